"""Where the decoder blocks of each supported Hugging Face family live, and the family facts that depend on it.

This module is the ONLY place that knows model internals such as ``model.layers`` or ``transformer.h``, which
blocks of a family hold experts, which MLPs are gated, where the final norm and the embeddings are. Everything else
asks :func:`decoder_stack` once per model and reads the :class:`DecoderStack` it returns.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> stack = decoder_stack(model)
    >>> len(stack.layers), stack.path, type(stack.owner).__name__
    (4, 'model.layers', 'LlamaModel')
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

__all__ = [
    "ARCHITECTURES",
    "MOE_DENSE_LAYERS_FIELD",
    "Architecture",
    "DecoderStack",
    "decoder_stack",
    "expert_layers",
    "find_hf_model",
    "get_decoder_layers",
    "has_gated_mlp",
    "input_embeddings",
    "output_embeddings",
    "qwen_moe_layout",
]


@dataclass(frozen=True)
class Architecture:
    """How one model family stores its decoder blocks.

    Args:
        layer_paths: dotted attribute paths of the block ``ModuleList``, tried in order, relative to the model
            with an LM head first and to the bare base model after (for example ``model.layers`` then ``layers``).
        per_layer_fields: config attributes holding one entry per layer (sliced when layers are removed).
        layer_index_fields: config attributes holding lists of layer indices (renumbered when layers are removed).
        moe_sparse_step_field: MoE config attribute ``step`` of the Qwen-MoE rule (:func:`qwen_moe_layout`),
            decided when the block is built. Surgery keeps which surviving blocks have experts.
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
_QWEN_MOE = replace(_LLAMA_LIKE, layer_index_fields=("mlp_only_layers",), moe_sparse_step_field="decoder_sparse_step")

#: model_type -> Architecture. Add a family here (and a tiny config to ``tests/conftest.py``), nowhere else.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen2_moe": _QWEN_MOE,
    "qwen3_moe": _QWEN_MOE,
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
    "smollm3": replace(_LLAMA_LIKE, per_layer_fields=("layer_types", "mlp_layer_types", "no_rope_layers")),
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


# Families whose MLP is up -> activation -> down (no gate). Any other family is taken as gated (SwiGLU/GeGLU).
_PLAIN_MLP = frozenset({"gpt2", "gptj", "bloom", "falcon", "gpt_neox", "opt", "phi", "starcoder2", "gpt_bigcode"})

#: The Qwen-MoE config field listing the blocks forced dense (see :func:`qwen_moe_layout`).
MOE_DENSE_LAYERS_FIELD = "mlp_only_layers"


def has_gated_mlp(model_type: str) -> bool:
    """Whether the family's MLP is gated (gate, up, down) rather than plain (up, down)."""
    return model_type not in _PLAIN_MLP


def qwen_moe_layout(step: int, dense: Collection[int], num_experts: int, num_layers: int) -> list[bool]:
    """The Qwen-MoE rule (``Qwen2MoeDecoderLayer.__init__``): block ``i`` has experts iff ``i not in dense`` and
    ``(i + 1) % step == 0`` (and ``num_experts > 0``); one flag per block."""
    return [i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)]


