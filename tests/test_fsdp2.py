"""FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` per block) with 2 CPU processes over gloo.

Every run below is one fit of tests/fsdp2_script.py; one launch runs the first runs one after the other, a second
launch the resumed ones, and each test reads what rank 0 wrote. The runs are small (a tiny Llama, 16 sequences)
and compared with the same run under DDP or on one process, exactly where the arithmetic is the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAYERS, RandomTokens, TinyLM, launch_two_process

SCRIPT = Path(__file__).parent / "fsdp2_script.py"
STEP_4 = Path("ckpt") / "epoch=0-step=4.ckpt"

# name: settings (see the script). "resume": the run whose step-4 checkpoint this one resumes from.
RUNS = {
    "monitor": dict(callbacks="monitor", max_steps=2, late_model=True, lr=0.0),
    "bf16_mp_policy": dict(callbacks="monitor", max_steps=2, lr=0.0, mixed=True),
    "bf16_trainer_bf16_mixed": dict(callbacks="monitor", max_steps=2, lr=0.0, precision="bf16-mixed"),
    # 6 steps, two blocks removed after step 2, a distributed checkpoint at step 4, an export
    "prune": dict(callbacks="prune", max_steps=6, save_every=4, export=True, scheduler=True),
    "prune_ddp": dict(strategy="ddp", callbacks="prune", max_steps=6, scheduler=True),
    "prune_full_state_file": dict(callbacks="prune", max_steps=6, save_every=4, distributed_checkpoint=False,
                                  scheduler=True),
    "prune_resumed_dcp_folder": dict(callbacks="prune", max_steps=6, resume="prune", scheduler=True),
    "prune_resumed_full_state_file": dict(callbacks="prune", max_steps=6, resume="prune_full_state_file",
                                          distributed_checkpoint=False, scheduler=True),
    "freeze": dict(callbacks="freeze", max_steps=6, save_every=4),
    "freeze_resumed": dict(callbacks="freeze", max_steps=6, resume="freeze"),
    "freeze_prune": dict(callbacks="freeze_prune", max_steps=6, save_every=4),
    "freeze_prune_ddp": dict(strategy="ddp", callbacks="freeze_prune", max_steps=6),
    "freeze_prune_resumed": dict(callbacks="freeze_prune", max_steps=6, resume="freeze_prune"),
    "sample": dict(callbacks="sample", max_steps=7, save_every=4),
    "sample_ddp": dict(strategy="ddp", callbacks="sample", max_steps=7),
    "sample_resumed": dict(callbacks="sample", max_steps=7, resume="sample"),
}


def job(base: Path, name: str) -> dict:
    settings = dict(RUNS[name], out=base / name)
    if settings.pop("export", False):
        settings["export_dir"] = base / name / "export"
    if "resume" in settings:
        settings["ckpt_path"] = base / settings.pop("resume") / STEP_4
    return settings


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: rank 0's result of the run ``name``; ``runs.base``: the folder holding each run's folder."""
    base = tmp_path_factory.mktemp("fsdp2")
    for resumed in (False, True):  # resumed runs in fresh processes, as a user's resume: nothing left in memory
        launch_two_process(SCRIPT, [job(base, name) for name in RUNS if ("resume" in RUNS[name]) == resumed])

    def result(name: str) -> dict:
        return torch.load(base / name / "result.pt", weights_only=False)

    result.base = base
    return result


def first_eight():
    """The sequences both ranks saw in 2 steps (2 x 2 x 2): the first 8 of the script's 16."""
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(RandomTokens(length=16), range(8)), batch_size=8)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_monitor_bi_equals_single_process_bi_over_the_union(runs):
    """The model is built in configure_model (nothing exists before); BI is reduced over both ranks."""
    from lp_callbacks import measure_depth

    result = runs("monitor")
    union = measure_depth(TinyLM(lr=0.0).model, first_eight(), block_sizes=(2,))
    torch.testing.assert_close(result["bi"], union.block_influence, atol=1e-6, rtol=0)
    torch.testing.assert_close(result["angular2"], union.angular_distances[2], atol=1e-6, rtol=0)
    assert result["tokens"] == union.tokens


