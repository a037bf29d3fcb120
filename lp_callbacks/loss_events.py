"""The training loss around depth events: the loss before each event, right after it, and when it recovered.

:class:`LossTracker` keeps the loss of every optimizer step (the tensors stay on their device until
:meth:`LossTracker.flush`, one host transfer per logged interval) and one :class:`EventRecord` per
:class:`~lp_callbacks.events.DepthEvent` found on the callbacks (prune, freeze, unfreeze: whatever they report).
:func:`read_loss` finds the loss in what a training step returned. No Lightning here.

Example:
    >>> tracker = LossTracker(RecoveryRule(loss_window=2))
    >>> record = tracker.add_event("Pruner", DepthEvent(step=2, kind="prune", original_layers=[1]))
    >>> for step, loss in enumerate([3.0, 2.0, 2.6, 1.9]):
    ...     tracker.add(step, loss)
    >>> tracker.flush(); (record.loss_before, record.loss_after, record.status, record.recovery_steps)
    (2.5, 2.6, 'recovered', 1)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lp_callbacks.events import DepthEvent, collect_depth_events

__all__ = ["EventRecord", "LossTracker", "RecoveryRule", "read_loss"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def read_loss(
    outputs: Any, callback_metrics: Mapping[str, Any], loss_key: str | None = None, outputs_scale: float = 1.0
) -> tuple[Tensor | float, float] | None:
    """``(loss, scale)`` of a training batch (``loss * scale`` is its value), or ``None`` when there is none.

    Args:
        outputs: what ``training_step`` returned: a scalar tensor or a mapping with ``"loss"``; read when
            ``loss_key`` is ``None``.
        callback_metrics: ``trainer.callback_metrics``: ``loss_key`` (else ``train_loss``, then ``loss``).
        loss_key: read this logged scalar instead of ``outputs``.
        outputs_scale: the scale of a loss read from ``outputs`` (Lightning divides it by
            ``accumulate_grad_batches`` under automatic optimization).
    """
    if loss_key is None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            return loss.detach(), outputs_scale
    value = callback_metrics.get(loss_key or "train_loss")
    if value is None and loss_key is None:
        value = callback_metrics.get("loss")
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.detach(), 1.0
    if isinstance(value, (int, float)):
        return float(value), 1.0
    return None


@dataclass(frozen=True)
class RecoveryRule:
    """When the loss counts as recovered after an event.

    Args:
        loss_window: steps averaged for the loss before an event and for the smoothed loss after it.
        recovery_tolerance: recovered when the smoothed loss is at most ``before + tolerance * |before|``.
        max_recovery_steps: give up (status ``not_recovered``) after that many steps; ``None``: track until the end.
    """

    loss_window: int = 10
    recovery_tolerance: float = 0.0
    max_recovery_steps: int | None = None


@dataclass
class EventRecord:
    """One event and what the loss did around it.

    ``status``: ``pending`` (no loss after it seen yet), ``recovering``, ``recovered``, ``not_recovered`` (past
    ``max_recovery_steps``) or ``no_baseline`` (no loss before it).
    """

    source: str
    event: DepthEvent
    loss_before: float | None = None
    loss_after: float | None = None
    recovery_steps: int | None = None
    status: str = "pending"
    post: list[float] = field(default_factory=list)
    logged: list[str] = field(default_factory=list)

    def key(self) -> tuple[str, tuple[int, str, tuple[int, ...]]]:
        return (self.source, self.event.key())

    @property
    def open(self) -> bool:
        """Whether losses still change the record."""
        return self.status in ("pending", "recovering")

    def feed(self, step: int, loss: float, log: Sequence[tuple[int, float]], rule: RecoveryRule) -> None:
        """Take the loss of the batches that started at ``step`` (>= the event's); ``log`` holds earlier losses."""
        if step < self.event.step:
            return
        if self.status == "pending":
            prior = [v for s, v in log if s < self.event.step][-rule.loss_window :]
            self.loss_before, self.loss_after = _mean(prior), loss
            self.status = "recovering" if prior else "no_baseline"
        if self.status != "recovering":
            return
        self.post = (self.post + [loss])[-rule.loss_window :]
        smoothed = _mean(self.post)
        before = self.loss_before if self.loss_before is not None else math.inf
        if smoothed <= before + rule.recovery_tolerance * abs(before):
            self.recovery_steps, self.status, self.post = step - self.event.step, "recovered", []
        elif rule.max_recovery_steps is not None and step - self.event.step >= rule.max_recovery_steps:
            self.status, self.post = "not_recovered", []

    def as_dict(self) -> dict[str, Any]:
        """The event's fields plus ``source``, ``loss_before``, ``loss_after``, ``recovery_steps``, ``status``."""
        return {
            **self.event.to_dict(),
            "source": self.source,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "recovery_steps": self.recovery_steps,
            "status": self.status,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.as_dict(), "post": list(self.post), "logged": list(self.logged)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EventRecord:
        return cls(
            source=str(state.get("source", "")),
            event=DepthEvent.from_dict(state),
            loss_before=state.get("loss_before"),
            loss_after=state.get("loss_after"),
            recovery_steps=state.get("recovery_steps"),
            status=str(state.get("status", "pending")),
            post=list(state.get("post", [])),
            logged=list(state.get("logged", [])),
        )


class LossTracker:
    """Losses per optimizer step and the :class:`EventRecord` of every event seen.

    Args:
        rule: when the loss counts as recovered.
    """

    def __init__(self, rule: RecoveryRule | None = None) -> None:
        self.rule = rule or RecoveryRule()
        self.records: list[EventRecord] = []
        #: ``(step, loss)`` of the latest optimizer steps, on the host
        self.log: deque[tuple[int, float]] = deque(maxlen=4 * self.rule.loss_window + 64)
        #: the loss of the first optimizer step of the run (kept across resumes)
        self.first_loss: float | None = None
        #: ``(logged step, mean loss since the previous log)``: the curve of the events picture
        self.curve: list[tuple[int, float]] = []
        self._pending: list[tuple[int, Tensor | float, float]] = []  # (start step, loss, scale)
        self._interval: list[float] = []
        self._seen_counts: dict[int, int] = {}

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event seen, oldest first, as :meth:`EventRecord.as_dict`."""
        return [r.as_dict() for r in sorted(self.records, key=lambda r: r.event.step)]

    @property
    def last_loss(self) -> float | None:
        return self.log[-1][1] if self.log else None

    def restart(self) -> None:
        """Drop what a run in progress left on its device (at fit start, after an exception)."""
        self._pending.clear()
        self._interval.clear()
        self._seen_counts.clear()

    def add(self, step: int, loss: Tensor | float, scale: float = 1.0) -> None:
        """The loss of a batch that started at optimizer step ``step`` (a tensor stays where it is)."""
        self._pending.append((step, loss, scale))

    def flush(self) -> None:
        """Bring the pending losses to the host (one transfer) and feed them, step by step, to the event records."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        tensors = [loss.reshape(()) for _, loss, _ in pending if isinstance(loss, Tensor)]
        host = iter(torch.stack(tensors).double().tolist() if tensors else [])
        per_step: dict[int, list[float]] = {}
        for start, loss, scale in pending:
            value = next(host) if isinstance(loss, Tensor) else float(loss)
            per_step.setdefault(start, []).append(value * scale)
        for step in sorted(per_step):
            value = _mean(per_step[step])  # mean over the micro-batches of one optimizer step
            if not math.isfinite(value):
                continue
            for record in self.records:
                if record.open:
                    record.feed(step, value, self.log, self.rule)
            self.log.append((step, value))
            self._interval.append(value)
            if self.first_loss is None:
                self.first_loss = value

    def close_interval(self, step: int) -> None:
        """Add the mean loss since the previous call to :attr:`curve` at ``step``."""
        if self._interval:
            self.curve.append((step, _mean(self._interval)))
        self._interval = []

    def add_event(self, source: str, event: DepthEvent) -> EventRecord | None:
        """Track ``event``; the new record, or ``None`` when it is already tracked."""
        record = EventRecord(source, event)
        if any(r.key() == record.key() for r in self.records):
            return None
        self.records.append(record)
        for step, value in list(self.log):  # losses already on the host (feed skips those before the event)
            record.feed(step, value, self.log, self.rule)
        return record

    def scan(self, callbacks: Iterable[object]) -> list[EventRecord]:
        """Track the new events of every callback with a ``depth_events`` list; the records added.

        Cheap when nothing changed (one ``len`` per callback).
        """
        callbacks = list(callbacks)
        changed = False
        for callback in callbacks:
            events = getattr(callback, "depth_events", None)
            if isinstance(events, (list, tuple)) and len(events) != self._seen_counts.get(id(callback)):
                self._seen_counts[id(callback)] = len(events)
                changed = True
        if not changed:
            return []
        added = (self.add_event(source, event) for source, event in collect_depth_events(callbacks))
        return [record for record in added if record is not None]

    def new_metrics(self, prefix: str) -> dict[str, float]:
        """Values of events that became known since the last call (one event per key per call)."""
        p, out = prefix, {}
        for record in sorted(self.records, key=lambda r: r.event.step):
            if record.loss_after is not None and "after" not in record.logged and f"{p}/event_loss_after" not in out:
                if record.loss_before is not None:
                    out[f"{p}/event_loss_before"] = record.loss_before
                out[f"{p}/event_loss_after"] = record.loss_after
                record.logged.append("after")
            if (record.recovery_steps is not None and "recovery" not in record.logged
                    and f"{p}/event_recovery_steps" not in out):
                out[f"{p}/event_recovery_steps"] = float(record.recovery_steps)
                record.logged.append("recovery")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": [r.state_dict() for r in self.records],
            "loss_log": list(self.log),
            "first_loss": self.first_loss,
            "loss_curve": list(self.curve),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; states saved before ``first_loss`` existed kept ``first_losses``."""
        self.records = [EventRecord.from_state(s) for s in state.get("records", [])]
        self.log.clear()
        self.log.extend((int(s), float(v)) for s, v in state.get("loss_log", []))
        first = state.get("first_loss")
        if first is None and state.get("first_losses"):
            first = state["first_losses"][0]
        self.first_loss = None if first is None else float(first)
        self.curve = [(int(s), float(v)) for s, v in state.get("loss_curve", [])]
