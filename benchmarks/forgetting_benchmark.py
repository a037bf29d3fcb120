"""Does freezing by Block Influence forget less? SmolLM2-135M adapted to Shakespeare hard enough to forget.

Every run: the same data order, AdamW at a constant ``--lr``, ``--steps`` optimizer steps of ``--batch-size`` x
``--seq-len`` tokens from eight plays. Every ``--eval-every`` steps (and at step 0) two perplexities are measured
under one fixed protocol (disjoint windows of 256 tokens): the in-domain gain on two plays never trained on, and
forgetting on modern English prose the runs never see (CPython's licence and docstrings). Methods:

* ``full``          every parameter trains (the embeddings and LM head too);
* ``blocks``        every block trains, the embeddings/LM head and final norm frozen (as in every method below:
                    this separates the choice of blocks from freezing the embeddings, which SmolLM2 ties to its head);
* ``bi``            ``LayerFreezeCallback``: the half of the blocks with the highest BI (measured at fit start on
                    calibration batches) frozen, with the embeddings/LM head and final norm;
* ``random``        the same count of blocks chosen at random (``--seeds``);
* ``position``      the first half of the blocks frozen (the classic "freeze the bottom");
* ``lora``          LoRA (r=8, alpha=16) on every projection of every block, nothing else trains;
* ``lisa``          LISA-style layer-wise sampling, ``LayerFreezeCallback(num_trainable=--lisa-blocks,
                    resample_every_n_steps=--lisa-every, seed=...)``: that many blocks trainable at a time, drawn
                    again uniformly every that many steps (``--seeds``); embeddings/head/norm frozen as for ``bi``;
* ``lisa_bi``       the same with ``sampling="low_bi"``: low-BI blocks drawn more often (probability 1/BI).

The report: the out-of-domain curve over steps, each method's final in-domain and out-of-domain perplexity, the
out-of-domain perplexity at the in-domain gain of the weakest method (interpolated on each curve: forgetting at equal
gain), trainable parameters, optimizer-state bytes (the peak over the run) and median step time as ratios to full fine-tuning (the runs
follow each other in one process; the step times are medians of each run). A picture of the trade-off curves is
written next to the JSON.

The budget was chosen by measurement (full fine-tuning alone, 4 x 128 tokens per step): at lr 1e-4 the
out-of-domain perplexity rose only 3% in 100 steps (15.51 -> 16.00) while the in-domain one fell 54 -> 43; at 3e-4 it
rose 32% in 20 steps but the in-domain perplexity got worse after step 20 (no adaptation worth the name); 2e-4 for 60
steps sits between.

To run:
    python benchmarks/forgetting_benchmark.py                     # all 14 runs, ~35-40 minutes on 2 CPU cores
    python benchmarks/forgetting_benchmark.py --methods full --steps 100 --lr 1e-4 --eval-every 20   # one curve
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import Blocks, StepTimer, heal_data, real_model, table  # noqa: E402

from lp_callbacks import measure_depth  # noqa: E402
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback  # noqa: E402
from lp_callbacks.evaluation import PerplexityProtocol, perplexity  # noqa: E402
from lp_callbacks.freezing import optimizer_state_bytes  # noqa: E402
from lp_callbacks.harness.module import CausalLMModule  # noqa: E402

METHODS = ("full", "blocks", "bi", "random", "position", "lora", "lisa", "lisa_bi")
SEEDED = ("random", "lisa", "lisa_bi")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lisa-blocks", type=int, default=4)
    parser.add_argument("--lisa-every", type=int, default=10)
    parser.add_argument("--json", type=Path, default=Path("forgetting_benchmark.json"))
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a JSON of an earlier run with the same settings: its runs are not repeated")
    return parser.parse_args()


class Evaluator(pl.Callback):
    """In-domain and out-of-domain perplexity at step 0 and every ``every`` optimizer steps (and at the end)."""

    def __init__(self, data: dict[str, torch.Tensor], every: int) -> None:
        self.data, self.every, self.curve = data, every, []
        self.protocols = {k: PerplexityProtocol(seq_len=256, stride=256, split=k) for k in ("in_domain", "out_of_domain")}

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.curve and self.curve[-1]["step"] == trainer.global_step:
            return
        was_training = pl_module.training
        pl_module.eval()
        point = {"step": trainer.global_step}
        for split, protocol in self.protocols.items():
            point[split] = perplexity(pl_module.model, self.data[split], protocol, batch_size=4).ppl
        self.curve.append(point)
        pl_module.train(was_training)

    def on_train_start(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)


class PeakOptimizerState(pl.Callback):
    """The most optimizer-state bytes held after any optimizer step (LISA's state comes and goes with its draws)."""

    def __init__(self) -> None:
        self.peak = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.peak = max(self.peak, optimizer_state_bytes(trainer.optimizers))


def calibration_bi(data: dict[str, torch.Tensor]) -> list[float]:
    model, _ = real_model()
    return measure_depth(model.eval(), DataLoader(Blocks(data["calibration"]), batch_size=4)).block_influence.tolist()


def build(method: str, seed: int, bi: list[float], args: argparse.Namespace, num_layers: int, model) -> tuple[Any, list]:
    """The model to train (LoRA-wrapped or not) and the callbacks of ``method``."""
    half = num_layers // 2
    if method == "full":
        return model, []
    if method == "blocks":
        return model, [LayerFreezeCallback(num_trainable=num_layers, scores=[0.0] * num_layers)]
    if method == "bi":
        return model, [LayerFreezeCallback(num_frozen=half, scores=bi)]
    if method == "random":
        order = random.Random(seed).sample(range(num_layers), num_layers)
        return model, [LayerFreezeCallback(num_frozen=half, scores=[float(num_layers - order.index(i)) for i in range(num_layers)])]
    if method == "position":
        return model, [LayerFreezeCallback(num_frozen=half, scores=[float(num_layers - i) for i in range(num_layers)])]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)), []
    if method == "lisa":
        return model, [LayerFreezeCallback(num_trainable=args.lisa_blocks, resample_every_n_steps=args.lisa_every, seed=seed)]
    if method == "lisa_bi":
        return model, [LayerFreezeCallback(num_trainable=args.lisa_blocks, resample_every_n_steps=args.lisa_every, seed=seed,
                                           sampling="low_bi", scores=bi)]
    raise ValueError(f"`--methods` must be among {METHODS}, got {method!r}")


