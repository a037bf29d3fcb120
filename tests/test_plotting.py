"""Headless figures: removed layers masked, files written under deterministic names, valid PNGs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from lp_callbacks.events import DepthEvent
from lp_callbacks.plotting import (
    EVENTS_FILE,
    HEATMAP_FILE,
    PROFILE_FILE,
    bi_matrix,
    plot_bi_heatmap,
    plot_bi_profile,
    plot_events,
)

HISTORY = [
    {"step": 1, "original_indices": [0, 1, 2, 3], "block_influence": [0.4, 0.05, 0.02, 0.3]},
    {"step": 5, "original_indices": [0, 1, 2, 3], "block_influence": [0.35, 0.04, 0.01, 0.3]},
    {"step": 10, "original_indices": [0, 1, 3], "block_influence": [0.33, 0.06, 0.31]},
]
EVENTS = [DepthEvent(step=6, kind="prune", original_layers=[2], scores=[0.01]),
          {"step": 8, "kind": "freeze", "original_layers": [0], "scores": [0.33], "loss_before": 3.0,
           "loss_after": 3.2, "recovery_steps": 4}]


def _valid_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert float(image[..., :3].std()) > 0  # not a blank canvas
    return image


def test_bi_matrix_masks_removed_layers():
    matrix, steps = bi_matrix(HISTORY)
    assert steps == [1, 5, 10]
    assert matrix.shape == (4, 3)
    assert math.isnan(matrix[2, 2]) and np.isfinite(np.delete(matrix.ravel(), 2 * 3 + 2)).all()
    assert matrix[3, 2] == pytest.approx(0.31)
    assert bi_matrix(HISTORY, original_num_layers=6)[0].shape == (6, 3)  # trailing layers removed before any record
    assert bi_matrix([])[0].shape == (0, 0)


def test_heatmap_grey_for_removed(tmp_path):
    fig = plot_bi_heatmap(HISTORY, EVENTS, original_num_layers=4, path=tmp_path / HEATMAP_FILE)
    assert isinstance(fig, Figure)
    mesh = fig.axes[0].collections[0]
    data = mesh.get_array()
    assert np.ma.is_masked(data) and int(np.ma.getmaskarray(data).sum()) == 1
    assert [line.get_xdata()[0] for line in fig.axes[0].get_lines()] == [6, 8]
    _valid_png(tmp_path / HEATMAP_FILE)


def test_heatmap_log_colours_when_bi_spans_decades():
    from matplotlib.colors import LogNorm

    wide = [{"step": 1, "original_indices": [0, 1, 2], "block_influence": [1.0, 0.02, 0.03]}]
    assert isinstance(plot_bi_heatmap(wide).axes[0].collections[0].norm, LogNorm)
    narrow = [{"step": 1, "original_indices": [0, 1, 2], "block_influence": [0.3, 0.1, 0.2]}]
    assert not isinstance(plot_bi_heatmap(narrow).axes[0].collections[0].norm, LogNorm)
    assert not isinstance(plot_bi_heatmap(wide, log_scale=False).axes[0].collections[0].norm, LogNorm)


def test_profile_and_events_pngs(tmp_path):
    last = HISTORY[-1]
    plot_bi_profile(last["block_influence"], last["original_indices"], original_num_layers=4, threshold=0.05,
                    frozen=[0], step=10, path=tmp_path / "depth" / PROFILE_FILE)
    fig = plot_events(EVENTS, loss_curve=[(1, 3.5), (5, 3.0), (10, 2.9)], depth_curve=[(1, 4), (6, 3), (10, 3)],
                      path=tmp_path / "depth" / EVENTS_FILE)
    assert "recovered in 4 steps" in " ".join(t.get_text() for t in fig.axes[0].texts)
    _valid_png(tmp_path / "depth" / PROFILE_FILE)
    _valid_png(tmp_path / "depth" / EVENTS_FILE)


def test_same_data_same_bytes(tmp_path):
    plot_bi_heatmap(HISTORY, EVENTS, path=tmp_path / "a.png")
    plot_bi_heatmap(HISTORY, EVENTS, path=tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_empty_inputs_still_draw(tmp_path):
    plot_bi_heatmap([], path=tmp_path / "h.png")
    plot_bi_profile([], [], path=tmp_path / "p.png")
    plot_events([], path=tmp_path / "e.png")
    for name in ("h.png", "p.png", "e.png"):
        _valid_png(tmp_path / name)


def test_profile_length_mismatch_is_named():
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        plot_bi_profile([0.1, 0.2], [0, 1, 2])
