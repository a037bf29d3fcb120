import json
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader, random_batch, tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint

from lp_callbacks import BlockInfluenceMonitor, get_decoder_layers
from lp_callbacks.callbacks.layer_prune import LayerPruneCallback
from lp_callbacks.schedules import GradualSchedule


def n_layers(module):
    return len(get_decoder_layers(module))


def params_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Probe(pl.Callback):
    """Records, at every optimizer step, the layer count, the LR and (before callbacks after it act) BI."""

    def __init__(self):
        self.layers, self.lrs, self.events = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.layers.append((trainer.global_step, batch_idx, n_layers(pl_module)))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


# ----------------------------------------------------------------------------------------------- what a user sees
def test_removes_lowest_bi_layers_and_keeps_training(tmp_path):
    module = TinyLM()
    monitor = BlockInfluenceMonitor()
    seen = {}

    class SpyMonitor(pl.Callback):  # BI the pruner will use: measured up to and including step 3
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                seen["bi"] = monitor.block_influence.clone()

    prune = LayerPruneCallback(num_layers=2, at_steps=[3])
    fast_trainer(tmp_path, callbacks=[monitor, SpyMonitor(), prune], max_steps=6).fit(module, loader())
    assert n_layers(module) == LAYERS - 2 and module.model.config.num_hidden_layers == LAYERS - 2
    event = prune.removed[0]
    candidates = seen["bi"][1:-1]  # first and last protected by default
    expected = sorted((torch.argsort(candidates)[:2] + 1).tolist())
    assert event["original_layers"] == expected and event["step"] == 3
    assert event["scores"] == pytest.approx([seen["bi"][i].item() for i in expected])
    # the monitor goes on measuring the survivors and reports them by their original indices
    assert monitor.original_indices == [i for i in range(LAYERS) if i not in expected]
    assert monitor.block_influence.shape == (LAYERS - 2,) and monitor.measured_steps == 3
    assert prune.depth_events[0].original_layers == expected


