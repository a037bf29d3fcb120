"""Each script in examples/ documents how to run it and runs with --tiny as a user would (a subprocess)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    # One thread: tiny models run fastest so, and do not spin against other jobs on a shared CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--tiny", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_says_how_to_run_it(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and "To run:" in doc and f"python examples/{path.name}" in doc and "--tiny" in doc


def test_prune_your_trainer_tiny(tmp_path):
    out = run_example("prune_your_trainer.py", tmp_path, "--output-dir", str(tmp_path / "out"))
    assert "exported 4-block model" in out and "reloaded logits equal the trained model's: True" in out
    assert (tmp_path / "out" / "pruned_model" / "config.json").is_file()


def test_monitor_only_tiny(tmp_path):
    out = run_example("monitor_only.py", tmp_path, "--output-dir", str(tmp_path / "out"))
    values = [float(v) for v in re.findall(r"block +\d+ +BI ([\d.]+)", out)]
    assert len(values) == 6 and all(v > 0 for v in values)
    assert list((tmp_path / "out").rglob("bi_heatmap.png"))


def test_domain_adaptation_tiny(tmp_path):
    out = run_example("domain_adaptation.py", tmp_path, "--steps", "6", "--warmup-steps", "2")
    frozen = re.search(r"frozen blocks \(highest BI\): (\[.*\])", out)
    assert frozen and len(ast.literal_eval(frozen.group(1))) == 3
    before, after = map(float, re.search(r"held-out perplexity: +([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before


def test_readme_quickstart_runs_as_pasted(tmp_path):
    """The README's quickstart block, unchanged, in a fresh directory holding only README.md."""
    import shutil

    readme = Path(__file__).parent.parent / "README.md"
    quickstart = readme.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    shutil.copy(readme, tmp_path / "README.md")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "quickstart" / "pruned-model")
    assert exported.config.num_hidden_layers == 4
    version = tmp_path / "runs" / "quickstart" / "lightning_logs" / "version_0"
    assert (version / "metrics.csv").is_file() and (version / "depth" / "summary.json").is_file()
