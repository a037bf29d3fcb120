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
