"""``DepthEfficiencyMonitor``: what depth costs and what it buys, logged while the model trains.

Costs: decoder layers, parameters, FLOPs per token, tokens/s, step time, peak memory. What depth buys: redundancy
read from the :class:`~lp_callbacks.callbacks.BlockInfluenceMonitor` and the training loss around every pruning or
freezing event reported through the :mod:`lp_callbacks.events` protocol. Pictures and a run summary at the end.

Lightning plumbing over parts that know nothing of Lightning: :mod:`~lp_callbacks.step_clock` (timing, tokens),
:mod:`~lp_callbacks.depth_stats` (sizes, FLOPs, memory, BI summaries), :mod:`~lp_callbacks.loss_events` (the loss
around events), :mod:`~lp_callbacks.plotting` (pictures) and :mod:`~lp_callbacks.run_summary` (the summary).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import Tensor

from lp_callbacks import depth_stats
from lp_callbacks.architectures import get_decoder_layers
from lp_callbacks.callbacks.block_influence import find_monitor
from lp_callbacks.depth_stats import count_tokens, effective_depth  # re-exported: their historical home
from lp_callbacks.loss_events import LossTracker, RecoveryRule, read_loss
from lp_callbacks.run_summary import build_summary, collect_evaluations, format_summary, write_summary
from lp_callbacks.step_clock import Interval, StepClock
from lp_callbacks.stepping import OptimizerStepTracker
from lp_callbacks.validation import check_bool, check_int, check_number

__all__ = ["DepthEfficiencyMonitor", "count_tokens", "effective_depth"]


class DepthEfficiencyMonitor(Callback):
    r"""Log what depth costs and buys, draw Block Influence over training, and summarise the run.

    Every ``log_every_n_steps`` optimizer steps (and at the first), through every logger of the Trainer
    (``trainer.loggers``: CSV, TensorBoard, W&B, MLflow...), with ``prefix="depth"``:

    ==============================  =================================================================================
    ``depth/num_layers``            decoder blocks now
    ``depth/original_num_layers``   decoder blocks before any removal (kept across resumes)
    ``depth/params_total``          parameters of the LightningModule (a tied tensor once)
    ``depth/params_trainable``      those with ``requires_grad`` (drops when blocks are frozen)
    ``depth/flops_per_token``       forward FLOPs per token of the current architecture at the batch's padded length
                                    (or ``seq_len``): attention + MLP + LM head, see :mod:`lp_callbacks.flops`
    ``depth/tokens_per_sec``        tokens (attention-mask sum, else ``input_ids.numel()``; summed over ranks) per
                                    second of ``clock`` (wall-clock time by default) since the previous log
    ``depth/step_time_sec``         seconds of ``clock`` per optimizer step since the previous log, data loading and
                                    callbacks included, validation excluded (``tokens_per_sec * step_time_sec`` =
                                    tokens per step)
    ``depth/peak_memory_bytes``     ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS on CPU
    ``depth/layers_below_threshold`` blocks whose BI is below ``threshold`` (needs a BlockInfluenceMonitor)
    ``depth/effective_depth``       participation ratio of BI, ``(sum BI)^2 / sum BI^2`` (:func:`effective_depth`):
                                    how many blocks effectively do the work, from 1 to ``num_layers``
    ``depth/event_loss_before``     mean training loss over the ``loss_window`` steps before an event
    ``depth/event_loss_after``      training loss of the first step after it
    ``depth/event_recovery_steps``  steps until the loss, averaged over the last ``loss_window`` steps after the event,
                                    is back at ``event_loss_before`` (0: it never rose)
    ==============================  =================================================================================

    Event keys are logged at the first logging step where they are known. Events come from every callback in
    ``trainer.callbacks`` with a ``depth_events`` list (:mod:`lp_callbacks.events`). The training loss is read from
    ``outputs`` of ``on_train_batch_end`` (un-normalised for gradient accumulation) or from
    ``trainer.callback_metrics[loss_key]``.

    Nothing here synchronises the GPU on other steps: per step the callback stores the loss tensor and the mask sum
    (one small kernel) and reads a clock; values come to the host on logging steps only (set ``sync_cuda=True`` to
    synchronise at every step end, for exact per-step timing). Under DDP every rank must run the same Trainer
    configuration (the token count is a sum across ranks on logging steps).

    At the end of fit (and on :meth:`save_plots`), on rank zero, in ``output_dir`` (default
    ``<trainer.log_dir or default_root_dir>/depth``): ``bi_heatmap.png`` (BI, original layer x step, removed layers in
    grey, events as lines), ``bi_profile.png`` (latest BI per original layer, removed ones hatched at their last
    BI), ``events.png`` (loss and depth over steps, events labelled), also sent to TensorBoard (``add_figure``), W&B
    (``log_image``) or MLflow (``log_figure``) loggers; then ``summary.json`` (:attr:`run_summary`, whose ``"metrics"`` are exactly the last
    values logged) and a compact table printed with ``rank_zero_info``. In the summary, "before" is the model at the
    first training batch (what the first log shows unless the depth changed at step 1) and "after" the last logged
    value; the train loss "before"/"after" is the loss of the first/last optimizer step of the run (kept across
    resumes); the means are totals over the run (tokens / seconds, seconds / optimizer steps). With a
    :class:`~lp_callbacks.callbacks.ControlEvaluationCallback` in the Trainer (in any order), the table shows its
    measures at fit start and at fit end, and ``"control_evaluation"`` holds them with every evaluation.

    Args:
        log_every_n_steps: log every N optimizer steps (``None``: the Trainer's ``log_every_n_steps``).
        seq_len: sequence length for FLOPs/token (``None``: the padded length of the current batch).
        causal_flops: count attention over the visible (causal) keys only, see :func:`lp_callbacks.flops.flops_breakdown`.
        threshold: BI threshold for ``layers_below_threshold`` (``None``: the BlockInfluenceMonitor's).
        loss_window: steps averaged for the loss before an event and for the smoothed loss after it.
        recovery_tolerance: recovered when the smoothed loss is at most ``before + tolerance * |before|``.
        max_recovery_steps: give up (status ``not_recovered``) after that many steps; ``None``: track until the end.
        sync_cuda: ``torch.cuda.synchronize()`` at every optimizer step end (exact step timings, slower).
        save_plots_on_fit_end: draw the three PNGs at the end of fit.
        log_images: also send the figures to loggers that take images.
        write_summary: print the summary table and write ``summary.json`` at the end of fit.
        output_dir: where PNGs and ``summary.json`` go (default ``<log_dir>/depth``).
        tokens_fn: ``batch -> number of tokens`` (int or 0-d tensor) when the batch is not a dict with
            ``input_ids``/``attention_mask``.
        loss_key: read the training loss from ``trainer.callback_metrics[loss_key]`` instead of ``outputs``.
        prefix: logged keys start with it.
        layers_path: dotted path of the decoder block list, for custom models.
        clock: ``() -> seconds`` read for ``tokens_per_sec``, ``step_time_sec`` and the validation time they leave
            out; only differences between two readings count (default :func:`time.perf_counter`). Tests pass a fake
            clock to get exact timings; not configurable from YAML.

    Example:
        >>> trainer = pl.Trainer(callbacks=[BlockInfluenceMonitor(), LayerPruneCallback(...),  # doctest: +SKIP
        ...                                 DepthEfficiencyMonitor()], logger=CSVLogger("runs"))
        >>> trainer.fit(module, datamodule)                                                   # doctest: +SKIP
        >>> trainer.callbacks[-1].run_summary["num_layers"]                                  # doctest: +SKIP
        {'before': 30, 'after': 24}
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        seq_len: int | None = None,
        causal_flops: bool = False,
        threshold: float | None = None,
        loss_window: int = 10,
        recovery_tolerance: float = 0.0,
        max_recovery_steps: int | None = None,
        sync_cuda: bool = False,
        save_plots_on_fit_end: bool = True,
        log_images: bool = True,
        write_summary: bool = True,
        output_dir: str | os.PathLike[str] | None = None,
        tokens_fn: Callable[[Any], int | Tensor] | None = None,
        loss_key: str | None = None,
        prefix: str = "depth",
        layers_path: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        self.seq_len = check_int("seq_len", seq_len, minimum=1, allow_none=True)
        self.causal_flops = check_bool("causal_flops", causal_flops)
        check_number("threshold", threshold, 0.0, 2.0, allow_none=True)  # the range of BI
        self.threshold = None if threshold is None else float(threshold)
        rule = RecoveryRule(
            loss_window=check_int("loss_window", loss_window, minimum=1),
            recovery_tolerance=float(check_number("recovery_tolerance", recovery_tolerance, 0.0, 1.0, high_open=True)),
            max_recovery_steps=check_int("max_recovery_steps", max_recovery_steps, minimum=1, allow_none=True),
        )
        self.save_plots_on_fit_end = check_bool("save_plots_on_fit_end", save_plots_on_fit_end)
        self.log_images = check_bool("log_images", log_images)
        self.write_summary = check_bool("write_summary", write_summary)
        if tokens_fn is not None and not callable(tokens_fn):
            raise TypeError(f"`tokens_fn` must be callable (batch -> int), got {type(tokens_fn).__name__}.")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"`prefix` must be a non-empty string, got {prefix!r}.")
        self.output_dir, self.tokens_fn, self.loss_key = output_dir, tokens_fn, loss_key
        self.prefix, self.layers_path = prefix, layers_path
        self._step_clock = StepClock(clock, sync_cuda=check_bool("sync_cuda", sync_cuda))
        self._losses = LossTracker(rule)
        self._steps = OptimizerStepTracker()

        # kept across resumes (state_dict), with the step clock's totals and the loss tracker's state
        self.original_num_layers: int | None = None
        self.baseline: dict[str, Any] | None = None  # num_layers, params, FLOPs at the first training batch
        self.last_metrics: dict[str, float] = {}
        self.last_logged_step: int | None = None
        self.run_summary: dict[str, Any] | None = None
        self._depth_curve: list[tuple[int, int]] = []
        # per run
        self._trainer: pl.Trainer | None = None
        self._batch_step: int | None = None  # trainer.global_step when the current batch started
        self._batch_seq_len: int | None = None
        self._warnings = WarningCache()

    # ================================================================ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # the arguments, as the parts that use them hold them
    clock = property(lambda self: self._step_clock.clock, doc="The ``() -> seconds`` callable timings are read from.")
    sync_cuda = property(lambda self: self._step_clock.sync_cuda)
    loss_window = property(lambda self: self._losses.rule.loss_window)
    recovery_tolerance = property(lambda self: self._losses.rule.recovery_tolerance)
    max_recovery_steps = property(lambda self: self._losses.rule.max_recovery_steps)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event seen, oldest first: the :class:`DepthEvent` fields plus ``source``, ``loss_before``,
        ``loss_after``, ``recovery_steps`` and ``status``."""
        return self._losses.events

    def save_plots(
        self, trainer: pl.Trainer | None = None, output_dir: str | os.PathLike[str] | None = None
    ) -> dict[str, Path]:
        """Draw ``bi_heatmap.png``, ``bi_profile.png`` and ``events.png`` now; return ``{name: path}``.

        Writes on global rank zero only (other ranks return ``{}``). Also sends the figures to image-capable
        loggers when ``log_images``. Under DDP call it on every rank (the log directory is agreed across ranks).

        Raises:
            ValueError: when no Trainer was given and the monitor never ran in one.
        """
        trainer = trainer or self._trainer
        if trainer is None:
            raise ValueError("`save_plots` needs the Trainer the monitor runs in: pass `trainer=`, got None.")
        directory = Path(output_dir) if output_dir is not None else self._resolve_output_dir(trainer)
        if not trainer.is_global_zero:
            return {}
        from lp_callbacks.plotting import draw_depth_figures, log_figures

        monitor = find_monitor(trainer)
        history = list(monitor.history) if monitor is not None else []
        bi = monitor.block_influence if monitor is not None else None
        current = None if bi is None or monitor.original_indices is None else (bi.tolist(), monitor.original_indices)
        drawn = draw_depth_figures(directory, history, self.events, current, self.original_num_layers,
                                   threshold=self._threshold(monitor), loss_curve=self._losses.curve,
                                   depth_curve=sorted(self._depth_curve))
        if self.log_images:
            log_figures(trainer.loggers, drawn, prefix=self.prefix, step=trainer.global_step, warn=rank_zero_warn)
        return drawn.paths

    # ================================================================ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._note_depth(self._num_layers(pl_module))  # a clear error now, not mid-run
        self._step_clock.reset()
        self._losses.restart()
        if find_monitor(trainer) is None:
            rank_zero_warn(
                "DepthEfficiencyMonitor: no BlockInfluenceMonitor in trainer.callbacks, so `depth/layers_below_threshold`,"
                " `depth/effective_depth` and the BI pictures are left out. Add one to get them."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._steps.batch_started(trainer)
        self._batch_step = trainer.global_step
        self._step_clock.batch_started()
        self._batch_seq_len = self.seq_len or depth_stats.batch_seq_len(batch) or self._batch_seq_len
        if self.baseline is None:
            self.baseline = self._model_size(pl_module)
        self._scan_events(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_clock.count(self.tokens_fn(batch) if self.tokens_fn is not None else count_tokens(batch))
        self._record_loss(trainer, pl_module, outputs)
        if not self._steps.stepped(trainer):
            return  # accumulating gradients: the optimizer has not stepped yet
        self._step_clock.optimizer_stepped(pl_module.device)
        self._scan_events(trainer, pl_module)
        interval = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % interval == 0 or trainer.global_step == 1:
            self._log(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_clock.validation_started()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_clock.validation_ended()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning refuses `pl_module.log` here: every value goes to `trainer.loggers` directly.
        self._scan_events(trainer, pl_module)
        if self._step_clock.steps > 0 or not self.last_metrics:
            self._log(trainer, pl_module)
        self._losses.flush()
        directory = self._resolve_output_dir(trainer)  # every rank: log_dir is broadcast under DDP
        files = self._save_plots_at_end(trainer, directory) if self.save_plots_on_fit_end else {}
        self.run_summary = self._summary(trainer, files)
        if self.write_summary and trainer.is_global_zero:
            path = write_summary(self.run_summary, directory)
            rank_zero_info(format_summary(self.run_summary, path))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._losses.restart()
        self._step_clock.reset()

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "original_num_layers": self.original_num_layers,
            "baseline": self.baseline,
            **self._losses.state_dict(),  # records, loss_log, first_loss, loss_curve
            "depth_curve": list(self._depth_curve),
            "totals": dict(self._step_clock.totals),
            "last_metrics": dict(self.last_metrics),
            "last_logged_step": self.last_logged_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_num_layers = state_dict.get("original_num_layers", self.original_num_layers)
        self.baseline = state_dict.get("baseline", self.baseline)
        self._losses.load_state_dict(state_dict)
        self._depth_curve = [(int(s), int(n)) for s, n in state_dict.get("depth_curve", [])]
        self._step_clock.totals.update(state_dict.get("totals", {}))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.last_logged_step = state_dict.get("last_logged_step")

    # ================================================================ internals
    def _num_layers(self, pl_module: pl.LightningModule) -> int:
        return len(get_decoder_layers(pl_module, self.layers_path))

    def _note_depth(self, num_layers: int) -> None:
        """``original_num_layers`` is the largest depth seen (or implied by an event's original index)."""
        self.original_num_layers = max(self.original_num_layers or 0, num_layers)

    def _model_size(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        seq_len = self.seq_len or self._batch_seq_len
        return depth_stats.model_size(pl_module, self.layers_path, seq_len, causal=self.causal_flops,
                                      warn=self._warnings.warn)

    def _threshold(self, monitor: Any) -> float | None:
        if self.threshold is not None:
            return self.threshold
        return None if monitor is None else float(monitor.threshold)

    def _record_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        # Lightning divides the returned loss by accumulate_grad_batches under automatic optimization
        scale = float(trainer.accumulate_grad_batches) if pl_module.automatic_optimization else 1.0
        found = read_loss(outputs, trainer.callback_metrics, self.loss_key, outputs_scale=scale)
        if found is None:
            self._warnings.warn(
                "DepthEfficiencyMonitor: found no training loss (neither `outputs['loss']` nor"
                f" `trainer.callback_metrics[{self.loss_key or 'train_loss'!r}]`): the loss around events is not"
                " tracked. Pass `loss_key` naming a logged scalar.",
            )
            return
        step = self._batch_step if self._batch_step is not None else trainer.global_step
        self._losses.add(step, *found)

    def _scan_events(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for record in self._losses.scan(trainer.callbacks):  # type: ignore[attr-defined]
            if record.event.kind == "prune":
                self._depth_curve.append((record.event.step, self._num_layers(pl_module)))
            self._note_depth(max(record.event.original_layers) + 1)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses.flush()  # the one host transfer of this interval (waits for the GPU)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        interval = self._step_clock.take(pl_module.device, reduce)
        size = self._model_size(pl_module)
        metrics = self._metrics(trainer, pl_module, size, interval)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.last_metrics, self.last_logged_step = metrics, step
        self._depth_curve.append((step, size["num_layers"]))
        self._losses.close_interval(step)

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, size: Mapping[str, Any],
                 interval: Interval) -> dict[str, float]:
        """The values of one log, keys without the prefix first: sizes, rates, memory, BI, events."""
        values: dict[str, Any] = {
            "num_layers": size["num_layers"],
            "original_num_layers": self.original_num_layers or size["num_layers"],
            "params_total": size["params_total"],
            "params_trainable": size["params_trainable"],
            "flops_per_token": size["flops_per_token"],
            **interval.rates(),
            "peak_memory_bytes": depth_stats.peak_memory_bytes(pl_module.device),
        }
        monitor = find_monitor(trainer)
        bi = monitor.block_influence if monitor is not None else None
        if bi is not None:
            values.update(depth_stats.bi_stats(bi, self._threshold(monitor)))
        metrics = {f"{self.prefix}/{k}": float(v) for k, v in values.items() if v is not None}
        return {**metrics, **self._losses.new_metrics(self.prefix)}

    def _resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "depth"

    def _save_plots_at_end(self, trainer: pl.Trainer, directory: Path) -> dict[str, Path]:
        try:
            return self.save_plots(trainer, directory)
        except Exception as err:  # noqa: BLE001 (a finished run must not fail on a picture)
            rank_zero_warn(f"DepthEfficiencyMonitor: could not draw the plots ({type(err).__name__}: {err}).")
            return {}

    def _summary(self, trainer: pl.Trainer, files: Mapping[str, Path]) -> dict[str, Any]:
        return build_summary(
            step=trainer.global_step, logged_step=self.last_logged_step, original_num_layers=self.original_num_layers,
            baseline=self.baseline, last_metrics=self.last_metrics, prefix=self.prefix,
            seq_len=self.seq_len or self._batch_seq_len, loss_before=self._losses.first_loss,
            loss_after=self._losses.last_loss, totals=self._step_clock.totals, events=self.events, files=files,
            evaluations=collect_evaluations(trainer.callbacks, trainer),  # runs a control's final one if still due
        )

