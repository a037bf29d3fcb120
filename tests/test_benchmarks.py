"""The benchmarks' own machinery on a tiny model (their numbers come from the real model, in benchmarks/)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_heal_benchmark_times_kd_and_plain_steps_alternating_in_one_run(one_thread):
    """The timing stage hides the teacher every other batch; the distiller must take those batches as plain ones
    (it once stopped the run there, after every training run of the benchmark had finished)."""
    import heal_benchmark

    args = argparse.Namespace(timing_steps=4, alpha=0.5, chunk_size=128, lr=1e-3, batch_size=2)
    result = heal_benchmark.kd_step_ratio(tiny_model(), {"train": torch.randint(1, 128, (16, 16))}, args)
    assert set(result) == {"kd_step_s", "plain_step_s", "ratio"} and all(math.isfinite(v) for v in result.values())


# ------------------------------------------------------------------------------ result files and arguments
def _refused(parse, argv: list[str], capsys, *words: str) -> None:
    """``parse(argv)`` stops at parse time (argparse's exit 2) with a message holding every one of ``words``."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_result_helper_refuses_files_it_did_not_write_and_replaces_its_own_atomically(tmp_path, monkeypatch):
    import json
    import os

    import pytest
    from _common import check_result_path, write_json_result

    user = tmp_path / "notes.json"
    user.write_text('{"mine": 1}')
    other = tmp_path / "other.json"
    other.write_text('{"benchmark": "eval_benchmark"}')
    text = tmp_path / "text.json"
    text.write_text("not json")
    for path in (user, other, text):
        before = path.read_text()
        with pytest.raises(ValueError, match=r"--json .* Delete it or pass another --json"):
            check_result_path(path, "heal_benchmark")
        with pytest.raises(ValueError, match="--json"):
            write_json_result(path, {"x": 1}, "heal_benchmark")
        assert path.read_text() == before
    with pytest.raises(ValueError, match="folder"):
        check_result_path(tmp_path / "missing" / "r.json", "heal_benchmark")

    ours = tmp_path / "r.json"
    assert check_result_path(ours, "heal_benchmark") is None
    write_json_result(ours, {"x": 1}, "heal_benchmark")
    assert json.loads(ours.read_text()) == {"benchmark": "heal_benchmark", "x": 1}
    write_json_result(ours, {"x": 2}, "heal_benchmark")  # its own file: replaced
    assert check_result_path(ours, "heal_benchmark")["x"] == 2

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_result(ours, {"x": 3}, "heal_benchmark")
    assert json.loads(ours.read_text())["x"] == 2  # the old result whole, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "other.json", "r.json", "text.json"]


def test_forgetting_benchmark_refuses_bad_arguments_and_result_paths_at_parse_time(tmp_path, capsys):
    import forgetting_benchmark as fb

    out = ["--json", str(tmp_path / "f.json")]
    _refused(fb.parse_args, ["--methods", "full,bogus", *out], capsys, "--methods", "lisa_bi", "bogus")
    _refused(fb.parse_args, ["--eval-every", "0", *out], capsys, "--eval-every", ">= 1", "got 0")
    _refused(fb.parse_args, ["--json", str(tmp_path / "f.png")], capsys, "--json", ".png")
    (tmp_path / "f.png").write_bytes(b"a user's picture")  # beside a JSON the benchmark has not written
    _refused(fb.parse_args, out, capsys, "f.png", "Delete it")
    assert fb.parse_args(["--json", str(tmp_path / "g.json"), "--methods", "full,lora"]).method_list == ["full", "lora"]


def test_freeze_and_fsdp2_benchmarks_refuse_impossible_settings_at_parse_time(capsys):
    import freeze_benchmark
    import fsdp2_benchmark

    _refused(freeze_benchmark.parse_args, ["--fraction-frozen", "1.0"], capsys, "--fraction-frozen", "29", "got 1.0")
    _refused(fsdp2_benchmark.parse_args, ["--steps", "5", "--prune-step", "10"], capsys, "--prune-step", "[1,", "got 10")


def test_prune_benchmark_refuses_reuse_and_report_files_of_other_settings(tmp_path, capsys):
    import prune_benchmark as pb

    def saved(name: str, *argv: str):
        args = pb.parse_args(["--quick", *argv])
        pb.write_json_result(tmp_path / name, {"settings": vars(args), "quality": []}, pb.BENCHMARK)
        return str(tmp_path / name)

    a, b = saved("a.json"), saved("b.json", "--lr", "3e-4")
    _refused(pb.parse_args, ["--quick", "--reuse", b], capsys, "--reuse", "lr", "0.0003")
    _refused(pb.parse_args, ["--report", a, b], capsys, "--report", "lr")
    assert pb.parse_args(["--quick", "--reuse", a, "--json", str(tmp_path / "c.json")]).reuse
