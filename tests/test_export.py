"""``lp_callbacks.export``: the export target is validated, written atomically, recovered after a kill, and a PEFT
model is exported merged, loadable by plain ``from_pretrained``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_batch, tiny_model

from lp_callbacks.export import RECORD_FILE, check_export_dir, save_export

RECORD = {"original_num_layers": 2, "kept_original_layers": [0, 1], "events": [], "criterion": "block_influence"}


@pytest.fixture(scope="module")
def small():
    """One tiny 2-block Llama for the directory tests (saving it takes milliseconds)."""
    return tiny_model("llama", num_layers=2)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _earlier_export(directory: Path, marker: str = "old") -> None:
    """A minimal stand-in for an earlier export: RECORD_FILE plus a weights file."""
    directory.mkdir(parents=True)
    (directory / RECORD_FILE).write_text(json.dumps({"marker": marker}))
    (directory / "model.safetensors").write_bytes(b"old weights " + marker.encode())


# ============================================================================ refusals
def test_refuses_a_folder_of_user_files_and_leaves_them_untouched(tmp_path, small):
    target = tmp_path / "thesis"
    target.mkdir()
    for i in range(7):
        (target / f"chapter{i}.tex").write_text(f"precious {i}")
    (target / "figures").mkdir()
    (target / "figures" / "plot.png").write_bytes(b"\x89PNG")
    before = _snapshot(target)

    with pytest.raises(ValueError) as excinfo:
        check_export_dir(target)
    message = str(excinfo.value)
    assert "`export_dir`" in message and str(target) in message
    assert RECORD_FILE in message and "not an earlier lp_callbacks export" in message
    assert "'chapter0.tex', 'chapter1.tex', 'chapter2.tex', 'chapter3.tex', 'chapter4.tex', ... 3 more" in message
    assert "new or empty directory" in message

    with pytest.raises(ValueError, match="`directory`.*not an earlier lp_callbacks export"):
        save_export(small, target, RECORD)
    with pytest.raises(ValueError, match="`export_dir`"):
        save_export(small, target, RECORD, argument="export_dir")
    assert _snapshot(target) == before
    assert _hidden(tmp_path) == []


def test_refuses_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("print('mine')")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not an earlier lp_callbacks export") as excinfo:
        check_export_dir(".", argument="export_dir")
    assert str(tmp_path) in str(excinfo.value) and "'train.py'" in str(excinfo.value)
    assert (tmp_path / "train.py").read_text() == "print('mine')"


def test_refuses_a_file(tmp_path, small):
    target = tmp_path / "model.bin"
    target.write_bytes(b"data")
    with pytest.raises(ValueError, match="existing file") as excinfo:
        check_export_dir(target)
    assert str(target) in str(excinfo.value)
    with pytest.raises(ValueError, match="existing file"):
        save_export(small, target, RECORD)
    assert target.read_bytes() == b"data"


def test_refuses_a_checkpoint_folder(tmp_path):
    target = tmp_path / "checkpoints"
    target.mkdir()
    (target / "epoch=0-step=3.ckpt").write_bytes(b"ckpt")
    with pytest.raises(ValueError, match=r"'epoch=0-step=3\.ckpt'") as excinfo:
        check_export_dir(target)
    assert str(target) in str(excinfo.value)
    assert (target / "epoch=0-step=3.ckpt").read_bytes() == b"ckpt"


def test_refuses_a_symbolic_link(tmp_path):
    _earlier_export(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="symbolic link"):
        check_export_dir(tmp_path / "link")


def test_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot be created.*is a file") as excinfo:
        check_export_dir(tmp_path / "notes.txt" / "sub" / "export", argument="export_dir")
    assert "`export_dir`" in str(excinfo.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_refuses_a_path_under_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="no write permission"):
            check_export_dir(locked / "a" / "export")
    finally:
        locked.chmod(0o755)


# ============================================================================ accepted targets
def test_a_new_path_is_accepted_expanded_and_nothing_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_export_dir("~/runs/pruned") == tmp_path / "runs" / "pruned"
    assert check_export_dir(tmp_path / "a" / ".." / "b") == tmp_path / "b"
    assert list(tmp_path.iterdir()) == []


def test_an_empty_directory_is_accepted_and_filled(tmp_path, small):
    target = tmp_path / "empty"
    target.mkdir()
    assert check_export_dir(target) == target
    assert save_export(small, target, RECORD) == target
    assert json.loads((target / RECORD_FILE).read_text()) == RECORD
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert _hidden(tmp_path) == []


def test_replaces_an_earlier_export_and_leaves_no_hidden_siblings(tmp_path, small, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    first = save_export(small, "~/runs/pruned", {**RECORD, "run": 1})  # missing parents are created
    assert first == tmp_path / "runs" / "pruned"
    assert check_export_dir(first) == first  # an earlier export may be replaced
    save_export(small, first, {**RECORD, "run": 2})
    assert json.loads((first / RECORD_FILE).read_text())["run"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["pruned"]


def test_tokenizer_is_saved_and_permissions_follow_the_umask(tmp_path, small):
    class Tokenizer:
        def save_pretrained(self, directory):
            Path(directory, "tokenizer.json").write_text("{}")

    old_umask = os.umask(0o027)
    try:
        target = save_export(small, tmp_path / "shared", RECORD, tokenizer=Tokenizer())
    finally:
        os.umask(old_umask)
    assert (target / "tokenizer.json").read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    for path in target.iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path.name


def test_a_record_that_is_not_json_writes_nothing(tmp_path, small):
    with pytest.raises(TypeError):
        save_export(small, tmp_path / "x", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_works_without_peft(tmp_path, small, monkeypatch):
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")] or ["peft"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    from lp_callbacks import export

    assert export._tuner_classes() == ()
    target = save_export(small, tmp_path / "plain", RECORD)
    assert (target / RECORD_FILE).is_file()


# ============================================================================ crashes and kills
def test_a_crash_mid_save_keeps_the_earlier_export(tmp_path, small, monkeypatch):
    target = save_export(small, tmp_path / "pruned", {**RECORD, "run": 1})
    before = _snapshot(target)

    def broken(directory, *args, **kwargs):
        Path(directory, "model.safetensors").write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(small, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_export(small, target, {**RECORD, "run": 2})
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_a_directory_filled_during_the_save_is_not_replaced(tmp_path, small, monkeypatch):
    target = tmp_path / "pruned"
    real = type(small).save_pretrained

    def slow(directory, *args, **kwargs):
        target.mkdir()
        (target / "notes.txt").write_text("written meanwhile")
        return real(small, directory, *args, **kwargs)

    monkeypatch.setattr(small, "save_pretrained", slow)
    with pytest.raises(ValueError, match="'notes.txt'"):
        save_export(small, target, RECORD)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert _hidden(tmp_path) == []


def test_killed_between_the_renames_the_earlier_export_is_restored(tmp_path):
    target = tmp_path / "pruned"
    tmp = tmp_path / ".pruned.lp-tmp-abc123"  # a half-written new export
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    _earlier_export(tmp_path / ".pruned.lp-old-xyz789")  # the earlier export, renamed aside
    before = _snapshot(tmp_path / ".pruned.lp-old-xyz789")
    # things that are not ours, though some look alike: never touched
    (tmp_path / ".pruned.backup").mkdir()
    (tmp_path / ".pruned.backup" / "a.txt").write_text("mine")
    (tmp_path / ".pruned.lp-old-mine").mkdir()  # no RECORD_FILE: not an export of ours
    (tmp_path / ".pruned.lp-old-mine" / "b.txt").write_text("mine")
    (tmp_path / ".other.lp-tmp-abc").mkdir()  # the leftovers of another target
    (tmp_path / ".pruned.lp-tmp-file").write_text("a file, not our directory")

    assert check_export_dir(target) == target
    assert _snapshot(target) == before
    assert _hidden(tmp_path) == [".other.lp-tmp-abc", ".pruned.backup", ".pruned.lp-old-mine", ".pruned.lp-tmp-file"]
    assert (tmp_path / ".pruned.backup" / "a.txt").read_text() == "mine"
    assert (tmp_path / ".pruned.lp-old-mine" / "b.txt").read_text() == "mine"


def test_killed_after_the_swap_the_stale_copy_is_removed(tmp_path, small):
    _earlier_export(tmp_path / "pruned", marker="new")
    _earlier_export(tmp_path / ".pruned.lp-old-xyz789", marker="old")  # the swap finished, the rmtree did not
    (tmp_path / ".pruned.lp-tmp-q1w2e3").mkdir()  # killed while deleting the stale copy
    save_export(small, tmp_path / "pruned", RECORD)
    assert json.loads((tmp_path / "pruned" / RECORD_FILE).read_text()) == RECORD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


# ============================================================================ PEFT
_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    input_ids, attention_mask = torch.load(sys.argv[1])
    logits = {}
    for directory in sys.argv[3:]:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        assert not problems, (directory, problems)
        with torch.no_grad():
            logits[directory] = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
    assert "lp_callbacks" not in sys.modules
    torch.save(logits, sys.argv[2])
    """
)


