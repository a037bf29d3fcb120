"""Running per-layer sums of the scores in :mod:`lp_callbacks.functional`: torchmetrics wrappers for one step, and
their aggregation over steps (:class:`RunningMean`, :class:`BIHistory`) for the monitor.

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

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lp_callbacks.functional import TokenStats, angular_sums, bi_sums
from lp_callbacks.validation import check_int

__all__ = ["HISTORY_SIZE", "AngularDistance", "BIHistory", "BlockInfluence", "RunningMean"]

#: At most this many records in a :class:`BIHistory` (thinned to every other one when full).
HISTORY_SIZE = 200


def _mean(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` per position, NaN where nothing was counted (on the device: no host sync)."""
    return torch.where(count > 0, total / count.clamp_min(1e-300), torch.full_like(total, math.nan))


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
        check_int("num_layers", size, minimum=1)  # AngularDistance checked its block_size first
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
        return _mean(self.total, self.count)

    def _apply(self, fn, *args, **kwargs):
        # Keep float64 sums even under `.to(torch.bfloat16)` (torchmetrics guards `.half()`/`.float()`/`.type()` but
        # not `.to(dtype)`): low-precision accumulators would round small BI values away.
        out = super()._apply(fn, *args, **kwargs)
        for name in ("total", "count", "skipped"):
            setattr(self, name, getattr(self, name).to(torch.float64))
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
        self._add(layer, bi_sums(inputs, outputs, mask))


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
        self._add(first_layer, angular_sums(first_inputs, last_outputs, mask))


class RunningMean:
    """Per-position sums aggregated over measured steps: cumulative, exponential moving average, or a window.

    Sums and token counts are aggregated separately, so steps with more tokens weigh more, as they should.
    """

    def __init__(self, aggregation: str, ema_decay: float, window: int) -> None:
        self.aggregation, self.ema_decay, self.window = aggregation, ema_decay, window
        self.reset()

    def reset(self) -> None:
        self.total: Tensor | None = None
        self.count: Tensor | None = None
        self.recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=self.window)

    def add(self, total: Tensor, count: Tensor) -> None:
        total, count = total.detach().double(), count.detach().double()  # stays on device: no host sync per step
        if self.aggregation == "window":
            if self.recent and self.recent[0][0].device != total.device:  # restored from a checkpoint on the CPU
                self.recent = deque(((t.to(total.device), c.to(total.device)) for t, c in self.recent), maxlen=self.window)
            self.recent.append((total, count))
            self.total = torch.stack([t for t, _ in self.recent]).sum(0)
            self.count = torch.stack([c for _, c in self.recent]).sum(0)
        elif self.total is None or self.total.shape != total.shape:
            self.total, self.count = total.clone(), count.clone()
        else:
            decay = self.ema_decay if self.aggregation == "ema" else 1.0
            # .to(): a checkpoint restores these on the CPU
            self.total = decay * self.total.to(total.device) + total
            self.count = decay * self.count.to(count.device) + count

    def mean(self) -> Tensor | None:
        """Per-position mean, on the device (no host sync), NaN where nothing was measured."""
        return None if self.total is None or self.count is None else _mean(self.total, self.count)

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return {"total": cpu(self.total), "count": cpu(self.count), "recent": [(cpu(t), cpu(c)) for t, c in self.recent]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total, self.count = state.get("total"), state.get("count")
        self.recent = deque(state.get("recent", []), maxlen=self.window)


class BIHistory:
    """BI of every measured step, thinned to at most :data:`HISTORY_SIZE` evenly spaced records, oldest first.

    Values stay device tensors until read (:meth:`records`), so recording costs no host sync. When full, every
    other record goes and from then on every other measurement is kept: the spacing stays even whatever the run's
    length, and the picture as dense as it can be.
    """

    def __init__(self, records: list[dict[str, Any]] | None = None, stride: int = 1, count: int = 0) -> None:
        self._records, self.stride, self.count = list(records or []), stride, count

    def add(self, step: int, indices: Sequence[int], values: Tensor) -> None:
        if self.count % self.stride == 0:
            self._records.append({"step": step, "original_indices": list(indices), "block_influence": values})
            if len(self._records) > HISTORY_SIZE:
                self._records, self.stride = self._records[::2], 2 * self.stride
        self.count += 1

    def records(self) -> list[dict[str, Any]]:
        for record in self._records:
            if isinstance(record["block_influence"], Tensor):
                record["block_influence"] = record["block_influence"].tolist()
        return self._records
