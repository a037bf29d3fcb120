"""Safe, atomic export of a (pruned) Hugging Face model, and the one routine that writes a directory atomically.

* :func:`check_export_dir` validates the target at setup, before any training step, so that a run which would
  overwrite user data fails in seconds instead of after hours of training.
* :func:`save_export` writes ``save_pretrained`` (+ tokenizer, + :data:`RECORD_FILE`) with
  :func:`write_dir_atomically`. PEFT adapters are merged into a copy of the model, so the export loads with a plain
  ``AutoModelForCausalLM.from_pretrained(directory)``; the training model is left untouched.
* :func:`write_dir_atomically` fills a hidden temporary sibling and swaps it in with renames; the harness's model
  cache is written with it too.

Only a directory this package wrote (one holding its marker file, :data:`RECORD_FILE` for an export) or an empty
directory is ever replaced. Leftovers of a killed process (names ``.{name}.lp-tmp-*`` and ``.{name}.lp-old-*`` next
to the target) are cleaned, or restored, on the next call for the same target.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lp_callbacks.architectures import find_hf_model, input_embeddings, output_embeddings

__all__ = ["RECORD_FILE", "check_export_dir", "has_leftovers", "save_export", "write_dir_atomically"]

RECORD_FILE = "lp_pruning.json"
"""Written into every export; marks a directory as this package's own export, which may be replaced."""

_TMP = "lp-tmp-"  # .{name}.lp-tmp-XXXX: an export being written, or an old one being deleted
_OLD = "lp-old-"  # .{name}.lp-old-XXXX: the previous export, renamed aside during the swap
_SHOWN_ENTRIES = 5
_EXPORT = "an earlier lp_callbacks export"  # what an export target may replace, as messages name it


