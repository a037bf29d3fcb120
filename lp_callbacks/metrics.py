"""torchmetrics wrappers: running per-layer sums of the scores in :mod:`lp_callbacks.functional`.

States are float64 tensors reduced with ``sum`` across DDP ranks, so the result over two ranks equals the result
over the union of their tokens, whatever the shard sizes.

Example:
    >>> metric = BlockInfluence(num_layers=2)
    >>> x = torch.randn(2, 3, 8)
    >>> metric.update(0, x, x)
    >>> metric.update(1, x, -x)
    >>> metric.compute()
    tensor([0., 2.], dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lp_callbacks.functional import TokenStats, angular_distance_stats, block_influence_stats

__all__ = ["AngularDistance", "BlockInfluence"]


class _PerPositionMean(Metric):
    """Mean of a per-token score at each of ``size`` positions (layers or layer blocks)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    total: Tensor
    count: Tensor
    skipped: Tensor

    def __init__(self, size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"the number of positions must be a positive int, got {size!r}.")
        self.size = size
        for name in ("total", "count", "skipped"):
            self.add_state(name, default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, position: int, stats: TokenStats) -> None:
        if not 0 <= position < self.size:
            raise IndexError(f"position must be in [0, {self.size - 1}], got {position}.")
        self.total[position] += stats.total.to(self.total.device)
        self.count[position] += stats.count.to(self.count.device)
        self.skipped[position] += stats.skipped.to(self.skipped.device)

    def compute(self) -> Tensor:
        """Per-position mean, NaN where no token was seen: ``(size,)`` float64."""
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), torch.full_like(self.total, float("nan")))

    def _apply(self, fn, *args, **kwargs):
        # Keep float64 sums even if the owner calls `.half()`/`.to(bfloat16)` on everything (Lightning precision
        # plugins do): low-precision accumulators would round small BI values away.
        out = super()._apply(fn, *args, **kwargs)
        for name in ("total", "count", "skipped"):
            value = getattr(self, name)
            if value.dtype != torch.float64:
                setattr(self, name, value.to(torch.float64))
        return out


class BlockInfluence(_PerPositionMean):
    """Block Influence of each of ``num_layers`` blocks accumulated over batches (and ranks).

    Args:
        num_layers: number of decoder blocks.
    """

    def __init__(self, num_layers: int, **kwargs) -> None:
        super().__init__(num_layers, **kwargs)

    def update(self, layer: int, inputs: Tensor, outputs: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        """Add the tokens of one forward of block ``layer`` (``inputs``/``outputs``: ``(B, T, H)`` or ``(N, H)``)."""
        self._add(layer, block_influence_stats(inputs, outputs, mask))


class AngularDistance(_PerPositionMean):
    """Angular distance between the input of block l and the output of block l+n-1, for each l.

    Args:
        num_layers: number of decoder blocks L.
        block_size: n, the number of contiguous blocks spanned; there are ``L - n + 1`` positions.
    """

    def __init__(self, num_layers: int, block_size: int, **kwargs) -> None:
        if not isinstance(block_size, int) or not isinstance(num_layers, int) or not 1 <= block_size <= num_layers:
            raise ValueError(f"`block_size` must be an int in [1, num_layers={num_layers}], got {block_size!r}.")
        super().__init__(num_layers - block_size + 1, **kwargs)
        self.block_size = block_size

    def update(self, first_layer: int, first_inputs: Tensor, last_outputs: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        """Add tokens for the block starting at ``first_layer``: its input and the output ``n - 1`` layers later."""
        self._add(first_layer, angular_distance_stats(first_inputs, last_outputs, mask))
