"""Shared set-up of the benchmarks: the real SmolLM2-135M and real Shakespeare text, no downloads."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lp_callbacks.harness.data import shakespeare_files  # noqa: E402
from lp_callbacks.harness.models import load_smollm2  # noqa: E402

# Standard-library modules whose docstrings are mostly prose (modern English, held out from training).
OOD_MODULES = ("subprocess", "shelve", "heapq", "sqlite3", "http.cookiejar", "unittest", "pickle", "difflib")
# Plays never trained on: the in-domain held-out set.
HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")


# ------------------------------------------------------------------------------ result files
def check_result_path(path: Path | str | None, benchmark: str, flag: str = "--json") -> dict | None:
    """Refuse (``ValueError``, naming ``flag``) a result path this benchmark may not write: a folder, a link, a file
    in a folder that does not exist, or an existing file that is not a JSON object written by ``benchmark`` (its
    top-level ``"benchmark"`` key; a file from before that key was written is refused too). Call it right after
    parsing the arguments, before any run. Returns the existing result (``None`` when there is none)."""
    if path is None:
        return None
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
    if path.is_symlink():
        raise ValueError(f"{flag} {path} is a link; {benchmark} writes its results only to a plain file: pass another"
                         f" {flag}")
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"{flag} {path} exists and is not a file: pass another {flag}")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        saved = None
    owner = saved.get("benchmark") if isinstance(saved, dict) else None
    if owner != benchmark:
        what = ("not a JSON object" if not isinstance(saved, dict) else
                "a result without the \"benchmark\" key (written before results were marked, or not by a benchmark)"
                if owner is None else f"a result of {owner!r}")
        raise ValueError(f"{flag} {path} exists and is {what}, not a result of {benchmark!r}: it is not replaced."
                         f" Delete it or pass another {flag}")
    return saved


def parse_with_result_path(parser: "argparse.ArgumentParser", argv: "list[str] | None", benchmark: str):
    """``parser.parse_args(argv)``, then :func:`check_result_path` on ``--json`` as a parser error (before any run)."""
    args = parser.parse_args(argv)
    try:
        check_result_path(args.json, benchmark)
    except ValueError as e:
        parser.error(str(e))
    return args


def write_atomically(path: Path | str, write: Callable[[Any], None]) -> None:
    """``write(binary file)`` into a temporary file in ``path``'s folder, then ``os.replace`` it onto ``path``: a
    reader (or a run that stops) sees the old file or the new one, never half of one. Checks nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600: give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_result(path: Path | str, payload: dict, benchmark: str, flag: str = "--json") -> None:
    """Write ``payload`` as JSON to ``path``, marked ``"benchmark": benchmark``, atomically; refuses (as
    :func:`check_result_path`) a path that is not this benchmark's to replace."""
    if payload.get("benchmark", benchmark) != benchmark:
        raise ValueError(f"payload marked benchmark={payload['benchmark']!r}, written by {benchmark!r}")
    check_result_path(path, benchmark, flag)
    text = json.dumps({"benchmark": benchmark, **payload}, indent=2, default=str).encode("utf-8")
    write_atomically(path, lambda f: f.write(text))


def json_settings(values: dict) -> dict:
    """Settings as a JSON file holds them (paths as strings, tuples as lists): comparable with saved ones."""
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, default=str))


