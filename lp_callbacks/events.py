"""The depth-event protocol: how a callback that changes the model's depth tells others what it did.

A callback that prunes, freezes or unfreezes decoder blocks keeps a public list attribute ``depth_events`` and
appends one :class:`DepthEvent` per action. Readers (:class:`~lp_callbacks.callbacks.DepthEfficiencyMonitor`) find
every callback in ``trainer.callbacks`` that has such a list (:func:`collect_depth_events`); nothing else about the
writer is assumed, so writers and readers never import each other.

The contract for a writer:

1. ``self.depth_events: list[DepthEvent] = []`` in ``__init__``.
2. Right after the model changed, ``self.depth_events.append(DepthEvent(step=trainer.global_step, kind="prune",
   original_layers=[...], scores=[...]))``: ``step`` is the ``trainer.global_step`` at which the change took effect
   (the training batches that start at this step or later run the changed model), ``original_layers`` are the
   indices of the affected blocks in the *original* numbering (before any removal), ``scores`` the score that
   decided it for each of them (BI), in the same order, or ``[]``.
3. Save the list in ``state_dict`` (``[e.to_dict() for e in self.depth_events]``) and restore it in
   ``load_state_dict`` (``[DepthEvent.from_dict(d) for d in state.get("depth_events", [])]``), so a resumed run
   still knows its past events. Readers deduplicate by :meth:`DepthEvent.key`, so restored events are not counted
   twice.
4. Append on every rank (each rank's callback object takes the same decision); readers only write on rank zero.

Example:
    >>> event = DepthEvent(step=100, kind="prune", original_layers=[21, 25], scores=[0.012, 0.015],
    ...                    detail="2 lowest-BI blocks of 30")
    >>> DepthEvent.from_dict(event.to_dict()) == event
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["DEPTH_EVENT_KINDS", "DepthEvent", "collect_depth_events", "notify_after_prune", "notify_before_prune"]

#: The kinds of :class:`DepthEvent`.
DEPTH_EVENT_KINDS: tuple[str, ...] = ("prune", "freeze", "unfreeze")


@dataclass
class DepthEvent:
    """One change of the model's depth or of which blocks train.

    Args:
        step: ``trainer.global_step`` at which the change took effect: training batches that start at this step or
            later run the changed model.
        kind: ``"prune"`` (blocks removed), ``"freeze"`` (blocks stop training) or ``"unfreeze"``.
        original_layers: indices of the affected blocks in the original numbering (before any removal).
        scores: the score that decided the action for each block of ``original_layers`` (same order), e.g. its
            Block Influence; ``[]`` when there is none.
        detail: a short free text shown in plots and the run summary.
    """

    step: int
    kind: Literal["prune", "freeze", "unfreeze"]
    original_layers: list[int]
    scores: list[float] = field(default_factory=list)
    detail: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"`DepthEvent.step` must be a non-negative int (trainer.global_step), got {self.step!r}.")
        if self.kind not in DEPTH_EVENT_KINDS:
            raise ValueError(f"`DepthEvent.kind` must be one of {DEPTH_EVENT_KINDS}, got {self.kind!r}.")
        layers = list(self.original_layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(
                f"`DepthEvent.original_layers` must be a non-empty list of non-negative ints, got {self.original_layers!r}."
            )
        scores = [float(s) for s in self.scores]
        if scores and len(scores) != len(layers):
            raise ValueError(
                f"`DepthEvent.scores` must be empty or hold one score per layer ({len(layers)}), got {len(scores)}."
            )
        self.original_layers, self.scores, self.detail = layers, scores, str(self.detail)

    def key(self) -> tuple[int, str, tuple[int, ...]]:
        """What identifies the event: ``(step, kind, original_layers)``."""
        return (self.step, self.kind, tuple(self.original_layers))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for checkpoints and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DepthEvent:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer checkpoints still load."""
        return cls(
            step=int(data["step"]),
            kind=data["kind"],
            original_layers=[int(i) for i in data["original_layers"]],
            scores=[float(s) for s in data.get("scores", [])],
            detail=str(data.get("detail", "")),
        )


def _as_event(item: Any) -> DepthEvent | None:
    if isinstance(item, DepthEvent):
        return item
    if isinstance(item, Mapping):
        return DepthEvent.from_dict(item)
    return None


def collect_depth_events(callbacks: Iterable[object]) -> list[tuple[str, DepthEvent]]:
    """Every ``(source name, event)`` of the callbacks that expose ``depth_events``, sorted by step (stable).

    Items given as dicts (an event restored from a checkpoint and not yet converted) are converted; anything else in
    a ``depth_events`` list is ignored.
    """
    found: list[tuple[str, DepthEvent]] = []
    for callback in callbacks:
        events = getattr(callback, "depth_events", None)
        if not isinstance(events, (list, tuple)):
            continue
        for item in events:
            event = _as_event(item)
            if event is not None:
                found.append((type(callback).__name__, event))  # reported under its class name
    return sorted(found, key=lambda pair: pair[1].step)


def notify_before_prune(trainer: Any, pl_module: Any, current_indices: list[int]) -> None:
    """Tell every callback with an ``on_before_prune(trainer, pl_module, current_indices)`` method that these blocks
    (current numbering) are about to be removed: the model is still whole when it runs (a distillation teacher is
    copied then)."""
    _call_hooks(trainer, "on_before_prune", pl_module, list(current_indices))


def notify_after_prune(trainer: Any, pl_module: Any, original_layers: list[int]) -> None:
    """Tell every callback with an ``on_after_prune(trainer, pl_module, original_layers)`` method that these blocks
    (original numbering) left the model, the optimizers and the strategy's wrappers (a freezer follows them)."""
    _call_hooks(trainer, "on_after_prune", pl_module, list(original_layers))


def _call_hooks(trainer: Any, name: str, pl_module: Any, indices: list[int]) -> None:
    """``callback.<name>(trainer, pl_module, indices)`` for every callback of the Trainer that has that method."""
    for callback in trainer.callbacks:
        hook = getattr(callback, name, None)
        if callable(hook):
            hook(trainer, pl_module, indices)
