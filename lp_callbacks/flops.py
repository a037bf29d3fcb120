r"""Parameter counts and FLOPs per token of a decoder-only transformer, from its Hugging Face config.

Pure functions: no Lightning, no forward pass. The depth monitor logs them as blocks are removed.

FLOPs per token of one **forward** pass (a multiply-add counts 2 FLOPs; ``training=True`` multiplies by 3, the usual
"backward costs two forwards" estimate). With ``d`` the hidden size, ``H`` query heads, ``K`` key/value heads,
``h`` the head dimension, ``f`` the MLP width, ``V`` the vocabulary and ``c_i`` the attention context of layer ``i``::

    per layer i
      attention projections   2 * d * (H*h + 2*K*h)  +  2 * (H*h) * d          # q, k, v, o
      attention scores        4 * H * h * c_i                                  # Q K^T and A V
      MLP, gated (SwiGLU...)  2 * 3 * d * f                                    # gate, up, down
      MLP, plain (GELU...)    2 * 2 * d * f                                    # up, down
      MLP, mixture of experts 2 * d * E  +  k * 2 * 3 * d * f_e  (+ shared expert 2 * 3 * d * f_s + 2 * d)
    LM head                   2 * d_out * V   (+ OPT's project_in/out, 2 * 2 * d * d_out, when d_out != d)

    FLOPs/token = sum over the current layers + LM head

``c_i = seq_len`` (every query against the full padded sequence: what eager/SDPA attention computes, and the
PaLM/Chinchilla convention), ``min(seq_len, window)`` for sliding-window layers. With ``causal=True``, ``c_i`` is
instead the mean number of visible keys over positions ``t = 1..T``: ``mean_t min(t, window)`` (``(T + 1) / 2``
without a window), what a causal kernel such as FlashAttention does.

Left out because they are small next to the matmuls (under 1% for real models): embedding lookups, norms, biases,
activations, softmax, rotary embeddings, residual adds, MoE routing beyond the router matmul.
For a dense model the matmul part equals ``2 * N_matmul`` with ``N_matmul`` the parameters of every weight matrix
except the input embedding (the LM head counted even when tied): ``tests/test_flops.py`` checks that identity.

Example:
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=100)
    >>> flops_per_token(cfg, seq_len=16)
    168448.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lp_callbacks.architectures import DecoderStack, expert_layers, find_hf_model, has_gated_mlp
from lp_callbacks.validation import check_int

__all__ = [
    "FlopsBreakdown",
    "LayerFlops",
    "ParameterCounts",
    "TransformerDims",
    "count_parameters",
    "flops_breakdown",
    "flops_per_token",
    "transformer_dims",
]

@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a module, each shared tensor counted once (tied embeddings)."""

    total: int
    trainable: int


def count_parameters(module: nn.Module) -> ParameterCounts:
    """Count the parameters of ``module``: all of them and those with ``requires_grad``.

    Example:
        >>> count_parameters(nn.Linear(4, 3))
        ParameterCounts(total=15, trainable=15)
    """
    params = list(module.parameters())  # yields a shared (tied) parameter once
    return ParameterCounts(total=sum(p.numel() for p in params),
                           trainable=sum(p.numel() for p in params if p.requires_grad))


