
import lightning.pytorch as pl
import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader, tiny_config
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback
from lp_callbacks.events import collect_depth_events
from lp_callbacks.measure import measure_depth

SCORES = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]  # blocks 0, 2, 4 matter most
TOP3 = [0, 2, 4]
FIXED = ("model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.norm.weight")


class SnapshotAt(Callback):
    """Copies every parameter after optimizer step ``step`` (put it after the callbacks under test)."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, {}

    def on_fit_start(self, trainer, pl_module):
        if self.step == 0:
            self.weights = _weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.weights:
            self.weights = _weights(pl_module)


class ScriptedMonitor(BlockInfluenceMonitor):
    """A monitor whose BI at each read is ``script(global_step)``: lets a test choose what gets frozen when."""

    def __init__(self, script):
        super().__init__()
        self.script, self._scripted = script, None

    def flush(self, trainer):
        super().flush(trainer)
        self._scripted = torch.tensor(self.script(trainer.global_step), dtype=torch.float64)

    @property
    def block_influence(self):
        return self._scripted


def _weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _block_names(indices):
    return lambda name: any(name.startswith(f"model.model.layers.{i}.") for i in indices)


def _optimizer_names(trainer, module, state=False):
    names = {id(p): n for n, p in module.named_parameters()}
    optimizer = trainer.optimizers[0]
    params = optimizer.state if state else [p for g in optimizer.param_groups for p in g["params"]]
    return {names[id(p)] for p in params}


def _state_bytes(optimizer):
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


# ============================================================================================ really frozen
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"], ids=["sgd-momentum", "adamw-weight-decay"])
def test_frozen_weights_bit_identical_after_warmup(tmp_path, optimizer):
    """Freeze at step 2 from warm-up BI: frozen weights never move again, their optimizer state is gone."""
    module = TinyLM(optimizer=optimizer, lr=0.05)
    freeze = LayerFreezeCallback(fraction_frozen=0.5, warmup_steps=2)
    start, at_freeze = SnapshotAt(0), SnapshotAt(2)
    trainer = fast_trainer(tmp_path, callbacks=[freeze, start, at_freeze], max_steps=6)
    trainer.fit(module, loader())

    assert isinstance(trainer.callbacks[-1], BlockInfluenceMonitor)  # added by the callback, none was given
    assert len(freeze.frozen_blocks) == 3 and freeze.record["source"] == "warmup" and freeze.record["step"] == 2
    scores = torch.tensor(freeze.record["scores"])
    assert set(freeze.frozen_blocks) == set(scores.argsort(descending=True)[:3].tolist())  # the highest BI
    is_frozen_block = _block_names(freeze.frozen_blocks)
    frozen = {n for n in at_freeze.weights if is_frozen_block(n)}
    end = _weights(module)
    for name in frozen:
        assert torch.equal(end[name], at_freeze.weights[name]), name  # bit-identical since the freeze
    for name in FIXED:  # embeddings, LM head, final norm: frozen from the start
        assert torch.equal(end[name], start.weights[name]), name
    trainable = set(end) - frozen - set(FIXED)
    assert all(not torch.equal(end[n], at_freeze.weights[n]) for n in trainable)  # the others still train
    assert _optimizer_names(trainer, module) == trainable  # frozen params left the param groups...
    assert _optimizer_names(trainer, module, state=True) == trainable  # ...and the optimizer state
    assert all(module.get_parameter(n).requires_grad == (n in trainable) for n in end)


def test_user_scores_freeze_at_fit_start(tmp_path):
    module = TinyLM(optimizer="adamw")
    freeze = LayerFreezeCallback(num_trainable=3, scores=torch.tensor(SCORES))
    start = SnapshotAt(0)
    trainer = fast_trainer(tmp_path, callbacks=[freeze, start], max_steps=3)
    trainer.fit(module, loader())
    assert freeze.frozen_blocks == TOP3 and freeze.trainable_blocks == [1, 3, 5]
    assert freeze.record["source"] == "scores" and freeze.record["step"] == 0
    assert freeze.record["scores"] == pytest.approx(SCORES)
    assert freeze.record["frozen_modules"] == sorted(FIXED)
    assert trainer.callbacks == [freeze, start]  # no monitor needed, none added
    (event,) = freeze.depth_events  # what DepthEfficiencyMonitor reads (original numbering)
    assert (event.step, event.kind, event.original_layers) == (0, "freeze", TOP3)
    assert event.scores == pytest.approx([SCORES[i] for i in TOP3])
    assert [e for _, e in collect_depth_events(trainer.callbacks)] == [event]
    end, frozen = _weights(module), _block_names(TOP3)
    for name, value in start.weights.items():
        assert torch.equal(end[name], value) == (frozen(name) or name in FIXED), name
    metrics = trainer.callback_metrics
    assert metrics["layer_freeze/frozen_blocks"] == 3 and metrics["layer_freeze/trainable_blocks"] == 3
    assert metrics["layer_freeze/trainable_params"] == freeze.record["trainable_params"]
    assert metrics["layer_freeze/optimizer_state_bytes"] == _state_bytes(trainer.optimizers[0]) > 0


def test_calibration_loader_measures_at_fit_start(tmp_path):
    calib = loader(length=8, seed=3)
    expected = measure_depth(TinyLM().model, calib).block_influence
    freeze = LayerFreezeCallback(num_frozen=2, calibration_dataloader=calib, freeze_lm_head=False)
    module = TinyLM()
    fast_trainer(tmp_path, callbacks=[freeze], max_steps=1).fit(module, loader())
    torch.testing.assert_close(torch.tensor(freeze.record["scores"], dtype=torch.float64), expected)
    assert freeze.frozen_blocks == sorted(expected.argsort(descending=True)[:2].tolist())
    assert module.model.lm_head.weight.requires_grad and not module.model.model.norm.weight.requires_grad


def test_optimizer_state_half_of_full_finetuning(tmp_path):
    """Half the blocks frozen (and the protected modules): Adam state shrinks to the trainable share."""
    full_module, full = TinyLM(), fast_trainer(tmp_path, max_steps=2)
    full.fit(full_module, loader())
    module = TinyLM()
    freeze = LayerFreezeCallback(num_frozen=LAYERS // 2, scores=SCORES)
    trainer = fast_trainer(tmp_path, callbacks=[freeze], max_steps=2)
    trainer.fit(module, loader())
    full_bytes, frozen_bytes = _state_bytes(full.optimizers[0]), _state_bytes(trainer.optimizers[0])
    total = sum(p.numel() for p in module.parameters())
    share = freeze.record["trainable_params"] / total
    assert frozen_bytes / full_bytes <= 0.5
    assert frozen_bytes / full_bytes == pytest.approx(share, abs=0.01)
    assert freeze.record["optimizer_state_bytes"] == frozen_bytes


def test_gradient_accumulation_decides_once_at_step_boundary(tmp_path):
    freeze = LayerFreezeCallback(num_frozen=2, warmup_steps=2)
    trainer = fast_trainer(tmp_path, callbacks=[freeze], max_steps=4, accumulate_grad_batches=2)
    trainer.fit(TinyLM(), loader())
    assert len(freeze.history) == 1 and freeze.history[0]["step"] == 2


# ============================================================================================ gradient checkpointing
@pytest.mark.parametrize("kwargs", [{}, dict(freeze_embeddings=False, also_freeze=["model.embed_tokens"])],
                         ids=["flag", "also-freeze"])
def test_gradient_checkpointing_reentrant_with_frozen_embeddings(tmp_path, kwargs):
    """Reentrant checkpointing needs an input that requires grad: same training as without checkpointing."""
    # without the callback's enable_input_require_grads, the checkpointed blocks would get no gradient at all
    runs = {}
    for checkpointing in (False, True):
        module = TinyLM(optimizer="sgd")
        if checkpointing:
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            module.model.disable_input_require_grads()  # as older HF versions, or checkpointing enabled by hand
        freeze = LayerFreezeCallback(num_frozen=3, scores=SCORES, **kwargs)
        start = SnapshotAt(0)
        fast_trainer(tmp_path, callbacks=[freeze, start], max_steps=3).fit(module, loader())
        runs[checkpointing] = (start.weights, _weights(module))
    (start, plain), (_, checkpointed) = runs[False], runs[True]
    trainable = [n for n in plain if not _block_names(TOP3)(n) and n not in FIXED]
    assert all(not torch.equal(checkpointed[n], start[n]) for n in trainable)  # blocks under checkpointing trained
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


# ============================================================================================ unfreezing and resume
def _resume_pair(tmp_path, make_callbacks, optimizer, steps, stop, module_cls=TinyLM, first_steps=None):
    """Uninterrupted run to ``steps`` vs a run (to ``first_steps``, default ``stop``) resumed from its checkpoint
    of step ``stop``.

    One batch per epoch, the same at every step: whatever batch Lightning resumes at, both runs see the same data.
    """
    data = lambda: loader(length=4, batch_size=4)  # noqa: E731
    ref_module, ref_callbacks = module_cls(optimizer=optimizer), make_callbacks()
    ref = fast_trainer(tmp_path / "ref", callbacks=ref_callbacks, max_steps=steps)
    ref.fit(ref_module, data())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="resume-{step}", save_top_k=-1, every_n_train_steps=stop)
    first = fast_trainer(tmp_path / "a", callbacks=[*make_callbacks(), ckpt], max_steps=first_steps or stop,
                         enable_checkpointing=True)
    first.fit(module_cls(optimizer=optimizer), data())
    module, callbacks = module_cls(optimizer=optimizer, seed=1), make_callbacks()  # other init: weights must load
    resumed = fast_trainer(tmp_path / "b", callbacks=callbacks, max_steps=steps)
    resumed.fit(module, data(), ckpt_path=str(tmp_path / "ckpt" / f"resume-step={stop}.ckpt"))
    assert resumed.global_step == steps
    return (ref, ref_module, ref_callbacks), (resumed, module, callbacks)


def test_resume_restores_same_frozen_set_and_optimizer_state(tmp_path):
    make = lambda: [BlockInfluenceMonitor(), LayerFreezeCallback(fraction_trainable=0.5, warmup_steps=2)]  # noqa: E731
    (ref, ref_module, ref_cbs), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adam", steps=6, stop=4)
    freeze, ref_freeze = cbs[1], ref_cbs[1]
    assert freeze.frozen_blocks == ref_freeze.frozen_blocks and len(freeze.frozen_blocks) == 3
    assert len(freeze.history) == 1 and freeze.record["step"] == 2  # restored, not decided again
    assert _optimizer_names(resumed, module) == _optimizer_names(ref, ref_module)
    assert _optimizer_names(resumed, module, state=True) == _optimizer_names(ref, ref_module, state=True)
    ref_weights = _weights(ref_module)
    for name, value in _weights(module).items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-5, atol=1e-6)


def test_reevaluation_unfreezes_with_fresh_state_and_survives_resume(tmp_path):
    """Step 2 freezes blocks 0, 2, 4; step 5 swaps to 1, 3, 5: the unfrozen blocks train again from fresh state."""
    def script(step):
        return SCORES if step < 5 else SCORES[::-1]

    def make():
        return [ScriptedMonitor(script), LayerFreezeCallback(num_frozen=3, warmup_steps=2, reevaluate_every_n_steps=3),
                SnapshotAt(5)]

    (ref, ref_module, ref_cbs), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adamw", steps=10, stop=8)
    freeze, at_swap = ref_cbs[1], ref_cbs[2]
    assert [h["frozen_blocks"] for h in freeze.history] == [TOP3, [1, 3, 5], [1, 3, 5]]
    assert [h["step"] for h in freeze.history] == [2, 5, 8]
    events = [(e.step, e.kind, e.original_layers) for e in freeze.depth_events]
    assert events == [(2, "freeze", TOP3), (5, "unfreeze", TOP3), (5, "freeze", [1, 3, 5])]  # step 8: no change
    assert cbs[1].depth_events == freeze.depth_events  # restored from the checkpoint, not emitted twice
    end = _weights(ref_module)
    for name, value in at_swap.weights.items():
        if _block_names([1, 3, 5])(name):
            assert torch.equal(end[name], value), name  # newly frozen: untouched since step 5
        elif _block_names(TOP3)(name):
            assert not torch.equal(end[name], value), name  # unfrozen: trains again
    optimizer, names = ref.optimizers[0], {id(p): n for n, p in ref_module.named_parameters()}
    in_groups = [names[id(p)] for p in optimizer.param_groups[0]["params"]]
    assert in_groups == [n for n, _ in ref_module.named_parameters() if n in set(in_groups)]  # configured order
    unfrozen = [ref_module.get_parameter(n) for n in in_groups if _block_names(TOP3)(n)]
    assert unfrozen and all(int(optimizer.state[p]["step"]) == 5 for p in unfrozen)  # fresh at step 5, 5 steps since
    # the resumed run holds the same set and the same Adam moments
    assert cbs[1].frozen_blocks == [1, 3, 5] and len(cbs[1].history) == 3
    torch.testing.assert_close(resumed.optimizers[0].state_dict()["state"], optimizer.state_dict()["state"],
                               rtol=1e-5, atol=1e-7)
    for name, value in _weights(module).items():
        torch.testing.assert_close(value, end[name], rtol=1e-5, atol=1e-6)


def test_two_instances_have_distinct_state_keys():
    a = LayerFreezeCallback(num_frozen=2, scores=SCORES)
    b = LayerFreezeCallback(num_frozen=3, scores=SCORES)
    c = LayerFreezeCallback(num_frozen=2, scores=SCORES, prefix="second")
    assert len({a.state_key, b.state_key, c.state_key}) == 3
    a.frozen_blocks, a.history = [0, 2], [{"step": 0}]
    fresh = LayerFreezeCallback(num_frozen=2, scores=SCORES)
    fresh.load_state_dict(a.state_dict())
    assert fresh.frozen_blocks == [0, 2] and fresh.history == [{"step": 0}]
    fresh.load_state_dict({})  # an old or foreign state: defaults
    assert fresh.frozen_blocks is None and fresh.history == []


def test_highest_scores_choose_unmeasured_blocks_first_with_a_warning():
    from lp_callbacks.freezing import select_frozen
    from lp_callbacks.selection import highest_scores, lowest_scores

    scores = torch.tensor([0.5, float("nan"), 0.9, 0.5, 0.1], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"no BI for blocks \[1\]; they count as the most important"):
        assert select_frozen(scores, 2) == [1, 2]  # NaN: the most important, frozen first
    assert highest_scores(scores, 3) == [0, 1, 2]  # ties: the lower index first
    assert highest_scores(scores, 2, protected={1}) == [0, 2]
    assert lowest_scores(scores, 2) == [0, 4]  # for pruning NaN is never chosen


def test_decisions_fall_due_after_the_warm_up_then_every_n_steps():
    from lp_callbacks.freezing import decision_due

    def due(step, decided, source="warmup_steps", last_step=None, every=None):
        return decision_due(step, decided=decided, source=source, warmup_steps=5, last_step=last_step, every=every)

    assert [due(s, False) for s in (4, 5, 6)] == [False, True, True]  # the first choice ends the warm-up
    assert not due(50, False, source="scores")  # chosen at fit start, never by the clock
    assert [due(s, True, last_step=5, every=5) for s in (9, 10)] == [False, True]
    assert not due(10_000, True, last_step=5)  # no re-evaluation, no resampling: never again


def test_freeze_events_name_what_changed_among_the_blocks_that_exist():
    from lp_callbacks.freezing import freeze_events

    scores = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    unfreeze, freeze = freeze_events(7, "reevaluation", before=[0, 1, 9], after=[1, 2], present=[0, 1, 2, 3],
                                     scores=scores)  # block 9 was removed, not unfrozen
    assert (unfreeze.step, unfreeze.kind, unfreeze.original_layers, unfreeze.scores) == (7, "unfreeze", [0], [0.1])
    assert (freeze.kind, freeze.original_layers, freeze.detail) == ("freeze", [2], "reevaluation: freeze 1 of 4 blocks")
    assert freeze_events(8, "resampling", [1, 2], [2, 1], [0, 1, 2, 3], {}) == []  # the same set: no event
    (event,) = freeze_events(0, "sampling", [], [3], [0, 1, 2, 3], {})
    assert event.scores == []  # uniform sampling has no scores


# ============================================================================================ DDP
@pytest.mark.parametrize("prune", [False, True], ids=["freeze", "freeze-and-prune"])
def test_ddp_two_processes_freeze_the_same_blocks(ddp_runs, prune):
    rank0, rank1 = ddp_runs("freeze_prune" if prune else "freeze")
    assert rank0["global_step"] == rank1["global_step"] == 5
    assert rank0["frozen_blocks"] == rank1["frozen_blocks"] and len(rank0["frozen_blocks"]) == 3
    assert rank0["requires_grad"] == rank1["requires_grad"]
    assert rank0["wrapper_rebuilt"] and rank1["wrapper_rebuilt"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name  # the ranks never diverged
    assert rank0["num_layers"] == (LAYERS - 2 if prune else LAYERS)
    frozen = rank0["at_freeze"]
    assert len(frozen) == 3 * len([n for n in rank0["weights"] if n.startswith("model.model.layers.0.")]) + 3
    if prune:  # blocks 4 and 5 left after step 3: the frozen ones among them went with them
        assert set(rank0["frozen_blocks"]) <= {0, 1, 2, 3} and len(rank0["frozen_blocks"]) >= 1
        frozen = {n: v for n, v in frozen.items() if n in rank0["weights"] and not _block_names([4, 5])(n)}
    for name, value in frozen.items():
        assert torch.equal(rank0["weights"][name], value), name  # frozen under DDP too
    trainable = sorted(set(rank0["weights"]) - set(frozen))
    assert rank0["optimizer_params"] == rank0["optimizer_state_params"] == trainable


# ============================================================================================ bad input
def _bad(kwargs, match, error=ValueError, id=None):
    return pytest.param(kwargs, error, match, id=id)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        _bad(dict(scores=SCORES), r"exactly one of `num_trainable`, .*got none", id="no-amount"),
        _bad(dict(num_frozen=2, num_trainable=2, scores=SCORES), r"exactly one of .*'num_frozen': 2", id="two-amounts"),
        _bad(dict(fraction_frozen=1.0, scores=SCORES),
             r"`fraction_frozen` must be a number in \(0, 1\), got 1.0", id="fraction-1"),
        _bad(dict(fraction_trainable=0, scores=SCORES), r"`fraction_trainable` must be a number in .*got 0",
             id="fraction-0"),
        _bad(dict(fraction_frozen=-0.5, scores=SCORES), r"must be a number in \(0, 1\), got -0.5", id="fraction-negative"),
        _bad(dict(num_frozen=0, scores=SCORES), r"`num_frozen` must be an int >= 1, got 0", id="num-0"),
        _bad(dict(num_frozen=2), r"exactly one source of block importance.*got none", id="no-source"),
        _bad(dict(num_frozen=2, scores=SCORES, warmup_steps=3), r"exactly one source.*\['scores', 'warmup_steps'\]",
             id="two-sources"),
        _bad(dict(num_frozen=2, scores=[0.1, float("nan")]), r"`scores` must be finite", id="nan-scores"),
        _bad(dict(num_frozen=2, scores=[[0.1, 0.2]]), r"`scores` must be 1-D .*got shape \(1, 2\)", id="2d-scores"),
        _bad(dict(num_frozen=2, warmup_steps=-1), r"`warmup_steps` must be an int >= 0, got -1", id="negative-warmup"),
        _bad(dict(num_frozen=2, warmup_steps=2, reevaluate_every_n_steps=0),
             r"`reevaluate_every_n_steps` must be an int >= 1", id="reevaluate-0"),
        _bad(dict(num_frozen=2, scores=SCORES, freeze_embeddings="yes"),
             r"`freeze_embeddings` must be True or False, got 'yes'", TypeError, id="flag-not-bool"),
        _bad(dict(num_frozen=2, scores=SCORES, also_freeze="model.norm"), r"`also_freeze` must be a list", TypeError,
             id="names-as-str"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerFreezeCallback(**kwargs)


class HeadlessLM(pl.LightningModule):
    """A user's module around a bare decoder (no LM head)."""

    def __init__(self):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_config(tiny_config("llama"))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"]).last_hidden_state.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "module_cls", "match"),
    [
        pytest.param(dict(num_frozen=LAYERS, scores=SCORES), TinyLM,
                     r"`num_frozen=6` would freeze 6 of the model's 6 decoder blocks: at least one", id="freeze-all"),
        pytest.param(dict(fraction_trainable=0.05, scores=SCORES), TinyLM,
                     r"`fraction_trainable=0.05` would freeze 6 of the model's 6", id="fraction-freezes-all"),
        pytest.param(dict(num_trainable=7, scores=SCORES), TinyLM, r"`num_trainable` must be in \[1, 6\] .*got 7",
                     id="more-than-exist"),
        pytest.param(dict(num_frozen=2, scores=SCORES[:5]), TinyLM,
                     r"one value per decoder block: the model has 6 blocks, got 5", id="scores-length"),
        pytest.param(dict(num_frozen=2, scores=SCORES, also_freeze=["model.nrom"]), TinyLM,
                     r"`also_freeze` names 'model.nrom'.*Did you mean \['model.norm'", id="unknown-module"),
        pytest.param(dict(num_frozen=2, warmup_steps=4), TinyLM,
                     r"`warmup_steps` must be smaller than the Trainer's max_steps=4.*got 4", id="warmup-past-max"),
        pytest.param(dict(num_frozen=2, scores=SCORES), HeadlessLM,
                     r"`freeze_lm_head=True` but LlamaModel.get_output_embeddings\(\) returned None", id="no-lm-head"),
    ],
)
def test_bad_input_fails_before_the_first_step(tmp_path, kwargs, module_cls, match):
    module = module_cls()
    before = _weights(module)
    trainer = fast_trainer(tmp_path, callbacks=[LayerFreezeCallback(**kwargs)], max_steps=4)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, loader())
    assert trainer.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


