"""Pictures of depth: BI heatmap (original layer x step), BI profile, and the timeline of pruning/freezing events.

Both BI pictures switch to a logarithmic scale when BI spans decades (real models' first block dwarfs the others);
removed blocks stay visible: grey cells in the heatmap, their last measured BI (hatched grey) in the profile.

Headless: figures are built on matplotlib's Agg canvas directly (no ``pyplot``, no global figure registry, the
user's backend untouched), so this works on servers and in DDP workers. Every ``plot_*`` function returns the
:class:`~matplotlib.figure.Figure` and, given ``path``, also writes it as PNG (parent folders created, no timestamp
in the file, so the same data give the same bytes). :func:`draw_depth_figures` draws the depth monitor's three
pictures, :func:`log_figures` sends them to the loggers that take images.

Example:
    >>> fig = plot_bi_heatmap(monitor.history, events, path="runs/depth/bi_heatmap.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from lp_callbacks.events import DepthEvent

__all__ = [
    "EVENTS_FILE",
    "HEATMAP_FILE",
    "PROFILE_FILE",
    "DepthFigures",
    "bi_matrix",
    "draw_depth_figures",
    "frozen_layers",
    "last_measured_bi",
    "log_figures",
    "plot_bi_heatmap",
    "plot_bi_profile",
    "plot_events",
    "plot_measures",
    "save_figure",
]

HEATMAP_FILE = "bi_heatmap.png"
PROFILE_FILE = "bi_profile.png"
EVENTS_FILE = "events.png"

_KIND_COLORS = {"prune": "tab:red", "freeze": "tab:blue", "unfreeze": "tab:green"}
_REMOVED_COLOR = "lightgrey"
_LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}  # over lines
# ``log_scale=None``: a log scale when the largest positive BI is over this many times the smallest (typical of real
# models, whose first block dwarfs the others)
_LOG_RATIO = 20


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


def last_measured_bi(history: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """The last finite BI measured for each original layer in ``history`` (how removed blocks are drawn)."""
    last: dict[int, float] = {}
    for record in history:
        for i, value in zip(record["original_indices"], record["block_influence"]):
            if value is not None and math.isfinite(value):
                last[int(i)] = float(value)
    return last


def frozen_layers(events: Iterable[DepthEvent | Mapping[str, Any]]) -> set[int]:
    """Original indices frozen after ``events`` (in step order): a freeze adds its blocks, an unfreeze or a prune
    takes them away."""
    frozen: set[int] = set()
    for event in sorted((_event_dict(e) for e in events), key=lambda e: e["step"]):
        layers = set(event["original_layers"])
        frozen = frozen | layers if event["kind"] == "freeze" else frozen - layers
    return frozen


def _positive(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values) & (values > 0)]


def _spans_decades(positive: np.ndarray) -> bool:
    """Whether the largest of the ``positive`` values is over :data:`_LOG_RATIO` times the smallest."""
    return bool(positive.size) and bool(positive.max() > _LOG_RATIO * positive.min())


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
        log_scale: logarithmic colours; ``None`` chooses them when BI spans decades (:data:`_LOG_RATIO`).
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
        positive = _positive(matrix)
        if log_scale is None:
            log_scale = _spans_decades(positive)
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
    removed_bi: Mapping[int, float] | None = None,
    log_scale: bool | None = None,
) -> Figure:
    """Bar chart of the current BI per original layer; frozen layers in blue, removed ones hatched grey.

    A removed layer is drawn at the BI last measured for it (``removed_bi``), never at a made-up height; one never
    measured is a grey cross on the axis. All three kinds have a legend entry.

    Args:
        block_influence: BI of the current layers ``(L,)``.
        original_indices: original index of each current layer ``(L,)``.
        original_num_layers: depth before any removal.
        threshold: drawn as a dashed line.
        frozen: original indices of frozen layers.
        step: shown in the title.
        path: write the PNG there too.
        removed_bi: ``{original index: last measured BI}`` (:func:`last_measured_bi` of the BI history); entries of
            current layers are ignored.
        log_scale: logarithmic BI axis; ``None`` chooses it as the heatmap does (:data:`_LOG_RATIO`).
    """
    values = [float(v) for v in block_influence]
    indices = [int(i) for i in original_indices]
    if len(values) != len(indices):
        raise ValueError(
            f"`block_influence` and `original_indices` must have the same length, got {len(values)} and {len(indices)}."
        )
    total = original_num_layers if original_num_layers is not None else (max(indices) + 1 if indices else 0)
    frozen = set(frozen)
    removed = sorted(set(range(total)) - set(indices))
    last = {i: float(v) for i, v in (removed_bi or {}).items() if i in set(removed) and math.isfinite(v)}
    fig = _new_figure(max(5.0, 0.3 * total + 2), 3.5)
    if not indices:
        _empty(fig, "no Block Influence measured yet")
    else:
        ax = fig.add_subplot()
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        handles: list[Any] = []  # in the order drawn (matplotlib would list lines before bars)
        for is_frozen, color, label in ((False, "tab:orange", "trained"), (True, "tab:blue", "frozen")):
            chosen = [(i, v) for i, v in zip(indices, heights) if (i in frozen) == is_frozen]
            if chosen:
                handles.append(ax.bar(*zip(*chosen), color=color, label=label))
        if last:
            handles.append(ax.bar(list(last), list(last.values()), color=_REMOVED_COLOR, hatch="//",
                                  edgecolor="grey", label="removed (last measured BI)"))
        unmeasured = [i for i in removed if i not in last]
        if unmeasured:  # a cross on the axis: no height to claim
            handles += ax.plot(unmeasured, [0.03] * len(unmeasured), transform=ax.get_xaxis_transform(),
                               linestyle="none", marker="x", color="grey", label="removed (not measured)")
        if log_scale is None:
            log_scale = _spans_decades(_positive(np.asarray(heights + list(last.values()))))
        if log_scale:
            ax.set_yscale("log")
        if threshold is not None:
            handles.append(ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
                                      label=f"threshold {threshold:g}"))
        ax.set_xlabel("original layer")
        ax.set_ylabel("Block Influence" + (" (log scale)" if log_scale else ""))
        ax.set_xlim(-0.6, total - 0.4)
        if total <= 40:
            ax.set_xticks(range(total))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Block Influence profile" + (f" at step {step}" if step is not None else ""))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    if path is not None:
        save_figure(fig, path)
    return fig


def _event_label(event: Mapping[str, Any]) -> str:
    text = f"{event['kind']} {_layers_label(event['original_layers'])}"
    if event.get("recovery_steps") is not None:
        text += f"\nrecovered in {event['recovery_steps']} steps"
    return text


def _label_events(fig: Figure, ax: Any, events: Sequence[Mapping[str, Any]]) -> None:
    """Write each event's label at the top of ``ax`` next to its line; a label that would overlap one already
    written goes below it, one that would leave the axes on the right is turned to the line's left.

    Measured on the final layout (labels are kept out of it, so it does not move afterwards).
    """
    fig.get_layout_engine().execute(fig)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = 72.0 / fig.dpi
    placed: list[Any] = []
    for event in events:
        label = ax.annotate(_event_label(event), (event["step"], 1.0), xycoords=("data", "axes fraction"),
                            xytext=(3, -3), textcoords="offset points", va="top", fontsize="x-small",
                            color=_KIND_COLORS.get(event["kind"], "black"), annotation_clip=False, bbox=_LABEL_BOX)
        label.set_in_layout(False)
        box = label.get_window_extent(renderer)
        if box.x1 > frame.x1:
            label.set_horizontalalignment("right")
            label.xyann = (-3, -3)
            box = label.get_window_extent(renderer)
        while hits := [b for b in placed if b.overlaps(box)]:  # moves down only, past one more label each time
            label.xyann = (label.xyann[0], label.xyann[1] + (min(b.y0 for b in hits) - box.y1) * points - 2)
            box = label.get_window_extent(renderer)
        placed.append(box)


def plot_events(
    events: Iterable[DepthEvent | Mapping[str, Any]],
    loss_curve: Sequence[tuple[int, float]] = (),
    depth_curve: Sequence[tuple[int, int]] = (),
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Timeline: training loss (top) and decoder depth (bottom) over steps, with every event marked and labelled.

    Labels never overlap (a crowded one moves below its neighbour); the legend names the kinds of event and the
    loss markers: "loss before" (grey circle) is the mean loss of the window before an event, "loss after"
    (triangle, coloured by kind) the loss of the first step after it.

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
    handles, _ = ax_loss.get_legend_handles_labels()
    marker = {"linestyle": "none", "markeredgecolor": "black", "markeredgewidth": 0.5}
    for key, style, label in (("loss_before", {"marker": "o", "color": "grey", "markersize": 4},
                               "loss before"),
                              ("loss_after", {"marker": "^", "color": "white", "markersize": 5},
                               "loss after")):
        shown = [e for e in events if e.get(key) is not None]
        for event in shown:
            color = style["color"] if key == "loss_before" else _KIND_COLORS.get(event["kind"], "black")
            ax_loss.plot([event["step"]], [event[key]], **{**marker, **style, "color": color})
        if shown:
            handles.append(Line2D([], [], **marker, **style, label=label))
    if handles:
        ax_loss.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax_loss.set_title("Depth events" if events else "Depth events (none)")
    if depth_curve:
        x, y = zip(*depth_curve)
        ax_depth.step(x, y, where="post", color="black", linewidth=1.2)
    _event_lines(ax_depth, events)
    ax_depth.set_ylabel("decoder layers")
    ax_depth.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_depth.set_xlabel("step")
    if events:
        _label_events(fig, ax_loss, events)
    if path is not None:
        save_figure(fig, path)
    return fig


class DepthFigures(NamedTuple):
    """The depth monitor's three pictures and where they were written."""

    figures: dict[str, Figure]
    paths: dict[str, Path]


