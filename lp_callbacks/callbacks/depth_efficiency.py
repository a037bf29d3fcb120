"""``DepthEfficiencyMonitor``: what depth costs and what it buys, logged while the model trains.

Costs: decoder layers, parameters, FLOPs per token, tokens/s, step time, peak memory. What depth buys: redundancy
read from the :class:`~lp_callbacks.callbacks.BlockInfluenceMonitor` and the training loss around every pruning or
freezing event reported through the :mod:`lp_callbacks.events` protocol. Pictures and a run summary at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lp_callbacks.architectures import find_hf_model, get_decoder_layers
from lp_callbacks.callbacks.block_influence import find_monitor
from lp_callbacks.events import DepthEvent, collect_depth_events
from lp_callbacks.flops import count_parameters, flops_per_token

__all__ = ["DepthEfficiencyMonitor", "count_tokens", "effective_depth"]

SUMMARY_FILE = "summary.json"


def effective_depth(block_influence: Tensor | Sequence[float]) -> float | None:
    r"""Participation ratio of the Block Influence: ``(sum_i BI_i)^2 / sum_i BI_i^2``.

    How many blocks effectively carry the transformation: ``L`` when all ``L`` blocks change the hidden state
    equally, ``k`` when ``k`` blocks share the work equally and the others do nothing, ``1`` when one block does
    everything. Between 1 and the number of measured blocks; insensitive to the overall scale of BI (use
    ``layers_below_threshold`` for absolute redundancy). Non-finite entries (unmeasured blocks) are ignored.
    ``None`` when nothing finite and non-zero was measured.

    Example:
        >>> effective_depth([0.2, 0.2, 0.0, 0.0])
        2.0
    """
    bi = torch.as_tensor(block_influence, dtype=torch.float64).flatten()
    bi = bi[torch.isfinite(bi)].clamp_min(0.0)
    squares = float((bi * bi).sum())
    if squares <= 0.0:
        return None
    return float(bi.sum()) ** 2 / squares


def count_tokens(batch: Any) -> int | Tensor:
    """Tokens in a batch: ``attention_mask.sum()`` when a 2-D mask is present, else ``input_ids.numel()``.

    A tensor batch counts its elements, a tuple/list batch its first tensor. The mask sum stays a tensor on the
    batch's device (no GPU synchronisation); returns ``0`` for a batch it cannot read.
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2:
            return mask.sum()
        ids = batch.get("input_ids")
        if isinstance(ids, Tensor):
            return ids.numel()
        return 0
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0].numel()
    return 0


def _seq_len(batch: Any) -> int | None:
    if isinstance(batch, Mapping):
        for key in ("input_ids", "attention_mask"):
            value = batch.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1:
                return int(value.shape[-1])
        return None
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[-1]) if isinstance(batch, Tensor) and batch.ndim >= 1 else None


