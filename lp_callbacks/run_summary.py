"""The run summary of the depth monitor: built from what was logged, written as JSON, printed as a table.

Pure functions of plain values (no Lightning, no torch): :func:`build_summary` assembles the dictionary,
:func:`format_summary` renders the before/after table, :func:`write_summary` writes ``summary.json`` atomically.

Control evaluations join the summary through one public method, the way depth events do through ``depth_events``
(:mod:`lp_callbacks.events`): a callback that evaluates the model during fit
(:class:`~lp_callbacks.callbacks.ControlEvaluationCallback`) has ``final_evaluations(trainer) -> list[dict]``, its
evaluation records, oldest first, each with ``step``, ``when`` and numeric measures, the end-of-fit one included.
A reader calls it from its own ``on_train_end``, which Lightning may run before the evaluator's (callbacks run in
the order of ``trainer.callbacks``), so the method runs the final evaluation then if it has not run yet, once per
fit. :func:`collect_evaluations` asks every callback that has the method; :func:`evaluation_section` makes the
summary's ``"control_evaluation"`` entry of each: every measure at the first record ("before": fit start) and at
the last ("after": fit end), and every record (one after each depth event).

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_FILE", "build_summary", "collect_evaluations", "evaluation_section", "finite_or_none",
           "format_summary", "perplexity", "write_summary"]

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
    evaluations: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
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
        evaluations: ``{source: records}`` of the control evaluations (:func:`collect_evaluations`); when there is
            any, the summary holds ``"control_evaluation": {source: evaluation_section(records)}``.
    """
    base = baseline or {}

    def now(key: str) -> float | None:
        return last_metrics.get(f"{prefix}/{key}")

    def pair(key: str) -> dict[str, Any]:
        return {"before": base.get(key), "after": now(key)}

    time_total, tokens_total = totals["time"], totals["tokens"]
    control = {source: evaluation_section(records) for source, records in (evaluations or {}).items() if records}
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
        **({"control_evaluation": control} if control else {}),
    }


def collect_evaluations(callbacks: Iterable[object], trainer: Any) -> dict[str, list[dict[str, Any]]]:
    """``{class name: records}`` of every callback with a ``final_evaluations(trainer)`` method (the protocol of
    this module's docstring), each record a plain copy; call it at the end of fit."""
    found: dict[str, list[dict[str, Any]]] = {}
    for callback in callbacks:
        final = getattr(callback, "final_evaluations", None)
        if callable(final):
            found[type(callback).__name__] = [dict(record) for record in final(trainer)]
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluation_section(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary entry of one evaluator's records (oldest first, at least one): the ``step`` of the first and of
    the last record, each measure (a number other than ``step`` and ``tokens``) in them as ``{"before": first,
    "after": last}`` (``None`` where a record lacks it), and the records themselves under ``"evaluations"``.

    Example:
        >>> records = [{"step": 0, "when": "start", "kl": 0.0}, {"step": 8, "when": "end", "kl": 0.3}]
        >>> evaluation_section(records)["measures"]
        {'kl': {'before': 0.0, 'after': 0.3}}
    """
    first, last = records[0], records[-1]
    names = dict.fromkeys(k for r in records for k, v in r.items() if _is_number(v) and k not in ("step", "tokens"))
    return {
        "step": {"before": first.get("step"), "after": last.get("step")},
        "measures": {name: {"before": first.get(name), "after": last.get(name)} for name in names},
        "evaluations": [dict(r) for r in records],
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


def _row(label: str, pair: Mapping[str, Any], kind: str) -> str:
    """One table row: a 2-space indent, the 20-column label, "before", "after" and the change."""
    before, after = pair["before"], pair["after"]
    return f"  {label:<20}{_fmt(before, kind):>14}{_fmt(after, kind):>14}  {_change(before, after)}"


def _evaluation_lines(source: str, section: Mapping[str, Any]) -> list[str]:
    """A header, then one row per measure indented under it: "before" (fit start), "after" (fit end), the change."""
    steps = section["step"]
    return [f"  control evaluation ({source}), step {steps['before']} -> {steps['after']}",
            *(_row("  " + name, pair, "num") for name, pair in section["measures"].items())]


def format_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """The summary as a table: a 2-space indent, a 20-column label, then "before", "after" and the change; the
    means; one line per event; the control evaluations' measures before and after; the folder of ``path``."""
    lines = [f"DepthEfficiencyMonitor summary at step {summary['step']}", f"  {'':<20}{'before':>14}{'after':>14}"]
    lines += (_row(label, summary[key], kind) for label, key, kind in _ROWS)
    peak = summary["peak_memory_bytes"]
    for label, value in (("tokens/s (mean)", summary["tokens_per_sec_mean"]),
                         ("step time s (mean)", summary["step_time_sec_mean"]),
                         ("peak memory MiB", None if peak is None else peak / 2**20),
                         ("effective depth", summary["effective_depth"])):
        lines.append(f"  {label:<20}{'':>14}{_fmt(value, 'num'):>14}")
    lines.extend(_event_line(e) for e in summary["events"])
    for source, section in summary.get("control_evaluation", {}).items():
        lines.extend(_evaluation_lines(source, section))
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