def test_peft_models_are_exported_merged_and_load_with_plain_from_pretrained(tmp_path, one_thread):
    peft = pytest.importorskip("peft")
    from safetensors import safe_open

    from lp_callbacks.architectures import find_hf_model
    from lp_callbacks.surgery import drop_layers

    batch = random_batch()
    lora = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    drop_layers(lora, [2])  # a pruned model
    saved_head = peft.get_peft_model(
        tiny_model("llama", seed=1),
        peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    with torch.no_grad():
        saved_head.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)  # a trained head copy
    injected = tiny_model("llama", seed=2)  # adapters injected with no PeftModel at all
    with torch.no_grad():
        injected_base_logits = injected(**batch).logits
    lora_config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    injected = peft.inject_adapter_in_model(lora_config, injected)

    cases = {
        "inner": (lora, find_hf_model(lora)),  # what the callbacks pass: the LlamaForCausalLM inside the PeftModel
        "wrapper": (lora, lora),  # the PeftModel itself
        "modules_to_save": (saved_head, find_hf_model(saved_head)),
        "injected": (injected, injected),
    }
    expected, before = {}, {}
    for name, (live, _) in cases.items():
        with torch.no_grad():
            expected[name] = live(**batch).logits
            if name == "injected":
                without = injected_base_logits
            else:
                with live.disable_adapter():
                    without = live(**batch).logits
        assert not torch.allclose(without, expected[name], atol=1e-2)  # the adapters matter
        before[name] = {k: v.clone() for k, v in live.state_dict().items()}

    directories = {name: save_export(model, tmp_path / name, RECORD) for name, (_, model) in cases.items()}

    for name, (live, _) in cases.items():  # the training models are unchanged and keep their adapters
        after = live.state_dict()
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), name
        assert any("lora_A" in k for k in after)
    for name, directory in directories.items():
        with safe_open(directory / "model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k], name
        config = json.loads((directory / "config.json").read_text())
        assert "peft" not in json.dumps(config).lower()
        assert not (directory / "adapter_config.json").exists()
    assert json.loads((directories["inner"] / "config.json").read_text())["num_hidden_layers"] == 5

    torch.save((batch["input_ids"], batch["attention_mask"]), tmp_path / "batch.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt"),
         *map(str, directories.values())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "logits.pt")
    for name, directory in directories.items():
        torch.testing.assert_close(loaded[str(directory)], expected[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_adapter_on_one_side_of_tied_embeddings_exports_the_trained_model(tmp_path, target, one_thread):
    """An adapter on the tied LM head (or embedding) trained that side only: merged into the shared tensor it would
    act on both sides of the export."""
    peft = pytest.importorskip("peft")
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", 2)
    config.tie_word_embeddings = True
    base = AutoModelForCausalLM.from_config(config).eval()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", target], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_export(model, tmp_path / "out", RECORD)).eval()
    assert not reloaded.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
    after = model.state_dict()  # the training model: untouched, still tied, adapters in place
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert base.config.tie_word_embeddings and base.get_output_embeddings().weight is base.get_input_embeddings().weight
