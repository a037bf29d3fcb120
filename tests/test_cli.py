"""lp-callbacks CLI: help, config errors that name the key, data errors, fit/validate/measure end to end (tiny)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import write_corpus

from lp_callbacks.cli import byte_tokenizer, main
from lp_callbacks.config import ConfigError, config_help, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    """``-c configs/tiny.yaml`` plus data, cache and output directories under ``tmp_path``."""
    corpus = write_corpus(tmp_path)
    return ["-c", TINY, f"data.data_files=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}",
            f"trainer.default_root_dir={tmp_path / 'run'}", *extra]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ============================================================================================== help


@pytest.mark.parametrize(("command", "key"), [("fit", "callbacks.prune.num_layers"), ("validate", "trainer.max_steps"),
                                              ("measure", "measure.max_batches")], ids=["fit", "validate", "measure"])
def test_help_for_each_command(command, key, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"lp-callbacks {command}" in out and key in out and "KEY=VALUE" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "measure"))


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lp-callbacks": "lp_callbacks.cli:main"}


def test_config_help_covers_every_section():
    text = config_help()
    for key in ("model.smollm2", "model.config", "module.lr", "data.shakespeare", "trainer.max_steps",
                "callbacks.monitor.every_n_steps", "callbacks.freeze.fraction_frozen", "callbacks.depth.seq_len",
                "callbacks.checkpoint.every_n_train_steps", "measure.block_sizes"):
        assert f"{key}:" in text, key


# ====================================================================================== config errors


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_stepz=3", r"unknown key `trainer.max_stepz`.*max_steps"),
        ("module.lr=abc", r"`module.lr`.*abc"),
        ("callbacks.prune.criterion=bogus", r"`callbacks.prune.criterion` must be one of .*'angular'.*bogus"),
        ("callbacks.monitor.calibration_data=test", r"`callbacks.monitor.calibration_data` must be one of"),
        ("model.colour=red", r"unknown key `model.colour`"),
    ],
    ids=["misspelt", "wrong-type", "bad-choice", "bad-choice-cli-field", "unknown-model-key"],
)
def test_bad_override_names_the_key(override, expected, capsys):
    code, _, err = run(["fit", "-c", TINY, override, "--print-config"], capsys)
    assert code == 2
    assert override in err  # where it came from
    assert __import__("re").search(expected, err), err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("callbacks.prune.at_steps=3",
         "`callbacks.prune.at_steps` must be a list of ints or null, e.g. `callbacks.prune.at_steps=[3]`; got 3."),
        ("callbacks.prune={num_layers: 2, at_steps: 3}",
         "`callbacks.prune.at_steps` must be a list of ints or null, e.g. `callbacks.prune.at_steps=[3]`; got 3."),
        ("callbacks.prune.at_steps=[2, x]", "`callbacks.prune.at_steps` must be a list of ints or null; got [2, 'x']."),
        ("measure.block_sizes={a: 1}", "`measure.block_sizes` must be a list of ints; got {'a': 1}."),
        ("callbacks.prune=3", "`callbacks.prune` must be a mapping of its keys (a section) or null"
                              " (`callbacks.prune={}` for the defaults); got 3."),
        ("trainer.max_steps=1.5", "`trainer.max_steps` must be an int; got 1.5."),
    ],
    ids=["scalar-for-list", "inside-a-mapping", "bad-item", "mapping-for-list", "scalar-for-section", "float-for-int"],
)
def test_wrong_type_says_key_type_and_value_before_training(tmp_path, override, expected, capsys):
    code, out, err = run(["fit", *tiny_args(tmp_path), override], capsys)
    assert code == 2 and out == "" and not (tmp_path / "run").exists()
    assert err.strip() == f"lp-callbacks fit: error: command line `{override}`: {expected}"  # one line, no jargon


def test_wrong_type_in_yaml_gives_a_yaml_example(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("callbacks:\n  prune:\n    num_layers: 2\n    at_steps: 3\n")
    code, _, err = run(["fit", "-c", TINY, "-c", str(path), "--print-config"], capsys)
    assert code == 2
    assert f"{path}: `callbacks.prune.at_steps` must be a list of ints or null, e.g. `at_steps: [3]`; got 3." in err


def test_misspelt_key_in_yaml_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  max_epoch: 3\n")
    code, _, err = run(["fit", "-c", TINY, "-c", str(path), "--print-config"], capsys)
    assert code == 2 and str(path) in err and "trainer.max_epoch" in err and "max_epochs" in err


def test_callback_refusal_names_the_section(tmp_path, capsys):
    code, _, err = run(["fit", *tiny_args(tmp_path), "callbacks.prune={num_layers: 0, at_steps: [2]}",
                        "--print-config"], capsys)
    assert code == 2 and "callbacks.prune: `num_layers` must be a positive int, got 0" in err


def test_dash_dash_overrides_and_print_config(tmp_path, capsys):
    code, out, _ = run(["fit", *tiny_args(tmp_path), "--trainer.max_steps=7", "--print-config"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["trainer"]["max_steps"] == 7 and printed["model"]["tokenizer"] == "bytes"


def test_not_an_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", TINY, "--verbose"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --verbose" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.config=null"], "model: give exactly one source"),
        (["model.smollm2=true"], "got smollm2=True, name_or_path=None, config=set"),
        (["data.data_files=null"], "data: give exactly one of"),
    ],
    ids=["no-model", "two-models", "no-data"],
)
def test_source_errors(tmp_path, overrides, expected, capsys):
    code, _, err = run(["fit", *tiny_args(tmp_path), *overrides, "--print-config"], capsys)
    assert code == 2 and expected in err


def test_missing_config_file(capsys):
    code, _, err = run(["fit", "-c", "no/such.yaml"], capsys)
    assert code == 2 and "config file not found: no/such.yaml" in err


def test_load_config_merges_in_order(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("trainer: {max_steps: 5, log_every_n_steps: 2}\n")
    second.write_text("trainer: {max_steps: 9}\n")
    cfg = load_config([first, second], ["trainer.log_every_n_steps=3"])
    assert (cfg.trainer.max_steps, cfg.trainer.log_every_n_steps) == (9, 3)
    with pytest.raises(ConfigError, match="not an override of the form key=value"):
        load_config([], ["trainer.max_steps"])


# ============================================================================== model and data errors


def test_random_model_field_typo(tmp_path, capsys):
    code, _, err = run(["fit", *tiny_args(tmp_path), "model.config.hidden_sise=16"], capsys)
    assert code == 2 and "model.config: LlamaConfig has no field `hidden_sise` (did you mean `hidden_size`?)" in err


def test_tokenizer_larger_than_vocabulary(tmp_path, capsys):
    code, _, err = run(["fit", *tiny_args(tmp_path), "model.config.vocab_size=100"], capsys)
    assert code == 2 and "the tokenizer has 259 tokens but the model's embeddings hold 100" in err


def test_empty_data_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(["fit", *tiny_args(tmp_path), f"data.data_files=[{empty}]"], capsys)
    assert code == 2 and f"data.data_files: Data file is empty: {empty}" in err


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    code, _, err = run(["measure", *tiny_args(tmp_path), f"data.data_files={missing}"], capsys)
    assert code == 2 and f"data.data_files: Data file not found: {missing}" in err


@pytest.mark.parametrize(
    ("overrides", "key", "shown"),
    [
        (["model.config=null", "model.name_or_path=./no/such/model"], "model.name_or_path", "./no/such/model"),
        (["model.config=null", "model.name_or_path={missing}"], "model.name_or_path", "{missing}"),
        (["model.tokenizer=./no/such/tokenizer"], "model.tokenizer", "./no/such/tokenizer"),
    ],
    ids=["relative-model-dir", "absolute-model-dir", "tokenizer-dir"],
)
def test_missing_model_directory_is_one_line(tmp_path, overrides, key, shown, capsys):
    missing = str(tmp_path / "nope")
    overrides = [o.format(missing=missing) for o in overrides]
    code, _, err = run(["fit", *tiny_args(tmp_path), *overrides], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{key}: " in lines[0] and "directory not found: " + shown.format(missing=missing) in lines[0]


def test_byte_tokenizer_round_trips():
    tok = byte_tokenizer()
    text = "Thou art more lovely — ünïcødé\n"
    ids = tok(text)["input_ids"]
    assert len(tok) == 259 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text


# ============================================================================================ end to end


def test_fit_prunes_exports_and_plots(tmp_path, capsys):
    export = tmp_path / "pruned"
    code, out, _ = run(["fit", *tiny_args(tmp_path), "trainer.logger=false", "callbacks.monitor={}",
                        f"callbacks.prune={{num_layers: 2, at_steps: [2, 4], export_dir: {export}}}",
                        "callbacks.depth={}"], capsys)
    assert code == 0
    assert "6 optimizer steps" in out and "4 decoder blocks at the end (of 6)" in out and str(export) in out
    depth = tmp_path / "run" / "depth"
    assert {p.name for p in depth.iterdir()} >= {"bi_heatmap.png", "bi_profile.png", "events.png", "summary.json"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_hidden_layers == 4 and (export / "tokenizer.json").is_file()


def test_validate_reports_val_loss(tmp_path, capsys):
    code, out, _ = run(["validate", *tiny_args(tmp_path), "trainer.logger=false"], capsys)
    assert code == 0 and "val_loss" in out and "val_ppl" in out


def test_measure_writes_json_csv_png(tmp_path, capsys):
    out_dir = tmp_path / "measure"
    code, out, _ = run(["measure", *tiny_args(tmp_path), "measure.block_sizes=[1,2]",
                        f"measure.output_dir={out_dir}"], capsys)
    assert code == 0 and "Block Influence of random llama: 6 blocks" in out
    profile = json.loads((out_dir / "bi_profile.json").read_text())
    assert profile["num_layers"] == 6 and len(profile["block_influence"]) == 6 and profile["tokens"] > 0
    assert len(profile["angular_distances"]["2"]) == 5 and sorted(profile["lowest_bi_first"]) == list(range(6))
    with open(out_dir / "bi_profile.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["layer"]) for r in rows] == list(range(6)) and rows[-1]["angular_distance_n2"] == ""
    assert (out_dir / "bi_profile.png").stat().st_size > 0



def test_printed_config_loads_back(tmp_path, capsys):
    code, out, _ = run(["fit", *tiny_args(tmp_path), "callbacks.monitor={}", "--print-config"], capsys)
    saved = tmp_path / "printed.yaml"
    saved.write_text(out)
    assert code == 0 and load_config([saved]) == load_config([TINY], tiny_args(tmp_path)[2:] + ["callbacks.monitor={}"])