def expert_layers(config: Any, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Which of the ``num_layers`` blocks route to experts: ``mlp_layer_types`` when the config has it, the
    Qwen-MoE rule for its families, else every block (Mixtral and the like) or none without experts."""
    if num_experts <= 0:
        return (False,) * num_layers
    mlp_layer_types = getattr(config, "mlp_layer_types", None)
    if isinstance(mlp_layer_types, (list, tuple)) and len(mlp_layer_types) >= num_layers:
        return tuple(t == "sparse" for t in mlp_layer_types[:num_layers])
    arch = ARCHITECTURES.get(getattr(config, "model_type", None) or "")
    if arch is not None and arch.moe_sparse_step_field:
        step = int(getattr(config, arch.moe_sparse_step_field, 1) or 1)
        dense = set(getattr(config, MOE_DENSE_LAYERS_FIELD, None) or ())
        return tuple(qwen_moe_layout(step, dense, num_experts, num_layers))
    return (True,) * num_layers


def _embedding(model: nn.Module, kind: str) -> nn.Module | None:
    getter = getattr(model, f"get_{kind}_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``, or ``None`` where the model has none (or cannot tell)."""
    return _embedding(model, "input")


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` (the LM head), or ``None`` where the model has none."""
    return _embedding(model, "output")


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
    if isinstance(module, DecoderStack):
        return module.root
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


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _table_paths(model: nn.Module) -> tuple[str, ...]:
    arch = ARCHITECTURES.get(_model_type(model) or "")
    return arch.layer_paths if arch is not None else _FALLBACK_PATHS


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True, eq=False)
class DecoderStack:
    """One model's decoder stack, resolved once (:func:`decoder_stack`) and read by every part of the package.

    Args:
        root: the Hugging Face model acted on (the module itself for a custom model without one).
        owner: the module whose ``forward`` runs the blocks (``LlamaModel``, ``GPT2Model``, ``OPTDecoder``...); it
            receives the 2-D ``attention_mask`` that tells real tokens from padding.
        layers: the block ``ModuleList`` (pruning edits it in place, so the stack stays valid).
        path: the dotted path of ``layers`` from ``root``.
        arch: the family's :data:`ARCHITECTURES` entry, ``None`` for a family outside the table.
    """

    root: nn.Module
    owner: nn.Module
    layers: nn.ModuleList
    path: str
    arch: Architecture | None

    @property
    def model_type(self) -> str | None:
        return _model_type(self.root)

    @property
    def is_hf(self) -> bool:
        """Whether ``root`` is a Hugging Face ``PreTrainedModel`` (with a config to keep in step)."""
        from transformers import PreTrainedModel

        return isinstance(self.root, PreTrainedModel)

    def embeddings(self) -> list[nn.Module]:
        """The input embedding and the learned position embeddings (GPT-2 ``wpe``, OPT ``embed_positions``);
        ``[]`` when the model has no input embedding."""
        embedding = input_embeddings(self.root)
        if embedding is None:
            return []
        return [embedding, *(c for c in self.owner.children() if isinstance(c, nn.Embedding) and c is not embedding)]

    def final_norms(self) -> list[tuple[str, nn.Module]]:
        """Direct children of the owner that look like a normalisation (``norm``, ``ln_f``, ``final_layernorm``)."""
        found = []
        for name, child in self.owner.named_children():
            if child is self.layers or not any(True for _ in child.parameters()):
                continue
            if "norm" in name.lower() or name == "ln_f" or "norm" in type(child).__name__.lower():
                found.append((name, child))
        return found


def _locate(module: nn.Module, layers_path: str | None) -> tuple[nn.Module, str]:
    """``(root, path)`` such that ``root.<path>`` is the block ``ModuleList``; raises with what was searched."""
    if layers_path is not None and (not isinstance(layers_path, str) or not layers_path):
        raise ValueError(f"`layers_path` must be a non-empty dotted attribute path, got {layers_path!r}.")
    root = find_hf_model(module, layers_path)
    if layers_path is not None:
        found = _get_path(root, layers_path)
        if not isinstance(found, nn.ModuleList):
            from_module = _path_root(module, layers_path)  # read from the LightningModule (several models)
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
    searched = _table_paths(root)
    for path in searched:
        found = _get_path(root, path)
        if isinstance(found, nn.ModuleList):
            if len(found) == 0:
                raise ValueError(f"{type(root).__name__}.{path} is empty: the model has no decoder layers.")
            return root, path
    model_type = _model_type(root)
    family = f"model_type={model_type!r}" if model_type else "no HF config"
    raise ValueError(
        f"Could not find the decoder layers of {type(root).__name__} ({family}): searched {list(searched)}."
        f" Supported families: {', '.join(sorted(ARCHITECTURES))}. For a custom model pass `layers_path`, the dotted"
        " path of its block ModuleList (for example layers_path='backbone.blocks')."
    )


def decoder_stack(module: nn.Module | DecoderStack, layers_path: str | None = None) -> DecoderStack:
    """Resolve the decoder stack of ``module`` once; a :class:`DecoderStack` is returned as it is.

    Args:
        module: an HF model, or any module that holds one (LightningModule, PEFT model, compiled model, DDP).
        layers_path: explicit dotted path of the block list from the HF model (or from ``module``, which must then
            name one model when it holds several; see :func:`find_hf_model`), for custom models for example
            ``"backbone.blocks"``.

    Raises:
        ValueError: when nothing is found; the message lists the family and every path searched.
    """
    if isinstance(module, DecoderStack):
        return module
    root, path = _locate(module, layers_path)
    parent, _, _ = path.rpartition(".")
    return DecoderStack(
        root=root,
        owner=_get_path(root, parent) if parent else root,
        layers=_get_path(root, path),
        path=path,
        arch=ARCHITECTURES.get(_model_type(root) or ""),
    )


def get_decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """Return the ``ModuleList`` of decoder blocks of ``model`` (see :func:`decoder_stack`)."""
    return decoder_stack(model, layers_path).layers