def test_runs_on_a_torch_without_fsdp2s_newer_paths(tmp_path, monkeypatch):
    """torch 2.4/2.5 (the requirements' lower bound) have neither ``torch.distributed.fsdp.FSDPModule`` nor
    ``torch.distributed.fsdp._fully_shard``: a single-device prune, freeze and export never looks for them."""
    import torch.distributed._composable.fsdp  # noqa: F401 - FSDP2 where torch 2.4 placed it (imported before the removal)
    import torch.distributed.fsdp as fsdp
    from transformers import AutoModelForCausalLM

    from lp_callbacks import LayerFreezeCallback

    monkeypatch.delattr(fsdp, "FSDPModule")
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp._fully_shard._fsdp_state", None)  # import fails
    module = TinyLM()
    prune = LayerPruneCallback(num_layers=2, at_steps=[2], export_dir=tmp_path / "export")
    freeze = LayerFreezeCallback(num_frozen=2, scores=[0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    fast_trainer(tmp_path, callbacks=[BlockInfluenceMonitor(), freeze, prune], max_steps=4).fit(module, loader())
    assert n_layers(module) == LAYERS - 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").config.num_hidden_layers == LAYERS - 2


def test_monitor_created_when_absent(tmp_path):
    prune = LayerPruneCallback(num_layers=1, at_steps=[2])
    trainer = fast_trainer(tmp_path, callbacks=[prune], max_steps=3)
    trainer.fit(TinyLM(), loader())
    assert any(isinstance(c, BlockInfluenceMonitor) for c in trainer.callbacks)
    assert len(prune.removed) == 1


def test_gradual_schedule_re_measures_between_events(tmp_path):
    module = TinyLM(num_layers=8)
    monitor = BlockInfluenceMonitor()
    prune = LayerPruneCallback(num_layers=3, gradual={"start_step": 2, "end_step": 6, "num_events": 3})
    probe = Probe()
    fast_trainer(tmp_path, callbacks=[monitor, prune, probe], max_steps=8).fit(module, loader())
    assert [r["step"] for r in prune.removed] == [2, 4, 6]
    assert [r["num_layers_after"] for r in prune.removed] == [7, 6, 5]
    assert [layers for step, _, layers in probe.layers] == [8, 7, 7, 6, 6, 5, 5, 5]
    assert monitor.measured_steps == 2  # reset at the step-6 event: steps 7 and 8 measured the 5-block model
    removed = [o for r in prune.removed for o in r["original_layers"]]
    assert len(set(removed)) == 3 and 0 not in removed and 7 not in removed


def test_angular_criterion_removes_a_contiguous_block(tmp_path):
    module = TinyLM(num_layers=8)
    monitor = BlockInfluenceMonitor()
    prune = LayerPruneCallback(num_layers=3, at_steps=[2], criterion="angular")
    fast_trainer(tmp_path, callbacks=[monitor, prune], max_steps=3).fit(module, loader())
    removed = prune.removed[0]["original_layers"]
    assert removed == list(range(removed[0], removed[0] + 3)) and 0 not in removed and 7 not in removed


@pytest.mark.parametrize("criterion", ["last", "random"])
def test_baselines(tmp_path, criterion):
    prune = LayerPruneCallback(fraction=0.34, at_steps=[1], criterion=criterion, seed=3)
    fast_trainer(tmp_path, callbacks=[prune], max_steps=2).fit(TinyLM(), loader())
    removed = prune.removed[0]["original_layers"]
    assert len(removed) == 2 and 0 not in removed and LAYERS - 1 not in removed
    if criterion == "last":
        assert removed == [LAYERS - 3, LAYERS - 2]


# ----------------------------------------------------------------------------------------------- reliability
def test_gradient_accumulation_one_event_at_a_step_boundary(tmp_path):  # RELIABILITY 3
    module, probe = TinyLM(), Probe()
    prune = LayerPruneCallback(num_layers=1, at_steps=[2])
    fast_trainer(tmp_path, callbacks=[prune, probe], max_steps=4, accumulate_grad_batches=4).fit(module, loader(length=64))
    assert len(prune.removed) == 1 and prune.removed[0]["step"] == 2
    first_pruned = next(i for i, (_, _, layers) in enumerate(probe.layers) if layers == LAYERS - 1)
    assert probe.layers[first_pruned][1] % 4 == 3  # the last micro-batch of an optimizer step
    assert n_layers(module) == LAYERS - 1


def test_resume_after_removal_equals_uninterrupted_run(tmp_path):  # RELIABILITY 1 and 2
    def run(root, max_steps, callbacks=(), ckpt=None):
        module = TinyLM(lr=1e-2, scheduler=True)
        prune, probe = LayerPruneCallback(num_layers=2, at_steps=[3]), Probe()
        trainer = fast_trainer(root, callbacks=[BlockInfluenceMonitor(), prune, probe, *callbacks], max_steps=max_steps,
                               enable_checkpointing=bool(callbacks))
        trainer.fit(module, loader(length=16), ckpt_path=ckpt)  # 4 batches an epoch
        return module, prune, probe, trainer

    full, full_prune, full_probe, _ = run(tmp_path / "full", 8)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    crashed, _, _, first_trainer = run(tmp_path / "crash", 4, [checkpoint])  # "crashes" after the step-4 checkpoint
    optimizer = first_trainer.optimizers[0]
    live = {id(p) for p in crashed.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == live  # exactly the live params
    assert set(map(id, optimizer.state)) == live

    resumed, resumed_prune, resumed_probe, trainer = run(tmp_path / "resume", 8, ckpt=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert n_layers(resumed) == n_layers(full) == LAYERS - 2
    assert len(resumed_prune.removed) == 1  # restored, not fired again
    assert resumed_prune.removed[0]["original_layers"] == full_prune.removed[0]["original_layers"]
    for (k, a), b in zip(params_of(full).items(), params_of(resumed).values()):
        torch.testing.assert_close(a, b, msg=k)
    assert resumed_probe.lrs == full_probe.lrs[4:]  # the LR schedule kept its place
    optimizer = trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in resumed.parameters()}


def test_survivors_keep_their_optimizer_state(tmp_path):  # RELIABILITY 2
    module = TinyLM(scheduler=True)
    snapshots = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # runs before the pruner (earlier in the list)
                opt = trainer.optimizers[0]
                snapshots.update({id(p): opt.state[p]["exp_avg"].clone() for p in pl_module.parameters()})
                snapshots["lr"] = opt.param_groups[0]["lr"]

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                opt = trainer.optimizers[0]
                for p in pl_module.parameters():
                    torch.testing.assert_close(opt.state[p]["exp_avg"], snapshots[id(p)])
                assert len(opt.state) == sum(1 for _ in pl_module.parameters())
                assert opt.param_groups[0]["lr"] == snapshots["lr"]
                snapshots["checked"] = True

    prune = LayerPruneCallback(num_layers=2, at_steps=[3])
    fast_trainer(tmp_path, callbacks=[Snap(), prune, After()], max_steps=5).fit(module, loader())
    assert snapshots["checked"]


def test_epoch_event_checkpointed_then_resumed_does_not_fire_twice(tmp_path):  # RELIABILITY 4
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # saves at every epoch end, after us
    prune = LayerPruneCallback(num_layers=1, at_epochs=[0])
    fast_trainer(tmp_path, callbacks=[prune, checkpoint], max_epochs=1, max_steps=-1, enable_checkpointing=True).fit(
        TinyLM(), loader(length=8)
    )
    assert len(prune.removed) == 1
    resumed_prune, module = LayerPruneCallback(num_layers=1, at_epochs=[0]), TinyLM()
    fast_trainer(tmp_path, callbacks=[resumed_prune], max_epochs=2, max_steps=-1).fit(
        module, loader(length=8), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    )
    assert len(resumed_prune.removed) == 1 and n_layers(module) == LAYERS - 1


def test_export_loads_without_lp_callbacks_and_generation_with_cache(tmp_path):  # RELIABILITY 7 and 8
    module = TinyLM(family="qwen3")
    prune = LayerPruneCallback(num_layers=2, at_steps=[2], export_dir=tmp_path / "export", export_when="both")
    fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(module, loader())
    assert (tmp_path / "export_step_2" / "config.json").is_file()
    record = json.loads((tmp_path / "export" / "lp_pruning.json").read_text())
    for path in [tmp_path / "export", *(tmp_path / "export").iterdir()]:  # shareable, not mkdtemp's 0700
        assert path.stat().st_mode & 0o044 == 0o044, path
    assert record["events"][0]["original_layers"] == prune.removed[0]["original_layers"]
    model = module.model.eval()
    batch = random_batch(1, 6)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "export")!r}).eval()
e = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    assert torch.allclose(m(**e["batch"]).logits, e["logits"], atol=1e-5)
assert m.config.num_hidden_layers == {LAYERS - 2} and len(m.config.layer_types) == {LAYERS - 2}
assert "lp_callbacks" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        cached = model.generate(batch["input_ids"], max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(batch["input_ids"], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_hybrid_layer_types_family_keeps_training(tmp_path):  # RELIABILITY 18 (Gemma2 sliding/full)
    module = TinyLM(family="gemma2")
    before = list(module.model.config.layer_types)
    prune = LayerPruneCallback(num_layers=2, at_steps=[2])
    fast_trainer(tmp_path, callbacks=[prune], max_steps=4).fit(module, loader())
    kept = [i for i in range(LAYERS) if i not in prune.removed[0]["original_layers"]]
    assert module.model.config.layer_types == [before[i] for i in kept]


def test_ddp_ranks_remove_the_same_layers(ddp_runs):  # RELIABILITY 9 and 10
    ranks = ddp_runs("prune")
    assert ranks[0]["removed"] == ranks[1]["removed"]  # rank 1's own (different) random choice was overridden
    assert ranks[0]["num_layers"] == ranks[1]["num_layers"] == LAYERS - 2
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    assert ranks[0]["steps"] == 4


def test_two_instances_distinct_state_keys_both_restore(tmp_path):  # RELIABILITY 19
    a = LayerPruneCallback(num_layers=1, at_steps=[1])
    b = LayerPruneCallback(num_layers=1, at_steps=[3], criterion="last")
    assert a.state_key != b.state_key
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4)
    fast_trainer(tmp_path, callbacks=[a, b, checkpoint], max_steps=4, enable_checkpointing=True).fit(TinyLM(), loader())
    a2, b2 = LayerPruneCallback(num_layers=1, at_steps=[1]), LayerPruneCallback(num_layers=1, at_steps=[3], criterion="last")
    module = TinyLM()
    fast_trainer(tmp_path, callbacks=[a2, b2], max_steps=5).fit(module, loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert a2.removed == a.removed and b2.removed == b.removed and n_layers(module) == LAYERS - 2


def test_two_pruners_resume_a_model_built_in_configure_model(tmp_path):
    """The FSDP2 recipe builds the model in configure_model: both pruners bind at full depth before the first one
    rebuilds the checkpoint's architecture (the second once took the rebuilt model for an already-pruned one)."""
    class LateLM(TinyLM):
        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):
            if self.model is None:
                self.model = tiny_model(seed=0).train()

    def pruners():
        return [LayerPruneCallback(num_layers=1, at_steps=[1]), LayerPruneCallback(num_layers=1, at_steps=[3],
                                                                                   criterion="last")]

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4)
    first = pruners()
    fast_trainer(tmp_path, callbacks=[*first, checkpoint], max_steps=4, enable_checkpointing=True).fit(LateLM(), loader())
    module, second = LateLM(), pruners()
    fast_trainer(tmp_path, callbacks=second, max_steps=5).fit(module, loader(),
                                                               ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert [p.removed for p in second] == [p.removed for p in first] and n_layers(module) == LAYERS - 2


def test_sharded_strategy_refused_at_setup():  # RELIABILITY 17
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lp_callbacks.distributed import check_strategy_supported

    with pytest.raises(ValueError, match="does not support the FSDPStrategy strategy"):
        check_strategy_supported(SimpleNamespace(strategy=FSDPStrategy()), "LayerPruneCallback")


def test_spawned_processes_refused_by_the_pruner_only():
    """Under ddp_spawn the main process gets the worker's weights loaded into its own full-depth model: a mix of
    trained survivors and untouched blocks. The pruner refuses it; the monitor and the freezer change no structure."""
    from lp_callbacks.distributed import check_strategy_supported

    spawned = pl.Trainer(strategy="ddp_spawn", devices=1, accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match=r"LayerPruneCallback does not support DDPStrategy with start_method='spawn'"
                                         r" .*Use strategy='ddp'"):
        check_strategy_supported(spawned, "LayerPruneCallback", changes_architecture=True)
    check_strategy_supported(spawned, "LayerFreezeCallback")
    check_strategy_supported(pl.Trainer(strategy="ddp", devices=1, accelerator="cpu", logger=False),
                             "LayerPruneCallback", changes_architecture=True)


def test_a_subclass_checkpoint_rebuilds_the_pruned_architecture(tmp_path):
    from lp_callbacks.checkpoint import prune_states

    class MyPrune(LayerPruneCallback):
        pass

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    fast_trainer(tmp_path, callbacks=[MyPrune(num_layers=2, at_steps=[2]), checkpoint], max_steps=3,
                 enable_checkpointing=True).fit(TinyLM(), loader())
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert len(prune_states(torch.load(path, weights_only=False))) == 1
    module = TinyLM()
    fast_trainer(tmp_path, callbacks=[MyPrune(num_layers=2, at_steps=[2])], max_steps=4).fit(module, loader(),
                                                                                            ckpt_path=str(path))
    assert n_layers(module) == LAYERS - 2


def test_a_failed_fit_leaves_no_load_wrapper_on_the_strategy(tmp_path):
    class Failing(TinyLM):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    from lp_callbacks import LayerFreezeCallback

    freeze = LayerFreezeCallback(num_frozen=2, scores=[0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    callbacks = [BlockInfluenceMonitor(), freeze, LayerPruneCallback(num_layers=1, at_steps=[2])]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_steps=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing(), loader())
    assert not trainer.strategy.__dict__.get("_lp_before_checkpoint_load")


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 1.5, "at_steps": [1]}, r"`fraction` must be a number in \(0, 1\), got 1.5"),
        ({"fraction": 0.0, "at_steps": [1]}, r"`fraction` must be a number in \(0, 1\), got 0.0"),
        ({"num_layers": 1, "fraction": 0.5, "at_steps": [1]}, "exactly one of `num_layers`, `fraction`"),
        ({"num_layers": 1, "at_steps": [1], "criterion": "magnitude"}, r"`criterion` must be one of \('block_influence'"),
        ({"num_layers": 1}, "exactly one of `at_steps`"),
        ({"num_layers": 1, "at_steps": [0]}, r"`at_steps` must hold ints >= 1"),
        ({"num_layers": 1, "gradual": {"start_step": 5, "end_step": 2, "num_events": 2}}, "gradual"),
        ({"num_layers": 0, "at_steps": [1]}, r"`num_layers` must be an int >= 1, got 0"),
        ({"num_layers": 1, "at_steps": [1], "export_when": "event"}, "needs `export_dir`"),
    ],
    ids=["fraction>1", "fraction=0", "two-amounts", "criterion", "no-schedule", "step-0", "gradual", "zero", "export"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerPruneCallback(**kwargs)


class CountingLM(TinyLM):
    steps = 0

    def training_step(self, batch, batch_idx):
        CountingLM.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        ({"num_layers": LAYERS + 2, "at_steps": [1]}, {}, rf"cannot remove {LAYERS + 2} of the model's {LAYERS} decoder layers"),
        ({"num_layers": LAYERS, "at_steps": [1], "protect_first": 0, "protect_last": 0}, {}, "at most 5 can go"),
        ({"num_layers": 1, "at_steps": [1], "protected_layers": [9]}, {}, r"`protected_layers` must be original block indices in \[0, 5\], got \[9\]"),
        ({"num_layers": 1, "at_steps": [10]}, {"max_steps": 4}, r"steps \[10\] past the Trainer's max_steps=4"),
        ({"num_layers": 1, "at_epochs": [3]}, {"max_epochs": 2, "max_steps": -1}, r"epochs \[3\] that a run of max_epochs=2 never ends"),
    ],
    ids=["more-than-exist", "all-layers", "protected-out-of-range", "past-max-steps", "past-max-epochs"],
)
def test_bad_plans_fail_before_any_training_step(tmp_path, kwargs, trainer_kwargs, match):
    CountingLM.steps = 0
    with pytest.raises(ValueError, match=match):
        fast_trainer(tmp_path, callbacks=[LayerPruneCallback(**kwargs)], **{"max_steps": 4, **trainer_kwargs}).fit(CountingLM(), loader())
    assert CountingLM.steps == 0


