"""LayerFreezeCallback's layer-wise sampling (LISA): a few blocks trainable at a time, drawn again every N steps."""


import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader
from lightning.pytorch.callbacks import Callback
from test_layer_freeze import (
    FIXED,
    SCORES,
    _assert_same_run,
    _block_names,
    _optimizer_names,
    _prune_last_two,
    _resume_pair,
    _weights,
)

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback
from lp_callbacks.freezing import sample_frozen
from lp_callbacks.selection import sample_layers


class EveryStep(Callback):
    """After each optimizer step (put it after the freezer): every weight and the names the optimizer holds."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.in_optimizer: list[set[str]] = []

    def on_fit_start(self, trainer, pl_module):
        self.weights.append(_weights(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(_weights(pl_module))
        self.in_optimizer.append(_optimizer_names(trainer, pl_module))


def _trainable_at(freeze, step):
    """The trainable blocks (original numbering) of the draw in force during optimizer step ``step + 1``."""
    return [h for h in freeze.history if h["step"] <= step][-1]["trainable_blocks"]


def test_uniform_sampling_trains_only_the_drawn_blocks_and_draws_again_every_n_steps(tmp_path):
    module, steps = TinyLM(optimizer="adamw"), EveryStep()
    freeze = LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, seed=3)
    trainer = fast_trainer(tmp_path, callbacks=[freeze, steps], max_steps=7)
    trainer.fit(module, loader())

    assert [h["step"] for h in freeze.history] == [0, 2, 4, 6]
    assert [h["draw"] for h in freeze.history] == [0, 1, 2, 3]
    for h in freeze.history:  # each draw is the seeded draw of its number, 2 of the 6 blocks
        assert h["source"] in ("sampling", "resampling") and h["scores"] == []
        assert h["trainable_blocks"] == sample_layers(LAYERS, 2, seed=3, draw=h["draw"])
    assert len({tuple(h["trainable_blocks"]) for h in freeze.history}) > 1  # it does draw again
    for step in range(7):  # optimizer step step + 1 moved the drawn blocks and nothing else
        before, after = steps.weights[step], steps.weights[step + 1]
        trainable = _trainable_at(freeze, step)
        moved = {n for n in after if not torch.equal(after[n], before[n])}
        assert moved and all(_block_names(trainable)(n) for n in moved), (step, sorted(moved))
    start, end = steps.weights[0], steps.weights[-1]
    assert all(torch.equal(end[n], start[n]) for n in FIXED)  # embeddings, head, final norm frozen throughout
    # the optimizer holds the blocks of the current draw only, and keeps state for them only
    final = {n for n, p in module.named_parameters() if p.requires_grad}
    assert final and all(_block_names(freeze.trainable_blocks)(n) for n in final)
    assert _optimizer_names(trainer, module) == _optimizer_names(trainer, module, state=True) == final
    changed = [(e.step, e.kind) for e in freeze.depth_events]
    assert changed[:1] == [(0, "freeze")] and {k for _, k in changed[1:]} <= {"freeze", "unfreeze"}


def test_newly_drawn_blocks_start_with_fresh_optimizer_state(tmp_path):
    module = TinyLM(optimizer="adamw")
    freeze = LayerFreezeCallback(num_trainable=2, resample_every_n_steps=3, seed=1)
    trainer = fast_trainer(tmp_path, callbacks=[freeze], max_steps=8)
    trainer.fit(module, loader())
    last = freeze.history[-1]
    assert last["step"] == 6
    def trainable_since(block):  # the step of the first draw of the last unbroken run of draws that hold it
        since = None
        for h in freeze.history:
            since = (since if since is not None else h["step"]) if block in h["trainable_blocks"] else None
        return since

    optimizer, seen = trainer.optimizers[0], {}
    for name, param in module.named_parameters():
        if param.requires_grad:  # state counts the steps since the block became trainable: fresh when drawn anew
            block = int(name.split(".layers.")[1].split(".")[0])
            seen[block] = int(optimizer.state[param]["step"])
            assert seen[block] == 8 - trainable_since(block), name
    assert set(seen) == set(last["trainable_blocks"]) and 2 in seen.values()  # one block drawn anew at step 6


def test_low_bi_sampling_draws_low_bi_blocks_more_often():
    scores = torch.tensor([0.5, 0.001, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    draws = [sample_frozen(6, 5, seed=0, draw=d, scores=scores) for d in range(200)]
    trainable = [next(i for i in range(6) if i not in frozen) for frozen in draws]
    assert trainable.count(1) > 180  # probability 500 / 505 per draw
    uniform = [next(i for i in range(6) if i not in sample_frozen(6, 5, seed=0, draw=d)) for d in range(200)]
    assert 15 < uniform.count(1) < 60  # 1 / 6 per draw
    nan = torch.tensor([float("nan"), 0.5, 0.5, 0.001], dtype=torch.float64)  # no BI: like the most important
    with_nan = [next(i for i in range(4) if i not in sample_frozen(4, 3, seed=0, draw=d, scores=nan)) for d in range(200)]
    assert with_nan.count(3) > 180 and with_nan.count(0) < 10


def test_draws_depend_on_seed_and_number_only_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = [sample_layers(30, 4, seed=0, draw=d) for d in range(5)]
    assert a == [sample_layers(30, 4, seed=0, draw=d) for d in range(5)]
    assert a != [sample_layers(30, 4, seed=1, draw=d) for d in range(5)]
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("source", ["scores", "calibration_dataloader", "warmup_steps"])
def test_low_bi_sampling_weights_come_from_the_one_importance_source(tmp_path, source):
    kwargs = {"scores": dict(scores=SCORES), "calibration_dataloader": dict(calibration_dataloader=loader(length=8)),
              "warmup_steps": dict(warmup_steps=2)}[source]
    freeze = LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, sampling="low_bi", seed=4, **kwargs)
    callbacks = [BlockInfluenceMonitor(), freeze] if source == "warmup_steps" else [freeze]
    fast_trainer(tmp_path, callbacks=callbacks, max_steps=7).fit(TinyLM(), loader())
    first = 2 if source == "warmup_steps" else 0
    assert [h["step"] for h in freeze.history] == list(range(first, 7, 2))
    for h in freeze.history:
        assert len(h["scores"]) == LAYERS and len(h["trainable_blocks"]) == 2
        frozen = sample_frozen(LAYERS, 4, seed=4, draw=h["draw"], scores=torch.tensor(h["scores"], dtype=torch.float64))
        assert h["frozen_blocks"] == frozen
    if source == "scores":
        assert all(h["scores"] == pytest.approx(SCORES) for h in freeze.history)


@pytest.mark.parametrize("source", ["uniform", "calibration"])
def test_resume_draws_what_the_uninterrupted_run_draws(tmp_path, source):
    def make():
        extra = dict(sampling="low_bi", calibration_dataloader=loader(length=8)) if source == "calibration" else {}
        return [LayerFreezeCallback(num_trainable=2, resample_every_n_steps=3, seed=2, **extra)]

    (ref, ref_module, ref_cbs), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adamw", steps=8, stop=4)
    assert [h["step"] for h in cbs[0].history] == [h["step"] for h in ref_cbs[0].history] == [0, 3, 6]
    assert [h["frozen_blocks"] for h in cbs[0].history] == [h["frozen_blocks"] for h in ref_cbs[0].history]
    assert _optimizer_names(resumed, module, state=True) == _optimizer_names(ref, ref_module, state=True)
    _assert_same_run(resumed, module, ref, ref_module)


def test_sampling_after_a_removal_draws_among_the_blocks_that_exist(tmp_path):
    module = TinyLM(optimizer="adamw")
    freeze = LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, seed=0)
    trainer = fast_trainer(tmp_path, callbacks=[freeze, _prune_last_two(at_step=3)], max_steps=8)
    trainer.fit(module, loader())
    assert [h["step"] for h in freeze.history] == [0, 2, 3, 5, 7]  # drawn again right after the removal at step 3
    after = freeze.history[2:]
    for h in after:
        assert h["original_indices"] == [0, 1, 2, 3] and len(h["trainable_blocks"]) == 2
        assert set(h["trainable_blocks"]) <= {0, 1, 2, 3}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert _optimizer_names(trainer, module) == _optimizer_names(trainer, module, state=True) == trainable
    assert all(_block_names(freeze.trainable_blocks)(n) for n in trainable)


def test_resume_before_a_removal_keeps_every_drawn_block_in_the_optimizer(tmp_path):
    """Resumed at step 2, pruned at step 3: the blocks drawn after the removal train, as in the uninterrupted run."""
    make = lambda: [LayerFreezeCallback(num_frozen=2, resample_every_n_steps=2), _prune_last_two(at_step=3)]  # noqa: E731
    (ref, ref_module, ref_cbs), (resumed, module, cbs) = _resume_pair(tmp_path, make, "adamw", steps=7, stop=2,
                                                                      first_steps=4)
    assert [h["frozen_blocks"] for h in cbs[0].history] == [h["frozen_blocks"] for h in ref_cbs[0].history]
    _assert_same_run(resumed, module, ref, ref_module)  # every requires_grad parameter in the optimizer, with state


def test_a_second_fit_of_the_same_callback_starts_a_fresh_plan(tmp_path):  # RELIABILITY 25
    def run(freeze, steps=3):
        module = TinyLM(seed=1)
        fast_trainer(tmp_path, callbacks=[freeze], max_steps=steps).fit(module, loader())
        return module

    freeze, fresh = (LayerFreezeCallback(num_trainable=2, resample_every_n_steps=2, seed=3) for _ in range(2))
    run(freeze, steps=5)  # draws at steps 0, 2, 4
    module, fresh_module = run(freeze), run(fresh)
    assert [h["step"] for h in freeze.history] == [h["step"] for h in fresh.history] == [0, 2]
    assert [h["frozen_blocks"] for h in freeze.history] == [h["frozen_blocks"] for h in fresh.history]
    assert freeze.depth_events == fresh.depth_events
    end = _weights(fresh_module)
    assert all(torch.equal(value, end[name]) for name, value in _weights(module).items())


def test_ddp_ranks_draw_the_same_blocks(ddp_runs):
    rank0, rank1 = ddp_runs("sample")
    assert [h["step"] for h in rank0["history"]] == [0, 2, 4]
    assert [h["trainable_blocks"] for h in rank0["history"]] == [h["trainable_blocks"] for h in rank1["history"]]
    assert rank0["requires_grad"] == rank1["requires_grad"]
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name  # the ranks never diverged
    trainable = sorted(n for n, on in rank0["requires_grad"].items() if on)
    assert rank0["optimizer_params"] == rank0["optimizer_state_params"] == trainable
    assert rank0["wrapper_rebuilt"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(resample_every_n_steps=2, scores=SCORES),
                     r"`sampling='uniform'` draws the trainable blocks without .*remove \['scores'\]", id="uniform+scores"),
        pytest.param(dict(resample_every_n_steps=2, sampling="low_bi"),
                     r"exactly one source of block importance.*got none", id="low-bi-without-source"),
        pytest.param(dict(sampling="low_bi", scores=SCORES), r"`sampling='low_bi'` needs `resample_every_n_steps`",
                     id="sampling-without-period"),
        pytest.param(dict(resample_every_n_steps=2, sampling="lowest"),
                     r"`sampling` must be one of \['uniform', 'low_bi'\], got 'lowest'", id="unknown-sampling"),
        pytest.param(dict(resample_every_n_steps=2, warmup_steps=2, reevaluate_every_n_steps=2, sampling="low_bi"),
                     r"`reevaluate_every_n_steps` .* and `resample_every_n_steps` .* exclude each other", id="both"),
        pytest.param(dict(resample_every_n_steps=0), r"`resample_every_n_steps` must be an int >= 1", id="period-0"),
        pytest.param(dict(resample_every_n_steps=2, seed=-1), r"`seed` must be an int >= 0, got -1", id="negative-seed"),
    ],
)
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerFreezeCallback(num_trainable=2, **kwargs)


def test_no_importance_source_points_to_sampling():
    with pytest.raises(ValueError, match=r"Without one, sample the trainable blocks uniformly: `resample_every_n_steps"):
        LayerFreezeCallback(num_trainable=2)


def test_a_removal_of_every_trainable_block_chooses_the_frozen_set_again(tmp_path):
    """Without sampling: the two trainable (lowest-score) blocks are the ones removed; two of the four left train."""
    module = TinyLM(optimizer="adamw")
    freeze = LayerFreezeCallback(num_trainable=2, scores=[0.9, 0.8, 0.7, 0.6, 0.1, 0.2])
    trainer = fast_trainer(tmp_path, callbacks=[freeze, _prune_last_two(at_step=3)], max_steps=6)
    with pytest.warns(UserWarning, match=r"removal of blocks \[4, 5\] left no trainable block"):
        trainer.fit(module, loader())
    assert [(h["step"], h["source"], h["frozen_blocks"]) for h in freeze.history] == [
        (0, "scores", [0, 1, 2, 3]), (3, "removal", [0, 1])]
    assert freeze.trainable_blocks == [2, 3] and trainer.global_step == 6
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert _optimizer_names(trainer, module) == _optimizer_names(trainer, module, state=True) == trainable
