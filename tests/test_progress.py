"""ProgressLog: progress lines with an injected clock (no wall-clock thresholds), alone and inside a Trainer."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from conftest import TinyLM, fast_trainer, loader

from lp_callbacks.harness.progress import ProgressLog, format_duration


class Clock:
    """Returns the times it is given, in order."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def fake_trainer(**kwargs):
    """A Trainer's attributes; ``estimated_stepping_batches`` as Lightning gives it for ``max_epochs=-1``."""
    defaults = dict(global_step=0, max_steps=100, log_every_n_steps=10, progress_bar_metrics={}, callback_metrics={},
                    sanity_checking=False, is_global_zero=True)
    settings = {**defaults, **kwargs}
    settings.setdefault("estimated_stepping_batches", settings["max_steps"] if settings["max_steps"] > 0 else float("inf"))
    return SimpleNamespace(**settings)


def steps(progress: ProgressLog, trainer, up_to: int) -> None:
    for step in range(trainer.global_step + 1, up_to + 1):
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, None, None, step)


def test_a_line_every_n_steps_with_loss_and_eta():
    out = io.StringIO()
    progress = ProgressLog(every_n_steps=10, clock=Clock(100.0, 120.0, 310.0), stream=out)
    trainer = fake_trainer(progress_bar_metrics={"train_loss": torch.tensor(3.25), "val_loss": 9.0})
    progress.on_train_start(trainer, None)
    steps(progress, trainer, 10)
    trainer.progress_bar_metrics["train_loss"] = torch.tensor(2.5)
    steps(progress, trainer, 20)
    # 20 s for 10 steps: 90 steps left take 180 s; then 210 s for 20 steps: 80 steps left, 840 s
    assert out.getvalue().splitlines() == [
        "step 10/100 (10%)  train_loss 3.2500  elapsed 20s  ETA 3m00s",
        "step 20/100 (20%)  train_loss 2.5000  elapsed 3m30s  ETA 14m00s",
    ]


def test_the_last_step_is_printed_and_a_step_only_once():
    out = io.StringIO()
    progress = ProgressLog(every_n_steps=4, clock=Clock(0.0, 1.0, 2.0), stream=out)
    trainer = fake_trainer(max_steps=6)
    progress.on_train_start(trainer, None)
    steps(progress, trainer, 6)
    progress.on_train_batch_end(trainer, None, None, None, 7)  # gradient accumulation: no optimizer step
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == ["step 4/6 (66%)", "step 6/6 (100%)"]


def test_a_resumed_run_counts_its_own_steps_for_the_eta():
    out = io.StringIO()
    progress = ProgressLog(every_n_steps=5, clock=Clock(0.0, 10.0), stream=out)
    trainer = fake_trainer(global_step=40, max_steps=50)
    progress.on_train_start(trainer, None)
    steps(progress, trainer, 45)
    assert out.getvalue() == "step 45/50 (90%)  elapsed 10s  ETA 10s\n"  # 5 steps in 10 s, not 45


def test_cadence_defaults_to_log_every_n_steps_and_no_total_means_no_eta():
    out = io.StringIO()
    progress = ProgressLog(clock=Clock(0.0, 3.0), stream=out)
    trainer = fake_trainer(max_steps=-1, log_every_n_steps=3)
    progress.on_train_start(trainer, None)
    steps(progress, trainer, 4)
    assert out.getvalue() == "step 3  elapsed 3s\n"


def test_validation_line_when_the_loss_is_computed():
    out = io.StringIO()
    progress = ProgressLog(stream=out)
    trainer = fake_trainer(global_step=25, callback_metrics={"val_loss": torch.tensor(3.7169),
                                                              "val_ppl": torch.tensor(41.14), "train_loss": 1.0})
    progress.on_train_start(trainer, None)
    progress.on_validation_end(trainer, None)
    trainer.sanity_checking = True
    progress.on_validation_end(trainer, None)  # the sanity check prints nothing
    trainer.sanity_checking, trainer.callback_metrics = False, {"train_loss": 1.0}
    progress.on_validation_end(trainer, None)  # no validation metric: nothing
    assert out.getvalue() == "step 25/100  val_loss 3.7169  val_ppl 41.1400\n"


@pytest.mark.parametrize(
    ("settings", "heads"),
    [(dict(max_steps=1000, estimated_stepping_batches=10), ["step 5/10 (50%)", "step 10/10 (100%)"]),  # epochs end it
     (dict(max_steps=-1, estimated_stepping_batches=-1), ["step 5", "step 10"])],  # a streamed dataset: no total
    ids=["epochs-first", "streamed"],
)
def test_the_total_is_the_steps_the_fit_reaches(settings, heads):
    out = io.StringIO()
    progress = ProgressLog(every_n_steps=5, clock=Clock(0.0, 5.0, 10.0), stream=out)
    trainer = fake_trainer(**settings)
    progress.on_train_start(trainer, None)
    steps(progress, trainer, 10)
    assert [line.split("  ")[0] for line in out.getvalue().splitlines()] == heads


def test_disabled_prints_nothing():
    out = io.StringIO()
    progress = ProgressLog(every_n_steps=1, clock=Clock(0.0, 1.0), stream=out)
    progress.disable()
    trainer = fake_trainer()
    progress.on_train_start(trainer, None)
    steps(progress, trainer, 1)
    assert out.getvalue() == "" and not progress.is_enabled


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_cadence(bad):
    with pytest.raises(ValueError, match=r"`every_n_steps` must be an int >= 1 or None"):
        ProgressLog(every_n_steps=bad)


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 60, 307, 3599, 7380)] == ["0s", "59s", "1m00s", "5m07s", "59m59s",
                                                                          "2h03m"]


def test_in_a_trainer_it_replaces_the_progress_bar(tmp_path):
    out = io.StringIO()
    ticks = iter(range(100))
    progress = ProgressLog(every_n_steps=2, clock=lambda: float(next(ticks)), stream=out)
    trainer = fast_trainer(tmp_path, callbacks=[progress], enable_progress_bar=True, max_steps=4)
    trainer.fit(TinyLM(), loader(length=16), loader(length=8))
    assert trainer.progress_bar_callback is progress
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 2/4 (50%)", "step 4/4 (100%)", "step 4/4"]
    assert lines[0].endswith("elapsed 1s  ETA 1s") and lines[1].endswith("elapsed 2s  ETA 0s")
    assert "val_loss" in lines[2]
