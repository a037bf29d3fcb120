"""Which parameters train: the one place that flips ``requires_grad`` for
:class:`~lp_callbacks.LayerFreezeCallback` and keeps the optimizers and the strategy's wrappers in line with it.

A :class:`ParamSwitch` is bound to one model and one set of optimizers (one fit). It freezes a set of blocks plus
fixed parameters (embeddings, LM head, final norm, named modules): frozen parameters get ``requires_grad=False``
and leave the optimizers' groups and state; a parameter that trains again returns to its own group, as configured,
with fresh state. The group layout is a pure function of the frozen set, so a checkpoint's optimizer state always
fits on resume.

Example:
    >>> switch = ParamSwitch(stack, fixed=head_params, optimizers=trainer.optimizers)  # doctest: +SKIP
    >>> switch.apply(trainer, blocks=[0, 1, 2])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from lp_callbacks.architectures import DecoderStack, input_embeddings
from lp_callbacks.distributed import schedulers_of, sync_strategy_with_model
from lp_callbacks.freezing import enable_input_require_grads
from lp_callbacks.surgery import drop_optimizer_params, follow_param_groups

__all__ = ["ParamSwitch"]


class ParamSwitch:
    """Freeze blocks of ``stack`` and ``fixed`` parameters, in the model, the optimizers and the strategy's wrapper.

    Args:
        stack: the decoder stack whose blocks are switched (positions as they are now).
        fixed: parameters frozen whatever the chosen blocks are.
        optimizers: the optimizers, with their param groups as configured (every parameter in).
        frozen_before: parameters an earlier switch froze (a second fit): they stay switchable.

    When the input embedding weight is among ``fixed`` (by flag, ``also_freeze`` or tied to a frozen LM head), the
    first apply calls :func:`~lp_callbacks.freezing.enable_input_require_grads` (reentrant checkpointing).
    """

    def __init__(
        self,
        stack: DecoderStack,
        fixed: Sequence[nn.Parameter],
        optimizers: Iterable[torch.optim.Optimizer],
        frozen_before: Mapping[int, nn.Parameter] | None = None,
    ) -> None:
        optimizers = list(optimizers)
        frozen_before = frozen_before or {}
        self.stack = stack
        self.block_params = [list(layer.parameters()) for layer in stack.layers]
        self.fixed = {id(p): p for p in fixed}
        candidates = list(fixed) + [p for params in self.block_params for p in params]
        self.managed = {id(p): p for p in candidates if p.requires_grad or id(p) in frozen_before}  # may switch
        self.frozen: dict[int, nn.Parameter] = {}
        self.layouts = [[list(group["params"]) for group in opt.param_groups] for opt in optimizers]  # as configured
        self.refresh_groups(optimizers)
        self._want_input_grads = id(getattr(input_embeddings(stack.root), "weight", None)) in self.fixed
        self._input_grads_enabled = False

    def apply(self, trainer: pl.Trainer, blocks: Sequence[int]) -> None:
        """Make exactly ``blocks`` (current positions) and the fixed parameters frozen: requires_grad, optimizers
        (the configured groups minus frozen parameters, in order; frozen state dropped), the DDP wrapper."""
        frozen = dict(self.fixed)
        for i in blocks:
            frozen.update({id(p): p for p in self.block_params[i]})
        changed = False
        for key, param in self.managed.items():
            trainable = key not in frozen
            changed |= param.requires_grad != trainable
            param.requires_grad_(trainable)
            if not trainable:
                param.grad = None
        self.frozen = {k: p for k, p in self.managed.items() if k in frozen}
        for optimizer, layout in zip(trainer.optimizers, self.layouts, strict=False):
            drop_optimizer_params(optimizer, frozen.values(), layout)
        if changed:
            sync_strategy_with_model(trainer)
        if self._want_input_grads and not self._input_grads_enabled:
            self._input_grads_enabled = enable_input_require_grads(self.stack.root)

    def refresh_groups(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Remember the optimizers' group objects, to follow them by identity through a removal. Call it again once
        a checkpoint's optimizer state has loaded: ``Optimizer.load_state_dict`` replaces every group dict."""
        self.groups = [list(opt.param_groups) for opt in optimizers]

    def restore_layouts(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Every group back to its configured parameters (frozen ones without state), e.g. for a removal: a group
        that loses its trainable parameters but keeps frozen ones is then not taken for an emptied one."""
        for optimizer, layout in zip(optimizers, self.layouts, strict=False):
            drop_optimizer_params(optimizer, [], layout)

    def follow_removals(self, trainer: pl.Trainer, alive: set[int]) -> None:
        """Blocks left the model: re-read them, forget every parameter whose id is not in ``alive``, in the layouts
        and the param groups too (a group whose parameters all went goes, with its scheduler entries)."""
        self.block_params = [list(layer.parameters()) for layer in self.stack.layers]
        self.managed = {k: p for k, p in self.managed.items() if k in alive}
        self.frozen = {k: p for k, p in self.frozen.items() if k in alive}
        self.fixed = {k: p for k, p in self.fixed.items() if k in alive}
        self.layouts = [
            follow_param_groups(optimizer, layout, groups, alive, schedulers_of(trainer, optimizer))
            for optimizer, layout, groups in zip(trainer.optimizers, self.layouts, self.groups, strict=False)
        ]
        self.refresh_groups(trainer.optimizers)

    def release(self) -> None:
        """Undo what the switch turned on in the model for training only (the input-grad hook); frozen stays frozen."""
        if self._input_grads_enabled:
            self.stack.root.disable_input_require_grads()
            self._input_grads_enabled = False