# ============================================================================================ freeze and prune together
def _prune_last_two(at_step=3):
    """Removes original blocks 4 (frozen by SCORES) and 5 (trainable) after optimizer step ``at_step``."""
    from lp_callbacks import LayerPruneCallback

    return LayerPruneCallback(num_layers=2, at_steps=[at_step], criterion="last", protect_last=0)


def _assert_optimizer_holds_the_trainable_only(trainer, module):
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert _optimizer_names(trainer, module) == trainable
    assert _optimizer_names(trainer, module, state=True) == trainable
    live = {id(p) for p in module.parameters()}
    assert all(id(p) in live for g in trainer.optimizers[0].param_groups for p in g["params"])


def test_freeze_and_prune_in_one_run_keep_the_frozen_set_in_original_numbering(tmp_path):  # RELIABILITY 30
    from lp_callbacks import DepthEfficiencyMonitor

    module = TinyLM(optimizer="adamw")
    start = _weights(module)
    freeze, prune, depth = LayerFreezeCallback(num_frozen=3, scores=SCORES), _prune_last_two(), DepthEfficiencyMonitor()
    trainer = fast_trainer(tmp_path, callbacks=[freeze, prune, depth], max_steps=6)
    trainer.fit(module, loader())
    assert prune.original_indices == [0, 1, 2, 3]
    assert freeze.frozen_blocks == [0, 2] and freeze.trainable_blocks == [1, 3]  # original numbering
    assert freeze.record["frozen_blocks"] == [0, 2] and freeze.record["original_indices"] == [0, 1, 2, 3]
    end = _weights(module)
    frozen = [n for n in end if n in FIXED or _block_names([0, 2])(n)]  # original 0, 2 sit at positions 0, 2
    assert frozen and all(torch.equal(end[n], start[n]) for n in frozen)
    assert all(not torch.equal(end[n], start[n]) for n in end if _block_names([1, 3])(n))
    _assert_optimizer_holds_the_trainable_only(trainer, module)
    kinds = [(e.kind, e.original_layers) for _, e in collect_depth_events(trainer.callbacks)]
    assert ("freeze", [0, 2, 4]) in kinds and ("prune", [4, 5]) in kinds
    assert {e["kind"] for e in depth.events} == {"freeze", "prune"}


