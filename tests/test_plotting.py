"""Headless figures: removed layers masked, files written under deterministic names, valid PNGs; what the pictures
say is read from matplotlib objects (axes scales, bar heights, legend texts, text extents), never from pixels."""

from __future__ import annotations

import itertools
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
    draw_depth_figures,
    frozen_layers,
    last_measured_bi,
    log_figures,
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


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _bars(ax, label: str) -> dict[float, float]:
    """``{bar centre: height}`` of the bars drawn under ``label``."""
    (bars,) = [c for c in ax.containers if c.get_label() == label]
    return {p.get_x() + p.get_width() / 2: p.get_height() for p in bars.patches}


def test_last_measured_bi_and_frozen_layers():
    assert last_measured_bi(HISTORY) == {0: 0.33, 1: 0.06, 2: 0.01, 3: 0.31}
    assert last_measured_bi([{"step": 1, "original_indices": [0, 1], "block_influence": [float("nan"), None]}]) == {}
    events = [{"step": 1, "kind": "freeze", "original_layers": [0, 1]}, DepthEvent(3, "unfreeze", [1]),
              DepthEvent(2, "freeze", [2]), DepthEvent(4, "prune", [2])]
    assert frozen_layers(events) == {0}


def test_profile_draws_a_removed_block_at_its_last_measured_bi():
    last = HISTORY[-1]
    fig = plot_bi_profile(last["block_influence"], last["original_indices"], original_num_layers=5,
                          removed_bi=last_measured_bi(HISTORY), log_scale=False)
    ax = fig.axes[0]
    assert _bars(ax, "removed (last measured BI)") == {2.0: pytest.approx(0.01)}  # not the top of the axis
    assert _bars(ax, "trained") == {0.0: 0.33, 1.0: 0.06, 3.0: 0.31}
    assert max(p.get_height() for p in ax.patches) == pytest.approx(0.33)
    (cross,) = [line for line in ax.lines if line.get_label() == "removed (not measured)"]  # layer 4: never measured
    assert list(cross.get_xdata()) == [4] and cross.get_marker() == "x"
    assert _legend(ax) == ["trained", "removed (last measured BI)", "removed (not measured)"]


def test_profile_log_scale_when_bi_spans_decades():
    assert plot_bi_profile([1.0, 0.02, 0.03], [0, 1, 2]).axes[0].get_yscale() == "log"
    assert plot_bi_profile([0.3, 0.1, 0.2], [0, 1, 2]).axes[0].get_yscale() == "linear"
    assert plot_bi_profile([1.0, 0.02, 0.03], [0, 1, 2], log_scale=False).axes[0].get_yscale() == "linear"
    with_removed = plot_bi_profile([0.3, 0.1], [0, 2], removed_bi={1: 0.001})  # the removed block's BI counts too
    assert with_removed.axes[0].get_yscale() == "log"
    assert "log scale" in with_removed.axes[0].get_ylabel()


def test_events_legend_names_kinds_and_loss_markers():
    fig = plot_events(EVENTS, loss_curve=[(1, 3.5), (5, 3.0), (10, 2.9)], depth_curve=[(1, 4), (6, 3)])
    assert _legend(fig.axes[0]) == ["training loss", "prune", "freeze", "loss before", "loss after"]
    before = [line for line in fig.axes[0].lines if line.get_marker() == "o" and len(line.get_xdata()) == 1]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in before] == [(8, 3.0)]


def test_event_labels_do_not_overlap_and_stay_inside_the_axes():
    steps = [10, 11, 12, 13, 100, 199, 200]
    events = [DepthEvent(step, "prune" if i % 2 else "freeze", [i, i + 10, i + 20]) for i, step in enumerate(steps)]
    events[1] = {**events[1].to_dict(), "recovery_steps": 3}  # a two-line label among them
    fig = plot_events(events, loss_curve=[(0, 4.0), (200, 2.0)], depth_curve=[(0, 30), (200, 23)])
    fig.canvas.draw()  # the final layout, as saved
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert len(boxes) == len(events)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert all(frame.x0 <= box.x0 and box.x1 <= frame.x1 for box in boxes)
    assert len({round(box.y1) for box in boxes[:4]}) == 4  # four events a step apart: four rows


def test_draw_depth_figures_writes_three_pngs(tmp_path):
    drawn = draw_depth_figures(tmp_path / "depth", HISTORY, [e if isinstance(e, dict) else e.to_dict() for e in EVENTS],
                               original_num_layers=4, threshold=0.05, loss_curve=[(1, 3.5), (10, 2.9)],
                               depth_curve=[(1, 4), (6, 3)])
    assert {name: path.name for name, path in drawn.paths.items()} == {
        "bi_heatmap": HEATMAP_FILE, "bi_profile": PROFILE_FILE, "events": EVENTS_FILE}
    for path in drawn.paths.values():
        _valid_png(path)
    profile = drawn.figures["bi_profile"].axes[0]
    assert profile.get_title() == "Block Influence profile at step 10"  # the last record when no current BI is given
    assert _bars(profile, "frozen") == {0.0: pytest.approx(0.33)}  # frozen at step 8
    assert _bars(profile, "removed (last measured BI)") == {2.0: pytest.approx(0.01)}
    current = draw_depth_figures(tmp_path / "now", HISTORY, [], current=([0.5, 0.4, 0.45], [0, 1, 3]))
    assert _bars(current.figures["bi_profile"].axes[0], "trained") == {0.0: 0.5, 1.0: 0.4, 3.0: 0.45}


def test_log_figures_warns_for_a_logger_that_refuses(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    class Refusing(TensorBoardLogger):
        @property
        def experiment(self):
            raise RuntimeError("no images here")

    drawn = draw_depth_figures(tmp_path, HISTORY, [])
    said: list[str] = []
    log_figures([CSVLogger(tmp_path), Refusing(tmp_path)], drawn, prefix="depth", step=3, warn=said.append)
    assert said == ["DepthEfficiencyMonitor: Refusing refused the figures (no images here)."]
