"""Where the decoder blocks of each supported Hugging Face family live.

This module is the ONLY place that knows model internals such as ``model.layers`` or ``transformer.h``. Everything
else asks :func:`get_decoder_layers` (and :func:`find_architecture` for per-layer config fields).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> len(get_decoder_layers(model))
    4
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "Architecture",
    "ARCHITECTURES",
    "find_architecture",
    "find_hf_model",
    "get_decoder_layers",
    "get_layers_owner",
    "resolve_layers_path",
]


@dataclass(frozen=True)
class Architecture:
    """How one model family stores its decoder blocks.

    Args:
        layer_paths: dotted attribute paths of the block ``ModuleList``, tried in order, relative to the model
            with an LM head first and to the bare base model after (for example ``model.layers`` then ``layers``).
        per_layer_fields: config attributes holding one entry per layer (sliced when layers are removed).
        layer_index_fields: config attributes holding lists of layer indices (renumbered when layers are removed).
        moe_sparse_step_field: MoE config attribute ``step`` of the Qwen-MoE rule "block ``i`` has experts iff
            ``i not in mlp_only_layers and (i + 1) % step == 0`` (and ``num_experts > 0``)", decided when the block
            is built. Surgery keeps which surviving blocks have experts (see ``lp_callbacks.surgery``).
        renumber_refusal: ``config -> reason | None``; a reason when a block cannot take a new index exactly
            (something fixed from ``layer_idx`` at construction that no config field records). Surgery then
            refuses any removal that moves a surviving block.
    """

    layer_paths: tuple[str, ...]
    per_layer_fields: tuple[str, ...] = ("layer_types", "mlp_layer_types")
    layer_index_fields: tuple[str, ...] = ()
    moe_sparse_step_field: str | None = None
    renumber_refusal: Callable[[Any], str | None] | None = None


def _gpt2_renumber_refusal(config: Any) -> str | None:
    # GPT2Attention.__init__ bakes `scaling /= layer_idx + 1` into the block: a moved block keeps its old scale in
    # memory but gets the new one when rebuilt by from_pretrained, so outputs would change on reload.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return (
            "GPT-2 with `scale_attn_by_inverse_layer_idx=True` divides each block's attention scores by"
            " (layer_idx + 1), fixed when the block is built, so a block that moves to another index would compute"
            " something else after save_pretrained/from_pretrained."
        )
    return None


_LLAMA_LIKE = Architecture(layer_paths=("model.layers", "layers"))

#: model_type -> Architecture. Add a family here (and a tiny config to ``tests/conftest.py``), nowhere else.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen2_moe": Architecture(
        layer_paths=("model.layers", "layers"),
        layer_index_fields=("mlp_only_layers",),
        moe_sparse_step_field="decoder_sparse_step",
    ),
    "qwen3_moe": Architecture(
        layer_paths=("model.layers", "layers"),
        layer_index_fields=("mlp_only_layers",),
        moe_sparse_step_field="decoder_sparse_step",
    ),
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": Architecture(layer_paths=("model.language_model.layers", "language_model.layers")),
    "phi": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "starcoder2": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "smollm3": Architecture(
        layer_paths=("model.layers", "layers"),
        per_layer_fields=("layer_types", "mlp_layer_types", "no_rope_layers"),
    ),
    "gpt2": Architecture(layer_paths=("transformer.h", "h"), renumber_refusal=_gpt2_renumber_refusal),
    "gptj": Architecture(layer_paths=("transformer.h", "h")),
    "bloom": Architecture(layer_paths=("transformer.h", "h")),
    "falcon": Architecture(layer_paths=("transformer.h", "h")),
    "gpt_neox": Architecture(layer_paths=("gpt_neox.layers", "layers")),
    "opt": Architecture(layer_paths=("model.decoder.layers", "decoder.layers")),
}

# Tried, in order, for a model whose family is not in the table (custom or new HF models).
_FALLBACK_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "layers",
    "decoder.layers",
    "h",
)


def _outermost_hf_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(attribute path, model)`` of every ``PreTrainedModel`` in ``module`` that no other one contains."""
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, candidate in module.named_modules():  # pre-order: an outer model comes before what it contains
        if isinstance(candidate, PreTrainedModel) and not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, candidate))
            if not name:  # ``module`` is itself the model
                break
    return found


def _path_root(module: nn.Module, layers_path: str) -> tuple[nn.Module, str] | None:
    """``layers_path`` read from ``module``: the first ``PreTrainedModel`` it crosses and the rest of the path."""
    from transformers import PreTrainedModel

    root, rest, obj = module, layers_path, module
    names = layers_path.split(".")
    for i, name in enumerate(names):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
        if root is module and isinstance(obj, PreTrainedModel) and i < len(names) - 1:
            root, rest = obj, ".".join(names[i + 1 :])
    return (root, rest) if isinstance(obj, nn.ModuleList) else None


def _describe_models(models: list[tuple[str, nn.Module]]) -> str:
    parts = []
    for name, model in models:
        frozen = ", all parameters frozen" if not any(p.requires_grad for p in model.parameters()) else ""
        parts.append(f"`{name}` ({type(model).__name__}{frozen})")
    return ", ".join(parts)


