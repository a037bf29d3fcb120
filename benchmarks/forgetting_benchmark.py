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

from _common import (  # noqa: E402
    Blocks,
    StepTimer,
    check_result_path,
    differing_settings,
    heal_data,
    real_model,
    table,
    write_atomically,
    write_json_result,
)

from lp_callbacks import measure_depth  # noqa: E402
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback  # noqa: E402
from lp_callbacks.evaluation import PerplexityProtocol, perplexity  # noqa: E402
from lp_callbacks.freezing import optimizer_state_bytes  # noqa: E402
from lp_callbacks.harness.module import CausalLMModule  # noqa: E402

METHODS = ("full", "blocks", "bi", "random", "position", "lora", "lisa", "lisa_bi")
SEEDED = ("random", "lisa", "lisa_bi")
BENCHMARK = "forgetting_benchmark"  # the mark of its result files
NUM_LAYERS = 30  # SmolLM2-135M's blocks (the bound of --lisa-blocks)
# the settings a run's numbers depend on: --reuse takes runs only from a file made with the same
REUSE_KEYS = ("steps", "eval_every", "batch_size", "seq_len", "lr", "eval_tokens", "lisa_blocks", "lisa_every")


def picture_path(json_path: Path) -> Path:
    """The PNG written next to the JSON."""
    return json_path.with_suffix(".png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, every one checked (and the result paths, and a --reuse file's settings) before any work."""
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
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        parser.error(f"--methods must be a comma-separated list of distinct methods among {', '.join(METHODS)};"
                     f" got {args.methods!r}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    args.method_list = methods
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be a comma-separated list of distinct ints >= 0, got {args.seeds!r}")
    args.seed_list = seeds
    for name in ("steps", "eval_every", "batch_size", "seq_len", "eval_tokens", "lisa_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an int >= 1, got {getattr(args, name)}")
    if not 1 <= args.lisa_blocks <= NUM_LAYERS:
        parser.error(f"--lisa-blocks must be in [1, {NUM_LAYERS}] (SmolLM2-135M's blocks), got {args.lisa_blocks}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.json.suffix.lower() == ".png":
        parser.error(f"--json must not end in .png (the picture is written next to the JSON, as .png), got {args.json}")
    try:
        saved = check_result_path(args.json, BENCHMARK)
        picture = picture_path(args.json)
        if picture.is_symlink() or (picture.exists() and not picture.is_file()):
            raise ValueError(f"the picture path {picture} (next to --json) is a link or not a file: pass another --json")
        if picture.exists() and (saved is None or saved.get("picture") != picture.name):
            raise ValueError(f"the picture path {picture} (next to --json {args.json}) exists but the JSON there does not"
                             " name it as its picture, so it is not this benchmark's to replace. Delete it or pass"
                             " another --json")
    except ValueError as e:
        parser.error(str(e))
    args.earlier = []
    if args.reuse:
        try:
            saved = json.loads(args.reuse.read_text(encoding="utf-8"))
            saved_args, earlier = saved["args"], saved["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--reuse {args.reuse}: not a JSON of this benchmark with \"args\" and \"results\" ({e!r})")
        changed = differing_settings(saved_args, vars(args), REUSE_KEYS)
        if changed:
            parser.error(f"--reuse {args.reuse} was made with other settings (saved, now): {changed}")
        args.earlier = earlier
    return args


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
    full = next((r for r in results if r["method"] == "full"), results[0])  # the reference of the ratios
    ref = "full" if full["method"] == "full" else f"{full['method']}; full not run"
    if full["method"] != "full":
        print(f"\nfull fine-tuning was not among --methods: the ratios below are to {full['method']}, not to full")
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
                 f"trainable params (x {ref})", f"optimizer state, peak (x {ref})", f"step time (x {ref})"], rows))


def _peak(result: dict[str, Any]) -> int:
    """The peak optimizer state of a run (runs saved before it was measured: their state at the end)."""
    return result.get("optimizer_state_peak_bytes") or result["optimizer_state_bytes"]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """The two panels, written to ``path`` atomically (its ownership checked by the caller)."""
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
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    _, tokenizer = real_model()
    data = heal_data(tokenizer, args.steps, args.batch_size, args.seq_len, args.eval_tokens)
    methods, seeds = args.method_list, args.seed_list
    bi = calibration_bi(data) if {"bi", "lisa_bi"} & set(methods) else []
    done = {(r["method"], r["seed"]): r for r in args.earlier}
    results = [done.get((m, seed)) or run(m, seed, data, bi, args) for m in methods for seed in (seeds if m in SEEDED else [0])]
    report(results, args)
    saved_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                  if k not in ("earlier", "method_list", "seed_list")}
    picture = picture_path(args.json)
    # the JSON first: it names the picture, which makes the picture this benchmark's to replace next time
    write_json_result(args.json, {"args": saved_args, "bi": bi, "results": results, "picture": picture.name}, BENCHMARK)
    plot(results, picture)
    print(f"\nwritten: {args.json}, {picture}")


if __name__ == "__main__":
    main()