# ============================================================================ directory rule
def _target(directory: str | os.PathLike) -> Path:
    """``directory`` with ``~`` expanded, absolute, ``..`` collapsed (symlinks are not resolved)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))


def _entries(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(repr(n) for n in names[:_SHOWN_ENTRIES])
    more = len(names) - _SHOWN_ENTRIES
    return shown + (f", ... {more} more" if more > 0 else "")


def _check_target(target: Path, argument: str, marker: str = RECORD_FILE, kind: str = _EXPORT) -> None:
    """The rule, in one place: raise ``ValueError`` unless ``target`` may be (re)placed: it is new, empty, or
    ``kind`` (a directory of this package, holding ``marker``)."""

    def refused(found: str, new: str = "a new directory") -> ValueError:
        return ValueError(
            f"`{argument}` must be {new}, an empty directory or {kind}; got {str(target)!r}, {found}. Choose a new or"
            f" empty directory (or {kind}, which is replaced)."
        )

    if target.is_symlink():
        raise refused(f"which is a symbolic link (to {os.readlink(target)!r}). Name the real directory instead")
    if not target.exists():
        ancestor = target.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            why = f"{str(ancestor)!r} is a file, not a directory"
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            why = f"there is no write permission in {str(ancestor)!r}"
        else:
            return
        raise refused(f"which cannot be created: {why}", new="a new directory that can be created")
    if not target.is_dir():
        raise refused("which is an existing file")
    if (target / marker).is_file():
        return
    try:
        if not any(target.iterdir()):
            return
    except PermissionError as error:
        raise refused(f"a directory whose entries cannot be read ({error.strerror})") from error
    raise refused(
        f"a non-empty directory that is not {kind} (no {marker}) and would be replaced as a whole."
        f" It holds: {_entries(target)}"
    )


# ============================================================================ leftovers of a killed process
def _siblings(target: Path, kind: str) -> list[Path]:
    """Our hidden siblings ``.{name}.{kind}*`` of ``target``: real directories only (never links or files)."""
    if not target.name or not target.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{target.name}.{kind}") + r"[A-Za-z0-9_]+")
    found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found)


def _discard(path: Path, target: Path) -> None:
    """Delete our ``lp-old`` copy ``path`` of ``target``: first rename it to a ``lp-tmp`` name, so a kill mid-way
    leaves only a tmp leftover (cleaned next time), never a half-deleted ``lp-old`` copy that could be restored."""
    trash = path.with_name(f".{target.name}.{_TMP}{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except FileNotFoundError:  # cleaned by someone else meanwhile
        return
    shutil.rmtree(trash, ignore_errors=True)


def _recover(target: Path, marker: str = RECORD_FILE) -> None:
    """Clean up after a process killed inside :func:`write_dir_atomically` (``finally`` does not run on ``SIGKILL``).

    Killed between the two renames of the swap, the target is missing and the previous directory sits complete in
    ``.{name}.lp-old-*``: rename it back first. Then remove ``.{name}.lp-tmp-*`` directories (ours by name) and
    any remaining ``lp-old`` copies that hold ``marker``. Nothing else is touched.
    """
    olds = [p for p in _siblings(target, _OLD) if (p / marker).is_file()]
    if olds and not target.exists() and not target.is_symlink():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        try:
            newest.rename(target)
        except FileNotFoundError:  # restored by a concurrent caller
            pass
        else:
            olds.remove(newest)
    for tmp in _siblings(target, _TMP):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in olds:
        _discard(old, target)


def has_leftovers(directory: str | os.PathLike) -> bool:
    """Whether a killed write left a temporary or renamed-aside copy next to ``directory``."""
    target = _target(directory)
    return any(_siblings(target, kind) for kind in (_TMP, _OLD))


def check_export_dir(directory: str | os.PathLike, argument: str = "export_dir", *, marker: str = RECORD_FILE,
                     kind: str = _EXPORT, recover: bool = True) -> Path:
    """Validate an export target at setup, before any training step, and clean leftovers of a killed export.

    Accepted: a path that does not exist but can be created (its nearest existing ancestor is a writable
    directory; nothing is created here), an empty directory, or an earlier export of this package (a directory
    holding :data:`RECORD_FILE`), which :func:`save_export` will replace. Anything else - a file, or a non-empty
    directory without :data:`RECORD_FILE` such as ``"."``, a checkpoint or log folder - is refused, because an
    export replaces the whole directory.

    Args:
        directory: the target; ``~`` is expanded.
        argument: the name of the user-facing argument, used in error messages.
        marker, kind: for another directory the package writes (the harness's model cache): the file that marks
            it as the package's, and what messages call it.
        recover: clean (or restore) a killed write's leftovers first; ``False`` when another process may be
            writing now.

    Returns:
        The absolute target path, ``~`` expanded.

    Raises:
        ValueError: the target is a file, a symbolic link, a non-empty directory that is not an earlier export,
            or cannot be created. The message names ``argument``, the path, what was found and what to do.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> check_export_dir(root / "pruned") == root / "pruned"
        True
        >>> (root / "notes.txt").write_text("mine")
        4
        >>> check_export_dir(root)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `export_dir` must be a new directory, ... It holds: 'notes.txt'. ...
    """
    target = _target(directory)
    if recover:
        _recover(target, marker)
    _check_target(target, argument, marker, kind)
    return target


# ============================================================================ PEFT
def _tuner_classes() -> tuple[type, ...]:
    """PEFT's adapter layer classes (tuner layers and ``modules_to_save``-style wrappers); none without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return ()
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older peft: ModulesToSaveWrapper only
        try:
            from peft.utils.other import ModulesToSaveWrapper as AuxiliaryTrainingWrapper
        except ImportError:
            return (BaseTunerLayer,)
    return (BaseTunerLayer, AuxiliaryTrainingWrapper)


def _has_adapters(model: nn.Module, classes: tuple[type, ...]) -> bool:
    return bool(classes) and any(isinstance(m, classes) for m in model.modules())


def _strip_peft(model: nn.Module) -> None:
    """Remove the attributes PEFT and transformers' PEFT integration put on the HF model."""
    for attr in ("peft_config", "_hf_peft_config_loaded", "_hotswap_enabled", "_prepare_peft_hotswap_kwargs"):
        if attr in vars(model):
            delattr(model, attr)
    if getattr(model, "_hf_peft_config_loaded", False):  # a class attribute: shadow it
        model._hf_peft_config_loaded = False


def _untie_if_diverged(model: nn.Module) -> None:
    """As PEFT's ``merge_and_unload``: a merged adapter on a tied embedding unties it; say so in the config."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    out_w = getattr(output_embeddings(model), "weight", None)
    in_w = getattr(input_embeddings(model), "weight", None)
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        config.tie_word_embeddings = False


def _untie_adapted(model: nn.Module, classes: tuple[type, ...]) -> None:
    """Tied embedding and LM head, an adapter on one side: give the LM head its own copy of the weight first.

    The adapter trained one side only; merged into the shared tensor it would act on both in the export."""
    hf = find_hf_model(model)
    config = getattr(hf, "config", None)
    sides = [input_embeddings(hf), output_embeddings(hf)]
    if not getattr(config, "tie_word_embeddings", False) or None in sides or not any(isinstance(s, classes) for s in sides):
        return
    embed, head = (s.get_base_layer() if hasattr(s, "get_base_layer") else s for s in sides)
    if getattr(embed, "weight", None) is not None and embed.weight is getattr(head, "weight", None):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config.tie_word_embeddings = False


def _merge_in_place(model: nn.Module, classes: tuple[type, ...]) -> nn.Module:
    """Merge and unload every adapter layer of ``model`` in place (the same walk as PEFT's ``merge_and_unload``,
    for adapters injected without a ``PeftModel`` around this model, e.g. the HF model inside one)."""
    for _ in range(8):  # an unloaded ``modules_to_save`` copy may itself hold adapter layers: walk again
        names = [name for name, m in model.named_modules() if isinstance(m, classes)]
        if not names:
            break
        outermost = [n for n in names if not any(n.startswith(f"{o}.") for o in names)]
        for name in outermost:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, child_name)
            if hasattr(layer, "unload_and_optionally_merge_module"):  # modules_to_save, MultiheadAttention, ...
                base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                layer.merge()
                base = layer.get_base_layer()
            setattr(parent, child_name, base)
    if _has_adapters(model, classes):
        raise ValueError(f"could not unload the PEFT adapter layers of {type(model).__name__}.")
    _strip_peft(model)
    _untie_if_diverged(model)
    return model


def _exportable(model: nn.Module) -> nn.Module:
    """``model`` itself when it holds no PEFT adapters; otherwise a deep copy with the adapters merged in.

    The training model is never modified. The copy doubles the model's memory for the duration of the export.
    """
    classes = _tuner_classes()
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = None  # noqa: N806
    if PeftModel is not None and isinstance(model, PeftModel):
        if not _has_adapters(model, classes):
            kind = getattr(getattr(model, "active_peft_config", None), "peft_type", "prompt learning")
            raise ValueError(
                f"`model` must be a model whose PEFT adapters can be merged into the weights (LoRA-style tuner "
                f"layers); got a PeftModel with {kind} adapters and no tuner layers. Export the base model instead."
            )
        merged = copy.deepcopy(model)
        _untie_adapted(merged, classes)
        merged = merged.merge_and_unload()
        _strip_peft(merged)
        return merged
    if not _has_adapters(model, classes):
        return model
    if isinstance(model, classes):
        raise ValueError(
            f"`model` must be a Hugging Face model (or a PeftModel); got the PEFT adapter layer "
            f"{type(model).__name__} itself."
        )
    exported = copy.deepcopy(model)
    _untie_adapted(exported, classes)
    return _merge_in_place(exported, classes)


# ============================================================================ writing
def _make_readable(directory: Path) -> None:
    """``mkdtemp`` makes 0700; an export is meant to be shared: dirs ``0o777 & ~umask``, files ``0o666 & ~umask``."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap(tmp: Path, target: Path, marker: str) -> None:
    """Put the finished ``tmp`` at ``target``: at no moment is a half-deleted directory of ours at ``target``."""
    if not target.exists():
        tmp.rename(target)  # fails (no data loss) if a non-empty directory or a file appeared meanwhile
        return
    if not (target / marker).is_file():  # empty (checked just before): nothing to keep
        target.rmdir()
        tmp.rename(target)
        return
    aside = target.with_name(f".{target.name}.{_OLD}{uuid.uuid4().hex[:8]}")
    target.rename(aside)
    try:
        tmp.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    _discard(aside, target)


def write_dir_atomically(
    directory: str | os.PathLike,
    fill: Callable[[Path], Any],
    *,
    argument: str,
    marker: str = RECORD_FILE,
    kind: str = _EXPORT,
    recover: bool = True,
    is_same: Callable[[Path], bool] | None = None,
) -> Path:
    """Write a directory atomically: ``fill(tmp)`` writes everything, then ``tmp`` takes the place of ``directory``.

    The target must be new, empty or ``kind`` (a directory of this package: it holds ``marker``); the rule is
    checked first (after cleaning the leftovers of a killed writer, with ``recover``) and again right before the
    swap. ``fill`` writes into a hidden sibling ``.{name}.lp-tmp-*`` in the same parent, ``marker`` last (its
    presence marks a complete directory); the result is made readable per the umask and swapped in: a directory of
    ours already there is renamed aside to ``.{name}.lp-old-*``, the new one renamed into place, the old one deleted.
    On any error the temporary directory is removed and what was at the target stays there.

    Args:
        directory: the target; ``~`` is expanded; missing parents are created.
        fill: ``tmp -> None``, writes the content, ``marker`` last.
        argument: the user-facing name of ``directory`` for error messages (e.g. ``"export_dir"``).
        marker: the file that marks a complete directory of this package, which may be replaced.
        kind: what such a directory is, in messages (``"an earlier lp_callbacks export"``).
        recover: clean the leftovers of a killed writer first; ``False`` where several processes may write the same
            target at once (a live temporary directory of another process must not be deleted).
        is_same: ``target -> bool``, whether the target already holds what ``fill`` wrote (another process, e.g. a
            DDP rank, finished the same meanwhile): then it is kept and ours dropped.

    Returns:
        The absolute path of the target.

    Raises:
        ValueError: the target is refused (see :func:`check_export_dir` for the rule).
    """
    target = _target(directory)
    if recover:
        _recover(target, marker)
    _check_target(target, argument, marker, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_TMP}", dir=target.parent))
    try:
        fill(tmp)
        _make_readable(tmp)
        if is_same is not None and is_same(target):
            return target
        _check_target(target, argument, marker, kind)  # the directory may have changed while we were writing
        try:
            _swap(tmp, target, marker)
        except OSError:
            if is_same is None or not is_same(target):  # not another process's copy of the same, renamed in between
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_export(
    model: nn.Module,
    directory: str | os.PathLike,
    record: Mapping[str, Any],
    tokenizer: Any = None,
    *,
    argument: str = "directory",
) -> Path:
    """``save_pretrained`` ``model`` (+ tokenizer, + :data:`RECORD_FILE`) to ``directory``, atomically.

    The target is checked with the rule of :func:`check_export_dir` before anything is done, then written with
    :func:`write_dir_atomically`: on any error an earlier export stays where it was.

    A model with PEFT adapters (a ``PeftModel``, or a Hugging Face model with adapters injected, such as the one
    :func:`~lp_callbacks.architectures.find_hf_model` finds inside a ``PeftModel``) is exported as a merged deep
    copy with plain transformers names and the base config; ``model`` itself is not changed.

    Args:
        model: a Hugging Face ``PreTrainedModel`` or a ``PeftModel``.
        directory: the target; ``~`` is expanded; missing parents are created.
        record: written as :data:`RECORD_FILE` with ``json.dumps(record, indent=2)``; plain JSON types.
        tokenizer: saved with ``tokenizer.save_pretrained`` next to the model when given.
        argument: the user-facing name of ``directory`` for error messages (e.g. ``"export_dir"``).

    Returns:
        The absolute path of the export.

    Raises:
        ValueError: the target is refused (see :func:`check_export_dir`), or ``model`` cannot be exported.
        TypeError: ``record`` is not JSON serialisable, or ``model`` has no ``save_pretrained``.

    Example:
        >>> import tempfile, pathlib
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> out = save_export(model, pathlib.Path(tempfile.mkdtemp()) / "pruned", {"kept_original_layers": [0, 1]})
        >>> sorted(p.name for p in out.iterdir())[-2:]
        ['lp_pruning.json', 'model.safetensors']
    """
    check_export_dir(directory, argument)
    text = json.dumps(dict(record), indent=2)  # fail before writing anything
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"`model` must be a Hugging Face PreTrainedModel or a PeftModel (with `save_pretrained`); got "
            f"{type(model).__name__}."
        )
    exported = _exportable(model)

    def fill(tmp: Path) -> None:
        exported.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(text)  # last: its presence marks a complete export

    return write_dir_atomically(directory, fill, argument=argument)