@pytest.mark.parametrize("way", ["mp_policy", "trainer_bf16_mixed"])
def test_bf16_keeps_bi_in_float64(runs, way):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16), or the Trainer's precision="bf16-mixed" (autocast): hidden
    states are bf16, BI is accumulated in float64."""
    from lp_callbacks import measure_depth

    result = runs(f"bf16_{way}")
    union = measure_depth(TinyLM(lr=0.0).model, first_eight())
    assert result["bi"].dtype == torch.float64 and torch.isfinite(result["bi"]).all()
    torch.testing.assert_close(result["bi"], union.block_influence, atol=2e-2, rtol=0)  # bf16 activations
    assert result["tokens"] == union.tokens


def test_pruned_fsdp2_run_equals_the_same_run_under_ddp(runs):
    fsdp2, ddp = runs("prune"), runs("prune_ddp")
    assert fsdp2["removed"] == ddp["removed"] and len(fsdp2["removed"][0]) == 2
    assert fsdp2["scheduler_steps"] == ddp["scheduler_steps"] == [6] and fsdp2["lrs"] == ddp["lrs"]  # kept its place
    assert fsdp2["num_layers"] == LAYERS - 2 and fsdp2["global_step"] == 6
    # the removed blocks' shards are freed, the survivors' are the same tensors; FSDP2's root drives the survivors only
    assert fsdp2["shards_alive"] == {i: i in fsdp2["kept"] for i in range(LAYERS)}
    assert fsdp2["fsdp_states"] == 1 + LAYERS - 2
    assert max_diff(fsdp2["state"], ddp["state"]) < 1e-5
    # the optimizer holds the survivors only: Adam's two moments per element of the pruned model
    assert fsdp2["optimizer_state_numel"] == ddp["optimizer_state_numel"] == 2 * fsdp2["trainable_numel"]
    assert fsdp2["trainable_numel"] == sum(t.numel() for t in fsdp2["state"].values())  # no tied weights here
    # DepthEfficiencyMonitor counts the whole model, not a shard
    assert fsdp2["depth_baseline"]["params_total"] == ddp["depth_baseline"]["params_total"]
    assert fsdp2["depth_last"]["depth/params_total"] == ddp["depth_last"]["depth/params_total"] < fsdp2["depth_baseline"]["params_total"]


def test_export_of_the_sharded_model_loads_with_plain_transformers(runs):
    from transformers import AutoModelForCausalLM

    fsdp2, export = runs("prune"), runs.base / "prune" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert len(model.model.layers) == model.config.num_hidden_layers == LAYERS - 2
    state = model.state_dict()
    assert max_diff({k: state[k] for k in fsdp2["state"]}, fsdp2["state"]) == 0.0
    record = json.loads((export / "lp_pruning.json").read_text())
    assert record["kept_original_layers"] == fsdp2["kept"]


@pytest.mark.parametrize("checkpoint", ["dcp_folder", "full_state_file"])
def test_resume_after_a_removal_equals_the_uninterrupted_run(runs, checkpoint):
    """A checkpoint taken after the removal (step 4 of 6, an epoch boundary), as a distributed-checkpoint folder or
    as one full-state-dict file: the resumed run rebuilds the pruned architecture before the sharded weights and the
    optimizer state load, and ends where the uninterrupted one did."""
    uninterrupted, resumed = runs("prune"), runs(f"prune_resumed_{checkpoint}")
    if checkpoint == "dcp_folder":
        assert (runs.base / "prune" / STEP_4).is_dir()
    else:  # the same run, saving one file
        assert (runs.base / "prune_full_state_file" / STEP_4).is_file()
        assert max_diff(runs("prune_full_state_file")["state"], uninterrupted["state"]) == 0.0
    assert resumed["removed"] == uninterrupted["removed"] and resumed["global_step"] == 6
    assert max_diff(resumed["state"], uninterrupted["state"]) == 0.0
    assert resumed["optimizer_state_numel"] == uninterrupted["optimizer_state_numel"]
    assert resumed["scheduler_steps"] == uninterrupted["scheduler_steps"] and resumed["lrs"] == uninterrupted["lrs"]


def test_freezing_under_fsdp2_holds_and_resumes(runs):
    """The 3 highest-scored blocks (and embeddings, final norm, head) are frozen: bit-identical at the end, no
    optimizer state; every other parameter trains."""
    first = runs("freeze")
    assert first["frozen"] == [0, 2, 4]
    initial, final = first["initial"], first["state"]
    frozen = {k for k in final if k in first["frozen_names"]}
    assert {k for k in final if any(k.startswith(f"model.layers.{i}.") for i in (0, 2, 4))} < frozen
    assert "model.embed_tokens.weight" in frozen and not any(k.startswith("model.layers.1.") for k in frozen)
    assert all(torch.equal(final[k], initial[k]) for k in frozen)
    assert all(not torch.equal(final[k], initial[k]) for k in final.keys() - frozen)
    assert first["trainable_numel"] == sum(final[k].numel() for k in final.keys() - frozen)
    assert first["optimizer_state_numel"] == 2 * first["trainable_numel"]
    resumed = runs("freeze_resumed")
    assert resumed["frozen"] == first["frozen"]
    assert max_diff(resumed["state"], final) == 0.0


def test_freeze_and_prune_together_under_fsdp2_equal_ddp_and_resume(runs):
    """A frozen and a trainable block removed after step 2; resume from step 4: frozen set kept in original numbering,
    the run equals DDP's, the resumed run equals the uninterrupted one."""
    first, ddp = runs("freeze_prune"), runs("freeze_prune_ddp")
    assert first["frozen"] == ddp["frozen"] == [0, 2] and first["kept"] == [0, 1, 2, 3]
    assert max_diff(first["state"], ddp["state"]) < 1e-5
    frozen = {k for k in first["state"] if k in first["frozen_names"]}
    assert all(torch.equal(first["state"][k], first["initial"][k]) for k in frozen)
    assert first["optimizer_state_numel"] == ddp["optimizer_state_numel"] == 2 * first["trainable_numel"]
    resumed = runs("freeze_prune_resumed")
    assert resumed["frozen"] == [0, 2] and resumed["kept"] == [0, 1, 2, 3]
    assert max_diff(resumed["state"], first["state"]) == 0.0