def find_hf_model(module: nn.Module, layers_path: str | None = None) -> nn.Module:
    """Return the Hugging Face ``PreTrainedModel`` the callbacks act on (or ``module`` when it holds none).

    Sees through a LightningModule attribute, ``DistributedDataParallel.module``, ``torch.compile``'s ``_orig_mod``
    and PEFT wrappers, since all of them register the wrapped model as a submodule. A module holding several models
    (a teacher and a student) is ambiguous: then ``layers_path`` must say which, read from ``module``
    (``layers_path="student.model.layers"``); without it this refuses rather than guess.

    Raises:
        ValueError: ``module`` holds more than one outermost ``PreTrainedModel`` and ``layers_path`` does not
            name the blocks of one of them.
    """
    models = _outermost_hf_models(module)
    if layers_path is not None and len(models) > 1:
        found = _path_root(module, layers_path)
        if found is not None:
            return found[0]
    if len(models) > 1:
        example = f"{models[-1][0]}.{_table_paths(models[-1][1])[0]}"
        where = f"`layers_path={layers_path!r}` does not name the blocks of one of them" if layers_path else "none is named"
        raise ValueError(
            f"{type(module).__name__} holds {len(models)} Hugging Face models: {_describe_models(models)}; {where}."
            " lp_callbacks will not guess which one to measure, prune or freeze: pass `layers_path`, the dotted path"
            f" of that model's block list from the {type(module).__name__} (for example layers_path={example!r}),"
            " to every lp_callbacks callback."
        )
    if not models:
        return module
    name, model = models[0]
    if name and not any(p.requires_grad for p in model.parameters()):
        warnings.warn(
            f"lp_callbacks acts on `{name}` ({type(model).__name__}), the only Hugging Face model in"
            f" {type(module).__name__}, but all its parameters are frozen: is it a teacher or a reference model"
            " rather than the one being trained?",
            UserWarning,
            stacklevel=2,
        )
    return model


def _table_paths(model: nn.Module) -> tuple[str, ...]:
    arch = ARCHITECTURES.get(_model_type(model) or "")
    return arch.layer_paths if arch is not None else _FALLBACK_PATHS


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_architecture(model: nn.Module) -> Architecture | None:
    """The table entry for ``model``'s family, or ``None`` when the family is not in :data:`ARCHITECTURES`."""
    return ARCHITECTURES.get(_model_type(find_hf_model(model)) or "")


def _get_path(root: nn.Module, path: str) -> object | None:
    obj: object = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def resolve_layers_path(model: nn.Module, layers_path: str | None = None) -> tuple[nn.Module, str]:
    """Find the decoder blocks: return ``(root, path)`` such that ``root.<path>`` is the block ``ModuleList``.

    Args:
        model: an HF model, or any module that holds one (LightningModule, PEFT model, compiled model, DDP).
        layers_path: explicit dotted path from the HF model (or from ``model`` when it holds no HF model), for
            custom models, for example ``"backbone.blocks"``.

    Raises:
        ValueError: when nothing is found; the message lists the family and every path searched.
    """
    root = find_hf_model(model, layers_path)
    if layers_path is not None:
        if not isinstance(layers_path, str) or not layers_path:
            raise ValueError(f"`layers_path` must be a non-empty dotted attribute path, got {layers_path!r}.")
        found = _get_path(root, layers_path)
        if not isinstance(found, nn.ModuleList):
            from_module = _path_root(model, layers_path)  # read from the LightningModule (several models)
            if from_module is not None and from_module[0] is root:
                root, layers_path = from_module
                found = _get_path(root, layers_path)
        if not isinstance(found, nn.ModuleList):
            raise ValueError(
                f"`layers_path={layers_path!r}` does not name a torch.nn.ModuleList on {type(root).__name__}"
                f" (found {type(found).__name__})."
            )
        if len(found) == 0:
            raise ValueError(f"`layers_path={layers_path!r}` names an empty ModuleList: the model has no decoder layers.")
        return root, layers_path

    model_type = _model_type(root)
    searched = _table_paths(root)
    for path in searched:
        found = _get_path(root, path)
        if isinstance(found, nn.ModuleList):
            if len(found) == 0:
                raise ValueError(f"{type(root).__name__}.{path} is empty: the model has no decoder layers.")
            return root, path
    family = f"model_type={model_type!r}" if model_type else "no HF config"
    supported = ", ".join(sorted(ARCHITECTURES))
    raise ValueError(
        f"Could not find the decoder layers of {type(root).__name__} ({family}): searched {list(searched)}."
        f" Supported families: {supported}. For a custom model pass `layers_path`, the dotted path of its"
        " block ModuleList (for example layers_path='backbone.blocks')."
    )


def get_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """Return the ``ModuleList`` of decoder blocks of ``model`` (see :func:`resolve_layers_path`)."""
    root, path = resolve_layers_path(model, layers_path)
    return _get_path(root, path)  # type: ignore[return-value]


def get_layers_owner(model: nn.Module, layers_path: str | None = None) -> nn.Module:
    """The module whose ``forward`` runs the blocks (``LlamaModel``, ``GPT2Model``, ``OPTDecoder``...).

    Its forward receives the 2-D ``attention_mask`` that tells real tokens from padding.
    """
    root, path = resolve_layers_path(model, layers_path)
    parent, _, _ = path.rpartition(".")
    return _get_path(root, parent) if parent else root  # type: ignore[return-value]
