"""What :class:`~lp_callbacks.LayerFreezeCallback` freezes: how many blocks, which ones, and the modules frozen
whatever BI says (embeddings, LM head, final norm, named modules); the checks of its arguments, when it decides,
the events and the values it logs.

Example:
    >>> count_frozen("fraction_frozen", 0.5, num_layers=30)
    15
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lp_callbacks.architectures import DecoderStack, input_embeddings, output_embeddings
from lp_callbacks.events import DepthEvent
from lp_callbacks.selection import highest_scores, sample_layers
from lp_callbacks.validation import check_amount, check_bool, check_int, round_half_up

__all__ = [
    "check_fits_model",
    "check_freeze_arguments",
    "check_warmup",
    "count_frozen",
    "decision_due",
    "enable_input_require_grads",
    "fixed_params",
    "freeze_events",
    "freeze_metrics",
    "optimizer_state_bytes",
    "present_scores",
    "sample_frozen",
    "select_frozen",
    "training_sizes",
]


def check_scores(scores: Any) -> Tensor | None:
    """User scores as a 1-D float64 CPU tensor (``None`` stays ``None``); raises for anything else."""
    if scores is None:
        return None
    try:
        values = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"`scores` must be a 1-D list or tensor of numbers (one per decoder block), got {scores!r}."
        ) from None
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"`scores` must be 1-D with one number per decoder block, got shape {tuple(values.shape)}.")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"`scores` must be finite, got {values.tolist()}.")
    return values


#: How :class:`~lp_callbacks.LayerFreezeCallback` draws the trainable blocks when it resamples them (LISA).
SAMPLINGS: tuple[str, ...] = ("uniform", "low_bi")


def check_sources(sources: Mapping[str, bool], sampling: str | None) -> str | None:
    """The one source of block importance among ``sources`` (name: given?), or ``None`` for uniform sampling, which
    needs none; raises for any other combination, and for a ``sampling`` outside :data:`SAMPLINGS`."""
    given = [name for name, on in sources.items() if on]
    if sampling is not None and sampling not in SAMPLINGS:
        raise ValueError(f"`sampling` must be one of {list(SAMPLINGS)}, got {sampling!r}.")
    if sampling == "uniform":
        if given:
            raise ValueError(
                "`sampling='uniform'` draws the trainable blocks without looking at block importance: remove"
                f" {given}, or pass sampling='low_bi' to draw low-BI blocks more often."
            )
        return None
    if len(given) != 1:
        raise ValueError(
            "LayerFreezeCallback needs exactly one source of block importance: `scores=[...]` (one per block),"
            " `calibration_dataloader=...` (measured at fit start) or `warmup_steps >= 1` (measured by the"
            f" BlockInfluenceMonitor while training); got {given or 'none'}. Without one, sample the trainable"
            " blocks uniformly: `resample_every_n_steps=N` (LISA)."
        )
    return given[0]


class FreezeArguments(NamedTuple):
    """What :func:`check_freeze_arguments` derives from the arguments."""

    mode: str  #: which of ``num_trainable`` / ``fraction_trainable`` / ``num_frozen`` / ``fraction_frozen`` was given
    amount: int | float
    scores: Tensor | None
    source: str | None  #: the one importance source; ``None`` for uniform sampling
    sampling: str | None  #: ``None`` unless the trainable blocks are resampled


def check_freeze_arguments(
    amounts: Mapping[str, Any],
    *,
    scores: Any,
    warmup_steps: Any,
    calibration_dataloader: Any,
    calibration_batches: Any,
    reevaluate_every_n_steps: Any,
    resample_every_n_steps: Any,
    sampling: Any,
    seed: Any,
    flags: Mapping[str, Any],
    also_freeze: Any,
    prefix: Any,
) -> FreezeArguments:
    """Check every argument of :class:`~lp_callbacks.LayerFreezeCallback` that does not need the model; raise for
    the first bad one, naming it."""
    mode, amount = check_amount(amounts, "how many blocks to freeze")
    values = check_scores(scores)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_int("calibration_batches", calibration_batches, minimum=1, allow_none=True)
    check_int("reevaluate_every_n_steps", reevaluate_every_n_steps, minimum=1, allow_none=True)
    check_int("resample_every_n_steps", resample_every_n_steps, minimum=1, allow_none=True)
    check_int("seed", seed, minimum=0)
    if resample_every_n_steps is not None and reevaluate_every_n_steps is not None:
        raise ValueError(
            "`reevaluate_every_n_steps` (re-pick the highest-BI blocks) and `resample_every_n_steps` (draw the"
            f" trainable blocks at random) exclude each other; got {reevaluate_every_n_steps} and"
            f" {resample_every_n_steps}."
        )
    if resample_every_n_steps is None and sampling != "uniform":
        raise ValueError(f"`sampling={sampling!r}` needs `resample_every_n_steps` (how often to draw), got None.")
    for name, value in flags.items():
        check_bool(name, value)
    if isinstance(also_freeze, str) or not all(isinstance(n, str) and n for n in also_freeze):
        raise TypeError(f"`also_freeze` must be a list of dotted module names, got {also_freeze!r}.")
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"`prefix` must be a non-empty string, got {prefix!r}.")
    sampled = None if resample_every_n_steps is None else sampling
    sources = {"scores": values is not None, "calibration_dataloader": calibration_dataloader is not None,
               "warmup_steps": warmup_steps > 0}
    return FreezeArguments(mode, amount, values, check_sources(sources, sampled), sampled)


def decision_due(step: int, *, decided: bool, source: str | None, warmup_steps: int, last_step: int | None,
                 every: int | None) -> bool:
    """Whether a freezing decision is due after optimizer step ``step``: the end of the warm-up before the first
    choice (``decided`` is false), then every ``every`` steps after the ``last_step`` one (``None``: never again)."""
    if not decided:
        return source == "warmup_steps" and step >= warmup_steps
    return every is not None and step >= (last_step or 0) + every


def freeze_events(step: int, source: str, before: Iterable[int], after: Iterable[int], present: Sequence[int],
                  scores: Mapping[int, float]) -> list[DepthEvent]:
    """The :class:`DepthEvent` s of one decision that changed the frozen set from ``before`` to ``after`` (original
    numbering) among the ``present`` blocks: one ``"unfreeze"`` and one ``"freeze"`` event, each when not empty;
    ``scores`` by original block (empty: none)."""
    before, after = set(before), set(after)
    events = []
    for kind, blocks in (("unfreeze", sorted(before & set(present) - after)), ("freeze", sorted(after - before))):
        if blocks:
            events.append(DepthEvent(
                step=step, kind=kind, original_layers=blocks, scores=[scores[o] for o in blocks if scores],
                detail=f"{source}: {kind} {len(blocks)} of {len(present)} blocks",
            ))
    return events


def check_fits_model(scores: Tensor | None, frozen_blocks: Sequence[int] | None, present: Sequence[int],
                     removed: Sequence[int]) -> None:
    """Refuse ``scores`` that are not one per original block (the ``present`` and ``removed`` ones), and a restored
    frozen set naming blocks the model does not hold."""
    original_depth = len(present) + len(removed)
    if scores is not None and len(scores) != original_depth:
        raise ValueError(
            f"`scores` must hold one value per decoder block: the model has {original_depth} blocks, got"
            f" {len(scores)} scores."
        )
    if frozen_blocks is not None and not set(frozen_blocks) <= set(present):
        raise RuntimeError(
            f"LayerFreezeCallback: the checkpoint freezes (original) blocks {list(frozen_blocks)} but the model"
            f" holds blocks {list(present)}. Resume with the model the checkpoint was trained with."
        )


def present_scores(scores: Mapping[int, float], present: Sequence[int]) -> Tensor:
    """The ``scores`` (by original block) of the ``present`` blocks, in their order, as float64."""
    return torch.tensor([scores[o] for o in present], dtype=torch.float64)


def check_warmup(warmup_steps: int, max_steps: int | None) -> None:
    """Refuse a warm-up that a run of ``max_steps`` (``None`` or ``-1``: no limit) never ends."""
    if warmup_steps and max_steps is not None and max_steps > 0 and warmup_steps >= max_steps:
        raise ValueError(
            f"`warmup_steps` must be smaller than the Trainer's max_steps={max_steps} (the blocks are frozen"
            f" when the warm-up ends), got {warmup_steps}."
        )


def count_frozen(mode: str, amount: int | float, num_layers: int) -> int:
    """How many of ``num_layers`` blocks to freeze; raises when that is all of them or more than exist."""
    if mode == "num_frozen":
        frozen = int(amount)
    elif mode == "num_trainable":
        if amount > num_layers:
            raise ValueError(
                f"`num_trainable` must be in [1, {num_layers}] (the model has {num_layers} decoder blocks),"
                f" got {amount}."
            )
        frozen = num_layers - int(amount)
    elif mode == "fraction_frozen":
        frozen = round_half_up(amount, num_layers)
    else:
        frozen = num_layers - round_half_up(amount, num_layers)
    if frozen >= num_layers:
        raise ValueError(
            f"`{mode}={amount!r}` would freeze {frozen} of the model's {num_layers} decoder blocks: at least one block"
            f" must stay trainable (freeze at most {num_layers - 1})."
        )
    if frozen == 0:
        rank_zero_warn(f"LayerFreezeCallback: `{mode}={amount!r}` of {num_layers} decoder blocks freezes none of them.")
    return frozen


def resolve_protected(stack: DecoderStack, flags: Mapping[str, bool]) -> dict[str, list[nn.Module]]:
    """The modules frozen whatever BI says: embeddings, LM head and final norm, each when its flag is on."""
    out: dict[str, list[nn.Module]] = {}
    model = type(stack.root).__name__
    if flags["embeddings"]:
        out["embeddings"] = stack.embeddings()
        if not out["embeddings"]:
            raise ValueError(
                f"`freeze_embeddings=True` but {model}.get_input_embeddings() finds no input embedding."
                " Pass freeze_embeddings=False, or name the module in `also_freeze`."
            )
    if flags["lm_head"]:
        head = output_embeddings(stack.root)
        if head is None:
            raise ValueError(
                f"`freeze_lm_head=True` but {model}.get_output_embeddings() returned None: no LM head"
                " found. Pass freeze_lm_head=False, or name your head module in `also_freeze`."
            )
        out["lm_head"] = [head]
    if flags["final_norm"]:
        norms = stack.final_norms()
        if not norms:
            children = [name for name, _ in stack.owner.named_children()]
            raise ValueError(
                f"`freeze_final_norm=True` but {type(stack.owner).__name__} (the module that runs the decoder blocks)"
                f" has no child that looks like a final norm; its children are {children}. Pass"
                " freeze_final_norm=False, or name the module in `also_freeze`."
            )
        out["final_norm"] = [module for _, module in norms]
    return out


def fixed_params(stack: DecoderStack, pl_module: nn.Module, protect: Mapping[str, bool],
                 also_freeze: Sequence[str]) -> list[nn.Parameter]:
    """The parameters frozen whatever BI says: the ``protect`` ed modules and those named in ``also_freeze``, each
    shared one (tied weights) once."""
    protected = resolve_protected(stack, protect)
    modules = [m for ms in protected.values() for m in ms] + resolve_names(stack.root, pl_module, also_freeze)
    warn_if_tied(stack.root, protect)
    return list(dict.fromkeys(p for m in modules for p in m.parameters()))


def resolve_names(hf: nn.Module, pl_module: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """Modules named in ``also_freeze``, relative to the HF model (or else to the LightningModule)."""
    modules = []
    for name in names:
        module = None
        for root in (hf, pl_module):
            try:
                module = root.get_submodule(name)
                break
            except AttributeError:
                continue
        if module is None:
            known = [n for n, _ in hf.named_modules() if n]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {close}?" if close else f" Top-level modules: {[n for n, _ in hf.named_children()]}."
            raise ValueError(
                f"`also_freeze` names {name!r}, which is not a submodule of {type(hf).__name__} nor of"
                f" {type(pl_module).__name__}.{hint}"
            )
        modules.append(module)
    return modules


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor the optimizers keep as state (Adam moments, momentum buffers)."""
    total = 0
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    total += value.numel() * value.element_size()
    return total