def draw_depth_figures(
    directory: str | os.PathLike[str],
    history: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    current: tuple[Sequence[float], Sequence[int]] | None = None,
    original_num_layers: int | None = None,
    threshold: float | None = None,
    loss_curve: Sequence[tuple[int, float]] = (),
    depth_curve: Sequence[tuple[int, int]] = (),
) -> DepthFigures:
    """Draw and write ``bi_heatmap``, ``bi_profile`` and ``events`` in ``directory``.

    Args:
        directory: where the PNGs go.
        history: BI records (``BlockInfluenceMonitor.history``).
        events: event dicts (``DepthEfficiencyMonitor.events``): lines on both timelines, frozen blocks in the profile.
        current: ``(BI, original indices)`` of the model now for the profile (at the last step of ``history``);
            ``None``: the last record of ``history``.
        original_num_layers: depth before any removal.
        threshold: the BI threshold line of the profile.
        loss_curve: ``(step, loss)`` of the events picture.
        depth_curve: ``(step, decoder layers)`` of the events picture.
    """
    directory = Path(directory)
    paths = {"bi_heatmap": directory / HEATMAP_FILE, "bi_profile": directory / PROFILE_FILE,
             "events": directory / EVENTS_FILE}
    last = history[-1] if history else {"block_influence": [], "original_indices": [], "step": None}
    bi, indices = current if current is not None else (last["block_influence"], last["original_indices"])
    step = last["step"]
    figures = {
        "bi_heatmap": plot_bi_heatmap(history, events, original_num_layers, path=paths["bi_heatmap"]),
        "bi_profile": plot_bi_profile(bi, indices, original_num_layers, threshold=threshold,
                                      frozen=frozen_layers(events), step=step, path=paths["bi_profile"],
                                      removed_bi=last_measured_bi(history)),
        "events": plot_events(events, loss_curve, depth_curve, path=paths["events"]),
    }
    return DepthFigures(figures, paths)


