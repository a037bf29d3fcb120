import math

import pytest
import torch
import torch.nn.functional as F

from lp_callbacks.functional import (
    angular_distance,
    angular_distances_from_hidden_states,
    bi_from_hidden_states,
    bi_mean,
    bi_sums,
)


def naive_bi(x, y, mask=None):
    """The textbook formula in float64."""
    x, y = x.double(), y.double()
    cos = F.cosine_similarity(x, y, dim=-1)
    if mask is not None:
        cos = cos[mask.bool()]
    return 1 - cos.mean()


def test_hand_computed_values():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])  # (1, 3, 2)
    y = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [-3.0, 0.0]]])
    # cos = 0, 1/sqrt(2), -1  ->  1 - cos = 1, 1 - 0.7071, 2
    expected = (1 + (1 - 1 / math.sqrt(2)) + 2) / 3
    assert bi_mean(x, y).item() == pytest.approx(expected, abs=1e-7)
    # angles: 90 deg, 45 deg, 180 deg  ->  / pi = 0.5, 0.25, 1
    assert angular_distance(x, y).item() == pytest.approx((0.5 + 0.25 + 1) / 3, abs=1e-7)
    assert bi_mean(x, x).item() == 0.0
    assert angular_distance(x, 5 * x).item() == pytest.approx(0.0, abs=1e-7)


def test_matches_naive_formula():
    x, y = torch.randn(3, 7, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    assert bi_mean(x, y).item() == pytest.approx(naive_bi(x, y).item(), abs=1e-12)


def test_padding_excluded_whatever_the_pads_hold():
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    garbage_x, garbage_y = x.clone(), y.clone()
    garbage_x[0, 4:] = 1e4
    garbage_y[0, 4:] = float("nan")
    expected = naive_bi(x, y, mask)
    assert bi_mean(garbage_x, garbage_y, mask).item() == pytest.approx(expected.item(), abs=1e-6)
    stats = bi_sums(garbage_x, garbage_y, mask)
    assert stats.count.item() == 10 and stats.skipped.item() == 0


def test_left_and_right_padding_equal_unpadded():
    seq_a, seq_b = torch.randn(4, 8), torch.randn(6, 8)
    out_a, out_b = torch.randn(4, 8), torch.randn(6, 8)
    unpadded = (torch.cat([seq_a, seq_b]), torch.cat([out_a, out_b]))
    ref = bi_mean(*unpadded)

    def pad(seq, side):
        z = torch.zeros(6 - len(seq), seq.shape[-1])
        return torch.cat([seq, z]) if side == "right" else torch.cat([z, seq])

    for side in ("right", "left"):
        x = torch.stack([pad(seq_a, side), seq_b])
        y = torch.stack([pad(out_a, side), out_b])
        m = torch.stack([pad(torch.ones(4, 1), side).squeeze(-1), torch.ones(6)]).long()
        assert bi_mean(x, y, m).item() == pytest.approx(ref.item(), abs=1e-7), side


def test_non_finite_and_zero_tokens_skipped_and_counted():
    x, y = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    x[0, 1, 3] = float("inf")
    y[0, 2] = 0.0
    x[0, 3, 0] = float("nan")
    stats = bi_sums(x, y)
    assert stats.skipped.item() == 3 and stats.count.item() == 2
    keep = torch.tensor([[1, 0, 0, 0, 1]])
    assert bi_mean(x, y).item() == pytest.approx(naive_bi(x, y, keep).item(), abs=1e-6)
    assert math.isfinite(bi_mean(x, y).item())


def test_no_valid_token_gives_nan_not_error():
    x = torch.zeros(1, 3, 4)
    assert math.isnan(bi_mean(x, x).item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_within_1e4_of_fp64(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 64, 256)
    y = x + 1e-2 * torch.randn_like(x)  # a redundant block: relative change ~1e-2, BI ~ 5e-5
    x_low, y_low = x.to(dtype), y.to(dtype)
    reference = naive_bi(x_low, y_low)  # same rounded inputs, exact math
    assert bi_mean(x_low, y_low).item() == pytest.approx(reference.item(), abs=1e-4)
    assert bi_sums(x_low, y_low).total.dtype == torch.float64


@pytest.mark.parametrize("eps", [1e-1, 1e-2, 1e-3], ids=["bi~5e-3", "bi~5e-5", "bi~5e-7"])
def test_fp32_math_accurate_for_redundant_blocks(eps):
    x = torch.randn(4, 64, 576, dtype=torch.float64)
    y = x + eps * torch.randn_like(x)
    exact = naive_bi(x, y).item()
    assert bi_mean(x.float(), y.float()).item() == pytest.approx(exact, abs=1e-7)
    exact_angle = (torch.arccos(F.cosine_similarity(x, y, dim=-1).clamp(-1, 1)) / math.pi).mean().item()
    assert angular_distance(x.float(), y.float()).item() == pytest.approx(exact_angle, abs=1e-5)


def test_from_hidden_states_shapes_and_values():
    hs = [torch.randn(2, 5, 8) for _ in range(5)]  # 4 blocks
    bi = bi_from_hidden_states(hs)
    assert bi.shape == (4,)
    assert bi[2].item() == pytest.approx(naive_bi(hs[2], hs[3]).item(), abs=1e-6)
    ang = angular_distances_from_hidden_states(hs, 2)
    assert ang.shape == (3,)
    assert ang[1].item() == pytest.approx(angular_distance(hs[1], hs[3]).item(), abs=1e-12)


@pytest.mark.parametrize("bad", [0, 5, 1.5], ids=["zero", "too-big", "float"])
def test_block_size_validated(bad):
    with pytest.raises(ValueError, match=r"`block_size` must be an int in \[1, 4\]"):
        angular_distances_from_hidden_states([torch.randn(1, 2, 4)] * 5, bad)


def test_mask_shape_validated():
    with pytest.raises(ValueError, match="`mask` must have shape"):
        bi_mean(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4))
