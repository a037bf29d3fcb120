"""The callbacks under FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` per block), 2 CPU processes (gloo),
on the real SmolLM2-135M (30 blocks) and Shakespeare text.

1. The monitor's overhead: ``BlockInfluenceMonitor(every_n_steps=2)`` measures the even steps only, so measured and
   unmeasured steps alternate in the same run (same machine noise); the ratio of their medians is reported.
2. The cost of a removal event under FSDP2: ``LayerPruneCallback`` removes 6 blocks at ``--prune-step``; the event's
   own wall time (choice, removal, optimizer, FSDP2 re-initialisation) is the callback's ``seconds`` record. The same
   run under DDP is timed for reference with ``--ddp``.

To run (about 10 minutes on 2 CPU cores; each rank holds the whole 135M model before sharding):
    python benchmarks/fsdp2_benchmark.py
    python benchmarks/fsdp2_benchmark.py --steps 12 --ddp
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import Blocks, StepTimer, median, real_model, shakespeare_blocks, table
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from lp_callbacks import BlockInfluenceMonitor, LayerPruneCallback

NUM_LAYERS, REMOVED = 30, 6  # SmolLM2-135M's blocks; the blocks the event removes


class ShardedLM(pl.LightningModule):
    """The README's recipe: each decoder block, then the model, ``fully_shard``-ed in ``configure_model``."""

    def __init__(self, model, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def configure_model(self) -> None:
        if self.device_mesh is None:  # DDP: nothing to shard
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def run(args: argparse.Namespace, strategy_name: str) -> dict:
    model, tokenizer = real_model()
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the child; 0 in the parent
    data = Blocks(shakespeare_blocks(tokenizer, args.steps * args.batch * 2, args.seq))
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    monitor = BlockInfluenceMonitor(every_n_steps=2, log_every_n_steps=1)
    prune = LayerPruneCallback(num_layers=REMOVED, at_steps=[args.prune_step], criterion="block_influence")
    timer = StepTimer()  # last: a step's time includes the callbacks' end-of-step work
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy_name == "fsdp2" else "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[monitor, prune, timer])
    trainer.fit(ShardedLM(model, 1e-5), DataLoader(data, batch_size=args.batch, sampler=sampler))
    # steps 0-1 warm up; the step that starts at prune_step - 1 carries the removal; before it the model has 30
    # blocks, after it 24 (each window labelled by its own depth, whichever of them is empty)
    timed = [(s, t) for s, t in zip(timer.steps, timer.times) if s >= 2 and s != args.prune_step - 1]
    ratios = []
    for lo, hi, blocks in ((2, args.prune_step - 1, NUM_LAYERS), (args.prune_step, args.steps, NUM_LAYERS - REMOVED)):
        measured = [t for s, t in timed if lo <= s < hi and s % 2 == 0]
        plain = [t for s, t in timed if lo <= s < hi and s % 2 == 1]
        if measured and plain:
            ratios.append({"blocks": blocks, "with_monitor_s": median(measured),
                           "without_s": median(plain), "ratio": median(measured) / median(plain),
                           "pairs": min(len(measured), len(plain))})
    result = {"strategy": strategy_name, "event_seconds": prune.removed[0]["seconds"],
              "removed": prune.removed[0]["original_layers"], "overhead": ratios,
              "tokens_per_step": 2 * args.batch * args.seq}
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(result, indent=2))
    torch.distributed.destroy_process_group()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked before any run (a --prune-step past --steps once failed only after the run)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--prune-step", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ddp", action="store_true", help="also the same run under DDP, for reference")
    parser.add_argument("--strategy", default=None, help=argparse.SUPPRESS)  # one run, in a fresh process
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be an int >= 1, got {getattr(args, name)}")
    if not 1 <= args.prune_step <= args.steps:
        parser.error(f"--prune-step must be in [1, --steps={args.steps}] (the removal happens after that optimizer"
                     f" step, inside the run), got {args.prune_step}")
    if args.strategy not in (None, "fsdp2", "ddp"):
        parser.error(f"--strategy must be fsdp2 or ddp, got {args.strategy!r}")
    return args


def main() -> None:
    args = parse_args()
    if args.strategy:
        run(args, args.strategy)
        return
    import subprocess
    import tempfile

    results = []
    for name in ["fsdp2"] + (["ddp"] if args.ddp else []):  # one after the other: never two jobs on the same cores
        out = Path(tempfile.mkdtemp()) / "result.json"
        cmd = [sys.executable, __file__, "--strategy", name, "--out", str(out), "--steps", str(args.steps),
               "--prune-step", str(args.prune_step), "--batch", str(args.batch), "--seq", str(args.seq)]
        subprocess.run(cmd, check=True)
        results.append(json.loads(out.read_text()))
    print(f"\n## SmolLM2-135M, 2 CPU processes (gloo), {results[0]['tokens_per_step']} tokens per step, AdamW fp32")
    rows = []
    for r in results:
        for o in r["overhead"]:
            rows.append([r["strategy"], o["blocks"], f"{o['without_s']:.3f}", f"{o['with_monitor_s']:.3f}",
                         f"{o['ratio']:.3f}", o["pairs"]])
    print(table(["strategy", "blocks", "median step, unmeasured (s)", "median step, measured (s)", "ratio", "pairs"], rows))
    print(table(["strategy", "removal event (s)", "blocks removed"],
                [[r["strategy"], f"{r['event_seconds']:.3f}", r["removed"]] for r in results]))


if __name__ == "__main__":
    main()
