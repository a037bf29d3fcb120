"""Depth statistics: BI summaries, batch sequence length, model sizes (FLOPs left out without an HF config)."""

from __future__ import annotations

import torch
from conftest import TinyLM

from lp_callbacks.depth_stats import batch_seq_len, bi_stats, model_size
from lp_callbacks.flops import flops_per_token


def test_bi_stats():
    bi = torch.tensor([0.2, 0.2, 0.0, float("nan")], dtype=torch.float64)
    assert bi_stats(bi, threshold=0.05) == {"layers_below_threshold": 1.0, "effective_depth": 2.0}
    assert bi_stats(bi, threshold=None) == {"effective_depth": 2.0}
    assert bi_stats(torch.zeros(3), threshold=0.1) == {"layers_below_threshold": 3.0}


def test_batch_seq_len():
    ids = torch.ones(2, 7, dtype=torch.long)
    assert batch_seq_len({"input_ids": ids}) == 7 and batch_seq_len({"attention_mask": ids[:, :3]}) == 3
    assert batch_seq_len((ids,)) == 7 and batch_seq_len(ids) == 7
    assert batch_seq_len({"text": "x"}) is None and batch_seq_len([]) is None


def test_model_size_counts_and_flops():
    module = TinyLM("llama", num_layers=2)
    size = model_size(module, None, seq_len=16)
    assert size["num_layers"] == 2 and size["params_total"] == size["params_trainable"] > 0
    assert size["flops_per_token"] == flops_per_token(module.model.config, 16) and size["seq_len"] == 16
    assert model_size(module, None, seq_len=None)["flops_per_token"] is None


def test_model_size_without_hf_config_warns_and_leaves_flops_out():
    class Blocks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    said: list[str] = []
    size = model_size(Blocks(), "layers", seq_len=8, warn=said.append)
    assert size["num_layers"] == 3 and size["params_total"] == 18 and size["flops_per_token"] is None
    assert len(said) == 1 and "FLOPs/token left out" in said[0]
