"""Every YAML in configs/ opens with its command, loads and validates; a few run end to end on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_corpus

from lp_callbacks.cli import check_config, main
from lp_callbacks.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = ROOT / "configs" / "tiny.yaml"


def command_of(path: Path) -> list[str]:
    """The ``lp-callbacks <command> --config configs/<name>.yaml ...`` line in the opening comment."""
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    found = [re.search(r"lp-callbacks (\w+) --config (\S+)", line) for line in head]
    return [m.group(1) for m in found if m and m.group(2) == f"configs/{path.name}"]


def test_the_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert names >= {"main_job", "monitor_only", "shortgpt_prune", "gromov_prune_heal", "gradual_prune",
                     "domain_adaptation", "measure", "tiny"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_opens_with_its_command_and_validates(path, tmp_path):
    assert path.read_text().startswith("#"), "a config opens with a comment"
    commands = command_of(path)
    assert commands and commands[0] in ("fit", "validate", "measure"), f"no `lp-callbacks <cmd> --config {path.name}`"
    overrides = [f"data.data_files=[{write_corpus(tmp_path)}]"] if path == TINY else []
    cfg = load_config([path], overrides)
    check_config(cfg)  # model/data sources, LightningModule and callback arguments


def _real_configs_use_the_embedded_default():
    return [p for p in CONFIGS if p != TINY]


@pytest.mark.parametrize("path", _real_configs_use_the_embedded_default(), ids=lambda p: p.stem)
def test_real_configs_run_smollm2_on_shakespeare(path):
    cfg = load_config([path])
    assert cfg.model.smollm2 and cfg.data.shakespeare
    if cfg.callbacks.prune is not None:
        schedule = cfg.callbacks.prune.at_steps or [cfg.callbacks.prune.gradual["end_step"]]
        assert max(schedule) < cfg.trainer.max_steps, "healing steps after the last removal"


def test_main_job_shape():
    cfg = load_config([ROOT / "configs" / "main_job.yaml"])
    prune = cfg.callbacks.prune
    assert cfg.callbacks.monitor is not None and cfg.callbacks.depth is not None
    assert prune.num_layers == 6 and 2 <= len(prune.at_steps) <= 3 and prune.criterion == "block_influence"
    assert prune.export_dir and prune.export_when == "fit_end"
    assert cfg.data.block_size * cfg.data.batch_size * cfg.trainer.max_steps <= 150_000  # fits ~15 min on 2 cores


# ======================================================================== end to end, tiny model overlay


def tiny_run(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    corpus = write_corpus(tmp_path)
    return ["fit", "-c", str(path), "-c", str(TINY), f"data.data_files=[{corpus}]",
            f"data.cache_dir={tmp_path / 'cache'}", f"trainer.default_root_dir={tmp_path / 'run'}",
            "trainer.logger=false", *extra]


def test_main_job_end_to_end_tiny(tmp_path, capsys):
    export = tmp_path / "pruned"
    code = main(tiny_run(ROOT / "configs" / "main_job.yaml", tmp_path, "trainer.max_steps=8",
                         "callbacks.prune.num_layers=3", "callbacks.prune.at_steps=[2,4,6]",
                         f"callbacks.prune.export_dir={export}", "module.warmup_steps=2"))
    out = capsys.readouterr().out
    assert code == 0 and "3 decoder blocks at the end (of 6)" in out
    summary = json.loads((tmp_path / "run" / "depth" / "summary.json").read_text())
    assert summary["num_layers"] == {"before": 6, "after": 3} and len(summary["events"]) == 3
    assert json.loads((export / "lp_pruning.json").read_text())["original_num_layers"] == 6


def test_shortgpt_calibration_end_to_end_tiny(tmp_path, capsys):
    code = main(tiny_run(ROOT / "configs" / "shortgpt_prune.yaml", tmp_path, "callbacks.prune.num_layers=2",
                         f"callbacks.prune.export_dir={tmp_path / 'pruned'}"))
    out = capsys.readouterr().out
    assert code == 0 and "4 decoder blocks at the end (of 6)" in out


def test_domain_adaptation_end_to_end_tiny(tmp_path, capsys):
    code = main(tiny_run(ROOT / "configs" / "domain_adaptation.yaml", tmp_path, "callbacks.freeze.warmup_steps=2"))
    out = capsys.readouterr().out
    assert code == 0 and "frozen blocks: [" in out
    frozen = json.loads(re.search(r"frozen blocks: (\[.*\])", out).group(1))
    assert len(frozen) == 3  # fraction_frozen 0.5 of 6
