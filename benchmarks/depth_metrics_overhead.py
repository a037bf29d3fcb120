"""What DepthEfficiencyMonitor costs per training step: median step time with vs without it, side by side.

Three measurements, because on a shared machine end-to-end noise can exceed the effect:

1. alternating steps (paired, the robust one): one training run where the monitor's per-step hooks run on every
   other optimizer step only (its logging steps included); median time of the steps with it vs the steps without;
2. separate runs (``--runs``): the same training with and without the monitor, in alternating rounds
   (A B A B ...); median step time of each and their ratio;
3. direct: the wall time spent inside the monitor's own hooks, per step (logging steps amortised), as a fraction of
   the median step time without it.

The model is a small Llama on random tokens; each step is timed by a clock callback (which synchronises the GPU
itself, the monitor does not).

To run:
    python benchmarks/depth_metrics_overhead.py                  # CPU, 1 thread, under a minute
    python benchmarks/depth_metrics_overhead.py --runs 3         # also separate A/B runs
    python benchmarks/depth_metrics_overhead.py --device cuda --hidden 512 --layers 8 --steps 400
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from lp_callbacks.callbacks.depth_efficiency import DepthEfficiencyMonitor

HOOKS = ("on_train_batch_start", "on_train_batch_end")


class Tokens(Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


class LM(pl.LightningModule):
    def __init__(self, hidden: int, layers: int, vocab: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=max(1, hidden // 64), vocab_size=vocab, use_cache=False)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch, labels=batch["input_ids"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepClock(Callback):
    """Wall time between consecutive optimizer-step ends (synchronised on GPU only here, in the clock)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.times, self._last = cuda, [], None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def _time_hooks(monitor: DepthEfficiencyMonitor) -> list[float]:
    """Wrap the monitor's per-step hooks (which call its logging on logging steps) with a clock."""
    spent: list[float] = []
    for name in HOOKS:
        hook = getattr(monitor, name)

        @functools.wraps(hook)
        def timed(*args: Any, _hook: Any = hook, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)

        setattr(monitor, name, timed)
    return spent


class AlternateSteps(Callback):
    """Runs the monitor's per-step hooks only for batches that start at an odd global step (they end at an even
    one, so the monitor's logging steps, multiples of an even interval, are among them); other hooks always."""

    def __init__(self, monitor: DepthEfficiencyMonitor) -> None:
        self.monitor = monitor
        self.on = False

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self.monitor.setup(*args, **kwargs)

    def on_fit_start(self, *args: Any) -> None:
        self.monitor.on_fit_start(*args)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.on = trainer.global_step % 2 == 1
        if self.on:
            self.monitor.on_train_batch_start(trainer, *args)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.on:
            self.monitor.on_train_batch_end(trainer, *args)


def _trainer(args: argparse.Namespace, callbacks: list[Callback], steps: int) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, log_every_n_steps=args.log_every)


def _data(args: argparse.Namespace, steps: int) -> DataLoader:
    return DataLoader(Tokens(steps * args.batch, args.seq_len, args.vocab), batch_size=args.batch)


def _monitor(args: argparse.Namespace) -> DepthEfficiencyMonitor:
    return DepthEfficiencyMonitor(log_every_n_steps=args.log_every, save_plots_on_fit_end=False, write_summary=False)


def run_alternating(args: argparse.Namespace) -> tuple[list[float], list[float], list[float]]:
    """Returns (step times without, step times with, seconds spent in the monitor's hooks per hooked step)."""
    monitor = _monitor(args)
    spent = _time_hooks(monitor)
    gate, clock = AlternateSteps(monitor), StepClock(args.device == "cuda")
    flags: list[bool] = []

    class Flag(Callback):
        def on_train_batch_end(self, *a: Any) -> None:
            flags.append(gate.on)

    steps = 2 * args.steps + args.warmup
    _trainer(args, [gate, clock, Flag()], steps).fit(LM(args.hidden, args.layers, args.vocab), _data(args, steps))
    pairs = list(zip(flags[1:], clock.times))[args.warmup :]  # clock.times[i] ends at batch i + 1
    with_ = [t for on, t in pairs if on]
    without = [t for on, t in pairs if not on]
    per_step = [a + b for a, b in zip(spent[0::2], spent[1::2])]  # (start, end) per hooked step
    return without, with_, per_step[args.warmup // 2 :]


def run_separately(args: argparse.Namespace, with_monitor: bool) -> list[float]:
    clock = StepClock(args.device == "cuda")
    callbacks: list[Callback] = [_monitor(args), clock] if with_monitor else [clock]
    steps = args.steps + args.warmup
    _trainer(args, callbacks, steps).fit(LM(args.hidden, args.layers, args.vocab), _data(args, steps))
    return clock.times[args.warmup :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="timed steps with the monitor (and as many without)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=0, help="also this many separate with/without run pairs")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: far less noise on a shared machine; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.set_float32_matmul_precision("high")

    without, with_, hook_times = run_alternating(args)
    base, mon = statistics.median(without), statistics.median(with_)
    hooks_per_step = statistics.mean(hook_times)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nDepthEfficiencyMonitor overhead on {device}: Llama hidden={args.hidden} layers={args.layers}"
          f" seq={args.seq_len} batch={args.batch}, logging every {args.log_every} steps")
    print(f"{'':40}{'without':>12}{'with':>12}{'ratio':>10}")
    print(f"{'alternating steps: median step (ms)':40}{base * 1e3:>12.3f}{mon * 1e3:>12.3f}{mon / base:>10.4f}"
          f"   ({len(without)} + {len(with_)} steps)")
    # noise floor: the same comparison between the even and odd halves of the steps without the monitor (A vs A)
    a_vs_a = statistics.median(without[1::2]) / statistics.median(without[0::2])
    print(f"{'  noise floor (without vs without)':40}{'':>24}{a_vs_a:>10.4f}")
    if args.runs:
        a: list[float] = []
        b: list[float] = []
        for _ in range(args.runs):
            a += run_separately(args, with_monitor=False)
            b += run_separately(args, with_monitor=True)
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{'separate runs: median step (ms)':40}{ma * 1e3:>12.3f}{mb * 1e3:>12.3f}{mb / ma:>10.4f}"
              f"   ({args.runs} x {args.steps} steps each)")
    print(f"{'in monitor hooks, per step (us)':40}{'':>12}{hooks_per_step * 1e6:>12.1f}{hooks_per_step / base:>10.3%}"
          f"   (median {statistics.median(hook_times) * 1e6:.1f} us, logging steps {max(hook_times) * 1e3:.2f} ms)")

if __name__ == "__main__":
    main()
