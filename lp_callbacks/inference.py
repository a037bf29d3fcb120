"""Inference plumbing shared by the offline measurements (:mod:`lp_callbacks.measure`) and the evaluations
(:mod:`lp_callbacks.evaluation`): a model's device, eval mode without gradients, the forward's keyword arguments for
one batch, its logits, per-token NLL in fp32, and a progress bar for interactive terminals.

No Lightning here, and nothing that knows an architecture: each function takes a plain ``nn.Module``.

Example:
    >>> model = torch.nn.Linear(2, 2)
    >>> device_of(model)
    device(type='cpu')
    >>> with evaluating(model):
    ...     model.training, torch.is_grad_enabled()
    (False, False)
    >>> model.training
    True
    >>> batch = {"input_ids": torch.tensor([[0, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    >>> model_inputs(batch, device_of(model), position_ids=True)["position_ids"]  # left padding: 0 at the first real
    tensor([[1, 0, 1]])
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["device_of", "evaluating", "logits_of", "model_inputs", "no_autocast", "no_cache", "progress", "takes_position_ids",
           "token_nll"]


def device_of(model: nn.Module) -> torch.device:
    """Where ``model`` takes its inputs (HF's ``model.device``: its first parameter's device; CPU without any)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; afterwards (also on error) every module's own train/eval mode as it was, so a
    submodule kept in eval mode inside a training model stays so."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def progress(batches: Iterable, limit: int | None, desc: str) -> Iterable:
    """The first ``limit`` of ``batches`` (all for ``None``) under a tqdm bar on an interactive terminal (silent in
    logs and CI, like tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    try:
        total = min(len(batches), limit) if limit is not None else len(batches)  # type: ignore[arg-type]
    except TypeError:  # an iterable without len
        total = limit
    return tqdm(itertools.islice(batches, limit), total=total, desc=desc, leave=False, disable=None)


def model_inputs(batch: Mapping[str, Tensor], device: torch.device, position_ids: bool = False) -> dict[str, Tensor]:
    """The keyword arguments of a model's forward for one batch, on ``device``.

    Args:
        batch: a dict with ``input_ids`` ``(B, T)`` and optionally ``attention_mask`` and ``position_ids``.
        device: where the model lives.
        position_ids: whether the forward takes ``position_ids`` (:func:`takes_position_ids`). If so, they are the
            batch's own, or, with an ``attention_mask``, derived from it as HF generation does (the first real token
            of every row is at position 0), so left padding does not shift absolute (learned) position embeddings.

    Returns:
        ``input_ids``, and ``attention_mask`` and ``position_ids`` where available.

    Raises:
        TypeError: ``batch`` is not a dict with ``input_ids``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(f"each batch must be a dict with 'input_ids' (and optionally 'attention_mask'), got {found}.")
    inputs = {"input_ids": batch["input_ids"].to(device)}
    mask = batch.get("attention_mask")
    if mask is not None:
        inputs["attention_mask"] = mask = mask.to(device)
    if position_ids:
        if batch.get("position_ids") is not None:
            inputs["position_ids"] = batch["position_ids"].to(device)
        elif mask is not None:
            positions = mask.long().cumsum(-1) - 1  # (B, T)
            inputs["position_ids"] = positions.masked_fill_(mask == 0, 1)
    return inputs


def takes_position_ids(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``position_ids`` (:func:`_takes`)."""
    return _takes(model, "position_ids")


def no_cache(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` when ``model.forward`` takes it (:func:`_takes`), else ``{}``: a forward without a
    KV cache, for HF models and plain modules alike."""
    return {"use_cache": False} if _takes(model, "use_cache") else {}


def _takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` names a parameter ``name``, or passes ``**kwargs`` on to a wrapped model (PEFT's
    ``get_base_model()``, ``torch.compile``'s original module) whose forward does. A bare ``**kwargs`` does not
    count."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read (e.g. some C-implemented or scripted forwards)
        return False
    if name in parameters:
        return True
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    base = model
    if passes_on:
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else getattr(model, "_orig_mod", model)
    return base is not model and _takes(base, name)


def logits_of(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """``model(**inputs)``'s ``(B, T, vocab)`` logits (with ``use_cache=False`` where the forward takes it, as
    :func:`takes_position_ids` reads it): an HF output's ``.logits``, the first item of a tuple, or the tensor itself.

    Raises:
        TypeError: the model returned no 3-D logits tensor.
    """
    out = model(**inputs, **no_cache(model))
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError(
            "the model must return (batch, seq_len, vocab) logits (an HF causal LM output or a tensor), got"
            f" {type(out).__name__}."
        )
    return logits


def token_nll(rows: Tensor, targets: Tensor) -> Tensor:
    """``-log softmax(rows)[target]`` per row, ``(N, V), (N,) -> (N,)``, in fp32 (fp64 for fp64 rows)."""
    x = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
    return x.logsumexp(-1) - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s type: the fp32 math of the evaluations stays fp32 under a mixed-precision run."""
    return torch.autocast(device_type=device.type, enabled=False)
