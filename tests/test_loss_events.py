"""The loss around depth events: before/after, recovery, the one host transfer, scanning callbacks, old states."""

from __future__ import annotations

import pytest
import torch

from lp_callbacks.events import DepthEvent
from lp_callbacks.loss_events import LossTracker, RecoveryRule, read_loss


class Source:
    def __init__(self, *events: DepthEvent) -> None:
        self.depth_events = list(events)


def test_loss_around_an_event_and_recovery_steps():
    tracker = LossTracker(RecoveryRule(loss_window=2))
    tracker.scan([Source(DepthEvent(step=4, kind="prune", original_layers=[1]))])
    losses = {0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0, 4: 3.0, 5: 2.6, 6: 2.2, 7: 1.9, 8: 1.8}
    for step, value in losses.items():  # step 3 split in two micro-batches with scale 2 (accumulation)
        if step == 3:
            tracker.add(3, torch.tensor(0.75), 2.0)
            tracker.add(3, torch.tensor(1.25), 2.0)
        else:
            tracker.add(step, torch.tensor(value), 1.0)
    tracker.flush()
    (event,) = tracker.events
    assert event["loss_before"] == pytest.approx((3.0 + 2.0) / 2)  # the 2 steps before step 4
    assert event["loss_after"] == 3.0
    assert event["status"] == "recovered" and event["recovery_steps"] == 2  # mean(2.6, 2.2) <= 2.5 at step 6
    assert tracker.first_loss == 5.0  # the summary's train loss "before"
    assert tracker.last_loss == pytest.approx(1.8)


def test_event_found_after_its_losses_is_fed_from_the_log_and_not_counted_twice():
    tracker = LossTracker(RecoveryRule(loss_window=1, max_recovery_steps=2))
    for step, value in enumerate([2.0, 2.0, 3.0, 3.0, 3.0]):
        tracker.add(step, value)
    tracker.flush()
    source = Source(DepthEvent(step=2, kind="freeze", original_layers=[0]))
    (record,) = tracker.scan([source])
    assert (record.loss_before, record.loss_after, record.status) == (2.0, 3.0, "not_recovered")
    assert tracker.scan([source]) == []  # nothing new: not even collected again
    source.depth_events.append(DepthEvent(step=0, kind="prune", original_layers=[3]))
    (early,) = tracker.scan([source])  # the old one is known by its key, the new one has no loss before it
    assert early.status == "no_baseline" and len(tracker.records) == 2
    assert [e["kind"] for e in tracker.events] == ["prune", "freeze"]  # oldest first


def test_new_metrics_report_each_event_once_per_key():
    tracker = LossTracker(RecoveryRule(loss_window=1))
    tracker.scan([Source(DepthEvent(1, "prune", [0]), DepthEvent(2, "freeze", [1]))])
    for step, value in enumerate([4.0, 5.0, 6.0, 3.0]):
        tracker.add(step, value)
    tracker.flush()
    first = tracker.new_metrics("depth")
    assert first == {"depth/event_loss_before": 4.0, "depth/event_loss_after": 5.0, "depth/event_recovery_steps": 2.0}
    assert tracker.new_metrics("depth") == {"depth/event_loss_before": 5.0, "depth/event_loss_after": 6.0,
                                            "depth/event_recovery_steps": 1.0}
    assert tracker.new_metrics("depth") == {}


def test_non_finite_losses_are_skipped_and_the_curve_is_per_interval():
    tracker = LossTracker()
    tracker.add(0, torch.tensor(float("nan")))
    tracker.add(1, torch.tensor(2.0))
    tracker.add(2, 4.0)
    tracker.flush()
    tracker.close_interval(2)
    tracker.close_interval(3)  # nothing new: no point
    assert list(tracker.log) == [(1, 2.0), (2, 4.0)] and tracker.curve == [(2, 3.0)]


def test_state_round_trip_and_old_first_losses_key():
    tracker = LossTracker(RecoveryRule(loss_window=2))
    tracker.scan([Source(DepthEvent(1, "prune", [2], [0.01]))])
    for step, value in enumerate([3.0, 4.0]):
        tracker.add(step, value)
    tracker.flush()
    tracker.close_interval(1)
    state = tracker.state_dict()
    assert set(state) == {"records", "loss_log", "first_loss", "loss_curve"}
    restored = LossTracker(RecoveryRule(loss_window=2))
    restored.load_state_dict(state)
    assert restored.events == tracker.events and list(restored.log) == list(tracker.log)
    assert restored.curve == tracker.curve and restored.first_loss == 3.0
    restored.load_state_dict({"first_losses": [5.0, 4.0]})  # saved before the summary used the first step's loss
    assert restored.first_loss == 5.0 and restored.records == []


def test_read_loss_from_outputs_or_logged_metrics():
    loss = torch.tensor(2.0, requires_grad=True)
    found, scale = read_loss(loss, {}, outputs_scale=4.0)
    assert float(found) == 2.0 and scale == 4.0 and not found.requires_grad
    assert float(read_loss({"loss": loss}, {})[0]) == 2.0
    assert read_loss(None, {"train_loss": torch.tensor(1.5)}) == (torch.tensor(1.5), 1.0)
    assert read_loss(None, {"loss": 0.5}) == (0.5, 1.0)
    assert read_loss(loss, {"mine": 3.0}, loss_key="mine") == (3.0, 1.0)  # the key wins over outputs
    assert read_loss(None, {"loss": 0.5}, loss_key="mine") is None
    assert read_loss(torch.ones(2), {}) is None
