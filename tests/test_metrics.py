import pytest
import torch

from lp_callbacks.functional import angular_distance, bi_mean
from lp_callbacks.metrics import AngularDistance, BlockInfluence


def test_accumulates_like_one_big_batch():
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    ys = [torch.randn(2, 5, 8) for _ in range(3)]
    masks = [torch.randint(0, 2, (2, 5)) for _ in range(3)]
    metric = BlockInfluence(num_layers=2)
    for x, y, m in zip(xs, ys, masks):
        metric.update(1, x, y, m)
    whole = bi_mean(torch.cat(xs), torch.cat(ys), torch.cat(masks))
    out = metric.compute()
    assert torch.isnan(out[0])  # layer 0 never updated
    assert out[1].item() == pytest.approx(whole.item(), abs=1e-7)


def test_states_stay_float64_under_half():
    metric = BlockInfluence(num_layers=3).half()
    assert metric.total.dtype == torch.float64 and metric.count.dtype == torch.float64
    metric = metric.to(torch.bfloat16)
    assert metric.total.dtype == torch.float64


def test_reset_and_angular_positions():
    metric = AngularDistance(num_layers=4, block_size=2)
    assert metric.total.shape == (3,)
    x, y = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    metric.update(2, x, y)
    assert metric.compute()[2].item() == pytest.approx(angular_distance(x, y).item(), abs=1e-7)
    metric.reset()
    assert metric.count.sum().item() == 0
    with pytest.raises(IndexError, match=r"position must be in \[0, 2\]"):
        metric.update(3, x, y)


@pytest.mark.parametrize("bad", [0, 5], ids=["zero", "larger-than-depth"])
def test_angular_block_size_validated(bad):
    with pytest.raises(ValueError, match=r"`block_size` must be an int in \[1, num_layers=4\]"):
        AngularDistance(num_layers=4, block_size=bad)
