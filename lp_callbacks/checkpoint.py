"""Pruned Lightning checkpoints: the removals they record, and that architecture rebuilt on a full-depth model.

A checkpoint of a run with :class:`~lp_callbacks.LayerPruneCallback` holds the weights of the *pruned* model, so a
freshly built (full-depth) module cannot load it strictly. Every removal is recorded in the callback's state, in
original block numbering; :func:`restore_pruned_architecture` removes the same blocks from a fresh model, after which
the checkpoint's ``state_dict`` fits exactly. The callback does it by itself in every stage (``fit`` resume,
``validate``, ``test``, ``predict`` with ``ckpt_path``); for ``LightningModule.load_from_checkpoint`` (no Trainer)
call it from the module's ``on_load_checkpoint`` hook, which Lightning runs before the weights load:

Example:
    >>> class MyModule(pl.LightningModule):  # doctest: +SKIP
    ...     def on_load_checkpoint(self, checkpoint):
    ...         restore_pruned_architecture(self, checkpoint)
    >>> module = MyModule.load_from_checkpoint("last.ckpt")  # doctest: +SKIP
    >>> load_pruned_checkpoint(MyModule(), "last.ckpt")  # or load into a module you built  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lp_callbacks.architectures import decoder_stack
from lp_callbacks.distributed import forget_parameters
from lp_callbacks.surgery import Model, drop_layers, original_indices, removed_original_indices, restore_layers

__all__ = [
    "before_weights_load",
    "load_checkpoint",
    "load_pruned_checkpoint",
    "own_prune_state",
    "prune_states",
    "removal_records",
    "restore_pruned_architecture",
]

#: State keys of LayerPruneCallback in a checkpoint's ``callbacks`` start with the class name.
PRUNE_STATE_PREFIX = "LayerPruneCallback"


#: The file of a distributed checkpoint folder (``ModelParallelStrategy``) that holds everything but the tensors.
DISTRIBUTED_METADATA_FILE = "meta.pt"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint file at ``path``, memory-mapped (weights stay on disk); for a distributed checkpoint folder
    (FSDP2's default) its metadata only: callbacks' states, loops, no ``state_dict``; ``None`` for another folder.
    A URL (``s3://``, ``gs://``, ``memory://``...) is read through fsspec, as Lightning reads it."""
    if _is_url(path):
        return _load_url(str(path))
    path = Path(path)
    if path.is_dir():
        metadata = path / DISTRIBUTED_METADATA_FILE
        return torch.load(metadata, map_location="cpu", weights_only=False) if metadata.is_file() else None
    if not path.is_file():
        raise FileNotFoundError(f"`ckpt_path` {str(path)!r} does not exist.")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _is_url(path: Any) -> bool:
    return isinstance(path, str) and "://" in path


def _load_url(url: str) -> dict[str, Any] | None:
    from lightning.fabric.utilities.cloud_io import get_filesystem

    fs = get_filesystem(url)
    if fs.isdir(url):
        url = f"{url.rstrip('/')}/{DISTRIBUTED_METADATA_FILE}"
        if not fs.isfile(url):
            return None
    elif not fs.isfile(url):
        raise FileNotFoundError(f"`ckpt_path` {url!r} does not exist.")
    with fs.open(url, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=False)


