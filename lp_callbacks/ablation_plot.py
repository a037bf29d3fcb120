"""The picture of :func:`~lp_callbacks.measure.block_ablation`: the damage of removing each block alone.

Two bar charts over the blocks, one above the other: the increase of the LM loss and the KL of the next-token
distributions (both in nats). Headless like :mod:`lp_callbacks.plotting` (matplotlib's Agg canvas, no ``pyplot``).

Example:
    >>> fig = plot_block_ablation(block_ablation(model, batches), path="runs/ablation.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lp_callbacks.measure import AblationMeasurement
from lp_callbacks.plotting import save_figure

__all__ = ["ABLATION_FILE", "plot_block_ablation"]

ABLATION_FILE = "block_ablation.png"


def plot_block_ablation(
    measurement: AblationMeasurement,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Figure:
    """Bar charts of the loss increase and the KL of each ablated block; blocks not ablated (NaN) get no bar and a
    grey cross on the axis.

    Args:
        measurement: what :func:`~lp_callbacks.measure.block_ablation` returned.
        layers: the label of each block on the x axis (e.g. its original index); default its position.
        title: above the charts (default: the token count).
        path: write the PNG there too.

    Raises:
        ValueError: ``layers`` does not hold one label per block.
    """
    loss = [float(v) for v in measurement.loss_increase.tolist()]
    kl = [float(v) for v in measurement.kl.tolist()]
    labels = list(range(len(kl))) if layers is None else [int(i) for i in layers]
    if len(labels) != len(kl):
        raise ValueError(f"`layers` must hold one label per block ({len(kl)}), got {len(labels)}.")
    fig = Figure(figsize=(max(5.0, 0.3 * len(kl) + 2), 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    positions = list(range(len(kl)))
    for ax, values, color, name in ((axes[0], loss, "tab:red", "loss increase (nats)"),
                                    (axes[1], kl, "tab:purple", "KL(model || ablated) (nats)")):
        shown = [(p, v) for p, v in zip(positions, values) if math.isfinite(v)]
        if shown:
            ax.bar(*zip(*shown), color=color)
        missing = [p for p, v in zip(positions, values) if not math.isfinite(v)]
        if missing:
            ax.plot(missing, [0.03] * len(missing), transform=ax.get_xaxis_transform(), linestyle="none",
                    marker="x", color="grey", label="not ablated")
            ax.legend(loc="upper right", fontsize="small")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel(name)
    axes[1].set_xlabel("block")
    axes[1].set_xlim(-0.6, len(kl) - 0.4)
    if len(kl) <= 40:
        axes[1].set_xticks(positions, [str(i) for i in labels])
    fig.suptitle(title or f"Damage of removing each block alone ({measurement.tokens:,} tokens)")
    if path is not None:
        save_figure(fig, path)
    return fig
