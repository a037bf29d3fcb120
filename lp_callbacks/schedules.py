"""When to act: validated schedules of pruning events, pure Python (no Lightning).

Example:
    >>> schedule = PruneSchedule.from_args(at_steps=None, at_epochs=None,
    ...                                    gradual=GradualSchedule(start_step=100, end_step=400, num_events=4))
    >>> schedule.steps
    (100, 200, 300, 400)
    >>> split_evenly(6, 4)
    [2, 2, 1, 1]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GradualSchedule", "PruneSchedule", "split_evenly", "unmeasured_events"]


def _int_list(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"`{name}` must be a non-empty list of ints >= {minimum}, got {values!r}.")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < minimum]
    if bad:
        raise ValueError(f"`{name}` must hold ints >= {minimum}, got {list(values)!r} (bad: {bad}).")
    if len(set(values)) != len(values):
        raise ValueError(f"`{name}` must not repeat a value, got {list(values)!r}.")
    return tuple(sorted(values))


@dataclass(frozen=True)
class GradualSchedule:
    """``num_events`` events evenly spaced from optimizer step ``start_step`` to ``end_step`` (both included)."""

    start_step: int
    end_step: int
    num_events: int

    def __post_init__(self) -> None:
        for name in ("start_step", "end_step", "num_events"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`gradual.{name}` must be a positive int, got {value!r}.")
        if self.num_events > 1 and self.end_step - self.start_step < self.num_events - 1:
            raise ValueError(
                f"`gradual` needs end_step - start_step >= num_events - 1 to place {self.num_events} distinct events,"
                f" got start_step={self.start_step}, end_step={self.end_step}."
            )
        if self.end_step < self.start_step:
            raise ValueError(f"`gradual.end_step` must be >= start_step={self.start_step}, got {self.end_step}.")

    def steps(self) -> tuple[int, ...]:
        if self.num_events == 1:
            return (self.end_step,)
        span = self.end_step - self.start_step
        return tuple(self.start_step + round(i * span / (self.num_events - 1)) for i in range(self.num_events))


@dataclass(frozen=True)
class PruneSchedule:
    """Exactly one of: optimizer steps, epoch ends, or a gradual schedule (which resolves to steps)."""

    steps: tuple[int, ...] = ()
    epochs: tuple[int, ...] = ()

    @classmethod
    def from_args(
        cls,
        at_steps: Sequence[int] | None,
        at_epochs: Sequence[int] | None,
        gradual: GradualSchedule | Mapping[str, Any] | None,
    ) -> PruneSchedule:
        given = [name for name, v in (("at_steps", at_steps), ("at_epochs", at_epochs), ("gradual", gradual)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of `at_steps` (optimizer steps), `at_epochs` (epoch ends) or `gradual`, got {given or 'none'}."
            )
        if at_steps is not None:
            return cls(steps=_int_list("at_steps", at_steps, 1))
        if at_epochs is not None:
            return cls(epochs=_int_list("at_epochs", at_epochs, 0))
        if isinstance(gradual, Mapping):
            unknown = set(gradual) - {"start_step", "end_step", "num_events"}
            if unknown:
                raise ValueError(f"`gradual` takes start_step, end_step, num_events; unknown keys {sorted(unknown)}.")
            gradual = GradualSchedule(**gradual)
        if not isinstance(gradual, GradualSchedule):
            raise ValueError(f"`gradual` must be a GradualSchedule or a dict of its fields, got {gradual!r}.")
        return cls(steps=gradual.steps())

    @property
    def num_events(self) -> int:
        return len(self.steps) + len(self.epochs)

    def event_ids(self) -> list[str]:
        """Stable names of the events, kept in checkpoints to know which already fired."""
        return [f"step:{s}" for s in self.steps] + [f"epoch:{e}" for e in self.epochs]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` events, the earlier events taking the remainder."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def unmeasured_events(steps: Sequence[int], every_n_steps: int) -> list[int]:
    """Event steps with no measured training step since the previous event (or the start).

    A training step is measured when ``global_step % every_n_steps == 0`` as it starts, so the event after optimizer
    step ``s`` has a measurement iff some ``t`` in ``[previous event, s - 1]`` is a multiple of ``every_n_steps``.

    Example:
        >>> unmeasured_events([2, 3, 9], every_n_steps=4)
        [3]
    """
    gaps, previous = [], 0
    for step in sorted(steps):
        first_measured = -(-previous // every_n_steps) * every_n_steps
        if first_measured >= step:
            gaps.append(step)
        previous = step
    return gaps
