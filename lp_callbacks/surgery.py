"""Layer surgery on Hugging Face decoders: remove blocks physically (and put them back), prune the optimizer.

:func:`drop_layers` leaves a model that is indistinguishable from one built with fewer layers: the block
``ModuleList`` is rebuilt from the surviving module objects (so optimizers keep pointing at the same parameters),
every ``layer_idx`` inside the survivors is renumbered (KV caches are indexed by it), and the config is updated
(``num_hidden_layers``, per-layer lists such as ``layer_types``, layer-index lists such as ``mlp_only_layers``) so that
``generate`` with a cache and ``save_pretrained`` -> ``from_pretrained`` give what the pruned model computes. What
cannot be kept exact is refused with a ``ValueError`` before anything is touched.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> drop_layers(model, [1, 2])
    [0, 3]
    >>> model.config.num_hidden_layers, model.model.layers[1].self_attn.layer_idx
    (2, 1)
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lp_callbacks.architectures import (
    ARCHITECTURES,
    MOE_DENSE_LAYERS_FIELD,
    Architecture,
    DecoderStack,
    decoder_stack,
    qwen_moe_layout,
)

__all__ = [
    "check_removal_supported",
    "drop_emptied_param_groups",
    "drop_layers",
    "drop_optimizer_params",
    "original_indices",
    "removed_original_indices",
    "restore_layers",
]

Model = nn.Module | DecoderStack  # a model, a module holding one, or its resolved stack


def _validate_indices(indices: Sequence[int], num_layers: int) -> list[int]:
    """Sorted, validated copy of ``indices``; raises before anything is modified."""
    valid = f"layer positions in [0, {num_layers - 1}] (the model has {num_layers} decoder layers, numbered as now)"
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise TypeError(f"`indices` must be a sequence of ints, {valid}; got {indices!r}.")
    values: list[int] = []
    try:
        items = list(indices)
    except TypeError:  # a 0-d tensor claims to be iterable
        raise TypeError(f"`indices` must be a sequence of ints, {valid}; got {indices!r}.") from None
    for item in items:
        # bool is an int subclass, but `[True]` is a mistake, not layer 1
        if isinstance(item, bool):
            raise TypeError(f"`indices` must hold ints ({valid}), got the bool {item!r} in {items!r}.")
        try:
            values.append(operator.index(item))  # int, numpy and torch integer scalars
        except TypeError:
            raise TypeError(f"`indices` must hold ints ({valid}), got {item!r} in {items!r}.") from None
    out_of_range = [i for i in values if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(f"`indices` must be {valid}; got {out_of_range} out of range in {values}.")
    duplicates = sorted({i for i in values if values.count(i) > 1})
    if duplicates:
        raise ValueError(f"`indices` must be unique {valid}; got {duplicates} more than once in {values}.")
    return sorted(values)


def _surgery_architecture(stack: DecoderStack) -> Architecture | None:
    """The table entry of an HF model; ``None`` for a plain ``nn.Module``; refuses an HF family not in the table."""
    if not stack.is_hf:
        return None  # custom model reached through `layers_path`: no config to keep in step
    if stack.arch is None:
        raise ValueError(
            f"drop_layers does not know the per-layer config fields of {type(stack.root).__name__}"
            f" (model_type={stack.model_type!r}), so it cannot keep the model consistent after surgery. Supported"
            f" model types: {', '.join(sorted(ARCHITECTURES))}. Add the family to"
            " lp_callbacks.architectures.ARCHITECTURES."
        )
    return stack.arch


def check_removal_supported(model: Model, layers_path: str | None = None) -> str | None:
    """What :func:`drop_layers` would refuse, known before any removal: call it at setup.

    Raises the ``ValueError`` of an HF family missing from the architecture table (its per-layer config fields are
    unknown). Returns why a surviving block cannot take a new index exactly (for example GPT-2 with
    ``scale_attn_by_inverse_layer_idx=True``: only trailing blocks can go), or ``None`` when any removal is exact.
    """
    stack = decoder_stack(model, layers_path)
    arch = _surgery_architecture(stack)
    if arch is None or arch.renumber_refusal is None:
        return None
    reasons = [arch.renumber_refusal(config) for config in _decoder_configs(stack)]
    return next((reason for reason in reasons if reason is not None), None)


def _decoder_configs(stack: DecoderStack) -> list[Any]:
    """Every distinct config object that describes this decoder stack (usually exactly one, shared by all modules)."""
    from transformers import PretrainedConfig

    candidates: list[Any] = []
    root_config = getattr(stack.root, "config", None)
    if isinstance(root_config, PretrainedConfig):
        # multimodal models (Gemma3): the decoder's fields live in `config.text_config`
        candidates.append(root_config.get_text_config(decoder=True))
    for module in stack.owner.modules():  # attention modules keep `self.config` too; it must be the same object
        config = module.__dict__.get("config")
        if isinstance(config, PretrainedConfig):
            candidates.append(config)
    unique: dict[int, Any] = {}
    for config in candidates:
        unique.setdefault(id(config), config)
    return list(unique.values())


def _plan_layer_idx(layers: nn.ModuleList, kept: list[int]) -> list[tuple[nn.Module, int]]:
    """``(submodule, new layer_idx)`` for every submodule of a survivor that records its block's position."""
    updates: list[tuple[nn.Module, int]] = []
    for new_idx, old_idx in enumerate(kept):
        for name, module in layers[old_idx].named_modules():
            current = module.__dict__.get("layer_idx")  # plain attribute only (GPT-2, Llama, Falcon, OPT, ...)
            if current is None:
                continue
            if isinstance(current, bool) or not isinstance(current, int) or current != old_idx:
                where = f"{type(module).__name__} {name!r} of block {old_idx}" if name else f"block {old_idx}"
                raise ValueError(
                    f"Cannot renumber {where}: its `layer_idx` is {current!r}, not its position {old_idx} in the"
                    " decoder layer list, so the new index it should take is unknown. Was the model changed outside"
                    " lp_callbacks?"
                )
            if new_idx != old_idx:
                updates.append((module, new_idx))
    return updates


