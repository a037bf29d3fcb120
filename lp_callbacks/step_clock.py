"""Throughput of training: tokens and seconds per logged interval, without a GPU synchronisation per step.

Per training batch :class:`StepClock` keeps the batch's token count as it comes (a 0-d tensor stays on its device)
and counts optimizer steps; it reads its ``clock`` when an interval starts, around validation (whose time is left
out) and once when the interval is taken. Everything comes to the host in :meth:`StepClock.take`, on logging steps
only. No Lightning here: the caller passes the device and, under DDP, the sum across ranks.

Example:
    >>> clock = StepClock(clock=lambda: 0.0)
    >>> clock.batch_started(); clock.count(128); clock.optimizer_stepped(torch.device("cpu"))
    >>> clock.take(torch.device("cpu"))
    Interval(tokens=128, seconds=0.0, steps=1)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Interval", "StepClock"]


@dataclass(frozen=True)
class Interval:
    """What one logged interval trained: ``tokens`` (summed over ranks), ``seconds`` of the clock (validation left
    out) and optimizer ``steps``."""

    tokens: int
    seconds: float
    steps: int

    def rates(self) -> dict[str, float]:
        """``tokens_per_sec`` and ``step_time_sec``; empty when no step was taken or the clock did not move."""
        if self.steps <= 0 or self.seconds <= 0:
            return {}
        return {"tokens_per_sec": self.tokens / self.seconds, "step_time_sec": self.seconds / self.steps}


class StepClock:
    """Times intervals of optimizer steps and counts their tokens; keeps run totals (saved in checkpoints).

    Args:
        clock: ``() -> seconds``; only differences between two readings count (default :func:`time.perf_counter`).
        sync_cuda: ``torch.cuda.synchronize`` at every optimizer step (exact step timings, slower); off, the GPU is
            synchronised on :meth:`take` only.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync_cuda: bool = False) -> None:
        if not callable(clock):
            raise TypeError(f"`clock` must be callable (() -> seconds), got {type(clock).__name__}.")
        self.clock = clock
        self.sync_cuda = sync_cuda
        #: run totals over every taken interval: ``tokens``, ``time`` (seconds), ``steps``
        self.totals: dict[str, float] = {"tokens": 0, "time": 0.0, "steps": 0}
        self.reset()

    @property
    def steps(self) -> int:
        """Optimizer steps in the interval not taken yet."""
        return self._steps

    def reset(self, start: float | None = None) -> None:
        """Forget the interval in progress; the next one starts at ``start`` (``None``: at the next batch)."""
        self._start = start
        self._steps = 0
        self._tokens = 0
        self._token_tensors: list[Tensor] = []
        self._excluded = 0.0
        self._validation_start: float | None = None

    def batch_started(self) -> None:
        """A training batch starts: opens the interval when none is open (one clock reading)."""
        if self._start is None:
            self._start = self.clock()

    def count(self, tokens: int | Tensor) -> None:
        """Add a batch's tokens; a tensor on an accelerator is kept there until :meth:`take`."""
        if isinstance(tokens, Tensor) and tokens.device.type != "cpu":
            self._token_tensors.append(tokens)
        else:
            self._tokens += int(tokens)

    def optimizer_stepped(self, device: torch.device) -> None:
        """The optimizer stepped in this batch (synchronises the GPU first only with ``sync_cuda``)."""
        if self.sync_cuda and device.type == "cuda":
            torch.cuda.synchronize(device)
        self._steps += 1

    def validation_started(self) -> None:
        if self._start is not None:  # validation inside fit: its time is not training time
            self._validation_start = self.clock()

    def validation_ended(self) -> None:
        if self._validation_start is not None:
            self._excluded += self.clock() - self._validation_start
            self._validation_start = None

    def take(self, device: torch.device, reduce: Callable[[Tensor], Tensor] | None = None) -> Interval:
        """End the interval here (the one host transfer of the token count), add it to :attr:`totals`, start the next.

        Args:
            device: where the token tensors live; on CUDA the GPU is synchronised so that the interval ends where
                the GPU work ends.
            reduce: sums a 0-d tensor across ranks (``trainer.strategy.reduce``); ``None`` on one process.
        """
        total = torch.tensor(float(self._tokens), dtype=torch.float64, device=device)
        if self._token_tensors:
            total = total + torch.stack([t.to(torch.float64) for t in self._token_tensors]).sum()
        if reduce is not None:
            total = reduce(total)
        tokens = round(float(total))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = self.clock()
        seconds = (now - self._start - self._excluded) if self._start is not None else 0.0
        interval = Interval(tokens=tokens, seconds=seconds, steps=self._steps)
        self.reset(now)
        # tokens and steps count even when the clock did not move, so that the totals hold every token trained on
        self.totals["tokens"] += interval.tokens
        self.totals["time"] += max(interval.seconds, 0.0)
        self.totals["steps"] += interval.steps
        return interval
