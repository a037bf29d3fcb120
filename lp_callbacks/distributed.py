"""Strategy plumbing shared by the callbacks that change which parameters exist or train.

Example:
    >>> check_strategy_supported(trainer, "LayerPruneCallback")  # doctest: +SKIP
    >>> rebuild_ddp(trainer)                                     # doctest: +SKIP
"""

from __future__ import annotations

import gc

import lightning.pytorch as pl
from torch.nn.parallel import DistributedDataParallel

__all__ = ["UNSUPPORTED_STRATEGIES", "check_strategy_supported", "rebuild_ddp"]

#: Strategies that shard parameters or optimizer state: removing or freezing blocks mid-run would corrupt them.
UNSUPPORTED_STRATEGIES: tuple[str, ...] = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy", "XLAStrategy")


def check_strategy_supported(trainer: pl.Trainer, who: str) -> None:
    """Raise a ``ValueError`` naming the strategy when it shards parameters (FSDP, DeepSpeed, ...)."""
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    if names & set(UNSUPPORTED_STRATEGIES):
        raise ValueError(
            f"{who} does not support the {type(trainer.strategy).__name__} strategy: it shards parameters and optimizer"
            " state, which changing the set of blocks mid-run would corrupt. Supported: a single device and DDP"
            " (strategy='ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true', ...)."
        )


def rebuild_ddp(trainer: pl.Trainer) -> None:
    """Wrap the LightningModule in a fresh ``DistributedDataParallel`` after parameters were removed or (un)frozen.

    DDP fixes at construction which parameters it all-reduces: a removed or frozen one would never be marked ready
    ("Expected to have finished reduction" errors), an unfrozen one would silently diverge across ranks.
    ``DDPStrategy.configure_ddp`` is the strategy's own way of wrapping and keeps the user's DDP kwargs.
    A no-op without DDP.
    """
    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return
    configure_ddp = getattr(strategy, "configure_ddp", None)
    if not callable(configure_ddp):
        raise RuntimeError(f"cannot rewrap the model for {type(strategy).__name__}: it has no configure_ddp().")
    strategy.model = strategy.lightning_module
    configure_ddp()
    gc.collect()  # free the old wrapper's gradient buckets now
