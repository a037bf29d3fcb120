"""Two-process DDP run of LayerFreezeCallback on CPU (gloo); launched by tests/test_layer_freeze.py.

To run: python tests/ddp_freeze_script.py OUT_DIR [prune|sample]   (writes OUT_DIR/rank0.pt and OUT_DIR/rank1.pt)

Each rank trains on its own shard, freezes at step 2 from BI measured on the warm-up steps, trains on to step 5,
and saves what it holds: the frozen set, every weight, the frozen weights as they were at the freeze, and the
parameters its optimizer still holds. With ``prune``, a LayerPruneCallback also removes the last two blocks
(original 4 and 5) after step 3, whatever they are (frozen or not). With ``sample``, the trainable blocks are drawn
at random (LISA: 2 of 6, again every 2 steps) instead: no monitor, no warm-up.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from conftest import TinyLM, fast_trainer, loader  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor  # noqa: E402
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback  # noqa: E402

FREEZE_STEP = 2


class SnapshotAtFreeze(Callback):
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


def main(out_dir: str, prune: bool = False, sample: bool = False) -> None:
    torch.set_num_threads(1)
    module = TinyLM(optimizer="adamw", seed=0)
    if sample:
        freeze = LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, seed=5)
    else:
        freeze = LayerFreezeCallback(fraction_frozen=0.5, warmup_steps=FREEZE_STEP)
    snapshot = SnapshotAtFreeze()
    callbacks = [freeze, snapshot] if sample else [BlockInfluenceMonitor(), freeze, snapshot]
    if prune:
        from lp_callbacks import LayerPruneCallback

        callbacks.append(LayerPruneCallback(num_layers=2, at_steps=[3], criterion="last", protect_last=0))
    trainer = fast_trainer(out_dir, callbacks=callbacks, max_steps=5,
                           strategy="ddp", devices=2, accelerator="cpu")
    trainer.fit(module, loader(length=40, batch_size=4))
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    torch.save(
        {
            "frozen_blocks": freeze.frozen_blocks,
            "record": freeze.record,
            "history": freeze.history,
            "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
            "at_freeze": snapshot.frozen,
            "optimizer_params": sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"]),
            "optimizer_state_params": sorted(names[id(p)] for p in optimizer.state),
            "wrapper_rebuilt": snapshot.wrappers[0] is not snapshot.wrappers[-1],  # a new DistributedDataParallel after the freeze
            "global_step": trainer.global_step,
            "num_layers": len(module.model.model.layers),
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], prune=sys.argv[2:] == ["prune"], sample=sys.argv[2:] == ["sample"])
    if torch.distributed.is_initialized():  # a clean exit: gloo threads abort the process otherwise
        torch.distributed.destroy_process_group()