def test_gradual_schedule_steps():
    assert GradualSchedule(start_step=10, end_step=40, num_events=4).steps() == (10, 20, 30, 40)
    assert GradualSchedule(start_step=5, end_step=5, num_events=1).steps() == (5,)


# ----------------------------------------------------------------------------------------------- issue 9 (RELIABILITY 21-31)
def _checkpointed_run(tmp_path, prune, max_steps=4, every=4, module=None, data=None, **trainer_kwargs):
    """Train with ``prune``, checkpointing every ``every`` steps; returns the module and the checkpoint folder."""
    module = module or TinyLM()
    folder = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1)
    fast_trainer(tmp_path, callbacks=[prune, checkpoint], max_steps=max_steps, enable_checkpointing=True,
                 **trainer_kwargs).fit(module, data or loader())
    return module, folder


def test_export_dir_holding_user_files_refused_before_any_step(tmp_path):  # RELIABILITY 21
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    CountingLM.steps = 0
    prune = LayerPruneCallback(num_layers=1, at_steps=[2], export_dir=user)
    with pytest.raises(ValueError, match=r"(?s)`export_dir`.*results.*not an earlier lp_callbacks export.*notes.txt"):
        fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(CountingLM(), loader())
    assert CountingLM.steps == 0 and (user / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="export_dir"):  # uncreatable: under a file
        fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=1, at_steps=[2], export_dir=blocker / "out")],
                     max_steps=3).fit(CountingLM(), loader())
    assert CountingLM.steps == 0