@dataclass(frozen=True)
class TransformerDims:
    """The sizes the FLOPs formula needs, read from any supported family's config (see :func:`transformer_dims`)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool
    vocab_size: int
    output_dim: int  # the width the LM head multiplies (OPT's word_embed_proj_dim), usually hidden_size
    layer_types: tuple[str, ...] | None
    sliding_window: int | None
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()


def _text_config(config: Any) -> Any:
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _need(config: Any, what: str, *names: str) -> int:
    """The first of the config fields ``names`` that is set, as an int; raises naming ``what`` and the fields."""
    value = _first(config, *names)
    if value is None:
        raise ValueError(
            f"Cannot read the {what} from {type(config).__name__} (model_type={getattr(config, 'model_type', None)!r}):"
            f" none of the fields {list(names)} is set."
        )
    return int(value)


# Config fields of architectures the formula does not count (DeepSeek-V2/V3: MLA, dense first layers, shared experts).
_UNMODELLED = ("q_lora_rank", "kv_lora_rank", "first_k_dense_replace", "n_shared_experts")


def transformer_dims(config: Any, num_layers: int | None = None) -> TransformerDims:
    """Normalise an HF config (any supported family, multimodal configs through their text config).

    Args:
        config: a ``PretrainedConfig``.
        num_layers: the current number of decoder blocks when it differs from ``config.num_hidden_layers``.

    Raises:
        ValueError: when a size the formula needs is missing; the message names the fields searched.
    """
    config = _text_config(config)
    model_type = str(getattr(config, "model_type", "") or "")
    unmodelled = [f for f in _UNMODELLED if getattr(config, f, None)]
    if unmodelled:
        raise ValueError(
            f"The FLOPs formula does not model {type(config).__name__}'s {unmodelled} (latent attention, dense first"
            " layers, shared experts in that form): no number rather than a wrong one."
        )
    hidden = _need(config, "hidden size", "hidden_size", "n_embd", "d_model")
    heads = _need(config, "number of attention heads", "num_attention_heads", "n_head")
    layers = num_layers if num_layers is not None else _need(config, "number of layers", "num_hidden_layers", "n_layer")
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)

    if model_type == "falcon":  # its num_kv_heads property is only honoured with the new decoder architecture
        if getattr(config, "new_decoder_architecture", False):
            kv_heads = int(config.num_kv_heads)
        else:
            kv_heads = 1 if getattr(config, "multi_query", False) else heads
    else:
        kv_heads = int(_first(config, "num_key_value_heads") or heads)

    if model_type == "opt":
        intermediate = int(config.ffn_dim)
    elif model_type == "falcon":
        intermediate = int(getattr(config, "ffn_hidden_size", None) or 4 * hidden)
    else:
        intermediate = int(_first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden)

    vocab = _need(config, "vocabulary size", "vocab_size")
    output_dim = int(getattr(config, "word_embed_proj_dim", None) or hidden) if model_type == "opt" else hidden

    layer_types = getattr(config, "layer_types", None)
    layer_types = tuple(layer_types[:layers]) if isinstance(layer_types, (list, tuple)) and len(layer_types) >= layers else None
    window = getattr(config, "sliding_window", None)
    window = int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None

    num_experts = int(_first(config, "num_local_experts", "num_experts", "n_routed_experts") or 0)
    experts_per_token = int(getattr(config, "num_experts_per_tok", 0) or 0) if num_experts else 0
    expert_size = int(getattr(config, "moe_intermediate_size", None) or intermediate) if num_experts else 0
    shared_size = int(getattr(config, "shared_expert_intermediate_size", 0) or 0) if num_experts else 0
    return TransformerDims(
        model_type=model_type,
        num_layers=int(layers),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        gated_mlp=has_gated_mlp(model_type),
        vocab_size=vocab,
        output_dim=output_dim,
        layer_types=layer_types,
        sliding_window=window,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        expert_intermediate_size=expert_size,
        shared_expert_intermediate_size=shared_size,
        moe_layers=expert_layers(config, int(layers), num_experts),
    )


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per token of one decoder block."""

    attention_projections: float
    attention_scores: float
    mlp: float

    @property
    def total(self) -> float:
        return self.attention_projections + self.attention_scores + self.mlp


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token, block by block (current numbering), plus the LM head."""

    seq_len: int
    layers: tuple[LayerFlops, ...]
    lm_head: float

    @property
    def attention_projections(self) -> float:
        return sum(layer.attention_projections for layer in self.layers)

    @property
    def attention_scores(self) -> float:
        return sum(layer.attention_scores for layer in self.layers)

    @property
    def mlp(self) -> float:
        return sum(layer.mlp for layer in self.layers)

    @property
    def total(self) -> float:
        return sum(layer.total for layer in self.layers) + self.lm_head


def _context(seq_len: int, window: int | None, causal: bool) -> float:
    w = seq_len if window is None else min(window, seq_len)
    if not causal:
        return float(w)
    # mean over t = 1..T of min(t, w): a triangle up to w, then w for the remaining T - w positions
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _is_sliding(dims: TransformerDims, i: int) -> bool:
    if dims.sliding_window is None:
        return False
    if dims.layer_types is not None:
        return dims.layer_types[i] == "sliding_attention"
    return True  # Mistral, Mixtral, Starcoder2, Phi-3: a window without per-layer types applies to every layer


def flops_breakdown(config: Any, seq_len: int, causal: bool = False, num_layers: int | None = None) -> FlopsBreakdown:
    """Forward FLOPs per token of each block and of the LM head (formula in the module docstring).

    Args:
        config: an HF config, or a model (the config of the HF model it holds), or a
            :class:`~lp_callbacks.architectures.DecoderStack`.
        seq_len: tokens per sequence (the padded length of the batches).
        causal: count only the keys a causal kernel visits (see the module docstring).
        num_layers: current number of blocks when it differs from the config's.

    Raises:
        ValueError: for a ``seq_len`` that is not a positive int, or a config without the sizes needed.
    """
    check_int("seq_len", seq_len, minimum=1)
    if isinstance(config, (nn.Module, DecoderStack)):
        config = find_hf_model(config).config
    dims = transformer_dims(config, num_layers)
    d, h = dims.hidden_size, dims.head_dim
    q_width, kv_width = dims.num_heads * h, dims.num_kv_heads * h
    projections = 2.0 * d * (q_width + 2 * kv_width) + 2.0 * q_width * d
    dense_mlp = 2.0 * (3 if dims.gated_mlp else 2) * d * dims.intermediate_size
    moe_mlp = (
        2.0 * d * dims.num_experts
        + dims.experts_per_token * 2.0 * 3 * d * dims.expert_intermediate_size
        + (2.0 * 3 * d * dims.shared_expert_intermediate_size + 2.0 * d if dims.shared_expert_intermediate_size else 0.0)
    )
    layers = []
    for i in range(dims.num_layers):
        window = dims.sliding_window if _is_sliding(dims, i) else None
        scores = 4.0 * dims.num_heads * h * _context(seq_len, window, causal)
        mlp = moe_mlp if dims.moe_layers and dims.moe_layers[i] else dense_mlp
        layers.append(LayerFlops(attention_projections=projections, attention_scores=scores, mlp=mlp))
    head = 2.0 * dims.output_dim * dims.vocab_size
    if dims.output_dim != d:  # OPT's project_in / project_out
        head += 2.0 * 2 * d * dims.output_dim
    return FlopsBreakdown(seq_len=seq_len, layers=tuple(layers), lm_head=head)


def flops_per_token(
    config: Any, seq_len: int, causal: bool = False, training: bool = False, num_layers: int | None = None
) -> float:
    """Estimated FLOPs per token of the current architecture: forward, or forward + backward with ``training``.

    See the module docstring for the formula and what it leaves out.

    Example:
        >>> flops_per_token(model.config, seq_len=2048, training=True)  # doctest: +SKIP
        8.1e8
    """
    total = flops_breakdown(config, seq_len, causal=causal, num_layers=num_layers).total
    return 3.0 * total if training else total