def test_reevaluation_after_a_removal_picks_among_the_blocks_that_exist(tmp_path):
    module = TinyLM()
    freeze = LayerFreezeCallback(fraction_frozen=0.5, warmup_steps=2, reevaluate_every_n_steps=2)
    trainer = fast_trainer(tmp_path, callbacks=[BlockInfluenceMonitor(), freeze, _prune_last_two()], max_steps=7)
    trainer.fit(module, loader())  # step 7 trains what step 6 unfroze: its optimizer state exists
    assert [h["step"] for h in freeze.history] == [2, 4, 6]
    first, after = freeze.history[0], freeze.history[1:]
    assert len(first["frozen_blocks"]) == 3 and len(first["scores"]) == LAYERS
    for record in after:  # half of the 4 blocks left, chosen from BI of those 4
        assert len(record["scores"]) == 4 and len(record["frozen_blocks"]) == 2
        assert set(record["frozen_blocks"]) <= {0, 1, 2, 3} and record["original_indices"] == [0, 1, 2, 3]
    _assert_optimizer_holds_the_trainable_only(trainer, module)
    assert all(not p.requires_grad for i in freeze.frozen_blocks for p in module.model.model.layers[i].parameters())


class PerBlockGroups(TinyLM):
    """One param group per block (layer-wise learning rates) and one for the rest."""

    def configure_optimizers(self):
        blocks = [{"params": list(b.parameters()), "lr": 1e-2 * (i + 1)} for i, b in enumerate(self.model.model.layers)]
        rest = [p for n, p in self.named_parameters() if ".layers." not in n]
        optimizer = torch.optim.Adam([*blocks, {"params": rest}])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_layer_wise_groups_of_removed_frozen_blocks_leave_the_optimizer(tmp_path):
    """One param group per block: the group of a removed frozen block (empty in the optimizer) goes too."""
    module = PerBlockGroups()
    trainer = fast_trainer(tmp_path, callbacks=[LayerFreezeCallback(num_frozen=3, scores=SCORES), _prune_last_two()],
                           max_steps=5)
    trainer.fit(module, loader())
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 4 + 1  # blocks 0-3 and the rest; 4 (frozen) and 5 (trainable) gone
    assert [g["initial_lr"] for g in optimizer.param_groups[:4]] == pytest.approx([1e-2, 2e-2, 3e-2, 4e-2])
    assert len(trainer.lr_scheduler_configs[0].scheduler.base_lrs) == 5
    _assert_optimizer_holds_the_trainable_only(trainer, module)