def test_event_exports_replace_only_their_own_and_expand_home(tmp_path, monkeypatch):  # RELIABILITY 21
    monkeypatch.setenv("HOME", str(tmp_path))
    prune = LayerPruneCallback(num_layers=2, at_steps=[2, 3], export_dir="~/pruned", export_when="both")
    fast_trainer(tmp_path, callbacks=[prune], max_steps=4).fit(TinyLM(), loader())
    for name in ("pruned", "pruned_step_2", "pruned_step_3"):
        assert (tmp_path / name / "lp_pruning.json").is_file(), name
    again = LayerPruneCallback(num_layers=2, at_steps=[2, 3], export_dir="~/pruned", export_when="both")
    fast_trainer(tmp_path, callbacks=[again], max_steps=4).fit(TinyLM(seed=1), loader())  # replaces its own exports
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".pruned", "pruned"))) == [
        "pruned", "pruned_step_2", "pruned_step_3"]  # no hidden leftovers


PEFT_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "lp_callbacks" not in sys.modules
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_pruned_peft_model_exports_with_its_trained_behaviour(tmp_path):  # RELIABILITY 22
    peft = pytest.importorskip("peft")

    class LoraLM(TinyLM):
        def __init__(self):
            super().__init__()
            config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            self.model = peft.get_peft_model(self.model, config)

    module = LoraLM()
    prune = LayerPruneCallback(num_layers=2, at_steps=[2], export_dir=tmp_path / "export")
    fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(module, loader())
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    module.eval()
    with torch.no_grad():
        expected = module(ids)
    proc = subprocess.run([sys.executable, "-c", PEFT_LOGITS, str(tmp_path / "export"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_hidden_layers"] == LAYERS - 2


class TeacherStudent(TinyLM):
    """A distillation-style module: a frozen teacher assigned before the student."""

    def __init__(self):
        super().__init__()
        teacher = self.model
        teacher.requires_grad_(False)
        del self.model
        self.teacher = teacher
        self.student = TinyLM(seed=1).model
        self.model = self.student  # TinyLM's steps train self.model (registered twice: same object)


def test_several_models_refused_unless_named(tmp_path):  # RELIABILITY 23
    CountingLM.steps = 0
    with pytest.raises(ValueError, match=r"holds 2 Hugging Face models: `teacher` \(LlamaForCausalLM, all parameters frozen\)"):
        fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=1, at_steps=[2])], max_steps=3).fit(TeacherStudent(), loader())
    module = TeacherStudent()
    prune = LayerPruneCallback(num_layers=2, at_steps=[2], layers_path="student.model.layers", export_dir=tmp_path / "out")
    monitor = BlockInfluenceMonitor(layers_path="student.model.layers")
    fast_trainer(tmp_path, callbacks=[monitor, prune], max_steps=3).fit(module, loader())
    assert len(module.student.model.layers) == LAYERS - 2 and len(module.teacher.model.layers) == LAYERS
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == LAYERS - 2