def log_figures(
    loggers: Iterable[Any], drawn: DepthFigures, prefix: str, step: int, warn: Callable[[str], None]
) -> None:
    """Send the figures to the loggers that take images: TensorBoard (``add_figure``), W&B (``log_image`` of the
    PNG), MLflow (``log_figure``), tagged ``<prefix>/<name>``; a logger that refuses is named to ``warn``."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    for logger in loggers:
        try:
            for name, fig in drawn.figures.items():
                tag = f"{prefix}/{name}"
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(tag, fig, global_step=step, close=False)
                elif isinstance(logger, WandbLogger):
                    logger.log_image(key=tag, images=[str(drawn.paths[name])])
                elif isinstance(logger, MLFlowLogger):
                    logger.experiment.log_figure(logger.run_id, fig, f"{prefix}/{drawn.paths[name].name}")
        except Exception as err:  # noqa: BLE001 (an image the logger refuses must not end the run)
            warn(f"DepthEfficiencyMonitor: {type(logger).__name__} refused the figures ({err}).")


def plot_measures(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str] | None = None) -> Figure:
    """Every numeric measure of ``history`` (records with ``step`` and ``when``, as
    :class:`~lp_callbacks.callbacks.ControlEvaluationCallback` keeps them) over steps, one panel each; evaluations
    after an event are marked red and labelled with it."""
    names = [k for k in dict.fromkeys(k for r in history for k in r)
             if k not in ("step", "when", "tokens") and any(isinstance(r.get(k), (int, float)) for r in history)]
    fig = _new_figure(6.4, 1.8 * max(1, len(names)) + 0.4)
    if not names:
        _empty(fig, "no evaluation recorded")
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0] if names else []
    for ax, name in zip(axes, names):
        points = [(r["step"], r[name], str(r.get("when", ""))) for r in history if isinstance(r.get(name), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:blue")
        for step, value, when in points:
            if when.startswith("after"):
                ax.plot([step], [value], marker="o", color=_KIND_COLORS["prune"])
        ax.set_ylabel(name, fontsize=8)
    if names:
        axes[-1].set_xlabel("step")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].set_title("control data: the model against its reference (red: right after an event)", fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig
