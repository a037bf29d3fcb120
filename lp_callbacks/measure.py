"""Offline measurement, outside any Trainer: Block Influence of every block over a few batches, and the damage
done by removing each block alone (:func:`block_ablation`; :func:`choose_by_ablation` picks blocks by it, one shot
or greedily as SLEB does).

Example:
    >>> from lp_callbacks import block_influence
    >>> bi = block_influence(model, [{"input_ids": ids, "attention_mask": mask}])  # doctest: +SKIP
    >>> bi.shape                                                                   # doctest: +SKIP
    torch.Size([30])
    >>> block_ablation(model, batches).kl                                          # doctest: +SKIP
    tensor([2.1e+00, 3.2e-02, ...], dtype=torch.float64)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lp_callbacks.architectures import DecoderStack, decoder_stack
from lp_callbacks.distillation import kl_per_position, next_token_targets
from lp_callbacks.inference import (
    device_of,
    evaluating,
    logits_of,
    model_inputs,
    no_autocast,
    no_cache,
    progress,
    takes_position_ids,
    token_nll,
)
from lp_callbacks.recorder import BlockInfluenceRecorder, _hidden_from_args
from lp_callbacks.selection import lowest_scores
from lp_callbacks.validation import check_int

__all__ = ["AblationMeasurement", "DepthMeasurement", "block_ablation", "block_influence", "calibration_pass",
           "choose_by_ablation", "measure_depth"]


@dataclass
class DepthMeasurement:
    """What one pass over calibration batches measured, in the model's current layer numbering."""

    block_influence: Tensor  # (L,) float64
    angular_distances: dict[int, Tensor] = field(default_factory=dict)  # n -> (L - n + 1,) float64
    tokens: int = 0
    skipped_tokens: int = 0


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
    ``(B, T, vocab)`` logits are computed; ``position_ids`` are derived from the mask (see
    :func:`~lp_callbacks.inference.model_inputs`). The model's train/eval mode is restored afterwards.
    """
    check_int("max_batches", max_batches, minimum=1, allow_none=True)
    model = recorder.stack.root
    runner = _runner(recorder.stack)
    device, position_ids, cache_off = device_of(model), takes_position_ids(runner), no_cache(runner)
    with evaluating(model), recorder.recording():
        for batch in progress(batches, max_batches, desc):
            runner(**model_inputs(batch, device, position_ids), **cache_off)


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


# ============================================================================================ block ablation
@dataclass
class AblationMeasurement:
    """What removing each block alone does to the next-token predictions of the model, in its current numbering.

    Entries of the blocks that were not ablated (``blocks`` left them out, or they are in ``skipped``) are NaN.
    """

    loss_increase: Tensor  # (L,) float64: mean next-token NLL without the block minus base_loss, nats
    kl: Tensor  # (L,) float64: mean KL(model as given || model without the block), nats
    top1_agreement: Tensor  # (L,) float64: fraction of positions where both argmaxes agree
    base_loss: float  # mean next-token NLL of the model as given
    tokens: int  # positions counted (over all batches)
    batches: int
    skipped: tuple[int, ...] = ()  # blocks also left out of every ablated pass (a greedy search's earlier picks)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (NaN as ``None``), e.g. for JSON."""

        def plain(values: Tensor) -> list[float | None]:
            return [v if math.isfinite(v) else None for v in values.tolist()]

        return {"loss_increase": plain(self.loss_increase), "kl": plain(self.kl),
                "top1_agreement": plain(self.top1_agreement), "base_loss": self.base_loss, "tokens": self.tokens,
                "batches": self.batches, "skipped": list(self.skipped)}


def _positions(name: str, values: Iterable[int], num_layers: int) -> list[int]:
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"`{name}` must be a list of block positions in [0, {num_layers - 1}], got {values!r}.") from None

    def valid(v: Any) -> bool:
        try:
            return not isinstance(v, bool) and 0 <= operator.index(v) < num_layers
        except TypeError:
            return False

    if not all(valid(v) for v in items) or len({operator.index(v) for v in items}) != len(items):
        raise ValueError(
            f"`{name}` must be unique block positions in [0, {num_layers - 1}] (the model has {num_layers} blocks),"
            f" got {items!r}."
        )
    return sorted(operator.index(v) for v in items)


def _skip_hook(index: int, off: set[int]) -> Any:
    """A forward hook that makes block ``index`` an identity (its input becomes its output) while it is in ``off``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if index not in off:
            return None
        hidden = _hidden_from_args(args, kwargs)
        if hidden is None:
            raise TypeError(f"block {index} got no hidden-states tensor (first positional or `hidden_states`) to pass on.")
        if isinstance(output, Tensor):
            return hidden
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (hidden, *output[1:])
        raise TypeError(f"block {index} returned {type(output).__name__}: cannot skip it (expected a tensor or a tuple).")

    return hook


def block_ablation(
    model: nn.Module | DecoderStack,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    max_batches: int | None = None,
    layers_path: str | None = None,
    blocks: Iterable[int] | None = None,
    skipped: Iterable[int] = (),
    chunk_size: int = 1024,
) -> AblationMeasurement:
    """Remove each block alone (temporarily) and measure the damage: LM-loss increase and KL to the model as given.

    A block is removed by a forward hook that hands its input on as its output (exactly what the model would
    compute with the block deleted by :func:`~lp_callbacks.surgery.drop_layers`, cache aside); nothing in the
    model changes: no parameter or buffer is written (no grad, eval mode), the hooks are removed and the train/eval
    mode is given back, also on error, so the model is bit-identical afterwards.

    Cost: per batch one forward of the model as given plus one per ablated block, i.e. ``L`` extra full forward
    passes (with the LM head) over a plain evaluation; the ablated block still computes (its output is discarded).
    The reference logits of one batch are kept while its ablated passes run.

    Positions, targets and padding follow :func:`~lp_callbacks.evaluation.teacher_agreement` (a position counts
    when its next token is real; ``labels`` when the batch has them); KL is
    :func:`~lp_callbacks.distillation.kl_per_position` in fp32 chunks; every mean is over all counted positions.

    Args:
        model: an HF causal LM (or a module holding one, or its :class:`~lp_callbacks.architectures.DecoderStack`);
            its forward must return logits.
        batches: dicts with ``input_ids`` and optionally ``attention_mask``, ``labels``, ``position_ids``.
        max_batches: at most this many batches (``None``: all).
        layers_path: dotted path of the block list, for custom models.
        blocks: the positions to ablate (default: all but ``skipped``).
        skipped: positions left out of every ablated pass (not of the reference one): the blocks a greedy search
            already chose, so that ``kl[i]`` is the damage of removing ``skipped`` and ``i`` together.
        chunk_size: counted positions converted to fp32 at a time (the numbers do not depend on it).

    Raises:
        ValueError: a position is out of range or repeated, ``blocks`` and ``skipped`` overlap, an ablation would
            leave no block, or no position counted.
    """
    check_int("max_batches", max_batches, minimum=1, allow_none=True)
    check_int("chunk_size", chunk_size, minimum=1)
    stack = decoder_stack(model, layers_path)
    num_layers = len(stack.layers)
    skipped = _positions("skipped", skipped, num_layers)
    blocks = [i for i in range(num_layers) if i not in skipped] if blocks is None else _positions("blocks", blocks, num_layers)
    if not blocks or set(blocks) & set(skipped):
        raise ValueError(f"`blocks` must name at least one block not in `skipped`, got blocks={blocks} and"
                         f" skipped={skipped}.")
    if len(skipped) + 1 >= num_layers:
        raise ValueError(f"ablating a block with `skipped`={skipped} would leave none of the model's {num_layers} blocks.")
    root = stack.root
    device, takes_positions = device_of(root), takes_position_ids(root)
    off: set[int] = set()  # the blocks the hooks skip in the current pass
    handles = [layer.register_forward_hook(_skip_hook(i, off), with_kwargs=True) for i, layer in enumerate(stack.layers)]
    sums = torch.zeros(num_layers + 1, 3, dtype=torch.float64, device=device)  # kl, nll, agree; last row: reference
    tokens = num_batches = 0
    try:
        with evaluating(root):
            for batch in progress(batches, max_batches, "block ablation"):
                inputs = model_inputs(batch, device, takes_positions)
                labels = batch.get("labels")
                labels = labels.to(device) if labels is not None else None
                mask, targets = next_token_targets(inputs["input_ids"], labels, inputs.get("attention_mask"))
                targets = targets.reshape(-1)
                chunks = mask.reshape(-1).nonzero().squeeze(-1).split(chunk_size)
                off.clear()
                reference = logits_of(root, inputs)
                reference = reference.reshape(-1, reference.shape[-1])
                for i in [*blocks, num_layers]:  # the ablated passes, then the reference's own loss
                    off.clear()
                    off.update(skipped, (i,))
                    logits = logits_of(root, inputs) if i < num_layers else reference
                    logits = logits.reshape(-1, logits.shape[-1])
                    with no_autocast(device):
                        for chunk in chunks:
                            rows, ref = logits.index_select(0, chunk), reference.index_select(0, chunk)
                            sums[i] += torch.stack([kl_per_position(rows, ref).sum().double(),
                                                    token_nll(rows, targets.index_select(0, chunk)).sum().double(),
                                                    (rows.argmax(-1) == ref.argmax(-1)).sum().double()])
                    del logits
                tokens += sum(int(chunk.numel()) for chunk in chunks)
                num_batches += 1
                del reference
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError(
            "`batches` produced no position to compare (empty iterable, an iterator already used up, or all-padding"
            " / all -100 labels)."
        )
    means = (sums / tokens).cpu()
    measured = torch.zeros(num_layers, dtype=torch.bool)
    measured[blocks] = True
    kl, nll, agree = (means[:num_layers, j].masked_fill(~measured, math.nan) for j in range(3))
    base_loss = float(means[num_layers, 1])
    return AblationMeasurement(loss_increase=nll - base_loss, kl=kl, top1_agreement=agree, base_loss=base_loss,
                               tokens=tokens, batches=num_batches, skipped=tuple(skipped))


def choose_by_ablation(
    model: nn.Module | DecoderStack,
    batches: Iterable[Mapping[str, Tensor]],
    k: int,
    protected: Collection[int] = (),
    *,
    greedy: bool = False,
    max_batches: int | None = None,
    layers_path: str | None = None,
) -> tuple[list[int], list[float], list[AblationMeasurement]]:
    """The ``k`` unprotected blocks whose removal damages the model least, by the KL of :func:`block_ablation`.

    One shot (``greedy=False``): one measurement, the ``k`` lowest KL. Greedy (SLEB): ``k`` rounds; each ablates
    the remaining candidates with the blocks already chosen left out too, and takes the one whose removal (with
    them) gives the lowest KL to the model as given. Costs ``1 + C`` forward passes per batch for one shot
    (``C`` unprotected blocks), about ``k`` times that greedy. The model is not changed (remove the blocks after).

    Returns:
        The chosen positions (sorted), the KL of each (greedy: the KL of the model without it and every block
        chosen before it), and the measurements made (one per round).

    Raises:
        ValueError: fewer than ``k`` unprotected blocks, or what :func:`block_ablation` refuses.
    """
    check_int("k", k, minimum=1)
    num_layers = len(decoder_stack(model, layers_path).layers)
    candidates = [i for i in range(num_layers) if i not in protected]
    if k > len(candidates) or k >= num_layers:
        raise ValueError(f"cannot remove {k} of {num_layers} blocks: {len(candidates)} are not protected"
                         f" (protected: {sorted(protected)}) and at least one must remain.")
    if not greedy:
        measurement = block_ablation(model, batches, max_batches=max_batches, layers_path=layers_path, blocks=candidates)
        chosen = lowest_scores(measurement.kl, k, protected)
        return chosen, [float(measurement.kl[i]) for i in chosen], [measurement]
    picks: dict[int, float] = {}
    measurements = []
    for _ in range(k):
        measurement = block_ablation(model, batches, max_batches=max_batches, layers_path=layers_path,
                                     blocks=[i for i in candidates if i not in picks], skipped=list(picks))
        (pick,) = lowest_scores(measurement.kl, 1, set(protected) | set(picks))
        picks[pick] = float(measurement.kl[pick])
        measurements.append(measurement)
    return sorted(picks), [picks[i] for i in sorted(picks)], measurements