def test_resume_with_another_criterion_keeps_the_applied_removal(tmp_path):  # RELIABILITY 24
    first, folder = _checkpointed_run(tmp_path, LayerPruneCallback(num_layers=2, at_steps=[3]))
    edited, module = LayerPruneCallback(num_layers=2, at_steps=[3], criterion="last"), TinyLM()
    assert edited.state_key != LayerPruneCallback(num_layers=2, at_steps=[3]).state_key
    fast_trainer(tmp_path, callbacks=[edited], max_steps=7).fit(module, loader(), ckpt_path=str(folder / "epoch=0-step=4.ckpt"))
    assert n_layers(module) == LAYERS - 2 and len(edited.removed) == 1  # restored, never fired again


def test_resume_with_a_larger_total_applies_it_to_future_events(tmp_path):  # RELIABILITY 24
    prune = LayerPruneCallback(num_layers=2, at_steps=[3])
    _, folder = _checkpointed_run(tmp_path, prune)
    edited, module = LayerPruneCallback(num_layers=3, at_steps=[3, 6]), TinyLM()
    fast_trainer(tmp_path, callbacks=[edited], max_steps=7).fit(module, loader(), ckpt_path=str(folder / "epoch=0-step=4.ckpt"))
    assert [len(r["original_layers"]) for r in edited.removed] == [2, 1] and n_layers(module) == LAYERS - 3
    assert edited.removed[0] == prune.removed[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 4, "at_steps": [3]}, r"total of 4 blocks does not fit the 2 removed already and 0 events to come"),
        ({"num_layers": 2, "at_steps": [2, 6]}, r"events \['step:2'\] lie at or before the checkpoint \(step 4"),
        ({"num_layers": 2, "at_steps": [3, 6]}, r"0 layer\(s\) to remove cannot be spread over 1 events to come"),
    ],
    ids=["total-without-events", "past-event", "nothing-left"],
)
def test_resume_with_an_incoherent_plan_is_refused_showing_both(tmp_path, kwargs, match):  # RELIABILITY 24
    _, folder = _checkpointed_run(tmp_path, LayerPruneCallback(num_layers=2, at_steps=[3]))
    CountingLM.steps = 0
    with pytest.raises(ValueError, match=match) as error:
        fast_trainer(tmp_path, callbacks=[LayerPruneCallback(**kwargs)], max_steps=8).fit(
            CountingLM(), loader(), ckpt_path=str(folder / "epoch=0-step=4.ckpt"))
    assert CountingLM.steps == 0
    if "cannot resume" in str(error.value):  # both plans shown: what the checkpoint did, what is asked now
        assert "removed {'step:3': [" in str(error.value) and f"events {[f'step:{s}' for s in kwargs['at_steps']]}" in str(error.value)


def test_reused_callbacks_plan_and_export_the_second_model(tmp_path):  # RELIABILITY 25
    monitor, prune = BlockInfluenceMonitor(), LayerPruneCallback(num_layers=2, at_steps=[2], export_dir=tmp_path / "out")
    first = TinyLM()
    fast_trainer(tmp_path, callbacks=[monitor, prune], max_steps=3).fit(first, loader())
    second = TinyLM(num_layers=8, seed=1)
    fast_trainer(tmp_path, callbacks=[monitor, prune], max_steps=3).fit(second, loader())
    assert n_layers(first) == LAYERS - 2 and n_layers(second) == 6
    assert len(prune.removed) == 1 and prune.original_num_layers == 8
    record = json.loads((tmp_path / "out" / "lp_pruning.json").read_text())
    assert record["original_num_layers"] == 8 and len(record["kept_original_layers"]) == 6
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    assert monitor.original_indices == prune.original_indices
    with pytest.raises(ValueError, match="already pruned"):  # the pruned model itself, without its checkpoint
        fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(second, loader())


def test_no_token_measured_refuses_to_remove(tmp_path):  # RELIABILITY 26
    data = loader()
    data.dataset.attention_mask.zero_()
    module = TinyLM()
    with pytest.raises(RuntimeError, match="no real token was measured before event 'step:2'"):
        fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=1, at_steps=[2])], max_steps=3).fit(module, data)
    assert n_layers(module) == LAYERS


def _gpt2_inverse_scaling():
    module = TinyLM(family="gpt2")
    module.model.config.scale_attn_by_inverse_layer_idx = True
    return module


def _gpt_bigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    module = TinyLM()
    module.model = GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64))
    return module


@pytest.mark.parametrize(
    ("make", "kwargs", "trainer_kwargs", "match"),
    [
        (CountingLM, {"at_steps": [20]}, {"max_steps": -1, "max_epochs": 1}, r"steps \[20\] that this run never reaches: it ends after 8"),
        (CountingLM, {"at_steps": [2, 3], "num_layers": 2}, {"callbacks": [BlockInfluenceMonitor(every_n_steps=4)]}, r"events at steps \[3\] have no measured step"),
        (_gpt2_inverse_scaling, {"at_steps": [2]}, {}, "scale_attn_by_inverse_layer_idx"),
        (_gpt_bigcode, {"at_steps": [2]}, {}, r"model_type='gpt_bigcode'"),
        (CountingLM, {"at_steps": [2], "min_layers": 9}, {}, r"`min_layers` must be below the model's 6 decoder layers, got 9"),
    ],
    ids=["unreachable-step", "measurement-gap", "gpt2-inverse-scaling", "family-not-in-table", "min-layers"],
)
def test_errors_known_at_setup_come_before_any_step(tmp_path, make, kwargs, trainer_kwargs, match):  # RELIABILITY 27
    CountingLM.steps = 0
    trainer_kwargs = dict(trainer_kwargs)
    callbacks = [*trainer_kwargs.pop("callbacks", []), LayerPruneCallback(**{"num_layers": 1, **kwargs})]
    module = make()
    before = sum(p.sum().item() for p in module.parameters())
    with pytest.raises(ValueError, match=match):
        fast_trainer(tmp_path, callbacks=callbacks, **{"max_steps": 4, **trainer_kwargs}).fit(module, loader())
    assert CountingLM.steps == 0 and sum(p.sum().item() for p in module.parameters()) == before