def test_freeze_and_prune_resume_after_the_removal(tmp_path):
    make = lambda: [LayerFreezeCallback(num_frozen=3, scores=SCORES), _prune_last_two()]  # noqa: E731
    (ref, ref_module, ref_cbs), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adamw", steps=7, stop=4)
    assert cbs[0].frozen_blocks == ref_cbs[0].frozen_blocks == [0, 2]
    assert cbs[1].original_indices == [0, 1, 2, 3] and len(cbs[1].removed) == 1
    assert _optimizer_names(resumed, module) == _optimizer_names(ref, ref_module)
    torch.testing.assert_close(resumed.optimizers[0].state_dict()["state"], ref.optimizers[0].state_dict()["state"],
                               rtol=1e-5, atol=1e-7)
    end = _weights(ref_module)
    for name, value in _weights(module).items():
        torch.testing.assert_close(value, end[name], rtol=1e-5, atol=1e-6)


def _assert_same_run(resumed, module, ref, ref_module):
    _assert_optimizer_holds_the_trainable_only(resumed, module)
    assert [len(g["params"]) for g in resumed.optimizers[0].param_groups] == [
        len(g["params"]) for g in ref.optimizers[0].param_groups]
    torch.testing.assert_close(resumed.optimizers[0].state_dict()["state"], ref.optimizers[0].state_dict()["state"],
                               rtol=1e-5, atol=1e-7)
    end = _weights(ref_module)
    for name, value in _weights(module).items():
        torch.testing.assert_close(value, end[name], rtol=1e-5, atol=1e-6)


