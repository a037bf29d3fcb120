"""What the depth monitor measures besides time: model size and FLOPs, tokens of a batch, peak memory, BI summaries.

Functions of a model, a batch or a BI vector; no Lightning callback machinery.

Example:
    >>> effective_depth([0.2, 0.2, 0.0, 0.0])
    2.0
    >>> bi_stats(torch.tensor([0.2, 0.2, 0.0, float("nan")]), threshold=0.05)
    {'layers_below_threshold': 1.0, 'effective_depth': 2.0}
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lp_callbacks.architectures import find_hf_model, get_decoder_layers
from lp_callbacks.flops import count_parameters, flops_per_token

__all__ = ["batch_seq_len", "bi_log_metrics", "bi_stats", "count_tokens", "effective_depth", "model_size",
           "peak_memory_bytes"]


def effective_depth(block_influence: Tensor | Sequence[float]) -> float | None:
    r"""Participation ratio of the Block Influence: ``(sum_i BI_i)^2 / sum_i BI_i^2``.

    How many blocks effectively carry the transformation: ``L`` when all ``L`` blocks change the hidden state
    equally, ``k`` when ``k`` blocks share the work equally and the others do nothing, ``1`` when one block does
    everything. Between 1 and the number of measured blocks; insensitive to the overall scale of BI (use
    ``layers_below_threshold`` for absolute redundancy). Non-finite entries (unmeasured blocks) are ignored.
    ``None`` when nothing finite and non-zero was measured.

    Example:
        >>> effective_depth([0.2, 0.2, 0.0, 0.0])
        2.0
    """
    bi = torch.as_tensor(block_influence, dtype=torch.float64).flatten()
    bi = bi[torch.isfinite(bi)].clamp_min(0.0)
    squares = float((bi * bi).sum())
    if squares <= 0.0:
        return None
    return float(bi.sum()) ** 2 / squares


def bi_stats(block_influence: Tensor, threshold: float | None) -> dict[str, float]:
    """``layers_below_threshold`` (when a threshold is given) and ``effective_depth`` of the finite BI entries."""
    finite = block_influence[torch.isfinite(block_influence)]
    out: dict[str, float] = {}
    if threshold is not None:
        out["layers_below_threshold"] = float((finite < threshold).sum())
    depth = effective_depth(finite)
    if depth is not None:
        out["effective_depth"] = depth
    return out


def bi_log_metrics(
    prefix: str, original_indices: Sequence[int], block_influence: Tensor, threshold: float
) -> dict[str, float]:
    """What :class:`~lp_callbacks.BlockInfluenceMonitor` logs of a BI vector: ``{prefix}/layer_XX`` per block
    (original numbering), ``min``, ``max``, ``mean`` and ``num_below_threshold`` of the finite values, ``num_layers``."""
    metrics = {f"{prefix}/layer_{orig:02d}": float(v) for orig, v in zip(original_indices, block_influence)}
    finite = block_influence[torch.isfinite(block_influence)]
    if finite.numel():
        metrics[f"{prefix}/min"] = float(finite.min())
        metrics[f"{prefix}/max"] = float(finite.max())
        metrics[f"{prefix}/mean"] = float(finite.mean())
        metrics[f"{prefix}/num_below_threshold"] = float((finite < threshold).sum())
    metrics[f"{prefix}/num_layers"] = float(len(original_indices))
    return metrics


def count_tokens(batch: Any) -> int | Tensor:
    """Tokens in a batch: ``attention_mask.sum()`` when a 2-D mask is present, else ``input_ids.numel()``.

    A tensor batch counts its elements, a tuple/list batch its first tensor. The mask sum stays a tensor on the
    batch's device (no GPU synchronisation); returns ``0`` for a batch it cannot read.
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2:
            return mask.sum()
        ids = batch.get("input_ids")
        if isinstance(ids, Tensor):
            return ids.numel()
        return 0
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0].numel()
    return 0


def batch_seq_len(batch: Any) -> int | None:
    """The padded sequence length of a batch (last dimension of ``input_ids``/``attention_mask`` or of its first
    tensor), ``None`` when it has none."""
    if isinstance(batch, Mapping):
        for key in ("input_ids", "attention_mask"):
            value = batch.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1:
                return int(value.shape[-1])
        return None
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[-1]) if isinstance(batch, Tensor) and batch.ndim >= 1 else None


def peak_memory_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS elsewhere (``None`` on Windows)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def model_size(
    module: torch.nn.Module,
    layers_path: str | None,
    seq_len: int | None,
    causal: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``num_layers``, ``params_total``, ``params_trainable``, ``flops_per_token`` (``None`` without ``seq_len`` or
    an HF config: then ``warn`` is told why) and ``seq_len`` of the model now.

    Args:
        module: the LightningModule (or any module holding one HF model).
        layers_path: dotted path of the decoder block list, for custom models.
        seq_len: the sequence length FLOPs/token are counted at.
        causal: count attention over the visible (causal) keys only.
        warn: receives the message when FLOPs cannot be counted.
    """
    num_layers = len(get_decoder_layers(module, layers_path))
    counts = count_parameters(module)
    flops = None
    if seq_len:
        try:
            config = find_hf_model(module, layers_path).config
            flops = flops_per_token(config, seq_len, causal=causal, num_layers=num_layers)
        except (AttributeError, ValueError) as err:  # a custom model without an HF config
            if warn is not None:
                warn(f"DepthEfficiencyMonitor: FLOPs/token left out: {err}")
    return {"num_layers": num_layers, "params_total": counts.total, "params_trainable": counts.trainable,
            "flops_per_token": flops, "seq_len": seq_len}
