"""Pictures of depth: BI heatmap (original layer x step), BI profile, and the timeline of pruning/freezing events.

Headless: figures are built on matplotlib's Agg canvas directly (no ``pyplot``, no global figure registry, the
user's backend untouched), so this works on servers and in DDP workers. Every function returns the
:class:`~matplotlib.figure.Figure` and, given ``path``, also writes it as PNG (parent folders created, no timestamp
in the file, so the same data give the same bytes).

Example:
    >>> fig = plot_bi_heatmap(monitor.history, events, path="runs/depth/bi_heatmap.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lp_callbacks.events import DepthEvent

__all__ = [
    "EVENTS_FILE",
    "HEATMAP_FILE",
    "PROFILE_FILE",
    "bi_matrix",
    "plot_bi_heatmap",
    "plot_bi_profile",
    "plot_events",
    "save_figure",
]

HEATMAP_FILE = "bi_heatmap.png"
PROFILE_FILE = "bi_profile.png"
EVENTS_FILE = "events.png"

_KIND_COLORS = {"prune": "tab:red", "freeze": "tab:blue", "unfreeze": "tab:green"}
_REMOVED_COLOR = "lightgrey"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG at ``path`` (folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _event_dict(event: DepthEvent | Mapping[str, Any]) -> dict[str, Any]:
    return event.to_dict() if isinstance(event, DepthEvent) else dict(event)


def _layers_label(layers: Sequence[int], limit: int = 6) -> str:
    shown = ", ".join(str(i) for i in layers[:limit])
    return f"[{shown}{', ...' if len(layers) > limit else ''}]"


def bi_matrix(
    history: Sequence[Mapping[str, Any]], original_num_layers: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """BI history as a ``(original_num_layers, num_records)`` array, NaN where a layer was absent (removed).

    Args:
        history: records ``{"step", "original_indices", "block_influence"}`` (``BlockInfluenceMonitor.history``).
        original_num_layers: rows; default one more than the largest original index seen.

    Returns:
        ``(matrix, steps)``: ``matrix[i, j]`` is the BI of original layer ``i`` at ``steps[j]``.
    """
    seen = [i for record in history for i in record["original_indices"]]
    rows = original_num_layers if original_num_layers is not None else (max(seen) + 1 if seen else 0)
    matrix = np.full((rows, len(history)), np.nan)
    for j, record in enumerate(history):
        for i, value in zip(record["original_indices"], record["block_influence"]):
            if i < rows and value is not None and math.isfinite(value):
                matrix[i, j] = value
    return matrix, [int(record["step"]) for record in history]


def _edges(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _empty(fig: Figure, message: str) -> None:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _event_lines(ax: Any, events: Sequence[Mapping[str, Any]]) -> None:
    used: set[str] = set()
    for event in events:
        kind = event["kind"]
        ax.axvline(event["step"], color=_KIND_COLORS.get(kind, "black"), linestyle="--", linewidth=1.2,
                   label=kind if kind not in used else None)
        used.add(kind)


def plot_bi_heatmap(
    history: Sequence[Mapping[str, Any]],
    events: Iterable[DepthEvent | Mapping[str, Any]] = (),
    original_num_layers: int | None = None,
    path: str | os.PathLike[str] | None = None,
    log_scale: bool | None = None,
) -> Figure:
    """Heatmap of BI, original layer index (rows) x step (columns); removed layers in grey; events as lines.

    Args:
        history: ``BlockInfluenceMonitor.history``.
        events: :class:`DepthEvent` (or their dicts), drawn as dashed vertical lines coloured by kind.
        original_num_layers: depth before any removal (rows of the map).
        path: write the PNG there too.
        log_scale: logarithmic colours; ``None`` chooses them when the largest BI is over 20 times the smallest
            (typical of real models, whose first block dwarfs the others).
    """
    events = [_event_dict(e) for e in events]
    matrix, steps = bi_matrix(history, original_num_layers)
    fig = _new_figure(8, max(3.0, 0.25 * matrix.shape[0] + 1.5))
    if matrix.size == 0:
        _empty(fig, "no Block Influence measured yet\n(add a BlockInfluenceMonitor to the Trainer's callbacks)")
    else:
        import matplotlib

        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_REMOVED_COLOR)
        positive = matrix[np.isfinite(matrix) & (matrix > 0)]
        if log_scale is None:
            log_scale = positive.size > 0 and positive.max() > 20 * positive.min()
        norm = None
        if log_scale and positive.size:
            norm = matplotlib.colors.LogNorm(vmin=positive.min(), vmax=positive.max())
            matrix = np.where(matrix > 0, matrix, np.nan)  # log of 0: shown like a missing value
        mesh = ax.pcolormesh(_edges(steps), np.arange(matrix.shape[0] + 1) - 0.5,
                             np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, shading="flat")
        fig.colorbar(mesh, ax=ax, label="Block Influence (1 - cos)" + (", log scale" if norm is not None else ""))
        _event_lines(ax, events)
        ax.set_xlabel("step")
        ax.set_ylabel("original layer")
        ax.set_ylim(matrix.shape[0] - 0.5, -0.5)  # layer 0 on top, as blocks are listed
        if matrix.shape[0] <= 40:
            ax.set_yticks(range(matrix.shape[0]))
        ax.set_title("Block Influence over training (grey: removed)")
        if events:
            ax.legend(loc="upper right", fontsize="small")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_bi_profile(
    block_influence: Sequence[float],
    original_indices: Sequence[int],
    original_num_layers: int | None = None,
    threshold: float | None = None,
    frozen: Iterable[int] = (),
    step: int | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Bar chart of the current BI per original layer; removed layers marked in grey, frozen ones in blue.

    Args:
        block_influence: BI of the current layers ``(L,)``.
        original_indices: original index of each current layer ``(L,)``.
        original_num_layers: depth before any removal.
        threshold: drawn as a dashed line.
        frozen: original indices of frozen layers.
        step: shown in the title.
        path: write the PNG there too.
    """
    values = [float(v) for v in block_influence]
    indices = [int(i) for i in original_indices]
    if len(values) != len(indices):
        raise ValueError(
            f"`block_influence` and `original_indices` must have the same length, got {len(values)} and {len(indices)}."
        )
    total = original_num_layers if original_num_layers is not None else (max(indices) + 1 if indices else 0)
    frozen = set(frozen)
    fig = _new_figure(max(5.0, 0.3 * total + 2), 3.5)
    if not indices:
        _empty(fig, "no Block Influence measured yet")
    else:
        ax = fig.add_subplot()
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        for is_frozen, color, label in ((False, "tab:orange", "trained"), (True, "tab:blue", "frozen")):
            chosen = [(i, v) for i, v in zip(indices, heights) if (i in frozen) == is_frozen]
            if chosen:
                ax.bar(*zip(*chosen), color=color, label=label)
        removed = sorted(set(range(total)) - set(indices))
        if removed:
            top = max((v for v in values if math.isfinite(v)), default=1.0) or 1.0
            ax.bar(removed, [top] * len(removed), color=_REMOVED_COLOR, hatch="//", edgecolor="grey", alpha=0.6,
                   label="removed")
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        ax.set_xlabel("original layer")
        ax.set_ylabel("Block Influence")
        ax.set_xlim(-0.6, total - 0.4)
        if total <= 40:
            ax.set_xticks(range(total))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Block Influence profile" + (f" at step {step}" if step is not None else ""))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_events(
    events: Iterable[DepthEvent | Mapping[str, Any]],
    loss_curve: Sequence[tuple[int, float]] = (),
    depth_curve: Sequence[tuple[int, int]] = (),
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Timeline: training loss (top) and decoder depth (bottom) over steps, with every event marked and labelled.

    Args:
        events: :class:`DepthEvent` or dicts with at least ``step``, ``kind``, ``original_layers``; the optional
            ``loss_before``, ``loss_after`` and ``recovery_steps`` keys (the depth monitor's records) are annotated.
        loss_curve: ``(step, loss)`` points.
        depth_curve: ``(step, number of decoder layers)`` points.
        path: write the PNG there too.
    """
    events = sorted((_event_dict(e) for e in events), key=lambda e: e["step"])
    fig = _new_figure(8, 5)
    ax_loss, ax_depth = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    if loss_curve:
        x, y = zip(*loss_curve)
        ax_loss.plot(x, y, color="black", linewidth=1, label="training loss")
    ax_loss.set_ylabel("loss")
    _event_lines(ax_loss, events)
    for event in events:
        text = f"{event['kind']} {_layers_label(event['original_layers'])}"
        if event.get("recovery_steps") is not None:
            text += f"\nrecovered in {event['recovery_steps']} steps"
        ax_loss.annotate(text, (event["step"], 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", va="top", fontsize="x-small",
                         color=_KIND_COLORS.get(event["kind"], "black"))
        if event.get("loss_before") is not None:
            ax_loss.plot([event["step"]], [event["loss_before"]], marker="o", color="grey", markersize=4)
        if event.get("loss_after") is not None:
            ax_loss.plot([event["step"]], [event["loss_after"]], marker="^", color=_KIND_COLORS.get(event["kind"]),
                         markersize=5)
    if loss_curve or events:
        ax_loss.legend(loc="lower left", fontsize="small")
    ax_loss.set_title("Depth events" if events else "Depth events (none)")
    if depth_curve:
        x, y = zip(*depth_curve)
        ax_depth.step(x, y, where="post", color="black", linewidth=1.2)
    _event_lines(ax_depth, events)
    ax_depth.set_ylabel("decoder layers")
    ax_depth.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_depth.set_xlabel("step")
    if path is not None:
        save_figure(fig, path)
    return fig
