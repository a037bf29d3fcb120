"""Pure tensor math of depth redundancy. No Lightning, no hooks, no state.

Block Influence (ShortGPT, Men et al. 2024) of block i, with input ``x_i`` and output ``x_{i+1}``::

    BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)]        over real (non-padding) tokens t

Angular distance (Gromov et al. 2024) between the input of layer l and the output of layer l+n-1::

    d(x^l, x^{l+n}) = arccos(cos(x^l, x^{l+n})) / pi

Both are computed in fp32 (fp64 if given fp64) whatever the input dtype: norms and dot products reduce in fp32,
so the absolute error of a BI value is ~1e-7 (the smallest BI of real LLM blocks is ~1e-2). Accumulators are float64.

Tokens whose vectors are non-finite or zero are skipped and counted, so one overflow does not poison a run.

Example:
    >>> x = torch.randn(2, 5, 16)
    >>> float(bi_mean(x, x))  # a block that changes nothing
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "TokenStats",
    "angular_distance",
    "angular_distances_from_hidden_states",
    "angular_sums",
    "bi_from_hidden_states",
    "bi_mean",
    "bi_sums",
]


class TokenStats(NamedTuple):
    """Sufficient statistics of a per-token score: the mean is ``total / count``; they add across batches and ranks."""

    total: Tensor  # () float64: sum of the score over valid tokens
    count: Tensor  # () float64: number of valid tokens
    skipped: Tensor  # () float64: tokens inside the mask skipped because a vector was non-finite or zero


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_mask(x: Tensor, mask: Tensor | None) -> None:
    if mask is not None and mask.shape != x.shape[:-1]:
        raise ValueError(f"`mask` must have shape {tuple(x.shape[:-1])} (x without its last dim), got {tuple(mask.shape)}.")


def _cosines(first: Tensor, second: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token cosine ``(N,)`` in fp32 (fp64 for fp64 input), a ``(N,)`` bool of valid tokens, the skipped count.

    Three fused reductions (two norms, one dot product) and no (N, H) temporaries but the upcast of
    low-precision input: this runs on every block of every training step, so it must be cheap. Padding is
    masked out of the sums rather than gathered away, so nothing waits for the GPU (no data-dependent shapes).
    A token is valid when both vectors are finite and nonzero (a NaN or inf anywhere makes its norm non-finite).
    """
    if first.shape != second.shape:
        raise ValueError(f"inputs and outputs must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}.")
    _check_mask(first, mask)
    x, y = first.reshape(-1, first.shape[-1]), second.reshape(-1, second.shape[-1])  # (N, H)
    dtype = _compute_dtype(x)
    x, y = x.to(dtype), y.to(dtype)  # no copy for fp32; bf16/fp16 dot products must not round to 8 bits
    norm_x = torch.linalg.vector_norm(x, dim=-1)  # (N,)
    norm_y = torch.linalg.vector_norm(y, dim=-1)
    dot = torch.linalg.vecdot(x, y)
    finite = torch.isfinite(norm_x) & torch.isfinite(norm_y) & torch.isfinite(dot) & (norm_x > 0) & (norm_y > 0)
    real = torch.ones_like(finite) if mask is None else mask.reshape(-1).to(device=x.device, dtype=torch.bool)
    valid = finite & real
    tiny = torch.finfo(dtype).tiny
    cos = torch.where(valid, dot / norm_x.clamp_min(tiny) / norm_y.clamp_min(tiny), 1.0)
    return cos.clamp(-1.0, 1.0), valid, (real & ~finite).sum()


def _stats(per_token: Tensor, valid: Tensor, skipped: Tensor) -> TokenStats:
    total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum(dtype=torch.float64)
    return TokenStats(total, valid.sum(dtype=torch.float64), skipped.to(torch.float64))


def bi_sums(inputs: Tensor, outputs: Tensor, mask: Tensor | None = None) -> TokenStats:
    """Sum over valid tokens of ``1 - cos(input, output)``, the token count and the skipped count.

    Args:
        inputs: hidden state entering the block, ``(B, T, H)`` (any float dtype).
        outputs: hidden state leaving the block, same shape.
        mask: ``(B, T)`` attention mask (nonzero = real token) or ``None`` for all tokens.
    """
    cos, valid, skipped = _cosines(inputs, outputs, mask)
    return _stats(1.0 - cos, valid, skipped)


def angular_sums(first: Tensor, last: Tensor, mask: Tensor | None = None) -> TokenStats:
    """Sum over valid tokens of ``arccos(cos(first, last)) / pi``, the token count and the skipped count."""
    cos, valid, skipped = _cosines(first, last, mask)
    return _stats(torch.arccos(cos) / math.pi, valid, skipped)


def _mean(stats: TokenStats) -> Tensor:
    return stats.total / stats.count if stats.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


def bi_mean(inputs: Tensor, outputs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Block Influence ``1 - mean_t cos(inputs_t, outputs_t)`` over real tokens, as a float64 scalar.

    NaN when no token is valid.

    Example:
        >>> x = torch.randn(1, 4, 8)
        >>> bool(torch.isclose(bi_mean(x, -x), torch.tensor(2.0, dtype=torch.float64)))
        True
    """
    return _mean(bi_sums(inputs, outputs, mask))


def angular_distance(first: Tensor, last: Tensor, mask: Tensor | None = None) -> Tensor:
    """Gromov's angular distance ``mean_t arccos(cos(first_t, last_t)) / pi`` in [0, 1], as a float64 scalar."""
    return _mean(angular_sums(first, last, mask))


def _check_hidden_states(hidden_states: Sequence[Tensor]) -> None:
    if len(hidden_states) < 2:
        raise ValueError(f"`hidden_states` needs the input of the first block and at least one output, got {len(hidden_states)}.")


def bi_from_hidden_states(hidden_states: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """BI of every block from the L+1 residual-stream states ``[x_0 (input of block 0), ..., x_L]``: shape ``(L,)``.

    A reference implementation (it needs all states in memory); training code uses hooks instead.
    Mind that HF ``output_hidden_states`` applies the final norm to its last entry, so its last BI is not the
    last block's.
    """
    _check_hidden_states(hidden_states)
    return torch.stack([bi_mean(a, b, mask) for a, b in zip(hidden_states[:-1], hidden_states[1:])])


def angular_distances_from_hidden_states(
    hidden_states: Sequence[Tensor], block_size: int, mask: Tensor | None = None
) -> Tensor:
    """Angular distance between the input of block l and the output of block l+n-1 for every l: ``(L - n + 1,)``.

    The contiguous run of ``n = block_size`` blocks starting at ``argmin`` is the one to drop (Gromov et al.).
    """
    _check_hidden_states(hidden_states)
    num_layers = len(hidden_states) - 1
    if not isinstance(block_size, int) or not 1 <= block_size <= num_layers:
        raise ValueError(f"`block_size` must be an int in [1, {num_layers}], got {block_size!r}.")
    return torch.stack(
        [angular_distance(hidden_states[l], hidden_states[l + block_size], mask) for l in range(num_layers - block_size + 1)]
    )
