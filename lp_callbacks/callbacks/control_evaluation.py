"""``ControlEvaluationCallback``: how far the model has moved from where it started, on control data you give."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lp_callbacks.architectures import decoder_stack
from lp_callbacks.distributed import check_strategy_supported
from lp_callbacks.evaluation import evaluate_tasks, teacher_agreement
from lp_callbacks.events import collect_depth_events
from lp_callbacks.inference import evaluating
from lp_callbacks.recorder import BlockInfluenceRecorder
from lp_callbacks.reference import called_module, frozen_copy, full_depth_copy
from lp_callbacks.validation import check_int

__all__ = ["ControlEvaluationCallback"]

#: The agreement measures logged (``eval/<name>``) and kept in :attr:`ControlEvaluationCallback.history`.
MEASURES = ("kl", "top1_agreement", "student_ppl", "teacher_ppl")


class ControlEvaluationCallback(Callback):
    r"""Measure the model against a frozen copy of itself taken at fit start, on a control loader: before the first
    depth event, right after each one (before the next training step), and at the end of fit.

    Each evaluation runs :func:`~lp_callbacks.evaluation.teacher_agreement` on ``control_dataloader`` (KL to the
    reference, top-1 agreement, both perplexities over the same real tokens), then your ``metric_fn(model,
    control_dataloader)`` if given (your own metric: a dict of floats), then lm-eval ``tasks`` if given
    (:func:`~lp_callbacks.evaluation.evaluate_tasks`, offline, with ``task_limit``). Results are logged to every
    logger as ``eval/<name>`` at the step, kept in :attr:`history`, printed as a table at the end, and written to
    ``<log_dir>/depth/control_evaluation.json`` and ``control_evaluation.png`` (every measure over steps, events
    marked). On rank zero only, with a progress bar on a terminal. Events are those any callback reports through
    ``depth_events`` (pruning, freezing). A :class:`~lp_callbacks.callbacks.DepthEfficiencyMonitor` in the same
    Trainer, before or after this callback, puts the measures at fit start and at fit end, and every evaluation, in
    its run summary (:meth:`final_evaluations`, the protocol of :mod:`lp_callbacks.run_summary`).

    The reference is kept on the callback (never a submodule: not trained, not exported) and saved with its state,
    so a resumed run compares with the same model.

    Args:
        control_dataloader: batches of dicts with ``input_ids`` (and ``attention_mask``, ``labels``): data the run
            does not train on (held-out text of the domain, or of the domains that must not be forgotten).
        reference: ``"initial"`` (a frozen copy at fit start) or a module to compare with.
        metric_fn: ``(model, control_dataloader) -> {name: float}``, run in eval mode without gradients.
        max_batches: batches of the control loader per evaluation (``None``: all).
        tasks: lm-eval task names (needs ``pip install 'lp-callbacks[eval]'`` and ``tokenizer``).
        task_limit: documents per task.
        tokenizer: the model's tokenizer, for ``tasks``.
        include_path: more lm-eval task folders.
        output_dir: where the JSON and the picture go (default ``<log_dir>/depth``).
        layers_path: dotted path of the block list, when the module holds several models.

    Example:
        >>> control = ControlEvaluationCallback(DataLoader(held_out, batch_size=4), max_batches=8)  # doctest: +SKIP
        >>> trainer = pl.Trainer(callbacks=[BlockInfluenceMonitor(), LayerPruneCallback(...), control])  # doctest: +SKIP
        >>> control.history[-1]["kl"]  # doctest: +SKIP
        0.31
    """

    def __init__(
        self,
        control_dataloader: Iterable[Mapping[str, Any]],
        reference: Literal["initial"] | nn.Module = "initial",
        metric_fn: Callable[[nn.Module, Iterable[Mapping[str, Any]]], Mapping[str, float]] | None = None,
        max_batches: int | None = None,
        tasks: Sequence[str] = (),
        task_limit: int | None = None,
        tokenizer: Any = None,
        include_path: str | None = None,
        output_dir: str | None = None,
        layers_path: str | None = None,
    ) -> None:
        if not isinstance(reference, nn.Module) and reference != "initial":
            raise ValueError(f"`reference` must be 'initial' or an nn.Module, got {reference!r}.")
        if metric_fn is not None and not callable(metric_fn):
            raise ValueError(f"`metric_fn` must be a callable (model, dataloader) -> dict, got {metric_fn!r}.")
        check_int("max_batches", max_batches, minimum=1, allow_none=True)
        check_int("task_limit", task_limit, minimum=1, allow_none=True)
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if self.tasks and tokenizer is None:
            raise ValueError(f"`tasks` {self.tasks} need the model's `tokenizer`, got None.")
        self.control_dataloader = control_dataloader
        self.source = "module" if isinstance(reference, nn.Module) else "initial"
        self.reference: nn.Module | None = reference if isinstance(reference, nn.Module) else None
        self.metric_fn, self.max_batches = metric_fn, max_batches
        self.task_limit, self.tokenizer, self.include_path = task_limit, tokenizer, include_path
        self.output_dir, self.layers_path = output_dir, layers_path
        self.history: list[dict[str, Any]] = []  # one record per evaluation: step, when, measures
        self._seen: set[tuple] = set()  # depth events already evaluated after
        self._finished = False  # the end-of-fit evaluation of this fit ran
        self._restored: dict[str, Any] | None = None
        self._student: nn.Module | None = None

    # ================================================================ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # rank zero evaluates alone: a sharded model would wait for the other ranks' shards
            check_strategy_supported(trainer, "ControlEvaluationCallback", fsdp2=False)
            self.history, self._seen, self._restored, self._finished = [], set(), None, False
            if self.source == "initial":
                self.reference = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._student = called_module(decoder_stack(pl_module, self.layers_path).root, pl_module)
        if self._restored is not None and self._restored.get("reference") is not None:
            self.reference = full_depth_copy(self._student, self._restored["reference"])
        elif self.reference is None:
            if trainer.ckpt_path is not None:
                raise ValueError(
                    f"ControlEvaluationCallback(reference='initial'): the checkpoint {trainer.ckpt_path!r} holds no"
                    " reference of this callback, and the model resumed is not the initial one: give the reference"
                    " as a module, or resume without this callback."
                )
            self.reference = frozen_copy(self._student)
        self.reference.requires_grad_(False).eval()
        if not self.history:
            self.evaluate(trainer, "start")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        new = [(source, e) for source, e in collect_depth_events(trainer.callbacks) if e.key() not in self._seen]
        if new:
            self._seen.update(e.key() for _, e in new)
            self.evaluate(trainer, "after " + ", ".join(f"{e.kind} {e.original_layers}" for _, e in new))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final_evaluations(trainer)
        if trainer.is_global_zero:
            directory = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir) / "depth"
            self.write(directory)
            rank_zero_info(format_history(self.history))

    # ================================================================ measuring
    def evaluate(self, trainer: pl.Trainer, when: str) -> dict[str, Any] | None:
        """Run every measure now (rank zero); the record is appended to :attr:`history` and logged."""
        if not trainer.is_global_zero or self._student is None or self.reference is None:
            return None
        record: dict[str, Any] = {"step": trainer.global_step, "when": when}
        with _recorders_off(trainer), evaluating(self._student):
            stats = teacher_agreement(self._student, self.reference, self.control_dataloader, max_batches=self.max_batches)
            record.update({name: stats[name] for name in MEASURES}, tokens=stats["tokens"])
            if self.metric_fn is not None:
                record.update({str(k): float(v) for k, v in self.metric_fn(self._student, self.control_dataloader).items()})
            for task, values in self._tasks().items():
                record.update({f"{task}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        self.history.append(record)
        metrics = {f"eval/{k}": float(v) for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "tokens")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return record

    def final_evaluations(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        """:attr:`history` with the end-of-fit evaluation, which runs now if this fit has not run it yet (once a fit).

        For the readers of :mod:`lp_callbacks.run_summary` (the depth monitor's summary), which call it from their
        own ``on_train_end``: Lightning may run theirs before this callback's.
        """
        if not self._finished:
            self._finished = True
            self.evaluate(trainer, "end")
        return list(self.history)

    def _tasks(self) -> dict[str, dict[str, Any]]:
        if not self.tasks:
            return {}
        assert self._student is not None
        return evaluate_tasks(self._student, self.tokenizer, self.tasks, limit=self.task_limit,
                              include_path=self.include_path)["results"]

    def write(self, directory: Path) -> dict[str, Path]:
        """``control_evaluation.json`` and ``control_evaluation.png`` in ``directory``."""
        from lp_callbacks.plotting import plot_measures, save_figure

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "control_evaluation.json"
        path.write_text(json.dumps(self.history, indent=2))
        picture = save_figure(plot_measures(self.history), directory / "control_evaluation.png")
        return {"json": path, "png": picture}

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        copied = self.source == "initial" and self.reference is not None
        return {"version": 1, "history": self.history, "seen": [list(map(_plain, k)) for k in self._seen],
                "reference": self.reference.state_dict() if copied else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._seen = {(k[0], k[1], tuple(k[2])) for k in state_dict.get("seen", [])}
        self._restored = dict(state_dict)


def _recorders_off(trainer: pl.Trainer) -> contextlib.ExitStack:
    """Every Block Influence recorder of the Trainer's callbacks off: control forwards are no training data."""
    stack = contextlib.ExitStack()
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        recorder = getattr(callback, "recorder", None)
        if isinstance(recorder, BlockInfluenceRecorder):
            stack.enter_context(recorder.recording(False))
    return stack


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def format_history(history: Sequence[Mapping[str, Any]]) -> str:
    """The evaluations as a table: one row per evaluation, one column per measure."""
    names = [k for k in dict.fromkeys(k for r in history for k in r) if k not in ("step", "when", "tokens")]
    lines = ["ControlEvaluationCallback: the model against its reference on the control data",
             f"  {'step':>6}  {'when':<28}" + "".join(f"{n[:16]:>17}" for n in names)]
    for r in history:
        cells = "".join(f"{r[n]:>17.4g}" if isinstance(r.get(n), (int, float)) else f"{'-':>17}" for n in names)
        lines.append(f"  {r['step']:>6}  {str(r['when'])[:28]:<28}" + cells)
    return "\n".join(lines)
