"""Shared set-up of the benchmarks: the real SmolLM2-135M and real Shakespeare text, no downloads."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lp_callbacks.harness.data import shakespeare_files  # noqa: E402
from lp_callbacks.harness.models import load_smollm2  # noqa: E402


def real_model():
    """SmolLM2-135M-Instruct (30 Llama blocks), fp32, train mode, and its tokenizer."""
    model, tokenizer = load_smollm2()
    return model.train(), tokenizer


def shakespeare_blocks(tokenizer, num_blocks: int, seq_len: int, skip_blocks: int = 0, files: int = 12) -> torch.Tensor:
    """``(num_blocks, seq_len)`` token ids of consecutive Shakespeare text (after ``skip_blocks`` blocks)."""
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files()[:files])
    ids = torch.tensor(tokenizer(text)["input_ids"])
    need = (skip_blocks + num_blocks) * seq_len
    if ids.numel() < need:
        raise ValueError(f"only {ids.numel()} tokens in {files} files, need {need}: raise `files`")
    return ids[skip_blocks * seq_len : need].view(num_blocks, seq_len)


class Blocks(Dataset):
    """Rows of a ``(N, T)`` token tensor as causal-LM examples."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # (N, T)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


class StepTimer(pl.Callback):
    """Wall time of each training batch (start to end: forward, backward, optimizer step, the end-of-step work of
    callbacks placed before it), with the ``global_step`` it started at."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(self._step)
        self.times.append(time.perf_counter() - self._start)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