def differing_settings(saved: dict, now: dict, keys) -> dict[str, tuple]:
    """``{key: (saved, now)}`` for each of ``keys`` whose value differs (``"<absent>"`` where a side lacks it)."""
    saved, now = json_settings(saved), json_settings(now)
    return {k: (saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in keys
            if saved.get(k, "<absent>") != now.get(k, "<absent>")}


def spread_blocks(ids: torch.Tensor, seq_len: int, num_blocks: int) -> torch.Tensor:
    """``num_blocks`` windows of ``seq_len`` tokens spread evenly over ``ids``: ``(N, T)``."""
    if ids.numel() < seq_len * num_blocks:
        raise ValueError(f"{ids.numel()} tokens cannot give {num_blocks} disjoint blocks of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, num_blocks).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def out_of_domain_text() -> str:
    """Modern English prose shipped with every CPython: its LICENSE and a few modules' docstrings."""
    license_txt = Path(os.__file__).parent / "LICENSE.txt"
    parts = [license_txt.read_text(encoding="utf-8")] if license_txt.is_file() else []
    parts += [importlib.import_module(name).__doc__ or "" for name in OOD_MODULES]
    return "\n\n".join(parts)


def heal_data(tokenizer, steps: int, batch_size: int, seq_len: int, eval_tokens: int, calibration_blocks: int = 8) -> dict:
    """Training blocks and calibration blocks from the training plays; the first ``eval_tokens`` token ids of the
    held-out plays (in domain) and of the out-of-domain prose, as 1-D tensors for a perplexity protocol."""
    encode = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # noqa: E731
    files = shakespeare_files()
    train_files = [p for p in files if p.name not in HELD_OUT_PLAYS][:8]
    train_ids = encode("\n".join(p.read_text(encoding="utf-8") for p in train_files))
    blocks = spread_blocks(train_ids, seq_len, steps * batch_size + calibration_blocks)
    held_out = encode("\n".join(p.read_text(encoding="utf-8") for p in files if p.name in HELD_OUT_PLAYS))
    out_of_domain = encode(out_of_domain_text())
    for name, ids in (("held-out plays", held_out), ("out-of-domain prose", out_of_domain)):
        if ids.numel() < eval_tokens:
            raise ValueError(f"only {ids.numel()} tokens of {name}, asked for eval_tokens={eval_tokens}")
    return {"train": blocks[: steps * batch_size], "calibration": blocks[steps * batch_size :],
            "in_domain": held_out[:eval_tokens], "out_of_domain": out_of_domain[:eval_tokens]}


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


# ------------------------------------------------------------------------------ a pruned model against the original
def held_out_eval_data(tokenizer, ppl_tokens: int, agreement_blocks: int, seq_len: int, prompts: int,
                       prompt_tokens: int) -> dict:
    """Three disjoint slices of the held-out plays, in this order: the first ``ppl_tokens`` token ids (the text of a
    perplexity protocol, 1-D), ``agreement_blocks`` blocks of ``seq_len`` tokens (teacher agreement, ``(N, T)``),
    then ``prompts`` prompts of ``prompt_tokens`` tokens spread evenly over the rest (the generation check)."""
    files = [p for p in shakespeare_files() if p.name in HELD_OUT_PLAYS]
    held = torch.tensor(tokenizer("\n".join(p.read_text(encoding="utf-8") for p in files))["input_ids"])
    need = ppl_tokens + agreement_blocks * seq_len + prompts * prompt_tokens
    if held.numel() < need:
        raise ValueError(f"only {held.numel()} tokens in the held-out plays, need {need}")
    rest = held[ppl_tokens:]
    agreement = rest[: agreement_blocks * seq_len].view(-1, seq_len)
    rest = rest[agreement_blocks * seq_len :]
    step = max(1, (rest.numel() - prompt_tokens) // max(1, prompts))
    return {"ppl_ids": held[:ppl_tokens], "agreement": agreement,
            "prompts": [rest[i * step : i * step + prompt_tokens] for i in range(prompts)],
            "held_out_names": [p.name for p in files]}


def choice_stats(samples: list[dict]) -> dict:
    """From lm-eval's per-question records of a multiple-choice task: how often the most chosen answer position is
    picked (a model that always answers "A" has accuracy = the share of "A" among the gold answers, whatever it
    knows), the share of that position among the gold answers, and the mean probability of the gold answer among
    the choices (softmax of their log-likelihoods; 1 / choices = chance), which moves with the model even when its
    argmax does not."""
    picks, gold_prob = [], 0.0
    for s in samples:
        lls = torch.tensor([ll for ll, _ in s["filtered_resps"]], dtype=torch.float64)
        picks.append(int(lls.argmax()))
        gold_prob += float(lls.softmax(0)[int(s["target"])])
    top = max(set(picks), key=picks.count)
    return {"top_pick": "ABCDEFGH"[top], "top_pick_share": picks.count(top) / len(picks),
            "gold_share_of_top_pick": sum(int(s["target"]) == top for s in samples) / len(samples),
            "gold_prob": gold_prob / len(samples)}


def compare_with_original(student, teacher, tokenizer, held: dict, protocol, *, new_tokens: int,
                          tasks: dict | None = None, task_batch_size: int = 8, agreement_batch_size: int = 4,
                          generate: bool = True) -> dict:
    """``student`` (a pruned model) against ``teacher`` (the original, frozen) with ``lp_callbacks.evaluation``, on
    the slices of :func:`held_out_eval_data`: perplexity under ``protocol``, ``teacher_agreement`` (KL, top-1),
    ``generation_agreement`` (greedy, ``new_tokens``; ``None`` without ``generate``), and each lm-eval task of
    ``tasks`` (``{name: limit}``) with :func:`choice_stats`. Every model comes back in the mode it came in;
    ``seconds`` of each part."""
    from lp_callbacks.evaluation import evaluate_tasks, generation_agreement, perplexity, teacher_agreement

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ppl = perplexity(student, held["ppl_ids"], protocol)
    out: dict = {"ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "ppl_describe": ppl.describe()}
    seconds["perplexity"], t0 = time.perf_counter() - t0, time.perf_counter()
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in held["agreement"].split(agreement_batch_size)]
    out["agreement"] = teacher_agreement(student, teacher, batches)
    seconds["agreement"], t0 = time.perf_counter() - t0, time.perf_counter()
    out["generation"] = None
    if generate:
        gen = generation_agreement(student, teacher, held["prompts"], max_new_tokens=new_tokens, tokenizer=tokenizer)
        out["generation"] = {k: gen[k] for k in ("prefix_agreement", "token_agreement", "exact_match", "per_prompt",
                                                 "student_texts", "teacher_texts")}
        seconds["generation"], t0 = time.perf_counter() - t0, time.perf_counter()
    out["tasks"] = {}
    for name, limit in (tasks or {}).items():
        res = evaluate_tasks(student, tokenizer, [name], limit=limit, batch_size=task_batch_size, log_samples=True)
        out["tasks"][name] = {**res["results"][name], **choice_stats(res["raw"]["samples"][name])}
        seconds[name], t0 = time.perf_counter() - t0, time.perf_counter()
    out["seconds"] = seconds
    return out