def _peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _first_loss_in(state: Mapping[str, Any]) -> float | None:
    """The first step's loss saved in a checkpoint state; older states kept the first ``loss_window`` losses.

    Args:
        state: the monitor's ``state_dict``.
    """
    first = state.get("first_loss")
    if first is None and state.get("first_losses"):
        first = state["first_losses"][0]
    return None if first is None else float(first)


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class _EventRecord:
    """One event and what the loss did around it.

    ``status``: ``pending`` (no loss after it seen yet), ``recovering``, ``recovered``, ``not_recovered`` (past
    ``max_recovery_steps``) or ``no_baseline`` (no loss before it).
    """

    source: str
    event: DepthEvent
    loss_before: float | None = None
    loss_after: float | None = None
    recovery_steps: int | None = None
    status: str = "pending"
    post: list[float] = field(default_factory=list)
    logged: list[str] = field(default_factory=list)

    def key(self) -> tuple[str, tuple[int, str, tuple[int, ...]]]:
        return (self.source, self.event.key())

    def feed(self, step: int, loss: float, log: Sequence[tuple[int, float]], monitor: DepthEfficiencyMonitor) -> None:
        """Take the loss of the batches that started at ``step`` (>= the event's); ``log`` holds earlier losses."""
        if step < self.event.step:
            return
        if self.status == "pending":
            prior = [v for s, v in log if s < self.event.step][-monitor.loss_window :]
            self.loss_before, self.loss_after = _mean(prior), loss
            self.status = "recovering" if prior else "no_baseline"
        if self.status != "recovering":
            return
        self.post = (self.post + [loss])[-monitor.loss_window :]
        smoothed = sum(self.post) / len(self.post)
        before = self.loss_before if self.loss_before is not None else math.inf
        if smoothed <= before + monitor.recovery_tolerance * abs(before):
            self.recovery_steps, self.status, self.post = step - self.event.step, "recovered", []
        elif monitor.max_recovery_steps is not None and step - self.event.step >= monitor.max_recovery_steps:
            self.status, self.post = "not_recovered", []

    def as_dict(self) -> dict[str, Any]:
        """The event's fields plus ``source``, ``loss_before``, ``loss_after``, ``recovery_steps``, ``status``."""
        return {
            **self.event.to_dict(),
            "source": self.source,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "recovery_steps": self.recovery_steps,
            "status": self.status,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.as_dict(), "post": list(self.post), "logged": list(self.logged)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _EventRecord:
        return cls(
            source=str(state.get("source", "")),
            event=DepthEvent.from_dict(state),
            loss_before=state.get("loss_before"),
            loss_after=state.get("loss_after"),
            recovery_steps=state.get("recovery_steps"),
            status=str(state.get("status", "pending")),
            post=list(state.get("post", [])),
            logged=list(state.get("logged", [])),
        )


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {value!r}.")


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
    grey, events as lines), ``bi_profile.png`` (latest BI per original layer), ``events.png`` (loss and depth over
    steps with the events), also sent to TensorBoard (``add_figure``), W&B (``log_image``) or MLflow
    (``log_figure``) loggers; then ``summary.json`` (:attr:`run_summary`, whose ``"metrics"`` are exactly the last
    values logged) and a compact table printed with ``rank_zero_info``. In the summary, "before" is the model at the
    first training batch (what the first log shows unless the depth changed at step 1) and "after" the last logged
    value; the train loss "before"/"after" is the loss of the first/last optimizer step of the run (kept across
    resumes); the means are totals over the run (tokens / seconds, seconds / optimizer steps).

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
        _check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        _check_positive_int("seq_len", seq_len, allow_none=True)
        _check_positive_int("loss_window", loss_window)
        _check_positive_int("max_recovery_steps", max_recovery_steps, allow_none=True)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold <= 2):
            raise ValueError(f"`threshold` must be None or a number in [0, 2] (the range of BI), got {threshold!r}.")
        if isinstance(recovery_tolerance, bool) or not isinstance(recovery_tolerance, (int, float)) or not (
            0 <= recovery_tolerance < 1
        ):
            raise ValueError(f"`recovery_tolerance` must be a number in [0, 1), got {recovery_tolerance!r}.")
        if tokens_fn is not None and not callable(tokens_fn):
            raise TypeError(f"`tokens_fn` must be callable (batch -> int), got {type(tokens_fn).__name__}.")
        if not callable(clock):
            raise TypeError(f"`clock` must be callable (() -> seconds), got {type(clock).__name__}.")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"`prefix` must be a non-empty string, got {prefix!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.seq_len = seq_len
        self.causal_flops = bool(causal_flops)
        self.threshold = None if threshold is None else float(threshold)
        self.loss_window = loss_window
        self.recovery_tolerance = float(recovery_tolerance)
        self.max_recovery_steps = max_recovery_steps
        self.sync_cuda = bool(sync_cuda)
        self.save_plots_on_fit_end = bool(save_plots_on_fit_end)
        self.log_images = bool(log_images)
        self.write_summary = bool(write_summary)
        self.output_dir = output_dir
        self.tokens_fn = tokens_fn
        self.loss_key = loss_key
        self.prefix = prefix
        self.layers_path = layers_path
        self.clock = clock

        # kept across resumes (state_dict)
        self.original_num_layers: int | None = None
        self.baseline: dict[str, Any] | None = None  # num_layers, params, FLOPs at the first training batch
        self.last_metrics: dict[str, float] = {}
        self.last_logged_step: int | None = None
        self.run_summary: dict[str, Any] | None = None
        self._records: list[_EventRecord] = []
        self._loss_log: deque[tuple[int, float]] = deque(maxlen=4 * loss_window + 64)
        self._first_loss: float | None = None  # the loss of the first optimizer step of the run
        self._loss_curve: list[tuple[int, float]] = []
        self._depth_curve: list[tuple[int, int]] = []
        self._totals = {"tokens": 0, "time": 0.0, "steps": 0}
        # per run
        self._trainer: pl.Trainer | None = None
        self._reset_interval(None)
        self._pending_losses: list[tuple[int, Tensor | float, float]] = []  # (start step, loss, scale)
        self._step_at_start: int | None = None
        self._batch_seq_len: int | None = None
        self._seen_counts: dict[int, int] = {}
        self._validation_start: float | None = None
        self._warned: set[str] = set()

    # ================================================================ public API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event seen, oldest first: the :class:`DepthEvent` fields plus ``source``, ``loss_before``,
        ``loss_after``, ``recovery_steps`` and ``status``."""
        return [r.as_dict() for r in sorted(self._records, key=lambda r: r.event.step)]

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
        from lp_callbacks import plotting

        monitor = find_monitor(trainer)
        history = list(monitor.history) if monitor is not None else []
        events = self.events
        frozen: set[int] = set()
        for event in events:
            layers = set(event["original_layers"])
            frozen = frozen | layers if event["kind"] == "freeze" else frozen - layers
        bi, indices, step = self._latest_bi(monitor, history)
        threshold = self._threshold(monitor)
        figures = {
            "bi_heatmap": plotting.plot_bi_heatmap(history, events, self.original_num_layers,
                                                   path=directory / plotting.HEATMAP_FILE),
            "bi_profile": plotting.plot_bi_profile(bi, indices, self.original_num_layers, threshold=threshold,
                                                   frozen=frozen, step=step, path=directory / plotting.PROFILE_FILE),
            "events": plotting.plot_events(events, self._loss_curve, sorted(self._depth_curve),
                                           path=directory / plotting.EVENTS_FILE),
        }
        paths = {
            "bi_heatmap": directory / plotting.HEATMAP_FILE,
            "bi_profile": directory / plotting.PROFILE_FILE,
            "events": directory / plotting.EVENTS_FILE,
        }
        if self.log_images:
            self._log_figures(trainer, figures, paths)
        return paths

    # ================================================================ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        num_layers = len(get_decoder_layers(pl_module, self.layers_path))  # a clear error now, not mid-run
        self.original_num_layers = max(self.original_num_layers or 0, num_layers)
        self._reset_interval(None)
        self._pending_losses.clear()
        self._seen_counts.clear()
        if find_monitor(trainer) is None:
            rank_zero_warn(
                "DepthEfficiencyMonitor: no BlockInfluenceMonitor in trainer.callbacks, so `depth/layers_below_threshold`,"
                " `depth/effective_depth` and the BI pictures are left out. Add one to get them."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step
        if self._interval_start is None:
            self._reset_interval(self.clock())
        self._batch_seq_len = self.seq_len or _seq_len(batch) or self._batch_seq_len
        if self.baseline is None:
            self.baseline = self._measure_model(pl_module)
        self._scan_events(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tokens = self.tokens_fn(batch) if self.tokens_fn is not None else count_tokens(batch)
        if isinstance(tokens, Tensor) and tokens.device.type != "cpu":
            self._interval_token_tensors.append(tokens)
        else:
            self._interval_tokens += int(tokens)
        start = self._step_at_start if self._step_at_start is not None else trainer.global_step
        loss, scale = self._loss(trainer, pl_module, outputs)
        if loss is not None:
            self._pending_losses.append((start, loss, scale))
        if trainer.global_step <= start:
            return  # accumulating gradients: the optimizer has not stepped yet
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._interval_steps += 1
        self._scan_events(trainer, pl_module)
        step = trainer.global_step
        interval = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if step % interval == 0 or step == 1:
            self._log(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._interval_start is not None:  # validation inside fit: its time is not training time
            self._validation_start = self.clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self._excluded += self.clock() - self._validation_start
            self._validation_start = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning refuses `pl_module.log` here: every value goes to `trainer.loggers` directly.
        self._scan_events(trainer, pl_module)
        if self._interval_steps > 0 or not self.last_metrics:
            self._log(trainer, pl_module)
        self._flush_losses()
        directory = self._resolve_output_dir(trainer)  # every rank: log_dir is broadcast under DDP
        files: dict[str, Path] = {}
        if self.save_plots_on_fit_end:
            try:
                files = self.save_plots(trainer, directory)
            except Exception as err:  # noqa: BLE001 (a finished run must not fail on a picture)
                rank_zero_warn(f"DepthEfficiencyMonitor: could not draw the plots ({type(err).__name__}: {err}).")
        self.run_summary = self._build_summary(trainer, files)
        if self.write_summary and trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / SUMMARY_FILE
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(_finite_or_none(self.run_summary), indent=2, sort_keys=True))
            tmp.replace(path)  # never a half-written summary
            rank_zero_info(self._format_summary(self.run_summary, path))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._pending_losses.clear()
        self._reset_interval(None)

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "original_num_layers": self.original_num_layers,
            "baseline": self.baseline,
            "records": [r.state_dict() for r in self._records],
            "loss_log": list(self._loss_log),
            "first_loss": self._first_loss,
            "loss_curve": list(self._loss_curve),
            "depth_curve": list(self._depth_curve),
            "totals": dict(self._totals),
            "last_metrics": dict(self.last_metrics),
            "last_logged_step": self.last_logged_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_num_layers = state_dict.get("original_num_layers", self.original_num_layers)
        self.baseline = state_dict.get("baseline", self.baseline)
        self._records = [_EventRecord.from_state(s) for s in state_dict.get("records", [])]
        self._loss_log.clear()
        self._loss_log.extend((int(s), float(v)) for s, v in state_dict.get("loss_log", []))
        self._first_loss = _first_loss_in(state_dict)
        self._loss_curve = [(int(s), float(v)) for s, v in state_dict.get("loss_curve", [])]
        self._depth_curve = [(int(s), int(n)) for s, n in state_dict.get("depth_curve", [])]
        self._totals.update(state_dict.get("totals", {}))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.last_logged_step = state_dict.get("last_logged_step")

    # ================================================================ internals
    def _reset_interval(self, start: float | None) -> None:
        self._interval_start = start
        self._interval_steps = 0
        self._interval_tokens = 0
        self._interval_token_tensors: list[Tensor] = []
        self._interval_losses: list[float] = []
        self._excluded = 0.0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> tuple[Tensor | float | None, float]:
        if self.loss_key is None:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, Tensor) and loss.numel() == 1:
                # Lightning divides the returned loss by accumulate_grad_batches under automatic optimization
                scale = float(trainer.accumulate_grad_batches) if pl_module.automatic_optimization else 1.0
                return loss.detach(), scale
        value = trainer.callback_metrics.get(self.loss_key or "train_loss")
        if value is None and self.loss_key is None:
            value = trainer.callback_metrics.get("loss")
        if isinstance(value, Tensor) and value.numel() == 1:
            return value.detach(), 1.0
        if isinstance(value, (int, float)):
            return float(value), 1.0
        self._warn_once(
            "loss",
            "DepthEfficiencyMonitor: found no training loss (neither `outputs['loss']` nor"
            f" `trainer.callback_metrics[{self.loss_key or 'train_loss'!r}]`): the loss around events is not tracked."
            " Pass `loss_key` naming a logged scalar.",
        )
        return None, 1.0

    def _flush_losses(self) -> None:
        """Bring the pending losses to the host (one transfer) and feed them, step by step, to the event records."""
        if not self._pending_losses:
            return
        pending, self._pending_losses = self._pending_losses, []
        tensors = [loss if loss.ndim == 0 else loss.reshape(()) for _, loss, _ in pending if isinstance(loss, Tensor)]
        host = iter(torch.stack(tensors).double().tolist() if tensors else [])
        per_step: dict[int, list[float]] = {}
        for start, loss, scale in pending:
            value = next(host) if isinstance(loss, Tensor) else float(loss)
            per_step.setdefault(start, []).append(value * scale)
        for step in sorted(per_step):
            value = sum(per_step[step]) / len(per_step[step])  # mean over the micro-batches of one optimizer step
            if not math.isfinite(value):
                continue
            for record in self._records:
                if record.status in ("pending", "recovering"):
                    record.feed(step, value, self._loss_log, self)
            self._loss_log.append((step, value))
            self._interval_losses.append(value)
            if self._first_loss is None:
                self._first_loss = value

    def _scan_events(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        changed = False
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            events = getattr(callback, "depth_events", None)
            if isinstance(events, (list, tuple)) and len(events) != self._seen_counts.get(id(callback)):
                self._seen_counts[id(callback)] = len(events)
                changed = True
        if not changed:
            return
        known = {r.key() for r in self._records}
        for source, event in collect_depth_events(trainer.callbacks):  # type: ignore[attr-defined]
            record = _EventRecord(source, event)
            if record.key() in known:
                continue
            known.add(record.key())
            self._records.append(record)
            for step, value in list(self._loss_log):  # losses after the event that are already on the host
                if step >= event.step:
                    record.feed(step, value, self._loss_log, self)
            if event.kind == "prune":
                self._depth_curve.append((event.step, len(get_decoder_layers(pl_module, self.layers_path))))
            for i in event.original_layers:
                self.original_num_layers = max(self.original_num_layers or 0, i + 1)

    def _measure_model(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        num_layers = len(get_decoder_layers(pl_module, self.layers_path))
        counts = count_parameters(pl_module)
        seq_len = self.seq_len or self._batch_seq_len
        flops = None
        if seq_len:
            try:
                flops = flops_per_token(find_hf_model(pl_module, self.layers_path).config, seq_len, causal=self.causal_flops,
                                        num_layers=num_layers)
            except (AttributeError, ValueError) as err:  # a custom model without an HF config
                self._warn_once("flops", f"DepthEfficiencyMonitor: FLOPs/token left out: {err}")
        return {"num_layers": num_layers, "params_total": counts.total, "params_trainable": counts.trainable,
                "flops_per_token": flops, "seq_len": seq_len}

    def _threshold(self, monitor: Any) -> float | None:
        if self.threshold is not None:
            return self.threshold
        return None if monitor is None else float(monitor.threshold)

    @staticmethod
    def _latest_bi(monitor: Any, history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[int], int | None]:
        if monitor is not None and monitor.block_influence is not None and monitor.original_indices is not None:
            step = history[-1]["step"] if history else None
            return monitor.block_influence.tolist(), list(monitor.original_indices), step
        if history:
            return list(history[-1]["block_influence"]), list(history[-1]["original_indices"]), history[-1]["step"]
        return [], [], None

    def _take_tokens(self, trainer: pl.Trainer, device: torch.device) -> int:
        total = torch.tensor(float(self._interval_tokens), dtype=torch.float64, device=device)
        if self._interval_token_tensors:
            total = total + torch.stack([t.to(torch.float64) for t in self._interval_token_tensors]).sum()
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        return round(float(total))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._flush_losses()  # the one host transfer of this interval (waits for the GPU)
        tokens = self._take_tokens(trainer, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so that the interval ends where the GPU work ends
        now = self.clock()
        elapsed = (now - self._interval_start - self._excluded) if self._interval_start is not None else 0.0
        steps = self._interval_steps
        interval_losses = self._interval_losses
        self._reset_interval(now)

        p = self.prefix
        model = self._measure_model(pl_module)
        metrics: dict[str, float] = {
            f"{p}/num_layers": float(model["num_layers"]),
            f"{p}/original_num_layers": float(self.original_num_layers or model["num_layers"]),
            f"{p}/params_total": float(model["params_total"]),
            f"{p}/params_trainable": float(model["params_trainable"]),
        }
        if model["flops_per_token"] is not None:
            metrics[f"{p}/flops_per_token"] = float(model["flops_per_token"])
        if steps > 0 and elapsed > 0:
            metrics[f"{p}/tokens_per_sec"] = tokens / elapsed
            metrics[f"{p}/step_time_sec"] = elapsed / steps
        self._add_to_totals(tokens, elapsed, steps)
        peak = _peak_memory_bytes(device)
        if peak is not None:
            metrics[f"{p}/peak_memory_bytes"] = float(peak)
        monitor = find_monitor(trainer)
        bi = monitor.block_influence if monitor is not None else None
        if bi is not None:
            finite = bi[torch.isfinite(bi)]
            threshold = self._threshold(monitor)
            if threshold is not None:
                metrics[f"{p}/layers_below_threshold"] = float((finite < threshold).sum())
            depth = effective_depth(finite)
            if depth is not None:
                metrics[f"{p}/effective_depth"] = depth
        metrics.update(self._event_metrics())

        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.last_metrics, self.last_logged_step = metrics, step
        self._depth_curve.append((step, model["num_layers"]))
        if interval_losses:
            self._loss_curve.append((step, sum(interval_losses) / len(interval_losses)))

    def _add_to_totals(self, tokens: int, seconds: float, steps: int) -> None:
        """Count one logged interval in the run totals (``tokens_seen``, ``train_time_sec`` and the means).

        Tokens and steps count even when the clock did not move, so that ``tokens_seen`` is every token trained on.
        """
        self._totals["tokens"] += tokens
        self._totals["time"] += max(seconds, 0.0)
        self._totals["steps"] += steps

    def _event_metrics(self) -> dict[str, float]:
        """Values of events that became known since the last log (one event per key per log)."""
        p, out = self.prefix, {}
        for record in sorted(self._records, key=lambda r: r.event.step):
            if record.loss_after is not None and "after" not in record.logged and f"{p}/event_loss_after" not in out:
                if record.loss_before is not None:
                    out[f"{p}/event_loss_before"] = record.loss_before
                out[f"{p}/event_loss_after"] = record.loss_after
                record.logged.append("after")
            if (record.recovery_steps is not None and "recovery" not in record.logged
                    and f"{p}/event_recovery_steps" not in out):
                out[f"{p}/event_recovery_steps"] = float(record.recovery_steps)
                record.logged.append("recovery")
        return out

    def _resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "depth"

    def _log_figures(self, trainer: pl.Trainer, figures: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
        from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for logger in trainer.loggers:
            try:
                for name, fig in figures.items():
                    tag = f"{self.prefix}/{name}"
                    if isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_figure(tag, fig, global_step=step, close=False)
                    elif isinstance(logger, WandbLogger):
                        logger.log_image(key=tag, images=[str(paths[name])])
                    elif isinstance(logger, MLFlowLogger):
                        logger.experiment.log_figure(logger.run_id, fig, f"{self.prefix}/{paths[name].name}")
            except Exception as err:  # noqa: BLE001 (an image the logger refuses must not end the run)
                rank_zero_warn(f"DepthEfficiencyMonitor: {type(logger).__name__} refused the figures ({err}).")

    def _build_summary(self, trainer: pl.Trainer, files: Mapping[str, Path]) -> dict[str, Any]:
        p, last, base = self.prefix, self.last_metrics, self.baseline or {}

        def now(key: str) -> float | None:
            return last.get(f"{p}/{key}")

        def pair(key: str) -> dict[str, Any]:
            return {"before": base.get(key), "after": now(key)}

        loss_before = self._first_loss
        loss_after = self._loss_log[-1][1] if self._loss_log else None
        time_total, tokens_total = self._totals["time"], self._totals["tokens"]
        return {
            "step": trainer.global_step,
            "logged_step": self.last_logged_step,
            "original_num_layers": self.original_num_layers,
            "num_layers": {"before": base.get("num_layers"), "after": int(now("num_layers") or 0) or None},
            "params_total": pair("params_total"),
            "params_trainable": pair("params_trainable"),
            "flops_per_token": pair("flops_per_token"),
            "seq_len": {"before": base.get("seq_len"), "after": self.seq_len or self._batch_seq_len},
            "loss": {"before": loss_before, "after": loss_after},
            "perplexity": {"before": _perplexity(loss_before), "after": _perplexity(loss_after)},
            "tokens_seen": tokens_total,
            "train_time_sec": time_total,
            "tokens_per_sec_mean": tokens_total / time_total if time_total > 0 else None,
            "step_time_sec_mean": time_total / self._totals["steps"] if self._totals["steps"] else None,
            "peak_memory_bytes": now("peak_memory_bytes"),
            "effective_depth": now("effective_depth"),
            "layers_below_threshold": now("layers_below_threshold"),
            "events": self.events,
            "metrics": dict(last),
            "files": {name: str(path) for name, path in files.items()},
        }

    @staticmethod
    def _format_summary(summary: Mapping[str, Any], path: Path) -> str:
        def fmt(value: Any, kind: str = "int") -> str:
            if value is None:
                return "-"
            if kind == "int":
                return f"{int(value):,}"
            if kind == "sci":
                return f"{value:.3e}"
            return f"{value:.4g}"

        def change(before: Any, after: Any) -> str:
            return f"({(after - before) / before:+.1%})" if before and after is not None else ""

        rows = [
            ("decoder layers", "num_layers", "int"),
            ("params total", "params_total", "int"),
            ("params trainable", "params_trainable", "int"),
            ("FLOPs/token (fwd)", "flops_per_token", "sci"),
            ("train loss", "loss", "num"),
            ("perplexity", "perplexity", "num"),
        ]
        lines = [f"DepthEfficiencyMonitor summary at step {summary['step']}",
                 f"  {'':<20}{'before':>14}{'after':>14}"]
        for label, key, kind in rows:
            before, after = summary[key]["before"], summary[key]["after"]
            lines.append(f"  {label:<20}{fmt(before, kind):>14}{fmt(after, kind):>14}  {change(before, after)}")
        peak = summary["peak_memory_bytes"]
        lines.append(f"  {'tokens/s (mean)':<20}{'':>14}{fmt(summary['tokens_per_sec_mean'], 'num'):>14}")
        lines.append(f"  {'step time s (mean)':<20}{'':>14}{fmt(summary['step_time_sec_mean'], 'num'):>14}")
        lines.append(f"  {'peak memory MiB':<20}{'':>14}{fmt(None if peak is None else peak / 2**20, 'num'):>14}")
        lines.append(f"  {'effective depth':<20}{'':>14}{fmt(summary['effective_depth'], 'num'):>14}")
        for e in summary["events"]:
            text = f"  step {e['step']}: {e['kind']} {e['original_layers']}"
            if e["loss_after"] is not None:
                text += f", loss {fmt(e['loss_before'], 'num')} -> {fmt(e['loss_after'], 'num')}"
            text += {"recovered": f", recovered in {e['recovery_steps']} steps", "not_recovered": ", not recovered",
                     "recovering": ", not recovered yet"}.get(e["status"], "")
            lines.append(text)
        lines.append(f"  written to {path.parent}")
        return "\n".join(lines)