class LayerwiseLM(TinyLM):
    """One param group per decoder block, each with its own LR (layer-wise decay), and a per-group schedule."""

    def configure_optimizers(self):
        layers = get_decoder_layers(self)
        in_blocks = {id(p) for p in layers.parameters()}
        groups = [{"params": list(layer.parameters()), "lr": 1e-2 * 0.8 ** i} for i, layer in enumerate(layers)]
        groups.append({"params": [p for p in self.parameters() if id(p) not in in_blocks], "lr": 1e-3})
        optimizer = torch.optim.AdamW(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_layerwise_param_groups_resume_after_a_removal(tmp_path):  # RELIABILITY 28
    def lrs(trainer):
        return [g["lr"] for g in trainer.optimizers[0].param_groups]

    full = LayerwiseLM()
    trainer = fast_trainer(tmp_path / "full", callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2], criterion="last")], max_steps=6)
    trainer.fit(full, loader(length=16))  # 4 batches an epoch: the step-4 checkpoint ends an epoch
    _, folder = _checkpointed_run(tmp_path, LayerPruneCallback(num_layers=2, at_steps=[2], criterion="last"),
                                  module=LayerwiseLM(), data=loader(length=16))
    resumed = LayerwiseLM()
    again = fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2], criterion="last")], max_steps=6)
    again.fit(resumed, loader(length=16), ckpt_path=str(folder / "epoch=0-step=4.ckpt"))
    assert len(again.optimizers[0].param_groups) == LAYERS - 2 + 1
    assert lrs(again) == pytest.approx(lrs(trainer))  # every surviving block kept its own learning rate
    for (k, a), b in zip(params_of(full).items(), params_of(resumed).values()):
        torch.testing.assert_close(a, b, msg=k)


class LateLM(TinyLM):
    """Builds its HF model in configure_model (as for sharded training): nothing to find before that."""

    def __init__(self):
        super().__init__()
        del self.model

    def configure_model(self):
        if not hasattr(self, "model"):
            self.model = TinyLM().model


@pytest.mark.parametrize("monitor_first", [False, True], ids=["pruner-only", "monitor-before-pruner"])
def test_model_built_in_configure_model_is_found_pruned_and_resumed(tmp_path, monitor_first):  # RELIABILITY 31
    module = LateLM()
    prune = LayerPruneCallback(num_layers=2, at_steps=[2])
    _checkpointed_run(tmp_path, prune, module=module)
    assert n_layers(module) == LAYERS - 2 and prune.original_num_layers == LAYERS
    resumed, again = LateLM(), LayerPruneCallback(num_layers=2, at_steps=[2])
    callbacks = [BlockInfluenceMonitor(), again] if monitor_first else [again]
    fast_trainer(tmp_path, callbacks=callbacks, max_steps=6).fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert n_layers(resumed) == LAYERS - 2 and again.removed == prune.removed


def test_one_int_is_one_event():  # `at_steps=3` on a command line or in YAML
    assert LayerPruneCallback(num_layers=1, at_steps=3).schedule.steps == (3,)
    assert LayerPruneCallback(num_layers=1, at_epochs=0).schedule.epochs == (0,)
    with pytest.raises(ValueError, match=r"`at_steps` must hold ints >= 1, got \[0\]"):
        LayerPruneCallback(num_layers=1, at_steps=0)


def test_export_when_never_needs_no_export_dir_and_leaves_one_alone(tmp_path):
    prune = LayerPruneCallback(num_layers=1, at_steps=[2], export_when="never")  # no export_dir: accepted
    fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(TinyLM(), loader())
    assert len(prune.removed) == 1
    user = tmp_path / "results"  # not an export: would be refused as a target, but "never" writes nothing
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    leftover = tmp_path / ".results.lp-tmp-abc"  # named like an export leftover: cleaning it would be touching it
    leftover.mkdir()
    prune = LayerPruneCallback(num_layers=1, at_steps=[2], export_dir=user, export_when="never")
    fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(TinyLM(), loader())
    assert len(prune.removed) == 1 and [p.name for p in user.iterdir()] == ["notes.txt"] and leftover.is_dir()


def test_second_fit_of_an_already_pruned_module_with_ckpt_path_says_build_a_fresh_module(tmp_path):
    module, folder = _checkpointed_run(tmp_path, LayerPruneCallback(num_layers=1, at_steps=[2]))
    again = LayerPruneCallback(num_layers=1, at_steps=[2])
    with pytest.raises(ValueError, match="already pruned") as error:
        fast_trainer(tmp_path, callbacks=[again], max_steps=6).fit(module, loader(), ckpt_path=str(folder / "epoch=0-step=4.ckpt"))
    message = str(error.value)
    assert "build a fresh module" in message and "this same module object" in message
    assert "pass `ckpt_path` to resume it" not in message  # it was passed
