"""Frozen reference copies of the model being trained: a distillation teacher, an evaluation reference.

A copy is taken from the student (the HF model, or its PEFT wrapper), frozen, and kept outside the LightningModule;
it is saved as a plain ``state_dict`` and rebuilt on resume from the restored (possibly pruned) student, grown back
to full depth.

Example:
    >>> teacher = frozen_copy(student)                         # doctest: +SKIP
    >>> weights = teacher.state_dict()                         # saved with the callback's state
    >>> again = full_depth_copy(pruned_student, weights)       # after a resume  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lp_callbacks.surgery import removed_original_indices, restore_layers

__all__ = ["called_module", "fingerprint", "frozen_copy", "full_depth_copy"]

# The forward and backward hooks (the package's own and users' monitors); state-dict hooks stay: a model may need
# them to load the weights a full-depth copy is given.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _hookless_memo(model: nn.Module) -> dict[int, dict]:
    """A ``deepcopy`` memo mapping every hook dict of ``model``'s modules to a new empty one: the copy gets no hooks,
    and the objects that own them (a callback with its teacher, a monitor with its metrics) are not copied."""
    return {id(hooks): type(hooks)() for module in model.modules() for name in _HOOK_DICTS
            if (hooks := module.__dict__.get(name)) is not None}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy without autograd, in eval mode, and without the forward and backward hooks of ``model`` (a
    monitor's hooks on the student must not see the copy's forwards)."""
    return copy.deepcopy(model, _hookless_memo(model)).requires_grad_(False).eval()


def full_depth_copy(student: nn.Module, weights: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of ``student`` grown back to full depth (the blocks :func:`~lp_callbacks.drop_layers` removed
    in this process), in ``dtype``, holding ``weights`` (strictly: they must be a full-depth copy's)."""
    twin = frozen_copy(student)
    restore_layers(twin, removed_original_indices(twin))  # uninitialised blocks, filled by the weights below
    twin.to(dtype=dtype)
    twin.load_state_dict(weights, strict=True)
    return twin


def fingerprint(model: nn.Module) -> list[float]:
    """``[parameter count, sum, sum of squares]`` of the floating-point weights in float64: tells one model from
    another without keeping a copy."""
    count, total, squares = 0, 0, 0  # summed in the same order as ever (checkpoints hold the value), one copy at a time
    for p in model.state_dict().values():
        if torch.is_tensor(p) and p.is_floating_point():
            v = p.detach().double()
            count, total, squares = count + v.numel(), total + v.sum(), squares + (v * v).sum()
    return [float(count), float(total), float(squares)]


def called_module(root: nn.Module, module: nn.Module) -> nn.Module:
    """The module whose ``forward`` a training step calls for the HF model ``root`` inside ``module``: a PEFT
    wrapper around ``root`` (its inner calls go to ``forward`` directly, past the hooks of ``root``), else
    ``root``. What a copy is taken of, and what forward hooks go on."""
    for candidate in module.modules():
        if type(candidate).__name__.startswith("Peft") and any(m is root for m in candidate.modules()):
            return candidate
    return root
