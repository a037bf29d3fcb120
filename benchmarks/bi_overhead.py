"""What measuring Block Influence costs, on the real SmolLM2-135M (30 blocks, 135M params) and Shakespeare text.

1. Training-step time with vs without the monitor, inside a Lightning Trainer. The monitor runs with
   ``every_n_steps=2``: even steps are measured, odd steps are not, so both kinds of step are interleaved in the
   same run (same machine noise, same warm caches) and we report the ratio of their medians.
2. ``block_influence()`` vs a plain forward of the model vs the popular ``output_hidden_states`` implementation:
   time (interleaved repeats, medians) and peak memory (each in a fresh process, peak RSS above the loaded model).
3. The BI profile from the monitor inside a Trainer, from ``block_influence()``, and from a plain reference
   (hooks + textbook cosine in float64): max differences, and the profile itself.

To run:
    python benchmarks/bi_overhead.py            # about 5 minutes on 2 CPU cores
    python benchmarks/bi_overhead.py --quick    # fewer steps and repeats
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import StepTimer, check_result_path, median, real_model, shakespeare_blocks, table, write_json_result
from torch.utils.data import DataLoader, TensorDataset

from lp_callbacks import BlockInfluenceMonitor, block_influence, get_decoder_layers
from lp_callbacks.architectures import decoder_stack
from lp_callbacks.functional import bi_from_hidden_states


class LM(pl.LightningModule):
    def __init__(self, model, lr: float):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def trainer_overhead(steps: int, batch: int, seq: int) -> dict:
    model, tok = real_model()
    ids = shakespeare_blocks(tok, steps * batch, seq)
    monitor = BlockInfluenceMonitor(every_n_steps=2, log_every_n_steps=1)
    timer = StepTimer()  # after the monitor: its end-of-step time includes the monitor's
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, timer])
    trainer.fit(LM(model, 1e-5), DataLoader(TensorDataset(ids), batch_size=batch))
    warm = {s: t for s, t in zip(timer.steps, timer.times) if s >= 2}  # the first steps warm up allocators
    measured = [t for s, t in warm.items() if s % 2 == 0]
    plain = [t for s, t in warm.items() if s % 2 == 1]
    return {"with_monitor_s": median(measured), "without_s": median(plain), "ratio": median(measured) / median(plain),
            "pairs": len(plain), "tokens_per_step": batch * seq}


# ------------------------------------------------------------------------------------------ offline methods
def plain_forward(model, batch):
    with torch.no_grad():
        model(**batch, use_cache=False)


def hidden_states_bi(model, batch):
    """What the popular post-hoc scripts do: keep all L+1 hidden states, then compare them."""
    with torch.no_grad():
        states = model(**batch, use_cache=False, output_hidden_states=True).hidden_states
    return bi_from_hidden_states(states, batch["attention_mask"])


def decoder_forward(model, batch):
    """The same work block_influence() does minus the measuring: the blocks' owner (no LM head)."""
    with torch.no_grad():
        decoder_stack(model).owner(**batch, use_cache=False)


def hooks_bi(model, batch):
    return block_influence(model, [batch])


METHODS = {
    "plain forward (LM)": plain_forward,
    "plain forward (decoder only)": decoder_forward,
    "block_influence()": hooks_bi,
    "output_hidden_states": hidden_states_bi,
}


def _batch(tok, batch: int, seq: int):
    ids = shakespeare_blocks(tok, batch, seq, skip_blocks=1000)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def offline_times(repeats: int, batch: int, seq: int) -> dict[str, float]:
    model, tok = real_model()
    model.eval()
    data = _batch(tok, batch, seq)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for fn in METHODS.values():  # warm-up
        fn(model, data)
    for _ in range(repeats):
        for name, fn in METHODS.items():  # interleaved: the same noise for everyone
            t0 = time.perf_counter()
            fn(model, data)
            times[name].append(time.perf_counter() - t0)
    return {name: median(ts) for name, ts in times.items()}


def _rss_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _rss_now_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def peak_memory_child(method: str, batch: int, seq: int) -> None:
    """Runs in a fresh process: peak RSS of one call above the RSS of the loaded model."""
    torch.set_num_threads(1)
    model, tok = real_model()
    model.eval()
    data = _batch(tok, batch, seq)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = _rss_now_kib()
    METHODS[method](model, data)
    print(json.dumps({"peak_mib": (_rss_peak_kib() - base) / 1024}))


def offline_memory(batch: int, seq: int) -> dict[str, float]:
    out = {}
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", method, "--batch", str(batch), "--seq", str(seq)],
                              capture_output=True, text=True, check=True)
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


