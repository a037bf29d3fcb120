"""Parameter counts and FLOPs/token against independent counts made from the models' actual weights."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_config, tiny_model
from torch import nn

from lp_callbacks.flops import (
    count_parameters,
    flops_breakdown,
    flops_per_token,
    transformer_dims,
)


def _matmul_params(model: nn.Module) -> float:
    """Independent count: every weight matrix except the input embeddings, LM head included even when tied.

    3-D expert tensors ``(E, out, in)`` count ``top_k / E`` of their size: a token visits top_k experts.
    """
    config = model.config.get_text_config()
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = 0.0
    for p in model.parameters():
        if p.ndim < 2 or id(p) in embedding_ids:
            continue
        if p.ndim == 3:
            n += p.numel() * config.num_experts_per_tok / p.shape[0]
        else:
            n += p.numel()
    head = model.get_output_embeddings().weight
    if id(head) in embedding_ids:  # tied: the matmul still happens
        n += head.numel()
    return n


def _attention_scores(model: nn.Module, seq_len: int) -> float:
    """Independent count of Q K^T and A V from the attention modules' actual head counts (full context)."""
    total = 0.0
    for module in model.modules():
        heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
        head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
        if type(module).__name__.endswith("Attention") and heads and head_dim:
            total += 4.0 * heads * head_dim * seq_len
    return total


def _moe_model(kind: str):
    import transformers as tf

    common = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts_per_tok": 2, "pad_token_id": 0}
    if kind == "mixtral":
        config = tf.MixtralConfig(num_local_experts=4, **common)
    elif kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                   decoder_sparse_step=1, mlp_only_layers=[1], **common)
    else:
        config = tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, decoder_sparse_step=2, **common)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


# Sliding-window families use a window of 8 in conftest: seq_len 8 keeps every layer at full context.
SEQ = 8


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILIES)
def test_flops_equal_two_matmul_params_plus_attention(family):
    model = tiny_model(family, num_layers=4)
    expected = 2 * _matmul_params(model) + 4.0 * model.config.num_attention_heads * (
        model.config.hidden_size // model.config.num_attention_heads
        if getattr(model.config, "head_dim", None) is None else model.config.head_dim
    ) * SEQ * 4
    assert flops_per_token(model.config, seq_len=SEQ) == pytest.approx(expected, rel=1e-12)
    assert flops_per_token(model.config, seq_len=SEQ, training=True) == pytest.approx(3 * expected, rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "gemma", "falcon"])
def test_attention_term_matches_the_attention_modules(family):
    model = tiny_model(family, num_layers=3)
    breakdown = flops_breakdown(model.config, seq_len=SEQ)
    independent = _attention_scores(model, SEQ)
    assert independent > 0  # every family above exposes its head count and size on its attention module
    assert breakdown.attention_scores == pytest.approx(independent)
    assert breakdown.attention_projections + breakdown.mlp + breakdown.lm_head == pytest.approx(2 * _matmul_params(model))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_counts_active_experts_only(kind):
    model = _moe_model(kind)
    dims = transformer_dims(model.config)
    assert dims.num_experts == 4 and dims.experts_per_token == 2
    expected = 2 * _matmul_params(model) + 4.0 * 4 * 8 * SEQ * 4
    assert flops_per_token(model, seq_len=SEQ) == pytest.approx(expected, rel=1e-12)


def test_qwen_moe_dense_layers_follow_the_config_rule():
    dims = transformer_dims(_moe_model("qwen2_moe").config)
    assert dims.moe_layers == (True, False, True, True)  # mlp_only_layers=[1]
    assert transformer_dims(_moe_model("qwen3_moe").config).moe_layers == (False, True, False, True)  # step 2


def test_opt_projection_when_embedding_width_differs():
    import transformers as tf

    config = tf.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                          word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(config)
    assert flops_per_token(config, seq_len=SEQ) == pytest.approx(2 * _matmul_params(model) + 4.0 * 32 * SEQ * 2)


def test_sliding_window_layers_see_at_most_the_window():
    config = tiny_config("gemma2", num_layers=4)  # sliding, full, sliding, full; window 8; h = 8, H = 4
    b = flops_breakdown(config, seq_len=32)
    assert [layer.attention_scores for layer in b.layers] == [4.0 * 4 * 8 * 8, 4.0 * 4 * 8 * 32] * 2
    mistral = flops_breakdown(tiny_config("mistral", num_layers=2), seq_len=32)  # window everywhere
    assert {layer.attention_scores for layer in mistral.layers} == {4.0 * 4 * 8 * 8}


def test_causal_context_is_the_mean_number_of_visible_keys():
    config = tiny_config("llama", num_layers=1)
    T = 10
    full = flops_breakdown(config, seq_len=T).attention_scores
    causal = flops_breakdown(config, seq_len=T, causal=True).attention_scores
    assert causal == pytest.approx(full * sum(range(1, T + 1)) / T / T)
    windowed = flops_breakdown(tiny_config("mistral", num_layers=1), seq_len=T, causal=True).attention_scores
    assert windowed == pytest.approx(4.0 * 4 * 8 * sum(min(t, 8) for t in range(1, T + 1)) / T)


def test_flops_shrink_with_depth_and_follow_num_layers_override():
    config = tiny_config("llama", num_layers=6)
    per_layer = flops_breakdown(config, seq_len=SEQ).layers[0].total
    assert flops_per_token(config, SEQ) - flops_per_token(config, SEQ, num_layers=4) == pytest.approx(2 * per_layer)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "gemma", "phi"])
def test_parameter_counts_match_hf(family):
    model = tiny_model(family, num_layers=4)
    counts = count_parameters(model)
    assert counts.total == model.num_parameters()  # HF's own count, tied weights once
    for p in model.get_decoder().layers[1].parameters() if hasattr(model.get_decoder(), "layers") else []:
        p.requires_grad_(False)
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    counts = count_parameters(model)
    assert counts.trainable == model.num_parameters(only_trainable=True) < counts.total


def test_llama_parameter_count_by_hand():
    model = tiny_model("llama", num_layers=4)  # V=128, d=32, H=4, K=2, h=8, f=64, untied
    V, d, f, L = 128, 32, 64, 4
    per_layer = d * 32 + 2 * d * 16 + 32 * d + 3 * d * f + 2 * d
    assert count_parameters(model).total == V * d + L * per_layer + d + V * d


def test_bad_seq_len_and_missing_fields_are_named():
    config = tiny_config("llama")
    with pytest.raises(ValueError, match="`seq_len` must be an int >= 1, got 0"):
        flops_per_token(config, 0)

    class Bare:
        model_type = "custom"
        num_attention_heads = 4

    with pytest.raises(ValueError, match="hidden size.*hidden_size"):
        transformer_dims(Bare())


def test_a_family_the_formula_does_not_model_gets_no_number():
    """DeepSeek-V3 (MLA attention, dense first layers, shared experts) loads through the fallback paths: its FLOPs are
    refused, not miscounted (DepthEfficiencyMonitor then leaves FLOPs/token out with a warning)."""
    import transformers

    config = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                                           num_experts_per_tok=2)
    with pytest.raises(ValueError, match=r"does not model DeepseekV3Config's \['q_lora_rank', 'kv_lora_rank'"):
        transformer_dims(config)
