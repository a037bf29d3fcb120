"""Strategy plumbing shared by the callbacks that change which parameters exist or train.

Three set-ups are supported: one device, DDP (every flavour of ``DDPStrategy``), and FSDP2 through Lightning's
``ModelParallelStrategy`` with data parallelism only (``tensor_parallel_size=1``, ``fully_shard`` applied in the
user's ``configure_model``). After a callback removed or (un)froze parameters it calls
:func:`sync_strategy_with_model`: DDP is re-wrapped (it fixes at construction which parameters it all-reduces),
FSDP2's root forgets the block states it collected at its first forward (it would go on driving a removed block's
state in every backward).

Example:
    >>> check_strategy_supported(trainer, "LayerPruneCallback")  # doctest: +SKIP
    >>> sync_strategy_with_model(trainer)                        # doctest: +SKIP
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lp_callbacks.surgery import drop_optimizer_params

__all__ = [
    "REFUSED_STRATEGIES",
    "check_strategy_supported",
    "forget_parameters",
    "gather_full_model",
    "is_fsdp2",
    "rebuild_ddp",
    "refresh_fsdp2_root",
    "schedulers_of",
    "strategy_kind",
    "sync_strategy_with_model",
]

#: Strategies whose sharding a change of the set of blocks mid-run would corrupt (or that were never made to work).
REFUSED_STRATEGIES: tuple[str, ...] = ("FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy",
                                        "SingleDeviceXLAStrategy")  # XLA: never tried (no TPU), so refused whole

_SUPPORTED = (
    "Supported: a single device, DDP (strategy='ddp', 'ddp_find_unused_parameters_true', ...), and FSDP2"
    " through ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with `fully_shard` applied to each"
    " decoder block and then the model in `configure_model` (README, 'Scaling out')."
)

StrategyKind = Literal["local", "ddp", "fsdp2"]


def _class_names(strategy: Any) -> set[str]:
    return {cls.__name__ for cls in type(strategy).__mro__}


def strategy_kind(trainer: pl.Trainer) -> StrategyKind:
    """``"fsdp2"`` for ``ModelParallelStrategy``, ``"ddp"`` for any DDP strategy, else ``"local"``."""
    names = _class_names(trainer.strategy)
    if "ModelParallelStrategy" in names:
        return "fsdp2"
    return "ddp" if "DDPStrategy" in names else "local"


def check_strategy_supported(trainer: pl.Trainer, who: str, fsdp2: bool = True,
                             changes_architecture: bool = False) -> None:
    """Raise a ``ValueError`` naming the strategy when ``who`` cannot run under it, before any training step.

    Args:
        trainer: the Trainer being set up.
        who: the callback's name, for the message.
        fsdp2: whether ``who`` supports FSDP2 through ``ModelParallelStrategy`` (data parallel only).
        changes_architecture: ``who`` removes blocks: refused in spawned processes, whose results reach the main
            process as a state dict only.
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    if _class_names(strategy) & set(REFUSED_STRATEGIES):
        raise ValueError(
            f"{who} does not support the {name} strategy: it shards parameters and optimizer state in a way that"
            f" changing the set of blocks mid-run would corrupt. {_SUPPORTED}"
        )
    if changes_architecture and type(getattr(strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
        raise ValueError(
            f"{who} does not support {name} with start_method={getattr(strategy, '_start_method', 'spawn')!r}"
            " (ddp_spawn, ddp_fork, ddp_notebook): the main process gets back the trained weights only, loaded into"
            " its own full-depth model, not the pruned architecture. Use strategy='ddp'."
        )
    if strategy_kind(trainer) != "fsdp2":
        return
    if not fsdp2:
        raise ValueError(f"{who} does not support the {name} strategy (FSDP2) yet. Supported: a single device and DDP.")
    tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)  # resolved from "auto" in setup_environment
    if tensor_parallel != 1:
        raise ValueError(
            f"{who} supports {name} with data parallelism only (FSDP2): got tensor_parallel_size={tensor_parallel!r},"
            f" expected 1 (tensor-parallel blocks cannot be measured or removed whole). {_SUPPORTED}"
        )
    _fsdp2_internals()  # a torch whose FSDP2 internals moved is refused now, not at the first removal


def is_fsdp2(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules was sharded with ``fully_shard`` (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps FSDP2 under its first, private path
        from torch.distributed._composable.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def sync_strategy_with_model(trainer: pl.Trainer) -> None:
    """After parameters were removed or (un)frozen: re-wrap DDP, or refresh FSDP2's root; a no-op otherwise."""
    rebuild_ddp(trainer)
    if trainer.lightning_module is not None:
        refresh_fsdp2_root(trainer.lightning_module)


def forget_parameters(trainer: pl.Trainer, dead: Iterable[nn.Parameter]) -> None:
    """Parameters that left the model leave the optimizers (survivors keep their state; groups left empty go, with
    their LR scheduler entries) and the strategy's wrappers (:func:`sync_strategy_with_model`)."""
    dead = list(dead)
    for optimizer in trainer.optimizers:
        drop_optimizer_params(optimizer, dead, schedulers=schedulers_of(trainer, optimizer))
    sync_strategy_with_model(trainer)


def schedulers_of(trainer: pl.Trainer, optimizer: Any) -> list[Any]:
    """The Trainer's LR schedulers that step ``optimizer``."""
    return [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]


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


def _fsdp2_internals() -> tuple[Any, Any]:
    """``(get_state, StateContext)`` of this torch's FSDP2, or a ``RuntimeError`` saying they are not there."""
    import torch

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext, _get_module_fsdp_state
    except ImportError as error:  # pragma: no cover - depends on the torch release
        raise RuntimeError(
            f"lp_callbacks cannot re-initialise FSDP2 after a block removal with torch {torch.__version__} (its"
            f" internals moved: {error}); use DDP, or the torch version in lp_callbacks' requirements."
        ) from error
    return _get_module_fsdp_state, FSDPStateContext


def refresh_fsdp2_root(module: nn.Module) -> int:
    """Make FSDP2 collect its states anew at the next forward, after blocks left (or returned to) ``module``.

    ``fully_shard``'s root collects the state of every sharded submodule once, at its first forward, and drives
    them all in each backward: a removed block's state would stay in that list, referenced and post-processed every
    step (its shards themselves are freed by :func:`~lp_callbacks.surgery.drop_layers`, which moves removed blocks
    to the meta device). Resetting the lazy initialisation makes the next forward run it again over the blocks that
    exist, exactly as at the first step; the survivors' sharded parameters, and so the optimizer state keyed by
    them, are untouched. FSDP2 offers no public call for this (``reset_iter_state`` resets one iteration only), so
    this is the one place that touches its internals, checked at setup by :func:`check_strategy_supported`.

    Returns:
        How many FSDP2 states were reset (0 for a module without FSDP2: nothing happens, and FSDP2's internals are
        not looked for, so single-device and DDP runs work on any torch).
    """
    if not is_fsdp2(module):
        return 0
    get_state, state_context = _fsdp2_internals()
    states = {id(s): s for m in module.modules() if (s := get_state(m)) is not None}
    for state in states.values():
        state._is_root = None
        state._state_ctx = state_context()
    if states:
        gc.collect()
    return len(states)


def gather_full_model(model: nn.Module, is_global_zero: bool) -> nn.Module | None:
    """An unsharded copy of the FSDP2-sharded Hugging Face ``model`` on rank 0's CPU; ``None`` on the other ranks.

    A collective: every rank must call it. The weights come from ``get_model_state_dict`` (full, offloaded to CPU,
    kept on rank 0 only); the copy is built on the meta device and takes them as they are (``assign``), its tied
    weights are tied again and the buffers outside the state dict (rotary frequencies) are copied from ``model``,
    whose own buffers FSDP2 does not shard. ``model`` is not changed.

    Raises:
        ValueError: the gathered weights do not fit a plain model of ``model``'s class and config (PEFT adapters).
    """
    import copy

    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_global_zero:
        return None
    with torch.device("meta"):
        plain = type(model)(copy.deepcopy(model.config))
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if callable(getattr(plain, "tie_weights", None)):
        plain.tie_weights()
    buffers = dict(model.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(owner), leaf, buffers[name].detach().to("cpu", copy=True))
    still_meta = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if unexpected or still_meta:
        raise ValueError(
            f"cannot export the FSDP2-sharded {type(model).__name__} as a plain model: the gathered weights hold"
            f" {sorted(unexpected)[:5]} that it lacks, and it lacks {still_meta[:5]} (a PEFT model under FSDP2 is"
            " not supported: merge the adapters first, or train under DDP)."
        )
    return plain.eval()