def test_a_removal_during_the_warm_up_keeps_the_fixed_params_out_and_resumes(tmp_path):
    """Pruned at step 2 of a 4-step warm-up, checkpointed at step 3: the checkpoint's groups fit on resume."""
    make = lambda: [BlockInfluenceMonitor(), LayerFreezeCallback(num_frozen=2, warmup_steps=4),  # noqa: E731
                    _prune_last_two(at_step=2)]
    (ref, ref_module, ref_cbs), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adam", steps=6, stop=3,
                                                                      first_steps=5)
    assert cbs[1].frozen_blocks == ref_cbs[1].frozen_blocks and len(cbs[1].frozen_blocks) == 2
    _assert_same_run(resumed, module, ref, ref_module)


def test_layer_wise_groups_follow_removals_after_a_resume(tmp_path):
    """Resumed before two removals of frozen blocks (the optimizer's groups are new objects after the load): the
    emptied groups go, as in the uninterrupted run."""
    from lp_callbacks import LayerPruneCallback

    make = lambda: [LayerFreezeCallback(num_frozen=2, scores=[1, 2, 3, 4, 9, 9]),  # noqa: E731
                    LayerPruneCallback(num_layers=2, at_steps=[3, 4], criterion="last", protect_last=0)]
    (ref, ref_module, _), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adam", steps=5, stop=2,
                                                                 module_cls=PerBlockGroups, first_steps=5)
    assert cbs[1].original_indices == [0, 1, 2, 3] and len(ref.optimizers[0].param_groups) == 4 + 1
    _assert_same_run(resumed, module, ref, ref_module)


def test_a_count_that_would_freeze_every_block_left_after_pruning_is_refused_at_train_start(tmp_path):
    module = TinyLM()
    before = _weights(module)
    freeze = LayerFreezeCallback(num_frozen=4, scores=SCORES)  # fits 6 blocks, not the 4 left after the removal
    with pytest.raises(ValueError, match="would freeze 4 of the model's 4 decoder blocks"):
        fast_trainer(tmp_path, callbacks=[freeze, _prune_last_two()], max_steps=4).fit(module, loader())
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