def run(method: str, seed: int, data: dict[str, torch.Tensor], bi: list[float], args) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)  # the same data order and init everywhere; `seed` picks the blocks
    model, _ = real_model()
    num_layers = len(model.model.layers)
    model, callbacks = build(method, seed, bi, args, num_layers, model)
    evaluator, timer, peak = Evaluator(data, args.eval_every), StepTimer(), PeakOptimizerState()
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*callbacks, evaluator, timer, peak])
    module = CausalLMModule(model, lr=args.lr)
    trainer.fit(module, DataLoader(Blocks(data["train"]), batch_size=args.batch_size))
    step_times = [t for s, t in zip(timer.steps, timer.times) if s >= 2 and s % args.eval_every != args.eval_every - 1]
    result = {
        "method": method, "seed": seed, "curve": evaluator.curve,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),  # at the end
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers),
        "optimizer_state_peak_bytes": peak.peak,
        "step_time": statistics.median(step_times or timer.times),
    }
    for cb in callbacks:
        if isinstance(cb, LayerFreezeCallback):
            result["frozen_blocks"] = cb.frozen_blocks
            if cb.sampling:
                result["samples"] = [h["trainable_blocks"] for h in cb.history]
    end = evaluator.curve[-1]
    print(f"[{method} seed {seed}] in-domain {end['in_domain']:.2f}, out-of-domain {end['out_of_domain']:.2f},"
          f" step {result['step_time']:.2f} s", flush=True)
    return result


