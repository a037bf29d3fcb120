"""StepClock: exact intervals on an injected clock, validation left out, tokens kept on device until taken."""

from __future__ import annotations

import pytest
import torch

from lp_callbacks.step_clock import Interval, StepClock

CPU = torch.device("cpu")


class CountingClock:
    """Moves only when told to, and counts how often it is read."""

    def __init__(self) -> None:
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def _step(clock: StepClock, fake: CountingClock, seconds: float, tokens) -> None:
    clock.batch_started()
    fake.now += seconds
    clock.count(tokens)
    clock.optimizer_stepped(CPU)


def test_intervals_totals_and_clock_reads():
    fake = CountingClock()
    clock = StepClock(fake)
    for seconds, tokens in ((0.25, 10), (0.5, torch.tensor(6))):
        _step(clock, fake, seconds, tokens)
    assert fake.reads == 1  # per step: no clock reading (and no GPU synchronisation) once the interval is open
    assert clock.steps == 2
    first = clock.take(CPU)
    assert first == Interval(tokens=16, seconds=0.75, steps=2) and fake.reads == 2
    assert first.rates() == {"tokens_per_sec": 16 / 0.75, "step_time_sec": 0.375}
    _step(clock, fake, 0.125, 4)  # the next interval starts where the last one was taken
    assert clock.take(CPU) == Interval(tokens=4, seconds=0.125, steps=1)
    assert clock.totals == {"tokens": 20, "time": 0.875, "steps": 3}


def test_validation_time_is_left_out():
    fake = CountingClock()
    clock = StepClock(fake)
    _step(clock, fake, 0.5, 1)
    clock.validation_started()
    fake.now += 100.0
    clock.validation_ended()
    clock.validation_ended()  # a second end does not count twice
    assert clock.take(CPU).seconds == 0.5


def test_validation_outside_an_interval_and_a_clock_that_does_not_move():
    fake = CountingClock()
    clock = StepClock(fake)
    clock.validation_started()  # sanity check before training: nothing open, nothing measured
    fake.now += 7.0
    clock.validation_ended()
    clock.batch_started()
    clock.count(3)
    clock.optimizer_stepped(CPU)
    interval = clock.take(CPU)
    assert interval == Interval(tokens=3, seconds=0.0, steps=1) and interval.rates() == {}
    assert clock.totals["tokens"] == 3  # tokens count even when no time was measured


def test_reduce_sums_the_token_count_and_reset_forgets_the_interval():
    fake = CountingClock()
    clock = StepClock(fake)
    _step(clock, fake, 1.0, 5)
    assert clock.take(CPU, reduce=lambda t: t * 2).tokens == 10  # two ranks with the same count
    _step(clock, fake, 1.0, 5)
    clock.reset()
    assert clock.take(CPU) == Interval(tokens=0, seconds=0.0, steps=0)


def test_clock_must_be_callable():
    with pytest.raises(TypeError, match="`clock` must be callable"):
        StepClock(0.0)  # type: ignore[arg-type]
