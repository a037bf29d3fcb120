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

from lp_callbacks.architectures import DecoderStack
from lp_callbacks.recorder import BlockInfluenceRecorder
from lp_callbacks.validation import check_int

__all__ = ["DepthMeasurement", "block_influence", "calibration_pass", "measure_depth"]


@dataclass
class DepthMeasurement:
    """What one pass over calibration batches measured, in the model's current layer numbering."""

    block_influence: Tensor  # (L,) float64
    angular_distances: dict[int, Tensor] = field(default_factory=dict)  # n -> (L - n + 1,) float64
    tokens: int = 0
    skipped_tokens: int = 0


def _progress(batches: Iterable, limit: int | None, desc: str) -> Iterable:
    """The first ``limit`` of ``batches`` under a tqdm bar on an interactive terminal (silent in logs and CI, like
    tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    try:
        total = min(len(batches), limit) if limit is not None else len(batches)  # type: ignore[arg-type]
    except TypeError:  # an iterable without len
        total = limit
    return tqdm(itertools.islice(batches, limit), total=total, desc=desc, leave=False, disable=None)


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


def _runner(stack: DecoderStack) -> nn.Module:
    """The blocks' owner when it is an HF base model (it takes ``input_ids``), else the HF model (or custom model)."""
    from transformers import PreTrainedModel

    owner = stack.owner
    return owner if isinstance(owner, PreTrainedModel) or hasattr(owner, "embed_tokens") else stack.root


def calibration_pass(
    recorder: BlockInfluenceRecorder,
    batches: Iterable[Mapping[str, Tensor]],
    max_batches: int | None = None,
    desc: str = "Block Influence",
) -> None:
    """Run the recorder's model on ``batches`` (no grad, eval mode, no KV cache) with the recorder on: the one
    calibration loop, shared by :func:`measure_depth` and the callbacks (which read the recorder after it).

    Only the module that runs the blocks is called (``LlamaModel``, not ``LlamaForCausalLM``), so no LM head and no
    ``(B, T, vocab)`` logits are computed; ``position_ids`` are derived from the mask (see :func:`_model_inputs`).
    The model's train/eval mode is restored afterwards.
    """
    check_int("max_batches", max_batches, minimum=1, allow_none=True)
    model = recorder.stack.root
    runner = _runner(recorder.stack)
    device = next(model.parameters()).device
    position_ids = _takes_position_ids(runner)
    was_training = model.training
    model.eval()
    try:
        with recorder.recording(), torch.no_grad():
            for batch in _progress(batches, max_batches, desc):
                runner(**_model_inputs(batch, device, position_ids), use_cache=False)
    finally:
        model.train(was_training)


def measure_depth(
    model: nn.Module | DecoderStack,
    batches: Iterable[Mapping[str, Tensor]],
    max_batches: int | None = None,
    block_sizes: Iterable[int] = (),
    layers_path: str | None = None,
    max_tokens_per_batch: int | None = None,
) -> DepthMeasurement:
    """Run ``model`` on ``batches`` (no grad, eval mode, no KV cache) and measure every block.

    Args:
        model: an HF causal LM (or a module holding one, or its resolved
            :class:`~lp_callbacks.architectures.DecoderStack`).
        batches: dicts with ``input_ids`` ``(B, T)`` and optionally ``attention_mask`` and ``position_ids``
            ``(B, T)``. Without ``position_ids``, they are derived from the mask (first real token at 0).
        max_batches: stop after this many batches.
        block_sizes: also measure Gromov's angular distance over these numbers of contiguous blocks.
        layers_path: dotted path of the block list, for custom models.
        max_tokens_per_batch: token budget per batch (evenly spaced real tokens), ``None`` for all.

    Peak memory stays that of a plain inference forward: hooks reduce each block's output to a few scalars
    as the forward goes, and no list of hidden states is kept. Only the module that runs the blocks is called
    (``LlamaModel``, not ``LlamaForCausalLM``), so no LM head and no ``(B, T, vocab)`` logits are computed
    (:func:`calibration_pass`).

    Padding is excluded through ``attention_mask``, and positions are counted from each row's first real token,
    so right- and left-padded batches give the BI of the same sequences unpadded, for relative (RoPE, ALiBi) and
    absolute (learned, e.g. GPT-2) positions alike. ``position_ids`` in a batch are used as given (e.g. for
    packed sequences).
    """
    recorder = BlockInfluenceRecorder(model, layers_path, block_sizes, max_tokens_per_batch)
    try:
        calibration_pass(recorder, batches, max_batches)
        metric = recorder.bi_metric
        if not bool((metric.count > 0).any()):
            raise ValueError("`batches` produced no token to measure (empty iterable or all-padding masks).")
        return DepthMeasurement(
            block_influence=metric.compute().cpu(),
            angular_distances={n: m.compute().cpu() for n, m in recorder.angular_metrics.items()},
            tokens=int(metric.count.max()),
            skipped_tokens=int(metric.skipped.max()),
        )
    finally:
        recorder.detach()


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
