"""Progress as plain lines, for runs whose output goes to a log file rather than a terminal.

A terminal progress bar redraws one line; written to a file it is either absent or a flood of carriage returns.
:class:`ProgressLog` prints one line every ``every_n_steps`` optimizer steps instead, with the step, the training loss,
the elapsed time and an estimate of the time left, and one line with the validation loss whenever it is computed::

    step 25/100 (25%)  train_loss 3.7446  elapsed 1m55s  ETA 5m45s
    step 25/100  val_loss 3.7169  val_ppl 41.14

The ``lp-callbacks`` CLI uses it in place of the progress bar when stdout is not a terminal.

Example:
    >>> trainer = Trainer(max_steps=1000, callbacks=[ProgressLog(every_n_steps=50)])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

from lp_callbacks.validation import check_int

__all__ = ["ProgressLog", "format_duration"]


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"5m07s"``, ``"2h03m"``.

    Example:
        >>> format_duration(42.4), format_duration(307), format_duration(7380)
        ('42s', '5m07s', '2h03m')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLog(ProgressBar):
    """A progress line every ``every_n_steps`` optimizer steps (step, loss, elapsed, ETA), and the validation loss.

    It takes the place of Lightning's progress bar (it is a :class:`~lightning.pytorch.callbacks.ProgressBar`), so
    ``enable_progress_bar`` must stay on. Only rank 0 prints.

    Args:
        every_n_steps: print after every this many optimizer steps (and after the last one); ``None`` takes the
            Trainer's ``log_every_n_steps``.
        clock: seconds from an arbitrary origin (``time.monotonic``); tests inject their own.
        stream: where the lines go (default ``sys.stdout`` at the time of printing).

    Raises:
        ValueError: when ``every_n_steps`` is not a positive int or ``None``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1, allow_none=True)
        self.clock = clock
        self.stream = stream
        self._enabled = True
        self._start: tuple[float, int] | None = None  # (clock, global_step) when training started
        self._total: int | None = None  # the optimizer steps the fit will reach, when known
        self._last_printed_step = -1

    # ----------------------------------------------------------------------------------- ProgressBar API

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    # ------------------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (self.clock(), trainer.global_step)
        self._total = self._total_steps(trainer)
        self._last_printed_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        every = self.every_n_steps or max(1, trainer.log_every_n_steps)
        total = self._total
        if step == self._last_printed_step or not (step % every == 0 or (total is not None and step >= total)):
            return  # no optimizer step in this batch (gradient accumulation), or not a printing step
        self._last_printed_step = step
        self.print(self.train_line(trainer, step, total))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        line = self.validation_line(trainer)
        if line is not None:
            self.print(line)

    # ------------------------------------------------------------------------------------------ lines

    def train_line(self, trainer: pl.Trainer, step: int, total: int | None) -> str:
        """``step 25/100 (25%)  train_loss 3.7446  elapsed 1m55s  ETA 5m45s``."""
        text = f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"
        metrics = _scalars(trainer.progress_bar_metrics, prefix="train")
        text += "".join(f"  {name} {value:.4f}" for name, value in metrics.items())
        if self._start is not None:
            start_time, start_step = self._start
            elapsed = self.clock() - start_time
            text += f"  elapsed {format_duration(elapsed)}"
            done = step - start_step
            if total is not None and done > 0:
                text += f"  ETA {format_duration(elapsed / done * max(0, total - step))}"
        return text

    def validation_line(self, trainer: pl.Trainer) -> str | None:
        """``step 25/100  val_loss 3.7169  val_ppl 41.14``, or ``None`` when no validation metric was logged."""
        metrics = _scalars(trainer.callback_metrics, prefix="val")
        if not metrics:
            return None
        total = self._total
        head = f"step {trainer.global_step}/{total}" if total else f"step {trainer.global_step}"
        return head + "".join(f"  {name} {value:.4f}" for name, value in metrics.items())

    @staticmethod
    def _total_steps(trainer: pl.Trainer) -> int | None:
        """Lightning's own count (``max_steps``, or the epochs' optimizer steps when ``max_epochs`` ends the run
        first, as an LR schedule reads it); ``None`` when unknown (-1 or infinite: an endless or streamed run)."""
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) and total > 0 else None


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite scalar metrics whose name starts with ``prefix``, sorted by name."""
    found: dict[str, float] = {}
    for name in sorted(metrics):
        if not name.startswith(prefix):
            continue
        try:
            value = float(metrics[name])
        except (TypeError, ValueError, RuntimeError):  # a tensor of several values
            continue
        if math.isfinite(value):
            found[name] = value
    return found
