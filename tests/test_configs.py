"""Every YAML in configs/ opens with its command and parses through the real CLI; every config's classes build
(with the tiny model and data in place of SmolLM2 and Shakespeare); a few run end to end on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_corpus
from test_cli import callback, load_yaml, run

from lp_callbacks.harness.cli import LPCallbacksCLI

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny.yaml"
REAL = [p for p in CONFIGS if p != TINY]


def command_of(path: Path) -> list[str]:
    """The ``lp-callbacks <command> --config configs/<name>.yaml`` commands in the opening comment."""
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    found = [re.search(r"lp-callbacks (\w+) --config (\S+)", line) for line in head]
    return [m.group(1) for m in found if m and m.group(2) == f"configs/{path.name}"]


FIT = [p for p in REAL if command_of(p)[:1] == ["fit"]]  # measure.yaml runs end to end in test_cli.py


def test_the_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert names >= {"main_job", "monitor_only", "shortgpt_prune", "gromov_prune_heal", "gradual_prune",
                     "domain_adaptation", "measure", "tiny"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_opens_with_its_command_and_parses(path, tmp_path, capsys):
    assert path.read_text().startswith("#"), "a config opens with a comment"
    commands = command_of(path)
    assert commands and commands[0] in ("fit", "validate", "measure"), f"no `lp-callbacks <cmd> --config {path.name}`"
    for command in commands:
        code, out, err = run([command, "--config", path, "--print_config"], capsys)
        assert code == 0, err
        assert yaml.safe_load(out)["model"]["class_path"] == "lp_callbacks.harness.CausalLMModule"
        printed = tmp_path / f"{command}.yaml"
        printed.write_text(out)
        code, again, err = run([command, "--config", printed, "--print_config"], capsys)
        assert code == 0 and again == out, err  # the printed config parses back to itself


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_real_configs_run_smollm2_on_shakespeare_with_a_csv_logger(path):
    config = load_yaml(path)
    assert config["model"]["init_args"]["model"] == {"smollm2": True}
    assert config["data"]["init_args"]["shakespeare"] is True
    trainer = config["trainer"]
    if path.stem == "measure":
        return
    assert trainer["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"  # metrics.csv, whatever is installed
    for entry in trainer.get("callbacks", []):
        prune = entry.get("init_args", {}) if entry["class_path"].endswith("LayerPruneCallback") else None
        if prune is not None:
            schedule = prune.get("at_steps") or [prune["gradual"]["end_step"]]
            assert max(schedule) < trainer["max_steps"], "healing steps after the last removal"


def test_main_job_shape():
    config = load_yaml(ROOT / "configs" / "main_job.yaml")
    trainer = config["trainer"]
    names = [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]]
    assert names == ["BlockInfluenceMonitor", "LayerPruneCallback", "DepthEfficiencyMonitor", "ModelCheckpoint"]
    prune = callback(config, "LayerPruneCallback")
    assert prune["num_layers"] == 6 and 2 <= len(prune["at_steps"]) <= 3 and prune["criterion"] == "block_influence"
    assert prune["export_dir"] and prune.get("export_when", "fit_end") == "fit_end"
    checkpoint = callback(config, "ModelCheckpoint")  # one last checkpoint, so an interrupted run resumes
    assert checkpoint["save_last"] is True and checkpoint["save_top_k"] == 0 and checkpoint["dirpath"]
    assert trainer.get("enable_checkpointing", True) is not False
    data = config["data"]["init_args"]
    assert data["block_size"] * data["batch_size"] * trainer["max_steps"] <= 150_000  # fits ~15 min on 2 cores


# ====================================================== every config's classes, with the tiny model and data


def tiny_overlay(tmp_path: Path) -> dict[str, Any]:
    """The model and data of configs/tiny.yaml, as a file merged after a real config would give them."""
    tiny = load_yaml(TINY)
    model, data = tiny["model"], tiny["data"]
    model["init_args"]["model"]["smollm2"] = False
    data["init_args"].update(shakespeare=False, data_files=[str(write_corpus(tmp_path))],
                             cache_dir=str(tmp_path / "cache"))
    return {"model": model, "data": data, "trainer": {"accelerator": "cpu", "logger": False,
                                                      "default_root_dir": str(tmp_path / "run")}}


@pytest.mark.parametrize("path", FIT, ids=[p.stem for p in FIT])
def test_every_config_instantiates_on_the_tiny_model(path, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump(tiny_overlay(tmp_path)))
    # run=False: parse, link and build the model, the data, the callbacks and the Trainer; run nothing
    cli = LPCallbacksCLI(args=["--config", str(path), "--config", str(overlay)], run=False)
    assert cli.model.model.config.num_hidden_layers == 6 and len(cli.model.tokenizer) == 259
    assert cli.datamodule.tokenizer is cli.model.tokenizer  # linked
    mine = [type(c).__name__ for c in cli.trainer.callbacks if type(c).__module__.startswith("lp_callbacks.callbacks")]
    assert mine == [c["class_path"].rsplit(".", 1)[-1] for c in load_yaml(path)["trainer"]["callbacks"]
                    if c["class_path"].startswith("lp_callbacks")]
    assert type(cli.trainer.progress_bar_callback).__name__ == "ProgressLog"  # stdout is not a terminal here
    for cb in cli.trainer.callbacks:
        if hasattr(cb, "tokenizer"):
            assert cb.tokenizer is cli.model.tokenizer  # linked: the pruner exports it
        if hasattr(cb, "calibration_dataloader"):
            wanted = load_yaml(path)["data"]["init_args"].get("calibration_split")
            assert (cb.calibration_dataloader is None) == (wanted is None)


# ============================================================================ end to end, tiny model overlay


def tiny_run(path: Path, tmp_path: Path, edit: Any = None) -> list[str]:
    """``fit -c <a copy of path with the tiny model, data and schedule>``."""
    config = load_yaml(path)
    overlay = tiny_overlay(tmp_path)
    config["model"]["init_args"].update(overlay["model"]["init_args"])
    config["model"]["init_args"]["model"] = load_yaml(TINY)["model"]["init_args"]["model"]
    config["data"] = overlay["data"]
    config["trainer"].update(overlay["trainer"], max_steps=6, val_check_interval=None, limit_val_batches=2,
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                      if not c["class_path"].endswith("ModelCheckpoint")]
    for entry in config["trainer"]["callbacks"]:
        if "export_dir" in entry.get("init_args", {}):
            entry["init_args"]["export_dir"] = str(tmp_path / "pruned")
    if edit is not None:
        edit(config)
    written = tmp_path / path.name
    written.write_text(yaml.safe_dump(config, sort_keys=False))
    return ["fit", "--config", written]


def test_main_job_end_to_end_tiny(tmp_path, capsys):
    def shrink(config):
        config["trainer"]["max_steps"] = 8
        config["model"]["init_args"]["warmup_steps"] = 2
        callback(config, "LayerPruneCallback").update(num_layers=3, at_steps=[2, 4, 6])

    code, out, err = run(tiny_run(ROOT / "configs" / "main_job.yaml", tmp_path, shrink), capsys)
    assert code == 0, err
    assert "3 decoder blocks at the end (of 6)" in out
    summary = json.loads((tmp_path / "run" / "depth" / "summary.json").read_text())
    assert summary["num_layers"] == {"before": 6, "after": 3} and len(summary["events"]) == 3
    assert json.loads((tmp_path / "pruned" / "lp_pruning.json").read_text())["original_num_layers"] == 6


def test_shortgpt_calibration_end_to_end_tiny(tmp_path, capsys):
    def shrink(config):
        config["data"]["init_args"]["calibration_split"] = "val"  # the overlay replaced the data section
        callback(config, "LayerPruneCallback").update(num_layers=2)

    code, out, err = run(tiny_run(ROOT / "configs" / "shortgpt_prune.yaml", tmp_path, shrink), capsys)
    assert code == 0, err
    assert "4 decoder blocks at the end (of 6)" in out


def test_domain_adaptation_end_to_end_tiny(tmp_path, capsys):
    code, out, err = run(tiny_run(ROOT / "configs" / "domain_adaptation.yaml", tmp_path,
                                  lambda c: callback(c, "LayerFreezeCallback").update(num_trainable=2)), capsys)
    assert code == 0, err
    frozen = json.loads(re.search(r"frozen blocks: (\[.*\])", out).group(1))
    assert len(frozen) == 4  # 2 of the 6 blocks drawn trainable (the last draw)



def test_distill_heal_end_to_end_tiny(tmp_path, capsys):
    def shrink(config):
        callback(config, "LayerPruneCallback").update(num_layers=2, gradual={"start_step": 2, "end_step": 4, "num_events": 2})

    code, out, err = run(tiny_run(ROOT / "configs" / "distill_heal.yaml", tmp_path, shrink), capsys)
    assert code == 0, err
    assert "4 decoder blocks at the end (of 6)" in out
    summary = json.loads((tmp_path / "run" / "depth" / "summary.json").read_text())
    assert summary["loss"]["after"] is not None  # read from distill/lm_loss, logged by the distiller every step
    assert [e["loss_after"] is not None for e in summary["events"]] == [True, True]

@pytest.mark.slow
def test_main_job_builds_the_real_model(tmp_path):
    """The main job as configured (SmolLM2-135M, Shakespeare), built but not run."""
    pytest.importorskip("gguf")
    cli = LPCallbacksCLI(args=["--config", str(ROOT / "configs" / "main_job.yaml"),
                               f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.model.model.config.num_hidden_layers == 30 and cli.datamodule.tokenizer is cli.model.tokenizer