def test_layer_wise_sampling_under_fsdp2_equals_ddp_and_resumes(runs):
    """2 of 6 blocks trainable, drawn again at steps 2, 4 and 6: every draw changes which sharded parameters train.
    The checkpoint at step 4 is written before the draw due then (draws happen as a step starts): FSDP2's loader
    refused one that held the freshly drawn blocks without optimizer state. (It resumes at an epoch end, 4 steps
    here: a mid-epoch resume with a plain DataLoader is not exact in Lightning, with or without this package.)"""
    first, ddp = runs("sample"), runs("sample_ddp")
    assert first["draws"] == ddp["draws"] and len(first["draws"]) == 4 and len(set(map(tuple, first["draws"]))) > 1
    assert max_diff(first["state"], ddp["state"]) < 1e-5
    assert first["optimizer_state_numel"] == ddp["optimizer_state_numel"] == 2 * first["trainable_numel"]
    resumed = runs("sample_resumed")
    assert resumed["draws"] == first["draws"]
    assert max_diff(resumed["state"], first["state"]) == 0.0


@pytest.mark.parametrize(
    ("strategy", "who", "match"),
    [
        (lambda s: s.FSDPStrategy(), "LayerPruneCallback", "does not support the FSDPStrategy strategy.*ModelParallelStrategy"),
        (lambda s: type("DeepSpeedStrategy", (), {})(), "LayerFreezeCallback",  # deepspeed is not installed
         "does not support the DeepSpeedStrategy strategy.*tensor_parallel_size=1"),
        (lambda s: type("SingleDeviceXLAStrategy", (), {})(), "LayerPruneCallback",  # one TPU: never tried
         "does not support the SingleDeviceXLAStrategy strategy"),
        (lambda s: s.ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), "LayerPruneCallback",
         r"data parallelism only \(FSDP2\): got tensor_parallel_size=2, expected 1"),
        (lambda s: s.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "DistillationCallback",
         "DistillationCallback does not support the ModelParallelStrategy strategy"),
    ],
    ids=["fsdp1", "deepspeed", "single_tpu", "tensor_parallel", "distillation_fsdp2"],
)
def test_refused_strategies_are_named_with_the_supported_way(strategy, who, match):
    from types import SimpleNamespace

    from lightning.pytorch import strategies

    from lp_callbacks.distributed import check_strategy_supported

    trainer = SimpleNamespace(strategy=strategy(strategies))
    with pytest.raises(ValueError, match=match):
        check_strategy_supported(trainer, who, fsdp2=who != "DistillationCallback")


def test_data_parallel_fsdp2_is_accepted():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lp_callbacks.distributed import check_strategy_supported, strategy_kind

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    check_strategy_supported(trainer, "LayerPruneCallback")
    assert strategy_kind(trainer) == "fsdp2"


def test_readme_scaling_out_example_runs_as_pasted(tmp_path):
    """The README's FSDP2 block, unchanged, as a script (Lightning's launcher re-runs it in the second process)."""
    import re

    from transformers import AutoModelForCausalLM

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Scaling out (FSDP2)", 1)[1]
    (tmp_path / "example.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned_fsdp2")
    assert exported.config.num_hidden_layers == len(exported.model.layers) == 6