def prune_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``state_key -> state`` of every LayerPruneCallback saved in ``checkpoint``."""
    return {key: state for key, state in checkpoint.get("callbacks", {}).items() if key.startswith(PRUNE_STATE_PREFIX)}


def own_prune_state(
    checkpoint: Mapping[str, Any], state_key: str, trainer_keys: Sequence[str]
) -> dict[str, Any] | None:
    """The state of the LayerPruneCallback with ``state_key`` among the Trainer's (``trainer_keys``): saved under its
    key, or the one state left over when its arguments (so its key) were edited since; ``None`` when there is none.

    Raises:
        ValueError: states match none of the Trainer's pruners and cannot be told apart.
    """
    states = prune_states(checkpoint)
    if state_key in states:
        return states[state_key]
    orphans = {k: v for k, v in states.items() if k not in trainer_keys}
    unmatched = [k for k in trainer_keys if k not in states]
    if len(orphans) == 1 and len(unmatched) == 1:  # arguments edited since the checkpoint: same callback
        return next(iter(orphans.values()))
    if orphans:
        raise ValueError(
            f"LayerPruneCallback: the checkpoint holds pruning state under {sorted(orphans)}, which matches none"
            f" of this Trainer's LayerPruneCallbacks {sorted(trainer_keys)}. With several pruners, resume with the"
            " arguments they were saved with."
        )
    return None


def removal_records(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every removal the checkpoint records (all LayerPruneCallbacks of the run), oldest first."""
    records = [record for state in prune_states(checkpoint).values() for record in state.get("removed", [])]
    return sorted(records, key=lambda r: r["step"])


def _original_num_layers(checkpoint: Mapping[str, Any]) -> int | None:
    counts = {state.get("original_num_layers") for state in prune_states(checkpoint).values()} - {None}
    return counts.pop() if len(counts) == 1 else None


