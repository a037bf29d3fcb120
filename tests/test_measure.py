import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, LAYERS, random_batch, tiny_model

from lp_callbacks import block_influence, get_decoder_layers, measure_depth


def reference_bi(model, batch):
    """A plain, independent implementation: capture each block's input/output, textbook cosine in fp64."""
    captured = []
    handles = [
        layer.register_forward_hook(
            lambda m, args, kwargs, out: captured.append(
                (args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out)
            ),
            with_kwargs=True,
        )
        for layer in get_decoder_layers(model)
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].bool()
    return torch.stack(
        [1 - F.cosine_similarity(x.double(), y.double(), dim=-1)[mask].mean() for x, y in captured]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_for_every_family(family):
    model = tiny_model(family)
    batch = random_batch(3, 12)
    batch["attention_mask"][1, 8:] = 0
    bi = block_influence(model, [batch])
    assert bi.shape == (LAYERS,) and bi.dtype == torch.float64
    torch.testing.assert_close(bi, reference_bi(model, batch), atol=1e-6, rtol=0)


def test_multiple_batches_and_max_batches():
    model = tiny_model("llama")
    batches = [random_batch(2, 8, seed=s) for s in range(3)]
    two = measure_depth(model, batches, max_batches=2)
    merged = {k: torch.cat([b[k] for b in batches[:2]]) for k in batches[0]}
    torch.testing.assert_close(two.block_influence, block_influence(model, [merged]), atol=1e-7, rtol=0)
    assert two.tokens == 32


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RoPE (relative positions) and learned absolute positions
def test_padded_batch_equals_unpadded(family, side):
    model = tiny_model(family)
    short, long = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 9))
    unpadded = block_influence(model, [{"input_ids": short}, {"input_ids": long}])
    pads = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([short, pads], 1) if side == "right" else torch.cat([pads, short], 1)
    mask = (ids != 0).long()
    padded = {"input_ids": torch.cat([ids, long]), "attention_mask": torch.cat([mask, torch.ones_like(long)])}
    torch.testing.assert_close(block_influence(model, [padded]), unpadded, atol=1e-6, rtol=0)


def test_batch_position_ids_are_used_as_given():
    model = tiny_model("gpt2")
    batch = random_batch(2, 8)
    derived = block_influence(model, [batch])
    same = {**batch, "position_ids": torch.arange(8).expand(2, 8)}
    torch.testing.assert_close(block_influence(model, [same]), derived, atol=1e-7, rtol=0)
    shifted = {**batch, "position_ids": torch.arange(8).expand(2, 8) + 50}
    assert (block_influence(model, [shifted]) - derived).abs().max() > 1e-4


def test_angular_distances_and_token_budget():
    model = tiny_model("llama")
    batch = random_batch(2, 16)
    full = measure_depth(model, [batch], block_sizes=(1, 3))
    assert full.angular_distances[3].shape == (LAYERS - 2,)
    assert ((full.angular_distances[1] >= 0) & (full.angular_distances[1] <= 1)).all()
    budget = measure_depth(model, [batch], max_tokens_per_batch=8)
    assert budget.tokens == 8
    assert (budget.block_influence - full.block_influence).abs().max() < 0.05


def test_model_left_as_found():
    model = tiny_model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block_influence(model, [random_batch()])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not layer._forward_hooks for layer in get_decoder_layers(model))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_batches": 0}, ValueError, r"`max_batches` must be an int >= 1 or None, got 0"),
        ({"batches": [torch.ones(2, 3)]}, TypeError, r"each batch must be a dict with 'input_ids'"),
        ({"batches": []}, ValueError, "produced no token"),
    ],
    ids=["max_batches", "not-a-dict", "empty"],
)
def test_bad_input(kwargs, error, match):
    args = {"batches": [random_batch()], **kwargs}
    with pytest.raises(error, match=match):
        block_influence(tiny_model("llama"), **args)


def test_custom_blocks_returning_an_output_object_are_measured():
    """A custom stack (``layers_path``) whose blocks return an object holding ``hidden_states``, as HF's
    ``ModelOutput`` does: BI is measured from that tensor."""
    from dataclasses import dataclass

    from torch import nn

    from lp_callbacks.functional import bi_from_hidden_states
    from lp_callbacks.recorder import BlockInfluenceRecorder

    @dataclass
    class BlockOutput:
        hidden_states: torch.Tensor

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return BlockOutput(x + self.proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            states = [x]
            for block in self.blocks:
                states.append(block(states[-1]).hidden_states)
            return states

    net, x = Net(), torch.randn(2, 5, 8)
    recorder = BlockInfluenceRecorder(net, layers_path="blocks")
    with torch.no_grad(), recorder.recording():
        states = net(x)
    (total, count, _), _ = recorder.take_sums()
    torch.testing.assert_close(total / count, bi_from_hidden_states(states).double(), atol=1e-6, rtol=0)


def test_gemma3_multimodal_counts_real_tokens_only():
    """Gemma 3 (multimodal) hands its text model a dict of 4-D masks, not the user's 2-D one: the recorder takes the
    2-D mask the HF model was given, so a right-padded batch measures its real tokens only, as measure_depth."""
    from test_surgery import _model

    from lp_callbacks.recorder import BlockInfluenceRecorder

    model = _model("gemma3_multimodal").train()
    batch = random_batch(2, 12)
    batch["attention_mask"][1, 6:] = 0
    batch["input_ids"][1, 6:] = 0
    recorder = BlockInfluenceRecorder(model)
    with torch.no_grad(), recorder.recording():
        model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]))
    (total, count, skipped), _ = recorder.take_sums()
    assert count.tolist() == [18] * LAYERS and skipped.sum() == 0
    expected = measure_depth(model, [batch]).block_influence
    torch.testing.assert_close(total / count, expected, atol=1e-5, rtol=0)


def test_a_custom_root_s_second_argument_is_not_taken_for_a_mask():
    """Only an HF root's forward arguments are read by position (``(input_ids, attention_mask)``): a custom
    ``forward(ids, targets)`` keeps every token measured."""
    from torch import nn

    from lp_callbacks.recorder import BlockInfluenceRecorder

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.body = nn.Embedding(16, 8), Body()

        def forward(self, ids, targets):
            return self.body(self.embed(ids))

    root, ids = Root(), torch.randint(1, 16, (2, 6))
    recorder = BlockInfluenceRecorder(root, layers_path="body.layers")
    with torch.no_grad(), recorder.recording():
        root(ids, torch.zeros_like(ids))  # targets of 0 would mask everything out
    (_, count, _), _ = recorder.take_sums()
    assert count.tolist() == [12, 12]