def ood_at_gain(curve: list[dict[str, float]], target: float) -> float | None:
    """Out-of-domain perplexity where the curve's in-domain perplexity crosses ``target`` (linear interpolation)."""
    for a, b in zip(curve, curve[1:]):
        if (a["in_domain"] - target) * (b["in_domain"] - target) <= 0 and a["in_domain"] != b["in_domain"]:
            w = (a["in_domain"] - target) / (a["in_domain"] - b["in_domain"])
            return a["out_of_domain"] + w * (b["out_of_domain"] - a["out_of_domain"])
    return None


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base = results[0]["curve"][0]
    print(f"\n## Before training: in-domain ppl {base['in_domain']:.2f}, out-of-domain ppl {base['out_of_domain']:.2f}")
    full = next((r for r in results if r["method"] == "full"), results[0])
    steps = [p["step"] for p in full["curve"]]
    print("\n### Out-of-domain perplexity over steps (mean over seeds)")
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    rows = [[m] + [f"{statistics.mean(r['curve'][i]['out_of_domain'] for r in rs):.2f}" for i in range(len(steps))]
            for m, rs in by_method.items()]
    print(table(["method", *[f"step {s}" for s in steps]], rows))
    target = max(min(p["in_domain"] for p in r["curve"]) for r in results)  # the weakest method's best gain
    print(f"\n### At the end, and at equal in-domain gain (in-domain ppl {target:.2f}, reached by every run)")
    rows = []
    for m, rs in by_method.items():
        at = [ood_at_gain(r["curve"], target) for r in rs]
        rows.append([
            m, len(rs), spread([r["curve"][-1]["in_domain"] for r in rs]), spread([r["curve"][-1]["out_of_domain"] for r in rs]),
            spread([a for a in at if a is not None]) if any(a is not None for a in at) else "-",
            f"{statistics.mean(r['trainable_params'] for r in rs) / full['trainable_params']:.3f}",
            f"{statistics.mean(_peak(r) for r in rs) / max(_peak(full), 1):.3f}",
            f"{statistics.mean(r['step_time'] for r in rs) / full['step_time']:.3f}",
        ])
    print(table(["method", "runs", "in-domain ppl", "out-of-domain ppl", "out-of-domain at equal gain",
                 "trainable params", "optimizer state (peak)", "step time"], rows))


def _peak(result: dict[str, Any]) -> int:
    """The peak optimizer state of a run (runs saved before it was measured: their state at the end)."""
    return result.get("optimizer_state_peak_bytes") or result["optimizer_state_bytes"]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors: dict[str, Any] = {}
    for r in results:
        color = colors.setdefault(r["method"], f"C{len(colors)}")
        label = r["method"] if r["seed"] == min(x["seed"] for x in results if x["method"] == r["method"]) else None
        steps = [p["step"] for p in r["curve"]]
        ax1.plot(steps, [p["out_of_domain"] for p in r["curve"]], color=color, label=label, marker=".")
        ax2.plot([p["in_domain"] for p in r["curve"]], [p["out_of_domain"] for p in r["curve"]], color=color, marker=".")
    ax1.set(xlabel="optimizer step", ylabel="out-of-domain perplexity (prose never trained on)", title="Forgetting over steps")
    ax2.set(xlabel="in-domain perplexity (held-out plays)", ylabel="out-of-domain perplexity", title="Trade-off (left = more gain)")
    ax2.invert_xaxis()
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    _, tokenizer = real_model()
    data = heal_data(tokenizer, args.steps, args.batch_size, args.seq_len, args.eval_tokens)
    methods = [m for m in args.methods.split(",") if m]
    bi = calibration_bi(data) if {"bi", "lisa_bi"} & set(methods) else []
    seeds = [int(s) for s in args.seeds.split(",")]
    earlier = []
    if args.reuse:
        saved = json.loads(args.reuse.read_text())
        keys = ("steps", "eval_every", "batch_size", "seq_len", "lr", "eval_tokens", "lisa_blocks", "lisa_every")
        changed = {k: (saved["args"][k], vars(args)[k]) for k in keys if saved["args"][k] != vars(args)[k]}
        if changed:
            raise SystemExit(f"--reuse {args.reuse}: other settings (saved, now): {changed}")
        earlier = saved["results"]
    done = {(r["method"], r["seed"]): r for r in earlier}
    results = [done.get((m, seed)) or run(m, seed, data, bi, args) for m in methods for seed in (seeds if m in SEEDED else [0])]
    report(results, args)
    args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                      "bi": bi, "results": results}, indent=2))
    picture = args.json.with_suffix(".png")
    plot(results, picture)
    print(f"\nwritten: {args.json}, {picture}")


if __name__ == "__main__":
    main()
