"""The run summary of the depth monitor: built from what was logged, written as JSON, printed as a table.

Pure functions of plain values (no Lightning, no torch): :func:`build_summary` assembles the dictionary,
:func:`format_summary` renders the before/after table, :func:`write_summary` writes ``summary.json`` atomically.

Example:
    >>> perplexity(0.0)
    1.0
    >>> finite_or_none({"a": float("nan"), "b": [1.0, float("inf")]})
    {'a': None, 'b': [1.0, None]}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_FILE", "build_summary", "finite_or_none", "format_summary", "perplexity", "write_summary"]

SUMMARY_FILE = "summary.json"


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)`` (``inf`` past the float range), ``None`` for no loss."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts and lists too) replaced by ``None``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def build_summary(
    *,
    step: int,
    logged_step: int | None,
    original_num_layers: int | None,
    baseline: Mapping[str, Any] | None,
    last_metrics: Mapping[str, float],
    prefix: str,
    seq_len: int | None,
    loss_before: float | None,
    loss_after: float | None,
    totals: Mapping[str, float],
    events: Sequence[Mapping[str, Any]],
    files: Mapping[str, str | os.PathLike[str]],
) -> dict[str, Any]:
    """The run summary: "before" from ``baseline`` (the model at the first training batch), "after" from
    ``last_metrics`` (the last values logged, keys ``<prefix>/<name>``); means are ``totals`` over the run.

    Args:
        step: ``trainer.global_step`` now.
        logged_step: the step of ``last_metrics``.
        original_num_layers: decoder blocks before any removal.
        baseline: ``num_layers``, ``params_total``, ``params_trainable``, ``flops_per_token``, ``seq_len``.
        last_metrics: the last logged values.
        prefix: of the logged keys.
        seq_len: the sequence length used for FLOPs now.
        loss_before: loss of the first optimizer step of the run.
        loss_after: loss of the last one.
        totals: ``tokens``, ``time`` (seconds) and optimizer ``steps`` over the run.
        events: the event records (``DepthEfficiencyMonitor.events``).
        files: ``{name: path}`` of the pictures written.
    """
    base = baseline or {}

    def now(key: str) -> float | None:
        return last_metrics.get(f"{prefix}/{key}")

    def pair(key: str) -> dict[str, Any]:
        return {"before": base.get(key), "after": now(key)}

    time_total, tokens_total = totals["time"], totals["tokens"]
    return {
        "step": step,
        "logged_step": logged_step,
        "original_num_layers": original_num_layers,
        "num_layers": {"before": base.get("num_layers"), "after": int(now("num_layers") or 0) or None},
        "params_total": pair("params_total"),
        "params_trainable": pair("params_trainable"),
        "flops_per_token": pair("flops_per_token"),
        "seq_len": {"before": base.get("seq_len"), "after": seq_len},
        "loss": {"before": loss_before, "after": loss_after},
        "perplexity": {"before": perplexity(loss_before), "after": perplexity(loss_after)},
        "tokens_seen": tokens_total,
        "train_time_sec": time_total,
        "tokens_per_sec_mean": tokens_total / time_total if time_total > 0 else None,
        "step_time_sec_mean": time_total / totals["steps"] if totals["steps"] else None,
        "peak_memory_bytes": now("peak_memory_bytes"),
        "effective_depth": now("effective_depth"),
        "layers_below_threshold": now("layers_below_threshold"),
        "events": list(events),
        "metrics": dict(last_metrics),
        "files": {name: str(path) for name, path in files.items()},
    }


def _fmt(value: Any, kind: str = "int") -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "sci":
        return f"{value:.3e}"
    return f"{value:.4g}"


def _change(before: Any, after: Any) -> str:
    return f"({(after - before) / before:+.1%})" if before and after is not None else ""


def _event_line(event: Mapping[str, Any]) -> str:
    text = f"  step {event['step']}: {event['kind']} {event['original_layers']}"
    if event["loss_after"] is not None:
        text += f", loss {_fmt(event['loss_before'], 'num')} -> {_fmt(event['loss_after'], 'num')}"
    return text + {"recovered": f", recovered in {event['recovery_steps']} steps", "not_recovered": ", not recovered",
                   "recovering": ", not recovered yet"}.get(event["status"], "")


_ROWS = (
    ("decoder layers", "num_layers", "int"),
    ("params total", "params_total", "int"),
    ("params trainable", "params_trainable", "int"),
    ("FLOPs/token (fwd)", "flops_per_token", "sci"),
    ("train loss", "loss", "num"),
    ("perplexity", "perplexity", "num"),
)


def format_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """The summary as a table: a 2-space indent, a 20-column label, then "before", "after" and the change; the
    means; one line per event; the folder of ``path``."""
    lines = [f"DepthEfficiencyMonitor summary at step {summary['step']}", f"  {'':<20}{'before':>14}{'after':>14}"]
    for label, key, kind in _ROWS:
        before, after = summary[key]["before"], summary[key]["after"]
        lines.append(f"  {label:<20}{_fmt(before, kind):>14}{_fmt(after, kind):>14}  {_change(before, after)}")
    peak = summary["peak_memory_bytes"]
    for label, value in (("tokens/s (mean)", summary["tokens_per_sec_mean"]),
                         ("step time s (mean)", summary["step_time_sec_mean"]),
                         ("peak memory MiB", None if peak is None else peak / 2**20),
                         ("effective depth", summary["effective_depth"])):
        lines.append(f"  {label:<20}{'':>14}{_fmt(value, 'num'):>14}")
    lines.extend(_event_line(e) for e in summary["events"])
    lines.append(f"  written to {Path(path).parent}")
    return "\n".join(lines)


def write_summary(summary: Mapping[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``summary`` as ``directory/summary.json`` (non-finite floats as ``null``), never half-written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(finite_or_none(dict(summary)), indent=2, sort_keys=True))
    tmp.replace(path)
    return path
