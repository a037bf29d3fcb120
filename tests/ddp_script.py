"""2-process DDP runs on CPU (gloo): one launch runs several jobs one after the other in the same two processes.

    python tests/ddp_script.py '[{"job": "prune", "out": "/tmp/x/prune"}, ...]'

Lightning's launcher starts the second process at the first DDP fit; that process runs this script from the top with
the same job list, and every later Trainer finds both processes in place. Each job writes what each rank holds to
``OUT/rank{r}.pt``. Jobs (see each function): monitor, prune, distill, freeze, freeze_prune, sample. A job given
``"ddp": false`` runs in one process (launch it alone: it needs no second process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from conftest import RandomTokens, TinyLM, fast_trainer, loader  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lp_callbacks import (  # noqa: E402
    BlockInfluenceMonitor,
    DistillationCallback,
    LayerFreezeCallback,
    LayerPruneCallback,
    get_decoder_layers,
)

FREEZE_STEP = 2


def rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the child; 0 in the parent


def trainer(out: Path, callbacks: list, max_steps: int, **kwargs) -> pl.Trainer:
    return fast_trainer(out, callbacks=callbacks, max_steps=max_steps, **{"strategy": "ddp", "devices": 2, **kwargs})


def save(result: dict, out: Path, trainer: pl.Trainer) -> None:
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


def monitor(out: Path) -> None:
    """BI over 2 steps x 2 ranks x 4: the 16 samples once each, in whatever order Lightning's sampler deals them."""
    bi = BlockInfluenceMonitor(block_sizes=(1, 2))
    fit = trainer(out, [bi], max_steps=2, deterministic=False)
    fit.fit(TinyLM(lr=0.0), loader(length=16, batch_size=4))
    save({"bi": bi.block_influence, "angular2": bi.angular_distances(2), "tokens": bi.tokens_seen}, out, fit)


def prune(out: Path) -> None:
    """Pruning at step 2, then 2 more steps; each rank draws a *different* random choice (seed = rank): the callback
    must make every rank remove rank 0's."""
    pruner = LayerPruneCallback(num_layers=2, at_steps=[2], criterion="random", seed=rank())
    fit = trainer(out, [pruner], max_steps=4, deterministic=False)
    module = TinyLM(lr=1e-2)
    fit.fit(module, loader(length=32, batch_size=4))  # DistributedSampler: each rank its own shard
    save({"removed": [r["original_layers"] for r in pruner.removed], "num_layers": len(get_decoder_layers(module)),
          "state": {k: v.detach().clone() for k, v in module.state_dict().items()}, "steps": fit.global_step}, out, fit)


def distill(out: Path, ddp: bool = True) -> None:
    """KD with a removal at step 2: in one process (batches of 4) or under DDP (batches of 2 per rank, unshuffled
    shards: the same global batches)."""
    callbacks = [DistillationCallback(teacher="initial", alpha=0.5), LayerPruneCallback(num_layers=2, at_steps=[2])]
    kwargs = {} if ddp else {"strategy": "auto", "devices": 1}
    fit = trainer(out, callbacks, max_steps=4, use_distributed_sampler=False, **kwargs)
    module = TinyLM(lr=1e-3)
    data = RandomTokens(length=16, pad=False)
    sampler = DistributedSampler(data, num_replicas=2, rank=rank(), shuffle=False) if ddp else None
    fit.fit(module, DataLoader(data, batch_size=2 if ddp else 4, sampler=sampler))
    save({"teacher_fingerprint": callbacks[0]._fingerprint, "num_layers": len(get_decoder_layers(module)),
          "state": {k: v.detach().clone() for k, v in module.state_dict().items()}}, out, fit)


class SnapshotAtFreeze(pl.Callback):
    """Copies the frozen parameters right after the freeze (runs after LayerFreezeCallback in the same hook)."""

    def __init__(self) -> None:
        self.frozen: dict[str, torch.Tensor] = {}
        self.wrappers: list[torch.nn.Module] = []  # the objects, not id()s: a freed wrapper's id can be reused

    def on_train_start(self, trainer, pl_module) -> None:
        self.wrappers.append(trainer.strategy.model)

    def on_train_end(self, trainer, pl_module) -> None:
        self.wrappers.append(trainer.strategy.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == FREEZE_STEP and not self.frozen:
            self.frozen = {n: p.detach().clone() for n, p in pl_module.named_parameters() if not p.requires_grad}


def freeze(out: Path, prune: bool = False, sample: bool = False) -> None:
    """LayerFreezeCallback: freezes half the blocks at step 2 from BI measured on the warm-up steps, trains on to
    step 5. With ``prune``, a LayerPruneCallback also removes the last two blocks (original 4 and 5) after step 3,
    whatever they are. With ``sample``, the trainable blocks are drawn at random instead (LISA: 2 of 6, again every 2
    steps): no monitor, no warm-up."""
    module = TinyLM(optimizer="adamw", seed=0)
    if sample:
        freezer = LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, seed=5)
    else:
        freezer = LayerFreezeCallback(fraction_frozen=0.5, warmup_steps=FREEZE_STEP)
    snapshot = SnapshotAtFreeze()
    callbacks = [freezer, snapshot] if sample else [BlockInfluenceMonitor(), freezer, snapshot]
    if prune:
        callbacks.append(LayerPruneCallback(num_layers=2, at_steps=[3], criterion="last", protect_last=0))
    fit = trainer(out, callbacks, max_steps=5)
    fit.fit(module, loader(length=40, batch_size=4))
    optimizer = fit.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    save({
        "frozen_blocks": freezer.frozen_blocks,
        "history": freezer.history,
        "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "at_freeze": snapshot.frozen,
        "optimizer_params": sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"]),
        "optimizer_state_params": sorted(names[id(p)] for p in optimizer.state),
        "wrapper_rebuilt": snapshot.wrappers[0] is not snapshot.wrappers[-1],  # a new DistributedDataParallel after the freeze
        "global_step": fit.global_step,
        "num_layers": len(module.model.model.layers),
    }, out, fit)


JOBS = {"monitor": monitor, "prune": prune, "distill": distill, "freeze": freeze,
        "freeze_prune": lambda out: freeze(out, prune=True), "sample": lambda out: freeze(out, sample=True)}

if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on a small CPU
    for job in json.loads(sys.argv[1]):
        print(f"rank {rank()}: job {job}", file=sys.stderr, flush=True)  # names the job a failure came from
        name, out = job.pop("job"), Path(job.pop("out"))
        out.mkdir(parents=True, exist_ok=True)
        JOBS[name](out, **job)
    if torch.distributed.is_initialized():  # a clean exit: gloo threads abort the process otherwise
        torch.distributed.destroy_process_group()