def _plan_config(config: Any, arch: Architecture, num_layers: int, kept: list[int]) -> dict[str, Any]:
    """New values of the config fields that depend on the layer count or on layer positions (ordered)."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_heterogeneous", False):
        # per_layer_config overrides are built into each block; remapping them is not supported (yet)
        raise ValueError(
            f"drop_layers does not support heterogeneous configs (model_type={model_type!r} with `per_layer_config`"
            " overrides): the per-layer overrides would have to be renumbered with the blocks."
        )
    declared = getattr(config, "num_hidden_layers", None)
    if declared != num_layers:
        raise ValueError(
            f"The config says num_hidden_layers={declared!r} but the decoder holds {num_layers} layers"
            f" (model_type={model_type!r}): the model is already inconsistent, drop_layers will not guess."
        )
    moved = any(new != old for new, old in enumerate(kept))
    if moved and arch.renumber_refusal is not None:
        reason = arch.renumber_refusal(config)
        if reason is not None:
            removed = sorted(set(range(num_layers)) - set(kept))
            trailing = list(range(len(kept), num_layers))
            raise ValueError(
                f"Cannot remove `indices`={removed} exactly: {reason} Remove trailing blocks instead, for example"
                f" indices={trailing}."
            )

    updates: dict[str, Any] = {}
    for name in arch.per_layer_fields:
        value = getattr(config, name, None)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != num_layers:
            raise ValueError(
                f"config.{name} should hold one entry per layer ({num_layers}), got {value!r}"
                f" (model_type={model_type!r}): cannot slice it consistently."
            )
        updates[name] = type(value)(value[i] for i in kept)

    new_position = {old: new for new, old in enumerate(kept)}
    for name in arch.layer_index_fields:
        value = getattr(config, name, None)
        if value is None:
            continue
        # entries of removed layers disappear, the others follow their block
        updates[name] = type(value)(new_position[i] for i in value if i in new_position)

    step_field = arch.moe_sparse_step_field
    step = getattr(config, step_field, None) if step_field else None
    if step is not None:
        # Which block has experts is decided from layer_idx at construction; the reloaded model must match.
        # Both fields are always planned: restore_layers applies a plan made from the original config, which must
        # undo the explicit layout (step=1) an earlier removal wrote.
        updates[step_field] = step
        updates.setdefault(MOE_DENSE_LAYERS_FIELD, [])
        num_experts = getattr(config, "num_experts", 1) or 0
        old_layout = qwen_moe_layout(step, set(getattr(config, MOE_DENSE_LAYERS_FIELD, None) or ()), num_experts, num_layers)
        wanted = [old_layout[i] for i in kept]
        new_dense = set(updates.get(MOE_DENSE_LAYERS_FIELD, ()))
        if qwen_moe_layout(step, new_dense, num_experts, len(kept)) != wanted:
            # `step` would pick other blocks after renumbering: state the same layout explicitly instead
            # (every block sparse unless listed dense), which reloads to exactly these blocks.
            updates[step_field] = 1
            updates[MOE_DENSE_LAYERS_FIELD] = [j for j, sparse in enumerate(wanted) if not sparse]

    updates["num_hidden_layers"] = len(kept)  # last: maps to `n_layer` for GPT-2 through `attribute_map`
    return updates


# On the block ModuleList: removed blocks (original index -> block on the meta device) and the configs as they were
# before the first removal, so restore_layers can rebuild an earlier architecture (plain attributes, not state).
_REMOVED_BLOCKS = "_lp_removed_blocks"
_ORIGINAL_CONFIGS = "_lp_original_configs"

# Each block remembers its position in the original model as a plain attribute (not in state_dict, not exported),
# so every callback agrees on the original numbering whatever removed what.
_ORIGINAL_INDEX = "_lp_original_index"


def original_indices(model: Model, layers_path: str | None = None) -> list[int]:
    """The original index of each current block: ``[0, 1, ..., L-1]`` until blocks are removed.

    The first call on a model labels its blocks with their current positions; :func:`drop_layers` keeps the
    survivors' labels, so after removing blocks 2 and 5 of 8 this returns ``[0, 1, 3, 4, 6, 7]``.
    """
    layers = decoder_stack(model, layers_path).layers
    for position, layer in enumerate(layers):
        if not hasattr(layer, _ORIGINAL_INDEX):
            setattr(layer, _ORIGINAL_INDEX, position)
    return [getattr(layer, _ORIGINAL_INDEX) for layer in layers]


def drop_layers(model: Model, indices: Sequence[int], layers_path: str | None = None) -> list[int]:
    """Remove decoder blocks physically, in place, and keep the model consistent.

    The survivors are the same module objects (optimizer param identity is kept, see :func:`drop_optimizer_params`
    for the dead ones); the removed blocks move to the meta device (their memory is released; their structure is
    kept so that :func:`restore_layers` can load a checkpoint from before the removal); survivors' ``layer_idx`` is renumbered; ``config.num_hidden_layers``, per-layer config lists
    (``layer_types``, ...) and layer-index lists (``mlp_only_layers``) are updated, so that forward equals running the
    kept blocks of the original model, ``generate`` works with a KV cache, and ``save_pretrained`` ->
    ``from_pretrained`` rebuilds the same model. Everything is checked before anything changes.

    Args:
        model: an HF model, or a module holding one (LightningModule, PEFT, ``torch.compile``, DDP), or its
            :class:`~lp_callbacks.architectures.DecoderStack`; a custom model when ``layers_path`` is given (then
            only the list and ``layer_idx`` attributes are updated).
        indices: positions of the blocks to remove, in the model's CURRENT numbering (after earlier removals).
            Unique ints in ``[0, num_layers - 1]``; may be empty (nothing happens); must not cover every block.
        layers_path: dotted path of the block ``ModuleList`` for models not in the architecture table.

    Returns:
        The kept positions, in the numbering before this call (``kept[j]`` is now block ``j``).

    Raises:
        TypeError: ``indices`` is not a sequence of ints.
        ValueError: an index is out of range or repeated, every block would go, the family is unknown, or the
            family/config cannot be kept exact (for example GPT-2 with ``scale_attn_by_inverse_layer_idx=True``
            when a surviving block would move).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=128))
        >>> drop_layers(model, [2])
        [0, 1, 3]
        >>> model.config.n_layer, len(model.transformer.h)
        (3, 3)
    """
    stack = decoder_stack(model, layers_path)
    layers = stack.layers
    num_layers = len(layers)
    removed = _validate_indices(indices, num_layers)
    if len(removed) == num_layers:
        raise ValueError(
            f"`indices` would remove all {num_layers} decoder layers (got {removed}); at least one must remain."
        )
    arch = _surgery_architecture(stack)
    kept = sorted(set(range(num_layers)) - set(removed))
    if not removed:
        return kept

    # Plan everything first: a refusal must leave the model untouched.
    config_updates = [] if arch is None else [
        (config, _plan_config(config, arch, num_layers, kept)) for config in _decoder_configs(stack)
    ]
    idx_updates = _plan_layer_idx(layers, kept)

    originals = original_indices(stack)  # label the blocks before they move
    if _ORIGINAL_CONFIGS not in layers.__dict__:  # what restore_layers rebuilds configs from
        layers.__dict__[_ORIGINAL_CONFIGS] = [(config, copy.deepcopy(config)) for config, _ in config_updates]
    removed_blocks = layers.__dict__.setdefault(_REMOVED_BLOCKS, {})
    for i in removed:  # kept as structure only (meta tensors, no memory), so a checkpoint from before can load
        removed_blocks[originals[i]] = layers[i].to("meta")
    survivors = [layers[i] for i in kept]
    del layers[:]  # in place: whoever holds this ModuleList sees the new depth
    layers.extend(survivors)
    for module, new_idx in idx_updates:
        module.layer_idx = new_idx
    _apply_config_updates(config_updates)
    return kept


def _apply_config_updates(config_updates: list[tuple[Any, dict[str, Any]]]) -> None:
    for config, updates in config_updates:
        for name, value in updates.items():
            setattr(config, name, value)


def removed_original_indices(model: Model, layers_path: str | None = None) -> list[int]:
    """Original indices of the blocks :func:`drop_layers` removed from ``model`` in this process (restorable)."""
    return sorted(decoder_stack(model, layers_path).layers.__dict__.get(_REMOVED_BLOCKS, {}))


def restore_layers(model: Model, originals: Sequence[int], layers_path: str | None = None) -> list[int]:
    """Put back blocks that :func:`drop_layers` removed, by original index, with *uninitialised* weights.

    For loading a checkpoint written before the removal into the pruned model: call ``load_state_dict`` right
    after (:func:`~lp_callbacks.restore_pruned_architecture` does both steps). The blocks return at their original
    place; ``layer_idx`` and the config (``num_hidden_layers``, ``layer_types``, ...) follow the new positions.

    Returns:
        The original indices of the blocks the model holds afterwards.

    Raises:
        ValueError: a block was not removed by :func:`drop_layers` from this model in this process.
    """
    stack = decoder_stack(model, layers_path)
    layers = stack.layers
    stash = layers.__dict__.get(_REMOVED_BLOCKS, {})
    present = original_indices(stack)
    wanted = sorted(set(originals) - set(present))
    unknown = [o for o in wanted if o not in stash]
    if unknown:
        raise ValueError(
            f"cannot restore original blocks {unknown}: they were not removed from this model by drop_layers in this"
            f" process (it holds {present}; removed blocks known: {sorted(stash)})."
        )
    if not wanted:
        return present
    arch = _surgery_architecture(stack)
    reference = next(layers[0].parameters())
    blocks = dict(zip(present, layers))
    blocks.update({o: stash[o].to_empty(device=reference.device) for o in wanted})
    kept = sorted(blocks)
    config_updates = [] if arch is None else [
        (config, _plan_config(snapshot, arch, snapshot.num_hidden_layers, kept))
        for config, snapshot in layers.__dict__[_ORIGINAL_CONFIGS]
    ]
    for o in wanted:
        del stash[o]
    del layers[:]
    layers.extend(blocks[o] for o in kept)
    for new_idx, block in enumerate(layers):
        for module in block.modules():
            if isinstance(module.__dict__.get("layer_idx"), int):
                module.layer_idx = new_idx
    _apply_config_updates(config_updates)
    return kept


# Per-param-group lists that LR schedulers keep outside the groups (torch.optim.lr_scheduler).
_SCHEDULER_GROUP_FIELDS = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "min_lrs", "base_momentums", "max_momentums")


def _drop_scheduler_entries(scheduler: Any, emptied: list[int], num_groups: int) -> None:
    for nested in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _drop_scheduler_entries(nested, emptied, num_groups)
    for name in _SCHEDULER_GROUP_FIELDS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == num_groups:
            setattr(scheduler, name, [v for g, v in enumerate(values) if g not in emptied])


def drop_emptied_param_groups(
    optimizer: torch.optim.Optimizer, emptied: Sequence[int], schedulers: Iterable[Any] = ()
) -> None:
    """Delete the param groups at ``emptied`` (left without parameters by a removal) and their scheduler entries.

    With one group per block (layer-wise learning rates), a removed block leaves an empty group that
    ``configure_optimizers`` on the rebuilt model would not create, so a checkpoint taken afterwards could not be
    resumed ("different number of parameter groups"). Deleting the group, and its entry in each LR scheduler of this
    optimizer (``base_lrs``, ``lr_lambdas``, ...), keeps every other group's learning rate where it was.

    Args:
        optimizer: the optimizer whose groups lost all their parameters.
        emptied: indices of those groups (each must be empty).
        schedulers: LR schedulers stepping this optimizer.
    """
    num_groups = len(optimizer.param_groups)
    emptied = sorted(set(emptied))
    full = [g for g in emptied if optimizer.param_groups[g]["params"]]
    if full:
        raise ValueError(f"param groups {full} still hold parameters; only empty groups can be dropped.")
    for scheduler in schedulers:
        _drop_scheduler_entries(scheduler, emptied, num_groups)
    for g in reversed(emptied):
        del optimizer.param_groups[g]


def follow_param_groups(
    optimizer: torch.optim.Optimizer,
    layout: Sequence[Sequence[torch.Tensor]],
    groups: Sequence[Mapping[str, Any]],
    alive: set[int],
    schedulers: Iterable[Any] = (),
) -> list[list[torch.Tensor]]:
    """A configured group layout (see :func:`drop_optimizer_params`) after parameters left the model.

    ``layout[g]`` lists the parameters group ``groups[g]`` (the group dicts, by identity) was configured with,
    frozen ones included. Parameters whose ``id`` is not in ``alive`` go; a group whose parameters all went is gone
    from ``optimizer`` too (deleted with its scheduler entries, like :func:`drop_emptied_param_groups`), also when it
    held only frozen parameters, so that the groups match what ``configure_optimizers`` builds on the pruned model.

    Returns:
        The layout of the groups ``optimizer`` holds now, in their order.
    """
    position = {id(group): g for g, group in enumerate(optimizer.param_groups)}
    kept_layout, emptied = [], []
    for params, group in zip(layout, groups, strict=False):
        kept = [p for p in params if id(p) in alive]
        if id(group) not in position:  # deleted with the removal
            continue
        if params and not kept:
            emptied.append(position[id(group)])
            continue
        kept_layout.append(kept)
    if emptied:
        drop_emptied_param_groups(optimizer, emptied, schedulers)
    return kept_layout


def drop_optimizer_params(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    layout: Sequence[Sequence[torch.Tensor]] | None = None,
    schedulers: Iterable[Any] | None = None,
) -> int:
    """Forget ``params`` in ``optimizer``, in place: remove them from ``param_groups`` and their ``state``.

    Survivors keep their state (Adam moments, momentum buffers). A group left without parameters stays, with an
    empty ``params`` list, so LR schedulers (one LR per group) keep their alignment. ``state_dict`` /
    ``load_state_dict`` keep working, and a checkpoint taken afterwards fits the pruned model.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (or Lightning's ``LightningOptimizer`` wrapping one).
        params: the tensors to forget, typically ``removed_block.parameters()``; unknown tensors are ignored.
        layout: per group, the parameters it holds before ``params`` are taken out (default: what it holds now;
            groups past the end of ``layout`` keep theirs). :class:`~lp_callbacks.LayerFreezeCallback` passes the
            groups as configured, so a parameter it unfreezes returns to its own group, in order, with no state.
        schedulers: when given, the groups this call leaves empty are deleted too, with their entries in these LR
            schedulers of ``optimizer`` (:func:`drop_emptied_param_groups`).

    Returns:
        How many parameters were removed from the groups.

    Example:
        >>> layer_a, layer_b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> opt = torch.optim.Adam([*layer_a.parameters(), *layer_b.parameters()])
        >>> drop_optimizer_params(opt, layer_b.parameters())
        2
        >>> len(opt.param_groups[0]["params"])
        2
    """
    param_groups = getattr(optimizer, "param_groups", None)
    if not isinstance(param_groups, list):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    dead: dict[int, torch.Tensor] = {}
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"`params` must hold tensors, got {type(param).__name__}.")
        dead[id(param)] = param
    filled = [g for g, group in enumerate(param_groups) if group["params"]]
    removed = 0
    for g, group in enumerate(param_groups):
        source = layout[g] if layout is not None and g < len(layout) else group["params"]
        alive = [p for p in source if id(p) not in dead]
        removed += len(source) - len(alive)
        group["params"] = alive
    for param in dead.values():
        optimizer.state.pop(param, None)  # state is keyed by the tensor itself
    emptied = [g for g in filled if not param_groups[g]["params"]]
    if schedulers is not None and emptied:
        drop_emptied_param_groups(optimizer, emptied, schedulers)
    return removed