# ------------------------------------------------------------------------------------------ agreement
def reference_bi(model, batches):
    """Independent reference: capture each block's input/output with plain hooks; textbook cosine in float64."""
    layers = get_decoder_layers(model)
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    for batch in batches:
        captured: list = []

        def capture(m, a, kw, o, captured=captured):
            captured.append((a[0] if a else kw["hidden_states"], o[0] if isinstance(o, tuple) else o))

        handles = [layer.register_forward_hook(capture, with_kwargs=True) for layer in layers]
        with torch.no_grad():
            model(**batch)
        for h in handles:
            h.remove()
        mask = batch["attention_mask"].bool()
        for i, (x, y) in enumerate(captured):
            sums[i] += (1 - F.cosine_similarity(x.double(), y.double(), dim=-1))[mask].sum()
        count += int(mask.sum())
    return sums / count


def agreement(steps: int, batch: int, seq: int) -> dict:
    model, tok = real_model()
    ids = shakespeare_blocks(tok, steps * batch, seq, skip_blocks=2000)
    batches = [{"input_ids": ids[i : i + batch], "attention_mask": torch.ones_like(ids[i : i + batch])} for i in range(0, len(ids), batch)]
    monitor = BlockInfluenceMonitor()
    # lr = 0: the weights stay put, so the training forwards see the same model as the offline passes.
    # SmolLM2 has no dropout, so train mode and eval mode compute the same thing.
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(LM(model, 0.0), DataLoader(TensorDataset(ids), batch_size=batch))
    model.eval()
    offline = block_influence(model, batches)
    reference = reference_bi(model, batches)
    return {
        "monitor_vs_reference": float((monitor.block_influence - reference).abs().max()),
        "offline_vs_reference": float((offline - reference).abs().max()),
        "profile": reference.tolist(),
        "tokens": int(ids.numel()),
    }


BENCHMARK = "bi_overhead"  # the mark of its --json files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-agreement", action="store_true", help="only the timing and memory parts")
    args = parser.parse_args(argv)
    if not args.memory_child:  # a child writes no result file
        try:
            check_result_path(args.json, BENCHMARK)
        except ValueError as e:
            parser.error(str(e))
    return args


def main() -> None:
    args = parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child, args.batch, args.seq)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, repeats = (8, 3) if args.quick else (22, 7)
    results = {"torch_threads": torch.get_num_threads(), "cpu": os.cpu_count()}

    if not args.skip_agreement:
        print_agreement(results)
    print_training(results, steps, args)
    print_offline(results, repeats, args)
    if args.json:
        write_json_result(args.json, results, BENCHMARK)


def print_agreement(results: dict) -> None:
    results["agreement"] = agree = agreement(steps=4, batch=4, seq=128)
    print(f"\n## BI agreement on SmolLM2-135M ({agree['tokens']} Shakespeare tokens)")
    print(f"max |monitor in Trainer - reference| = {agree['monitor_vs_reference']:.2e}")
    print(f"max |block_influence() - reference|  = {agree['offline_vs_reference']:.2e}")
    print(table(["layer", "BI"], [[i, f"{v:.4f}"] for i, v in enumerate(agree["profile"])]))



def print_training(results: dict, steps: int, args: argparse.Namespace) -> None:
    results["training"] = tr = trainer_overhead(steps, 4, args.seq)
    print(f"\n## Training step, batch 4 x {args.seq} tokens, AdamW, fp32 CPU ({tr['pairs']} interleaved pairs)")
    print(table(["", "median step (s)", "ratio"],
                [["without monitor", f"{tr['without_s']:.3f}", "1.000"],
                 ["with BlockInfluenceMonitor", f"{tr['with_monitor_s']:.3f}", f"{tr['ratio']:.3f}"]]))



def print_offline(results: dict, repeats: int, args: argparse.Namespace) -> None:
    results["offline_time_s"] = times = offline_times(repeats, args.batch, args.seq)
    results["offline_peak_mib"] = mem = offline_memory(args.batch, args.seq)
    base_t, base_m = times["plain forward (LM)"], mem["plain forward (LM)"]
    print(f"\n## Offline measurement, batch {args.batch} x {args.seq} tokens (time: median of {repeats}; memory: peak RSS above the model)")
    print(table(["method", "time (s)", "time ratio", "peak extra memory (MiB)", "memory ratio"],
                [[name, f"{times[name]:.3f}", f"{times[name] / base_t:.2f}", f"{mem[name]:.0f}", f"{mem[name] / base_m:.2f}"]
                 for name in METHODS]))


if __name__ == "__main__":
    main()
