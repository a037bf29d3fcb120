"""The run summary: built from the logged values, strict JSON on disk, a table that shows the same numbers."""

from __future__ import annotations

import json
import math

from lp_callbacks.run_summary import (
    SUMMARY_FILE,
    build_summary,
    collect_evaluations,
    evaluation_section,
    format_summary,
    perplexity,
    write_summary,
)

LAST = {"depth/num_layers": 4.0, "depth/params_total": 900.0, "depth/params_trainable": 800.0,
        "depth/flops_per_token": 1.5e6, "depth/peak_memory_bytes": 3.0 * 2**20, "depth/effective_depth": 2.5}
BASELINE = {"num_layers": 6, "params_total": 1000, "params_trainable": 1000, "flops_per_token": 2.0e6, "seq_len": 16}
CONTROL = [{"step": 0, "when": "start", "kl": 0.0, "top1_agreement": 1.0, "tokens": 60},
           {"step": 3, "when": "after prune [2, 3]", "kl": 0.25, "top1_agreement": 0.8, "tokens": 60, "acc": 0.3},
           {"step": 10, "when": "end", "kl": 0.125, "top1_agreement": 0.75, "tokens": 60, "acc": 0.5}]
EVENT = {"step": 3, "kind": "prune", "original_layers": [2, 3], "scores": [], "detail": "", "source": "P",
         "loss_before": 2.0, "loss_after": 2.5, "recovery_steps": 4, "status": "recovered"}


def _summary(**changes):
    kwargs = dict(step=10, logged_step=10, original_num_layers=6, baseline=BASELINE, last_metrics=LAST,
                  prefix="depth", seq_len=16, loss_before=3.0, loss_after=2.0,
                  totals={"tokens": 400, "time": 2.0, "steps": 10}, events=[EVENT], files={"events": "d/events.png"})
    return build_summary(**{**kwargs, **changes})


def test_build_summary_before_after_and_means():
    summary = _summary()
    assert summary["num_layers"] == {"before": 6, "after": 4}
    assert summary["params_trainable"] == {"before": 1000, "after": 800.0}
    assert summary["perplexity"] == {"before": math.exp(3.0), "after": math.exp(2.0)}
    assert summary["tokens_per_sec_mean"] == 200.0 and summary["step_time_sec_mean"] == 0.2
    assert summary["metrics"] == LAST and summary["files"] == {"events": "d/events.png"}
    assert summary["layers_below_threshold"] is None  # not logged: not made up
    empty = _summary(totals={"tokens": 0, "time": 0.0, "steps": 0}, last_metrics={}, baseline=None)
    assert empty["tokens_per_sec_mean"] is None and empty["step_time_sec_mean"] is None
    assert empty["num_layers"] == {"before": None, "after": None}


def test_format_summary_rows_and_events(tmp_path):
    text = format_summary(_summary(), tmp_path / SUMMARY_FILE)
    table = {line[2:22].strip(): line[22:].split() for line in text.splitlines()[2:]}
    assert text.splitlines()[0] == "DepthEfficiencyMonitor summary at step 10"
    assert table["decoder layers"] == ["6", "4", "(-33.3%)"]
    assert table["FLOPs/token (fwd)"] == ["2.000e+06", "1.500e+06", "(-25.0%)"]
    assert table["tokens/s (mean)"] == ["200"] and table["peak memory MiB"] == ["3"]
    assert "  step 3: prune [2, 3], loss 2 -> 2.5, recovered in 4 steps" in text.splitlines()
    assert text.endswith(f"written to {tmp_path}")


def test_write_summary_is_strict_json(tmp_path):
    path = write_summary(_summary(loss_after=float("nan")), tmp_path / "depth")
    assert path == tmp_path / "depth" / SUMMARY_FILE
    data = json.loads(path.read_text())
    assert data["loss"]["after"] is None and data["perplexity"]["after"] is None
    assert [p.name for p in path.parent.iterdir()] == [SUMMARY_FILE]  # no temporary file left


def test_perplexity_overflow_and_none():
    assert perplexity(1e6) == math.inf and perplexity(None) is None


def test_evaluation_section_is_first_and_last_record_and_every_record():
    section = evaluation_section(CONTROL)
    assert section["step"] == {"before": 0, "after": 10}
    assert section["measures"] == {"kl": {"before": 0.0, "after": 0.125},
                                   "top1_agreement": {"before": 1.0, "after": 0.75},
                                   "acc": {"before": None, "after": 0.5}}  # not measured at the start: not made up
    assert section["evaluations"] == CONTROL and section["evaluations"][0] is not CONTROL[0]


def test_control_evaluations_in_the_summary_and_the_table(tmp_path):
    assert "control_evaluation" not in _summary() and "control_evaluation" not in _summary(evaluations={"C": []})
    assert "control evaluation" not in format_summary(_summary(), tmp_path / SUMMARY_FILE)
    summary = _summary(evaluations={"ControlEvaluationCallback": CONTROL})
    assert summary["control_evaluation"] == {"ControlEvaluationCallback": evaluation_section(CONTROL)}
    lines = format_summary(summary, tmp_path / SUMMARY_FILE).splitlines()
    start = lines.index("  control evaluation (ControlEvaluationCallback), step 0 -> 10")
    assert lines[start - 1].startswith("  step 3: prune") and lines[-1] == f"  written to {tmp_path}"
    table = {line[2:22].strip(): line[22:].split() for line in lines[start + 1:-1]}
    assert table == {"kl": ["0", "0.125"], "top1_agreement": ["1", "0.75", "(-25.0%)"], "acc": ["-", "0.5"]}
    data = json.loads(write_summary(summary, tmp_path).read_text())
    assert data["control_evaluation"]["ControlEvaluationCallback"]["evaluations"] == CONTROL


def test_collect_evaluations_asks_each_callback_that_has_the_method():
    asked = []

    class Evaluator:
        def final_evaluations(self, trainer):
            asked.append(trainer)
            return CONTROL

    class Other:
        final_evaluations = None  # not a method: not a reader of the protocol

    found = collect_evaluations([Other(), Evaluator(), object()], trainer="T")
    assert found == {"Evaluator": CONTROL} and asked == ["T"]
    assert found["Evaluator"][0] is not CONTROL[0]  # copies: the summary never aliases the callback's history