def restore_pruned_architecture(
    module: Model, checkpoint: Mapping[str, Any] | str | os.PathLike, layers_path: str | None = None
) -> list[int]:
    """Remove from ``module`` the blocks that ``checkpoint`` records as removed, so that its weights load strictly.

    Idempotent: removals already applied (by another call, or another callback) are skipped. A checkpoint written
    before some removal of this very model (``validate(ckpt_path="best")`` after pruning) grows it back: the blocks
    removed in this process return (their weights come from the checkpoint). A checkpoint without
    LayerPruneCallback state leaves the module unchanged.

    Args:
        module: the LightningModule (or HF model) built at full depth, as at the start of the pruned run.
        checkpoint: the loaded checkpoint dict (as ``on_load_checkpoint`` receives it) or its path.
        layers_path: dotted path of the block list when the module holds several models (see ``find_hf_model``).

    Returns:
        The original indices of the blocks the module now holds.

    Raises:
        ValueError: the module lacks blocks that the checkpoint holds and that it cannot grow back (another model,
            or one pruned in another process: load it into a freshly built module).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(checkpoint) or {}
    stack = decoder_stack(module, layers_path)
    total = _original_num_layers(checkpoint)
    if total is None:  # not a checkpoint of a run with LayerPruneCallback
        return original_indices(stack)
    removed = {o for record in removal_records(checkpoint) for o in record["original_layers"]}
    target = [i for i in range(total) if i not in removed]
    present = original_indices(stack)
    stash = set(removed_original_indices(stack))
    if not set(present) <= set(range(total)) or not set(target) <= set(present) | stash:
        raise ValueError(
            f"the checkpoint holds the weights of original blocks {target} (of {total}), but the model holds blocks"
            f" {present}: it is another model, or was pruned before it came here. Load the checkpoint into a"
            " freshly built, full-depth module, e.g. `lp_callbacks.load_pruned_checkpoint(MyModule(...), ckpt_path)`."
        )
    restore_layers(stack, target)  # a checkpoint from before a removal of this model: grow back
    present = original_indices(stack)
    drop_layers(stack, [i for i, o in enumerate(present) if o not in target])
    return original_indices(stack)


_BEFORE_LOAD = "_lp_before_checkpoint_load"  # on the strategy: the functions to run before it loads a checkpoint


def before_weights_load(
    trainer: Any, pl_module: nn.Module, on_checkpoint: Callable[[nn.Module, dict[str, Any]], Any], late: bool = False
) -> _BeforeLoad:
    """Run ``on_checkpoint(pl_module, checkpoint)`` just before the Trainer's strategy loads a local checkpoint
    (``fit``/``validate``/... with ``ckpt_path``); nothing runs without one. Returns a handle to ``remove()``.

    Every strategy loads through ``strategy.load_checkpoint(path)``, after ``setup`` and ``configure_model``: a
    single device and DDP before the optimizers exist, ``ModelParallelStrategy`` (FSDP2) after the model was sharded
    and the optimizers built, reading the module's ``state_dict`` as the template of a distributed checkpoint
    folder, or the module's parameter names for a full-state-dict file. Lightning has no callback hook at that
    point, so the strategy's ``load_checkpoint`` is wrapped on this Trainer's strategy object for the duration of
    the handle (the class is untouched); several callbacks share one wrapper, in the order they registered, those
    registered with ``late=True`` (which read the architecture the others rebuild) after the others.

    Example:
        >>> handle = before_weights_load(trainer, module, restore_pruned_architecture)  # doctest: +SKIP
    """
    strategy = trainer.strategy
    pending = strategy.__dict__.get(_BEFORE_LOAD)
    if pending is None:
        pending = strategy.__dict__[_BEFORE_LOAD] = []
        load = strategy.load_checkpoint

        def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            checkpoint = _checkpoint_to_load(checkpoint_path) if pending else None
            if checkpoint is not None:
                for _, fn in sorted(pending, key=lambda entry: entry[0]):  # stable: registration order within each
                    fn(checkpoint)
            return load(checkpoint_path, *args, **kwargs)

        strategy.load_checkpoint = load_checkpoint

    def run(checkpoint: dict[str, Any]) -> None:
        before = list(pl_module.parameters())
        on_checkpoint(pl_module, checkpoint)
        alive = {id(p) for p in pl_module.parameters()}
        dead = [p for p in before if id(p) not in alive]
        if dead:  # FSDP2 loads after the optimizers and the monitors were set up on the full model
            forget_parameters(trainer, dead)
            for callback in trainer.callbacks:
                if getattr(callback, "recorder", None) is not None and callable(getattr(callback, "layers_removed", None)):
                    callback.layers_removed([])  # a BlockInfluenceMonitor re-hooks the blocks that exist

    handle = _BeforeLoad(strategy, (late, run))
    pending.append(handle.entry)
    return handle


def _checkpoint_to_load(path: Any) -> dict[str, Any] | None:
    """The checkpoint Lightning is about to load, or ``None`` when there is none to read (Lightning then says so)."""
    if not path:
        return None
    try:
        return load_checkpoint(path)  # a local path or a URL: one existence check, in load_checkpoint
    except FileNotFoundError:
        return None


class _BeforeLoad:
    """The handle of :func:`before_weights_load`: ``remove()`` unregisters (the last one unwraps the strategy)."""

    def __init__(self, strategy: Any, entry: tuple[bool, Callable[[dict[str, Any]], Any]]) -> None:
        self.strategy, self.entry = strategy, entry

    def remove(self) -> None:
        pending = self.strategy.__dict__.get(_BEFORE_LOAD)
        if pending is None or self.entry not in pending:
            return
        pending.remove(self.entry)
        if not pending:
            del self.strategy.__dict__[_BEFORE_LOAD]
            del self.strategy.__dict__["load_checkpoint"]  # back to the class's method


def load_pruned_checkpoint(
    module: nn.Module, ckpt_path: str | os.PathLike, layers_path: str | None = None, strict: bool = True
) -> nn.Module:
    """Load a (possibly pruned) Lightning checkpoint into a freshly built, full-depth ``module``; returns it.

    Example:
        >>> module = load_pruned_checkpoint(MyModule(), "lightning_logs/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
    """
    checkpoint = load_checkpoint(ckpt_path)
    if checkpoint is None or "state_dict" not in checkpoint:
        raise ValueError(f"`ckpt_path` {str(ckpt_path)!r} is a sharded checkpoint folder; load it with its strategy.")
    restore_pruned_architecture(module, checkpoint, layers_path)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module
