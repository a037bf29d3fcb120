"""Offline measurement, outside any Trainer: Block Influence of every block over a few batches.

Example:
    >>> from lp_callbacks import block_influence
    >>> bi = block_influence(model, [{"input_ids": ids, "attention_mask": mask}])  # doctest: +SKIP
    >>> bi.shape                                                                   # doctest: +SKIP
    torch.Size([30])
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lp_callbacks.architectures import get_layers_owner
from lp_callbacks.recorder import BlockInfluenceRecorder

__all__ = ["DepthMeasurement", "block_influence", "measure_depth"]


@dataclass
class DepthMeasurement:
    """What one pass over calibration batches measured, in the model's current layer numbering."""

    block_influence: Tensor  # (L,) float64
    angular_distances: dict[int, Tensor] = field(default_factory=dict)  # n -> (L - n + 1,) float64
    tokens: int = 0
    skipped_tokens: int = 0


def _check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}.")


def progress(batches: Iterable, total: int | None, desc: str) -> Iterable:
    """A tqdm bar over ``batches`` on an interactive terminal (silent in logs and CI, like tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    return tqdm(batches, total=total, desc=desc, leave=False, disable=None)


def _model_inputs(batch: Mapping[str, Tensor], device: torch.device, position_ids: bool = False) -> dict[str, Tensor]:
    """The keyword arguments of the runner's forward for one calibration batch, on ``device``.

    Args:
        batch: a dict with ``input_ids`` ``(B, T)`` and optionally ``attention_mask`` and ``position_ids``.
        device: where the model lives.
        position_ids: whether the runner's forward takes ``position_ids``. If so, they are the batch's own, or,
            with an ``attention_mask``, derived from it as HF generation does (the first real token of every row
            is at position 0), so left padding does not shift absolute (learned) position embeddings.

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
            positions = mask.long().cumsum(-1) - 1
            inputs["position_ids"] = positions.masked_fill_(mask == 0, 1)
    return inputs


def _takes_position_ids(runner: nn.Module) -> bool:
    """Whether ``runner.forward`` names a ``position_ids`` parameter (a bare ``**kwargs`` does not count)."""
    try:
        return "position_ids" in inspect.signature(runner.forward).parameters
    except (TypeError, ValueError):  # no signature to read (e.g. some C-implemented or scripted forwards)
        return False


def _runner(model: nn.Module, layers_path: str | None) -> nn.Module:
    """The blocks' owner when it is an HF base model (it takes ``input_ids``), else the whole model."""
    from transformers import PreTrainedModel

    owner = get_layers_owner(model, layers_path)
    return owner if isinstance(owner, PreTrainedModel) or hasattr(owner, "embed_tokens") else model


def measure_depth(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_batches: int | None = None,
    block_sizes: Iterable[int] = (),
    layers_path: str | None = None,
    max_tokens_per_batch: int | None = None,
) -> DepthMeasurement:
    """Run ``model`` on ``batches`` (no grad, eval mode, no KV cache) and measure every block.

    Args:
        model: an HF causal LM (or a module holding one).
        batches: dicts with ``input_ids`` ``(B, T)`` and optionally ``attention_mask`` and ``position_ids``
            ``(B, T)``. Without ``position_ids``, they are derived from the mask (first real token at 0).
        max_batches: stop after this many batches.
        block_sizes: also measure Gromov's angular distance over these numbers of contiguous blocks.
        layers_path: dotted path of the block list, for custom models.
        max_tokens_per_batch: token budget per batch (evenly spaced real tokens), ``None`` for all.

    Peak memory stays that of a plain inference forward: hooks reduce each block's output to a few scalars
    as the forward goes, and no list of hidden states is kept. Only the module that runs the blocks is called
    (``LlamaModel``, not ``LlamaForCausalLM``), so no LM head and no ``(B, T, vocab)`` logits are computed.

    Padding is excluded through ``attention_mask``, and positions are counted from each row's first real token,
    so right- and left-padded batches give the BI of the same sequences unpadded, for relative (RoPE, ALiBi) and
    absolute (learned, e.g. GPT-2) positions alike. ``position_ids`` in a batch are used as given (e.g. for
    packed sequences).
    """
    _check_max_batches(max_batches)
    recorder = BlockInfluenceRecorder(model, layers_path, block_sizes, max_tokens_per_batch)
    device = next(model.parameters()).device
    runner = _runner(model, layers_path)
    position_ids = _takes_position_ids(runner)
    was_training = model.training
    model.eval()
    try:
        with recorder.recording(), torch.no_grad():
            total = min(max_batches, len(batches)) if max_batches and hasattr(batches, "__len__") else max_batches  # type: ignore[arg-type]
            for batch in progress(itertools.islice(batches, max_batches), total, "Block Influence"):
                runner(**_model_inputs(batch, device, position_ids), use_cache=False)
        metric = recorder.block_influence
        if not bool((metric.count > 0).any()):
            raise ValueError("`batches` produced no token to measure (empty iterable or all-padding masks).")
        return DepthMeasurement(
            block_influence=metric.compute().cpu(),
            angular_distances={n: m.compute().cpu() for n, m in recorder.angular.items()},
            tokens=int(metric.count.max()),
            skipped_tokens=int(metric.skipped.max()),
        )
    finally:
        recorder.detach()
        model.train(was_training)


def block_influence(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    max_batches: int | None = None,
    layers_path: str | None = None,
) -> Tensor:
    """Block Influence of every decoder block of ``model`` over ``batches``: ``(num_layers,)`` float64 on CPU.

    See :func:`measure_depth` for the arguments.
    """
    return measure_depth(model, batches, max_batches, layers_path=layers_path).block_influence
