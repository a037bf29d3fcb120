"""Per-block ablation: block_ablation against drop_layers + teacher_agreement, the model left bit-identical,
choose_by_ablation (one shot and greedy, SLEB), LayerPruneCallback(criterion="ablation"), the ablation plot."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader, random_batch, tiny_model

from lp_callbacks import get_decoder_layers
from lp_callbacks.callbacks.layer_prune import LayerPruneCallback
from lp_callbacks.evaluation import teacher_agreement
from lp_callbacks.measure import AblationMeasurement, block_ablation, choose_by_ablation
from lp_callbacks.selection import choose_layers
from lp_callbacks.surgery import drop_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def batches(n: int = 2, batch_size: int = 2, seq_len: int = 12) -> list[dict[str, torch.Tensor]]:
    out = [random_batch(batch_size, seq_len, seed=s) for s in range(n)]
    out[0]["attention_mask"][1, 8:] = 0  # padding must not count
    out[0]["input_ids"][1, 8:] = 0
    return out


def without(model, indices):
    """An independent reference: a deep copy with the blocks physically removed."""
    pruned = copy.deepcopy(model)
    drop_layers(pruned, list(indices))
    return pruned


def make_identity(model, index: int) -> None:
    """Zero the output projections of a Llama block: its attention and MLP add 0, the block returns its input."""
    block = get_decoder_layers(model)[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    block.self_attn.o_proj.weight.requires_grad_(False)  # stays an identity while the rest trains
    block.mlp.down_proj.weight.requires_grad_(False)


# ============================================================================================ block_ablation


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "gemma2"])  # RoPE, learned positions, tuple output,
def test_matches_drop_layers_and_teacher_agreement(family):                 # sliding/full layer types
    model = tiny_model(family)
    data = batches()
    result = block_ablation(model, data)
    assert isinstance(result, AblationMeasurement) and result.batches == 2 and result.skipped == ()
    assert result.kl.shape == result.loss_increase.shape == (LAYERS,) and result.kl.dtype == torch.float64
    for i in range(LAYERS):
        ref = teacher_agreement(without(model, [i]), model, data)
        assert result.kl[i].item() == pytest.approx(ref["kl"], abs=1e-7, rel=1e-5)
        assert result.loss_increase[i].item() == pytest.approx(ref["student_nll"] - ref["teacher_nll"], abs=1e-6)
        assert result.top1_agreement[i].item() == pytest.approx(ref["top1_agreement"])
        assert result.base_loss == pytest.approx(ref["teacher_nll"], abs=1e-6)
        assert result.tokens == ref["tokens"]
    assert bool((result.kl > 0).all())  # a random block always changes something


def test_skipped_blocks_and_a_subset():
    model = tiny_model("llama")
    data = batches()
    result = block_ablation(model, data, blocks=[1, 4], skipped=[2])
    assert math.isnan(result.kl[0]) and math.isnan(result.kl[2]) and math.isnan(result.loss_increase[3])
    assert result.skipped == (2,)
    for i in (1, 4):  # the damage of removing block 2 and block i together, against the whole model
        ref = teacher_agreement(without(model, [2, i]), model, data)
        assert result.kl[i].item() == pytest.approx(ref["kl"], abs=1e-7, rel=1e-5)
        assert result.loss_increase[i].item() == pytest.approx(ref["student_nll"] - ref["teacher_nll"], abs=1e-6)
    plain = result.to_dict()
    assert plain["kl"][0] is None and plain["kl"][1] == pytest.approx(result.kl[1].item()) and plain["skipped"] == [2]


def test_identity_block_does_no_damage():
    model = tiny_model("llama")
    make_identity(model, 2)
    result = block_ablation(model, batches())
    assert result.kl[2].item() == 0.0 and result.loss_increase[2].item() == 0.0 and result.top1_agreement[2] == 1.0
    assert bool((result.kl[[0, 1, 3, 4, 5]] > 1e-6).all())


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_is_bit_identical_afterwards_also_on_error():
    model = tiny_model("llama").train()
    data = batches()
    before, logits = state(model), model.eval()(**data[1]).logits.detach()
    model.train()
    block_ablation(model, data, max_batches=1)
    assert model.training and no_hooks(model)
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.eval()(**data[1]).logits, logits)
    assert all(p.grad is None for p in model.parameters())
    model.train()
    with pytest.raises(TypeError, match="each batch must be a dict with 'input_ids'"):
        block_ablation(model, [data[0], ["not a batch"]])  # fails half way, after the hooks are on
    assert model.training and no_hooks(model) and all(torch.equal(before[k], v) for k, v in state(model).items())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_batches": 0}, ValueError, r"`max_batches` must be an int >= 1 or None, got 0\."),
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be an int >= 1, got 0\."),
        ({"blocks": [6]}, ValueError, r"`blocks` must be unique block positions in \[0, 5\] \(the model has 6 blocks\),"
                                      r" got \[6\]\."),
        ({"blocks": [1, 1]}, ValueError, r"`blocks` must be unique .* got \[1, 1\]\."),
        ({"skipped": [True]}, ValueError, r"`skipped` must be unique .* got \[True\]\."),
        ({"blocks": [1], "skipped": [1]}, ValueError, r"`blocks` must name at least one block not in `skipped`, got"
                                                      r" blocks=\[1\] and skipped=\[1\]\."),
        ({"blocks": []}, ValueError, r"`blocks` must name at least one block"),
        ({"blocks": 3}, ValueError, r"`blocks` must be a list of block positions in \[0, 5\], got 3\."),
        ({"blocks": [torch.tensor(1), 1]}, ValueError, r"`blocks` must be unique"),
        ({"skipped": [0, 1, 2, 3, 4]}, ValueError, r"ablating a block with `skipped`=\[0, 1, 2, 3, 4\] would leave"
                                                   r" none of the model's 6 blocks\."),
    ],
)
def test_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        block_ablation(tiny_model("llama"), batches(1), **kwargs)


def test_no_position_to_compare():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="produced no position to compare"):
        block_ablation(model, [])
    used = iter(batches(1))
    block_ablation(model, used)
    with pytest.raises(ValueError, match="an iterator already used up"):
        block_ablation(model, used)


# ========================================================================================= choose_by_ablation


def brute_force_kl(model, data, removed, candidates):
    return {j: teacher_agreement(without(model, [*removed, j]), model, data)["kl"] for j in candidates}


def test_one_shot_and_greedy_choices_match_brute_force():
    model = tiny_model("llama", seed=3)
    data = batches()
    protected = {0, 5}
    candidates = [1, 2, 3, 4]
    alone = brute_force_kl(model, data, [], candidates)
    chosen, scores, measurements = choose_by_ablation(model, data, 2, protected)
    expected = sorted(sorted(candidates, key=alone.__getitem__)[:2])
    assert chosen == expected and len(measurements) == 1
    assert scores == pytest.approx([alone[i] for i in expected], rel=1e-5)
    assert math.isnan(measurements[0].kl[0]) and math.isnan(measurements[0].kl[5])  # protected: not even measured

    first = min(candidates, key=alone.__getitem__)
    rest = [c for c in candidates if c != first]
    together = brute_force_kl(model, data, [first], rest)
    second = min(rest, key=together.__getitem__)
    chosen, scores, measurements = choose_by_ablation(model, data, 2, protected, greedy=True)
    assert chosen == sorted([first, second]) and len(measurements) == 2 and measurements[1].skipped == (first,)
    by_block = dict(zip(chosen, scores))
    assert by_block[first] == pytest.approx(alone[first], rel=1e-5)
    assert by_block[second] == pytest.approx(together[second], rel=1e-5)  # KL without both, against the whole model


def test_choose_picks_the_identity_block_one_shot_and_greedy():
    model = tiny_model("llama")
    make_identity(model, 3)
    for greedy in (False, True):
        chosen, scores, _ = choose_by_ablation(model, batches(), 1, {0, 5}, greedy=greedy)
        assert chosen == [3] and scores == [0.0]
    chosen, _, _ = choose_by_ablation(model, batches(), 1, {0, 3, 5})  # protected: never chosen
    assert chosen != [3]


def test_choose_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"`k` must be an int >= 1, got 0\."):
        choose_by_ablation(model, batches(), 0)
    with pytest.raises(ValueError, match=r"cannot remove 3 of 6 blocks: 2 are not protected \(protected: \[0, 1, 2, 3\]\)"):
        choose_by_ablation(model, batches(), 3, {0, 1, 2, 3})
    with pytest.raises(ValueError, match=r"`criterion='ablation'` measures the model: it needs `model` and `ablation`"):
        choose_layers("ablation", 1, 6)


# ============================================================================== LayerPruneCallback criterion


class Snapshot(pl.Callback):
    """A copy of the model as it is when the pruner has chosen (on_before_prune), before anything is removed."""

    def __init__(self):
        self.models, self.chosen = [], []

    def on_before_prune(self, trainer, pl_module, current_indices):
        self.models.append(copy.deepcopy(pl_module.model).eval())
        self.chosen.append(current_indices)


@pytest.mark.parametrize("greedy", [False, True], ids=["one-shot", "greedy"])
def test_callback_removes_the_identity_block(tmp_path, greedy):
    module = TinyLM()
    make_identity(module.model, 2)
    calibration = loader(8, 4, 16, seed=1)
    prune = LayerPruneCallback(num_layers=1, at_steps=[2], criterion="ablation", calibration_dataloader=calibration,
                               ablation_greedy=greedy)
    fast_trainer(tmp_path, callbacks=[prune], max_steps=3).fit(module, loader())
    event = prune.removed[0]
    assert event["original_layers"] == [2] and event["scores"] == [0.0] and event["criterion"] == "ablation"
    assert len(get_decoder_layers(module)) == LAYERS - 1


@pytest.mark.parametrize("greedy", [False, True], ids=["one-shot", "greedy"])
def test_callback_choice_matches_brute_force_on_the_model_at_the_event(tmp_path, greedy):
    module = TinyLM(seed=3)
    calibration = loader(8, 4, 16, seed=1)
    snapshot = Snapshot()
    prune = LayerPruneCallback(num_layers=2, at_steps=[1], criterion="ablation", calibration_dataloader=calibration,
                               calibration_batches=1, ablation_greedy=greedy, protect_first=2, protected_layers=[4])
    fast_trainer(tmp_path, callbacks=[prune, snapshot], max_steps=1).fit(module, loader())
    (model,) = snapshot.models
    data = [next(iter(calibration))]  # calibration_batches=1: the first batch only
    candidates = [2, 3]  # protect_first=2, protected 4, protect_last=1 by default
    alone = brute_force_kl(model, data, [], candidates)
    assert prune.removed[0]["original_layers"] == [2, 3]  # only two candidates: both go either way
    if greedy:
        first = min(candidates, key=alone.__getitem__)
        other = [c for c in candidates if c != first]
        expected = {first: alone[first], other[0]: brute_force_kl(model, data, [first], other)[other[0]]}
    else:
        expected = alone
    assert prune.removed[0]["scores"] == pytest.approx([expected[2], expected[3]], rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"criterion": "ablation"}, ValueError,
         r"`criterion='ablation'` needs `calibration_dataloader` \(the batches each removal is measured on\), got None\."),
        ({"criterion": "ablation", "calibration_dataloader": 3}, TypeError,
         r"`calibration_dataloader` must be an iterable of batches \(a DataLoader, a list of dicts\), got int\."),
        ({"criterion": "ablation", "calibration_dataloader": {"input_ids": 1}}, TypeError,
         r"`calibration_dataloader` must be an iterable of batches .* got dict\."),
        ({"criterion": "ablation", "calibration_dataloader": [], "calibration_batches": 0}, ValueError,
         r"`calibration_batches` must be an int >= 1 or None, got 0\."),
        ({"criterion": "ablation", "calibration_dataloader": [], "ablation_greedy": "yes"}, TypeError,
         r"`ablation_greedy` must be True or False, got 'yes'\."),
        ({"criterion": "block_influence", "ablation_greedy": True}, ValueError,
         r"`ablation_greedy=True` applies to criterion='ablation' only, got criterion='block_influence'\."),
    ],
    ids=["no-loader", "not-iterable", "a-dict", "batches-0", "greedy-not-bool", "greedy-other-criterion"],
)
def test_construction_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        LayerPruneCallback(num_layers=1, at_steps=[1], **kwargs)


def test_other_criteria_ignore_the_calibration_loader():
    prune = LayerPruneCallback(num_layers=1, at_steps=[1], calibration_dataloader=loader())  # the CLI links it in
    assert prune.ablation is None and prune.calibration_dataloader is not None


# ======================================================================================================= plot


def test_plot_block_ablation(tmp_path):
    from lp_callbacks.ablation_plot import plot_block_ablation

    result = block_ablation(tiny_model("llama"), batches(1), blocks=[1, 2, 3])
    fig = plot_block_ablation(result, layers=[0, 2, 3, 5, 7, 8], path=tmp_path / "a" / "ablation.png")
    assert (tmp_path / "a" / "ablation.png").stat().st_size > 0
    top, bottom = fig.axes[:2]
    assert len(top.patches) == len(bottom.patches) == 3  # one bar per ablated block; NaN ones get a cross
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["0", "2", "3", "5", "7", "8"]
    with pytest.raises(ValueError, match=r"`layers` must hold one label per block \(6\), got 2\."):
        plot_block_ablation(result, layers=[0, 1])
