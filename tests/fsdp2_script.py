"""Run by tests/test_fsdp2.py: 2-process fits on CPU (gloo) under FSDP2 (ModelParallelStrategy) or DDP, one after
the other in the same two processes (see tests/ddp_script.py for how one launch serves several fits).

    python tests/fsdp2_script.py '[{"out": OUT_DIR, **SETTINGS}, ...]'

SETTINGS: strategy ("fsdp2" | "ddp"), callbacks ("monitor" | "prune" | "freeze" | "freeze_prune" | "sample"), max_steps, late_model (build the
model in configure_model), ckpt_path (resume), save_every (checkpoint every n steps), distributed_checkpoint,
mixed (bf16 parameters through FSDP2's MixedPrecisionPolicy), export_dir, scheduler (a per-step LambdaLR), precision (the Trainer's). Rank 0 writes OUT/result.pt: the full
state dict after the fit, what the callbacks hold, and the optimizer's state size.
"""

import gc
import json
import os
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from conftest import RandomTokens, TinyLM, tiny_model  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lp_callbacks import BlockInfluenceMonitor, DepthEfficiencyMonitor, LayerFreezeCallback, LayerPruneCallback  # noqa: E402


class ShardedLM(TinyLM):
    """The README's recipe: ``fully_shard`` each decoder block, then the model, in ``configure_model``."""

    def __init__(self, late_model: bool = False, mixed: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.late_model, self.mixed = late_model, mixed
        if late_model:  # built in configure_model: nothing exists before
            del self.model
            self.model = None

    def configure_model(self) -> None:
        if self.late_model and self.model is None:
            self.model = tiny_model(seed=0).train()
        if self.device_mesh is None:  # DDP: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.mixed else MixedPrecisionPolicy()
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self.model, mesh=mesh, mp_policy=policy)


def full_state(module: pl.LightningModule) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if module.device_mesh is None:
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardWatch(pl.Callback):
    """Weak references to each block's local shards at the start: which of them are still alive at the end."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.refs = {i: [weakref.ref(getattr(p, "_local_tensor", p)) for p in block.parameters()]
                     for i, block in enumerate(pl_module.model.model.layers)}

    def alive(self) -> dict[int, bool]:
        gc.collect()
        return {i: any(r() is not None for r in refs) for i, refs in self.refs.items()}


def main(settings: dict, out: Path) -> None:
    if settings["strategy"] == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=settings.get("distributed_checkpoint", True))
    else:
        strategy = "ddp"
    callbacks, kind = [], settings["callbacks"]
    monitor = BlockInfluenceMonitor(block_sizes=(1, 2))
    callbacks.append(monitor)
    if kind == "prune":
        callbacks.append(LayerPruneCallback(num_layers=2, at_steps=[2], export_dir=settings.get("export_dir")))
        callbacks.append(DepthEfficiencyMonitor())
        callbacks.append(ShardWatch())
    if kind in ("freeze", "freeze_prune"):  # blocks 0, 2, 4 frozen
        callbacks.append(LayerFreezeCallback(num_frozen=3, scores=[0.9, 0.1, 0.8, 0.2, 0.7, 0.3]))
    if kind == "sample":  # layer-wise sampling: 2 of the 6 blocks trainable, drawn again every 2 steps
        callbacks.append(LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, seed=1))
    if kind == "freeze_prune":  # original blocks 4 (frozen) and 5 (trainable) removed after step 2
        callbacks.append(LayerPruneCallback(num_layers=2, at_steps=[2], criterion="last", protect_last=0))
    if settings.get("save_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=settings["save_every"],
                                         save_top_k=-1, save_last=False))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=settings["max_steps"],
                         logger=False, callbacks=callbacks, enable_checkpointing=bool(settings.get("save_every")),
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         use_distributed_sampler=False, precision=settings.get("precision", "32-true"))
    module = ShardedLM(late_model=settings.get("late_model", False), mixed=settings.get("mixed", False),
                       lr=settings.get("lr", 1e-2), scheduler=settings.get("scheduler", False))
    initial = None if settings.get("late_model") else {k: v.clone() for k, v in module.model.state_dict().items()}
    # unshuffled shards (Lightning's own sampler would shuffle): rank r gets the samples r, r+2, ..., 2 per step
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the child; 0 in the parent
    data = RandomTokens(length=16)
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    trainer.fit(module, DataLoader(data, batch_size=2, sampler=sampler), ckpt_path=settings.get("ckpt_path"))
    state = full_state(module)
    optimizer = trainer.optimizers[0]
    result = {
        "state": state,
        "initial": initial,
        "bi": monitor.block_influence,
        "angular2": monitor.angular_distances(2),
        "tokens": monitor.tokens_seen,
        "num_layers": len(module.model.model.layers),
        "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
        "optimizer_state_numel": sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()),
        "scheduler_steps": [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs],
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "global_step": trainer.global_step,
        "trainable_numel": sum(p.numel() for p in module.parameters() if p.requires_grad),  # a DTensor's is global
    }
    for cb in trainer.callbacks:
        if isinstance(cb, LayerPruneCallback):
            result["removed"] = [r["original_layers"] for r in cb.removed]
            result["kept"] = cb.original_indices
        if isinstance(cb, LayerFreezeCallback):
            result["frozen"] = cb.frozen_blocks
            result["draws"] = [h["trainable_blocks"] for h in cb.history]
            result["frozen_names"] = sorted(n for n, p in module.model.named_parameters() if not p.requires_grad)
        if isinstance(cb, ShardWatch) and not settings.get("ckpt_path"):
            result["shards_alive"] = cb.alive()
        if isinstance(cb, DepthEfficiencyMonitor):
            result["depth_baseline"], result["depth_last"] = cb.baseline, cb.last_metrics
    if module.device_mesh is not None:  # what FSDP2's root drives each step (its lazily collected states)
        result["fsdp_states"] = len(module.model._get_fsdp_state()._state_ctx.all_states)
    if trainer.is_global_zero:
        torch.save(result, out / "result.pt")


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        print(f"rank {os.environ.get('LOCAL_RANK', 0)}: job {job}", file=sys.stderr, flush=True)
        out = Path(job.pop("out"))
        out.mkdir(parents=True, exist_ok=True)
        main({"strategy": "fsdp2", **job}, out)
    if torch.distributed.is_initialized():  # a clean exit: gloo threads abort the process otherwise
        torch.distributed.destroy_process_group()
