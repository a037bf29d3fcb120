"""The one rule for "did the optimizer step in this batch": ``trainer.global_step`` moved during it.

Under gradient accumulation that is the last micro-batch of each optimizer step only, so a step-triggered action
fires exactly once per optimizer step.

Example:
    >>> steps = OptimizerStepTracker()
    >>> steps.batch_started(trainer)          # in on_train_batch_start  # doctest: +SKIP
    >>> if steps.stepped(trainer): ...        # in on_train_batch_end    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

__all__ = ["OptimizerStepTracker"]


class OptimizerStepTracker:
    """Remembers ``trainer.global_step`` at the start of a training batch and tells whether it moved by its end."""

    def __init__(self) -> None:
        self._step_at_batch_start: int | None = None

    def batch_started(self, trainer: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def stepped(self, trainer: Any) -> bool:
        """Whether the optimizer stepped since :meth:`batch_started` (``False`` before any batch started)."""
        return self._step_at_batch_start is not None and trainer.global_step > self._step_at_batch_start