def training_sizes(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """``trainable_params``, ``frozen_params`` of ``module`` and the ``optimizer_state_bytes`` of ``optimizers``."""
    params = list(module.parameters())
    return {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "frozen_params": sum(p.numel() for p in params if not p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(optimizers),
    }


def freeze_metrics(prefix: str, sizes: Mapping[str, int], num_layers: int, frozen: int) -> dict[str, float]:
    """The values :class:`~lp_callbacks.LayerFreezeCallback` logs: ``sizes`` and the frozen / trainable block counts."""
    metrics = {f"{prefix}/{k}": float(v) for k, v in sizes.items()}
    metrics[f"{prefix}/frozen_blocks"] = float(frozen)
    metrics[f"{prefix}/trainable_blocks"] = float(num_layers - frozen)
    return metrics


def select_frozen(scores: Tensor, count: int) -> list[int]:
    """The ``count`` blocks with the highest score (ties: lower index first); NaN counts as highest."""
    missing = torch.isnan(scores)
    if bool(missing.any()):
        rank_zero_warn(
            f"LayerFreezeCallback: no BI for blocks {missing.nonzero().flatten().tolist()}; they count as the most"
            " important (frozen first)."
        )
    return highest_scores(scores, count)


def sample_frozen(num_layers: int, count: int, seed: int, draw: int, scores: Tensor | None = None) -> list[int]:
    """LISA: the ``count`` blocks to freeze when the ``num_layers - count`` trainable ones are drawn at random,
    uniformly (``scores`` is ``None``) or with probability proportional to ``1 / BI`` (a block without BI counts as
    the most important one measured); ``(seed, draw)`` fixes the draw."""
    weights = None
    if scores is not None:
        bi = scores.detach().to(torch.float64).cpu()
        finite = bi[torch.isfinite(bi)]
        bi = torch.where(torch.isfinite(bi), bi, finite.max() if finite.numel() else torch.ones(()))
        weights = 1.0 / bi.clamp_min(1e-6)
    trainable = set(sample_layers(num_layers, num_layers - count, seed, draw, weights))
    return [i for i in range(num_layers) if i not in trainable]


def uses_checkpointing(model: nn.Module) -> bool:
    """Whether the HF model runs with gradient (activation) checkpointing."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new HF name first (no warning)
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def enable_input_require_grads(model: nn.Module) -> bool:
    """Reentrant gradient checkpointing with frozen embeddings needs an input that requires grad: turn on HF's
    ``enable_input_require_grads`` hook when ``model`` checkpoints; whether this call turned it on (``False`` when
    not needed, or when HF (>= 5) already installed it with checkpointing)."""
    if not uses_checkpointing(model) or getattr(model, "_require_grads_hook", None) is not None:
        return False
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
        return True
    return False


def warn_if_tied(hf: nn.Module, protect: Mapping[str, bool]) -> None:
    """Warn when only one of the tied input embedding and LM head is to be frozen: their one weight is frozen."""
    if protect["embeddings"] == protect["lm_head"]:
        return
    if getattr(input_embeddings(hf), "weight", 0) is getattr(output_embeddings(hf), "weight", 1):
        rank_zero_warn(
            "LayerFreezeCallback: the input embeddings and the LM head share one weight (tied); it is frozen"
            f" because freeze_embeddings={protect['embeddings']} / freeze_lm_head={protect['lm_head']}."
        )
