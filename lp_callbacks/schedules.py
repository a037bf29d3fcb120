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

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from lp_callbacks.validation import check_int, round_half_up

__all__ = ["GradualSchedule", "PruneSchedule", "plan_removals", "split_evenly", "unmeasured_events"]


def _int_list(name: str, values: int | Sequence[int], minimum: int) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]  # `at_steps=3` means one event, after step 3
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
            check_int(f"gradual.{name}", getattr(self, name), minimum=1)
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
        at_steps: int | Sequence[int] | None,
        at_epochs: int | Sequence[int] | None,
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

    def event_ids(self) -> list[str]:
        """Stable names of the events, kept in checkpoints to know which already fired."""
        return [f"step:{s}" for s in self.steps] + [f"epoch:{e}" for e in self.epochs]

    def events_before(self, step: int, epoch: int) -> list[str]:
        """The events at or before optimizer step ``step``, or before epoch ``epoch`` (where a checkpoint is)."""
        return [f"step:{s}" for s in self.steps if s <= step] + [f"epoch:{e}" for e in self.epochs if e < epoch]

    def check_limits(self, max_steps: int | None, max_epochs: int | None) -> None:
        """Refuse events that a run with these Trainer limits (``None`` or ``-1``: no limit) never reaches."""
        late = [s for s in self.steps if max_steps is not None and max_steps > 0 and s > max_steps]
        if late:
            raise ValueError(f"`at_steps`/`gradual` has steps {late} past the Trainer's max_steps={max_steps}; they would never fire.")
        late = [e for e in self.epochs if max_epochs is not None and max_epochs > 0 and e >= max_epochs]
        if late:
            raise ValueError(f"`at_epochs` has epochs {late} that a run of max_epochs={max_epochs} never ends (epochs are 0-based).")

    def check_reachable(self, total_steps: float, done: Collection[str], limits: str) -> None:
        """Refuse step events not ``done`` yet past ``total_steps``, the optimizer steps of the whole run (``inf``:
        unknown), which ``limits`` (the Trainer's settings, for the message) give."""
        late = [s for s in self.steps if math.isfinite(total_steps) and s > total_steps and f"step:{s}" not in done]
        if late:
            raise ValueError(
                f"`at_steps`/`gradual` has steps {late} that this run never reaches: it ends after {int(total_steps)}"
                f" optimizer steps ({limits})."
            )

    def check_measured(self, every_n_steps: int) -> None:
        """Refuse step events with no training step measured since the previous event (:func:`unmeasured_events`)."""
        gaps = unmeasured_events(self.steps, every_n_steps)
        if gaps:
            raise ValueError(
                f"LayerPruneCallback: the events at steps {gaps} have no measured step since the previous event"
                f" (BlockInfluenceMonitor every_n_steps={every_n_steps} measures the steps that start at a"
                f" multiple of it; events at {list(self.steps)}): lower every_n_steps or move the events."
            )


def plan_removals(
    schedule: PruneSchedule,
    amount: tuple[str, float],
    present: Sequence[int],
    num_layers: int,
    protected: Collection[int],
    min_layers: int,
    removed: Sequence[Mapping[str, Any]] = (),
    criterion: str = "block_influence",
    resumed_at: tuple[int, int] = (0, 0),
) -> dict[str, int]:
    """How many blocks each event removes: ``event id -> count``, validated against the model before any step.

    Args:
        schedule: the events.
        amount: ``("num_layers", total)``, ``("fraction", of the original depth)`` or ``("layers_per_event", n)``.
        present: original indices of the blocks the model holds (after the removals already applied).
        num_layers: the original depth.
        protected: original indices that are never removed.
        min_layers: the model keeps at least this many blocks.
        removed: the records (``event``, ``original_layers``, ``criterion``) of the events already applied (a
            resumed run); they keep what they removed, the others must lie after the checkpoint and share what is
            left of the total. A plan that does not fit is refused with both plans in the message.
        criterion: the selection criterion; ``"angular"`` removes as many blocks at every event (one contiguous run
            each, Gromov).
        resumed_at: ``(global_step, epoch)`` of the checkpoint.
    """
    done = {r["event"]: len(r["original_layers"]) for r in removed}

    def refuse(why: str) -> NoReturn:
        applied = {r["event"]: r["original_layers"] for r in removed}
        raise ValueError(
            f"LayerPruneCallback: cannot resume with this plan: {why}. The checkpoint's run removed {applied or 'nothing'}"
            f" (criterion {sorted({r['criterion'] for r in removed}) or '-'}); the plan now is events"
            f" {schedule.event_ids()} removing {'='.join(map(str, amount))} with criterion={criterion!r}. Resume with"
            " the arguments the run was saved with, or change only events after the checkpoint."
        )

    step, epoch = resumed_at
    future = [e for e in schedule.event_ids() if e not in done]
    past = [e for e in schedule.events_before(step, epoch) if e not in done]
    if past:
        refuse(f"events {past} lie at or before the checkpoint (step {step}, epoch {epoch}) and never fired")
    already = sum(done.values())
    if min_layers >= num_layers:
        raise ValueError(f"`min_layers` must be below the model's {num_layers} decoder layers, got {min_layers}.")
    name, value = amount
    if name == "layers_per_event":
        counts = [int(value)] * len(future)
    else:
        total = int(value) if name == "num_layers" else round_half_up(value, num_layers)
        if total < 1:
            raise ValueError(f"`fraction={value}` of {num_layers} layers removes no layer; raise it.")
        left = total - already
        if left < 0 or (left > 0 and not future):
            refuse(f"the total of {total} blocks does not fit the {already} removed already and {len(future)} events to come")
        if left < len(future):
            to_come = " to come" if done else ""
            raise ValueError(f"{left} layer(s) to remove cannot be spread over {len(future)} events{to_come}; give fewer events.")
        counts = split_evenly(left, len(future)) if future else []
    removable = len([i for i in present if i not in protected])
    if sum(counts) > removable or len(present) - sum(counts) < min_layers:
        raise ValueError(
            f"cannot remove {already + sum(counts)} of the model's {num_layers} decoder layers: at most"
            f" {already + min(removable, len(present) - min_layers)} can go (min_layers={min_layers},"
            f" {len(protected)} protected: {sorted(protected)}); {max(min_layers, len(protected))} must remain."
        )
    if criterion == "angular" and len(set(counts)) > 1:
        raise ValueError(f"`criterion='angular'` removes one contiguous block per event: give a total divisible by the {len(future)} events (got {counts}).")
    return {**done, **dict(zip(future, counts))}


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
