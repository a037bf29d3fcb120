"""``BlockInfluenceMonitor``: Block Influence of every decoder block, measured while the model trains."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lp_callbacks.architectures import find_hf_model
from lp_callbacks.checkpoint import register_rebuild_hook
from lp_callbacks.measure import _model_inputs, progress
from lp_callbacks.recorder import BlockInfluenceRecorder
from lp_callbacks.surgery import original_layer_indices

__all__ = ["BlockInfluenceMonitor", "find_monitor", "find_or_add_monitor"]

_SOURCES = ("train", "validation", "calibration")
_AGGREGATIONS = ("cumulative", "ema", "window")


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive int{extra}, got {value!r}.")


class _Running:
    """Per-position sums aggregated over measured steps: cumulative, exponential moving average, or a window.

    Sums and token counts are aggregated separately, so steps with more tokens weigh more, as they should.
    """

    def __init__(self, aggregation: str, ema_decay: float, window: int) -> None:
        self.aggregation, self.ema_decay, self.window = aggregation, ema_decay, window
        self.reset()

    def reset(self) -> None:
        self.total: Tensor | None = None
        self.count: Tensor | None = None
        self.recent: deque[tuple[Tensor, Tensor]] = deque(maxlen=self.window)

    def add(self, total: Tensor, count: Tensor) -> None:
        total, count = total.detach().double(), count.detach().double()  # stays on device: no host sync per step
        if self.aggregation == "window":
            if self.recent and self.recent[0][0].device != total.device:  # restored from a checkpoint on the CPU
                self.recent = deque(((t.to(total.device), c.to(total.device)) for t, c in self.recent), maxlen=self.window)
            self.recent.append((total, count))
            self.total = torch.stack([t for t, _ in self.recent]).sum(0)
            self.count = torch.stack([c for _, c in self.recent]).sum(0)
        elif self.total is None or self.total.shape != total.shape:
            self.total, self.count = total.clone(), count.clone()
        else:
            decay = self.ema_decay if self.aggregation == "ema" else 1.0
            # .to(): a checkpoint restores these on the CPU
            self.total = decay * self.total.to(total.device) + total
            self.count = decay * self.count.to(count.device) + count

    def mean(self) -> Tensor | None:
        """Per-position mean on the CPU (reading it is the only host sync), NaN where nothing was measured."""
        if self.total is None or self.count is None:
            return None
        total, count = self.total.cpu(), self.count.cpu()
        return torch.where(count > 0, total / count.clamp_min(1e-300), torch.full_like(total, math.nan))

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return {"total": cpu(self.total), "count": cpu(self.count), "recent": [(cpu(t), cpu(c)) for t, c in self.recent]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total, self.count = state.get("total"), state.get("count")
        self.recent = deque(state.get("recent", []), maxlen=self.window)


class BlockInfluenceMonitor(Callback):
    r"""Measure the Block Influence (ShortGPT) of every decoder block during training, log it, keep its history.

    ``BI_i = 1 - mean_t cos(x_i, x_{i+1})`` over real tokens, from forward hooks on the blocks: with
    ``source="train"`` the training forward passes themselves are measured (no extra forward, no autograd graph
    kept, fp32 math whatever the precision). Sanity checking and validation never pollute training BI.
    Under gradient checkpointing and gradient accumulation every token counts once per step.
    Statistics are float64 sums reduced across DDP ranks, so every rank holds the same values.

    Other callbacks (pruning, freezing, depth metrics) read :attr:`block_influence` from this monitor; they never
    hook the model a second time. Use :func:`find_monitor` to get it from a Trainer.

    Args:
        every_n_steps: measure every N optimizer steps (the steps whose ``global_step % N == 0``).
        max_tokens_per_step: token budget per measured step (evenly spaced real tokens; no RNG used). ``None``: all.
        aggregation: how measured steps combine: ``"cumulative"`` (all since the start or the last
            :meth:`reset`), ``"ema"`` (exponential moving average, weight ``ema_decay`` per step), ``"window"``
            (the last ``window`` measured steps).
        ema_decay: in (0, 1), used by ``aggregation="ema"``.
        window: number of measured steps, used by ``aggregation="window"``.
        source: ``"train"`` (training forwards), ``"validation"`` (each validation epoch, sanity check excluded)
            or ``"calibration"`` (an extra no-grad pass over ``calibration_dataloader`` at fit start and every
            ``every_n_steps``).
        calibration_dataloader: batches (dicts with ``input_ids``, optional ``attention_mask``) for
            ``source="calibration"``.
        calibration_batches: at most this many calibration batches per measurement.
        block_sizes: track Gromov's angular distance for these numbers of contiguous blocks.
        threshold: layers with BI below it are counted in the logged ``num_below_threshold``.
        log_every_n_steps: log and record history every N steps (``None``: the Trainer's ``log_every_n_steps``).
        prefix: logged keys start with it, e.g. ``block_influence/layer_07`` (original layer numbering).
        layers_path: dotted path of the decoder block list, for custom models.

    Example:
        >>> monitor = BlockInfluenceMonitor(every_n_steps=10, aggregation="ema")
        >>> trainer = pl.Trainer(callbacks=[monitor], max_steps=100)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)                           # doctest: +SKIP
        >>> monitor.block_influence                                   # doctest: +SKIP
        tensor([0.31, 0.12, ..., 0.08], dtype=torch.float64)
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        max_tokens_per_step: int | None = None,
        aggregation: Literal["cumulative", "ema", "window"] = "cumulative",
        ema_decay: float = 0.9,
        window: int = 50,
        source: Literal["train", "validation", "calibration"] = "train",
        calibration_dataloader: Iterable[Mapping[str, Tensor]] | None = None,
        calibration_batches: int | None = None,
        block_sizes: Sequence[int] = (1,),
        threshold: float = 0.05,
        log_every_n_steps: int | None = None,
        prefix: str = "block_influence",
        layers_path: str | None = None,
    ) -> None:
        _positive_int("every_n_steps", every_n_steps)
        _positive_int("max_tokens_per_step", max_tokens_per_step, allow_none=True)
        _positive_int("window", window)
        _positive_int("calibration_batches", calibration_batches, allow_none=True)
        _positive_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {_AGGREGATIONS}, got {aggregation!r}.")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 < ema_decay < 1:
            raise ValueError(f"`ema_decay` must be a float in (0, 1), got {ema_decay!r}.")
        if source not in _SOURCES:
            raise ValueError(f"`source` must be one of {_SOURCES}, got {source!r}.")
        if source == "calibration" and calibration_dataloader is None:
            raise ValueError("`source='calibration'` needs `calibration_dataloader`, got None.")
        for n in block_sizes:
            _positive_int("block_sizes", n)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 2:
            raise ValueError(f"`threshold` must be a number in [0, 2] (the range of BI), got {threshold!r}.")
        self.every_n_steps = every_n_steps
        self.max_tokens_per_step = max_tokens_per_step
        self.aggregation = aggregation
        self.source = source
        self.calibration_dataloader = calibration_dataloader
        self.calibration_batches = calibration_batches
        self.block_sizes = tuple(sorted(set(block_sizes)))
        self.threshold = float(threshold)
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.layers_path = layers_path

        self.recorder: BlockInfluenceRecorder | None = None
        self.original_indices: list[int] | None = None
        self.history: list[dict[str, Any]] = []
        self.measured_steps = 0  # since the last reset
        self._tokens: Tensor | int = 0  # since the last reset (a device tensor while training)
        self._skipped_since_log: Tensor | int = 0
        self._running = _Running(aggregation, ema_decay, window)
        self._running_angular: dict[int, _Running] = {n: _Running(aggregation, ema_decay, window) for n in self.block_sizes}
        self._ema_decay, self._window = ema_decay, window
        self._step_at_batch_start: int | None = None
        self._pending = False
        self._rebuild_hook: Any = None

    # ================================================================ public reading API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source, prefix=self.prefix, every_n_steps=self.every_n_steps)

    @property
    def block_influence(self) -> Tensor | None:
        """Current BI of each block, ``(num_layers,)`` float64 on the CPU in the model's current numbering, or
        ``None`` before the first measurement (and right after a :meth:`reset`)."""
        return self._running.mean()

    def angular_distances(self, block_size: int = 1) -> Tensor | None:
        """Angular distance from the input of block l to the output of block ``l + block_size - 1``, for each l:
        ``(num_layers - block_size + 1,)``, or ``None`` while not measured. See :meth:`track_block_size`."""
        running = self._running_angular.get(block_size)
        return None if running is None else running.mean()

    @property
    def num_layers(self) -> int | None:
        return None if self.original_indices is None else len(self.original_indices)

    # ================================================================ API for other callbacks
    def track_block_size(self, block_size: int) -> None:
        """Start tracking angular distances over ``block_size`` contiguous blocks (for a Gromov-style pruner)."""
        _positive_int("block_size", block_size)
        if block_size not in self._running_angular:
            self._running_angular[block_size] = _Running(self.aggregation, self._ema_decay, self._window)
            self.block_sizes = tuple(sorted({*self.block_sizes, block_size}))
            if self.recorder is not None:
                self.recorder.add_block_size(block_size)

    def reset(self) -> None:
        """Forget the aggregated statistics (history is kept), e.g. so the next decision uses fresh BI."""
        self._running.reset()
        for running in self._running_angular.values():
            running.reset()
        if self.recorder is not None:
            self.recorder.reset()
        self.measured_steps = 0
        self._tokens = 0
        self._pending = False

    def layers_removed(self, indices: Sequence[int]) -> None:
        """Tell the monitor that blocks at ``indices`` (current numbering) were deleted from the model.

        Re-hooks the new block list, keeps the original numbering of the survivors, and resets the statistics.
        """
        if self.recorder is not None:
            self.recorder.attach()
            self.original_indices = original_layer_indices(self.recorder.model, self.layers_path)
        elif self.original_indices is not None:
            gone = set(indices)
            self.original_indices = [orig for i, orig in enumerate(self.original_indices) if i not in gone]
        self.reset()

    def flush(self, trainer: pl.Trainer) -> None:
        """Fold the statistics of the step in progress into :attr:`block_influence` now (idempotent).

        Every rank must call it together under DDP (it reduces across ranks).
        """
        if self._pending:
            self._finalize_step(trainer)

    def measure_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """Run a calibration pass now (needs ``calibration_dataloader``) and return the updated BI."""
        if self.calibration_dataloader is None:
            raise ValueError("`measure_now` needs the monitor's `calibration_dataloader`, got None.")
        self._calibrate(trainer, pl_module)
        return self.block_influence

    # ================================================================ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._start_run()
        self._rebuild_hook = register_rebuild_hook(trainer, pl_module, self.layers_path)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_rebuild_hook()
        self._attach(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "validation":
            self._attach(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "calibration" and self.block_influence is None:
            self._calibrate(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        if self.recorder is None or self.source != "train" or trainer.global_step % self.every_n_steps:
            return
        if self.max_tokens_per_step is not None:
            self.recorder.max_tokens_per_forward = max(1, self.max_tokens_per_step // trainer.accumulate_grad_batches)
        self.recorder.enabled = True
        self._pending = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is not None:
            self.recorder.enabled = False
        # The optimizer stepped iff global_step moved; under gradient accumulation that is the last micro-batch.
        stepped = self._step_at_batch_start is not None and trainer.global_step > self._step_at_batch_start
        if not stepped:
            return
        if self._pending:
            self._finalize_step(trainer)
        elif self.source == "calibration" and trainer.global_step % self.every_n_steps == 0:
            self._calibrate(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.recorder is not None:
            self.recorder.enabled = self.source == "validation" and not trainer.sanity_checking

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.enabled = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "validation" and not trainer.sanity_checking and self.recorder is not None:
            self._pending = True
            self._finalize_step(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        self._remove_rebuild_hook()

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "original_indices": self.original_indices,
            "history": self.history,
            "measured_steps": self.measured_steps,
            "tokens_seen": self.tokens_seen,  # an int: reading it syncs, fine at checkpoint time
            "running": self._running.state_dict(),
            "running_angular": {n: r.state_dict() for n, r in self._running_angular.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_indices = state_dict.get("original_indices", self.original_indices)
        self.history = list(state_dict.get("history", []))
        self.measured_steps = state_dict.get("measured_steps", 0)
        self._tokens = state_dict.get("tokens_seen", 0)
        self._running.load_state_dict(state_dict.get("running", {}))
        for n, running_state in state_dict.get("running_angular", {}).items():
            self.track_block_size(int(n))
            self._running_angular[int(n)].load_state_dict(running_state)

    # ================================================================ internals
    def _start_run(self) -> None:
        """A fit starts a new record (a resumed one gets its state back from the checkpoint afterwards)."""
        self._detach()
        self.reset()
        self.original_indices = None
        self.history = []

    def _remove_rebuild_hook(self) -> None:
        if self._rebuild_hook is not None:
            self._rebuild_hook.remove()
            self._rebuild_hook = None

    def _attach(self, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            return
        self.recorder = BlockInfluenceRecorder(pl_module, self.layers_path, self.block_sizes)
        num_layers = self.recorder.num_layers
        if self.original_indices is not None and len(self.original_indices) != num_layers:
            self._detach()
            raise RuntimeError(
                f"BlockInfluenceMonitor: the checkpoint records {len(self.original_indices)} decoder layers"
                f" (original indices {self.original_indices}) but the model has {num_layers}. Resume a pruned run"
                " with the same LayerPruneCallback in the Trainer so it rebuilds the pruned model first."
            )
        self.original_indices = original_layer_indices(pl_module, self.layers_path)

    def _detach(self) -> None:
        if self.recorder is not None:
            self.recorder.detach()
            self.recorder = None
        self._pending = False

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None or self.calibration_dataloader is None:
            return
        model = find_hf_model(pl_module, self.layers_path)  # the HF model takes input_ids/attention_mask; a user's forward may not
        was_training = pl_module.training
        pl_module.eval()
        try:
            with self.recorder.recording(), torch.no_grad():
                batches = itertools.islice(self.calibration_dataloader, self.calibration_batches)
                total = _num_batches(self.calibration_dataloader, self.calibration_batches)
                for batch in progress(batches, total, "BlockInfluenceMonitor: calibration"):
                    model(**_model_inputs(batch, pl_module.device), use_cache=False)
        finally:
            pl_module.train(was_training)
        self._pending = True
        self._finalize_step(trainer)

    def _finalize_step(self, trainer: pl.Trainer) -> None:
        """Reduce this step's sums across ranks, fold them into the running statistics, log, record history."""
        self._pending = False
        recorder = self.recorder
        if recorder is None:
            return
        metric = recorder.block_influence
        with metric.sync_context(should_sync=True):
            total, count, skipped = metric.total.clone(), metric.count.clone(), metric.skipped.clone()
        angular = {}
        for n, m in recorder.angular.items():
            with m.sync_context(should_sync=True):
                angular[n] = (m.total.clone(), m.count.clone())
        recorder.reset()
        # Everything stays on the device until a logging step reads it: no GPU sync on ordinary steps.
        self._running.add(total, count)
        for n, (t, c) in angular.items():
            self._running_angular[n].add(t, c)
        self.measured_steps += 1
        self._tokens = self._tokens + count.max()
        self._skipped_since_log = self._skipped_since_log + skipped.max()
        interval = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if self.source != "train" or trainer.global_step % interval == 0 or trainer.global_step <= 1:
            self._log_and_record(trainer)

    @property
    def tokens_seen(self) -> int:
        """Tokens measured (per block) since the start or the last :meth:`reset`, summed over ranks."""
        return int(self._tokens)

    def _log_and_record(self, trainer: pl.Trainer) -> None:
        skipped, self._skipped_since_log = int(self._skipped_since_log), 0
        if skipped:
            rank_zero_warn(
                f"BlockInfluenceMonitor: skipped {skipped} token(s) with non-finite or zero hidden states up to step"
                f" {trainer.global_step}; BI uses the other tokens."
            )
        bi = self.block_influence
        if bi is None or self.original_indices is None:
            return
        step = trainer.global_step
        self.history.append(
            {"step": step, "original_indices": list(self.original_indices), "block_influence": bi.tolist()}
        )
        finite = bi[torch.isfinite(bi)]
        metrics: dict[str, float] = {f"{self.prefix}/layer_{orig:02d}": float(v) for orig, v in zip(self.original_indices, bi)}
        if finite.numel():
            metrics.update(
                {
                    f"{self.prefix}/min": float(finite.min()),
                    f"{self.prefix}/max": float(finite.max()),
                    f"{self.prefix}/mean": float(finite.mean()),
                    f"{self.prefix}/num_below_threshold": float((finite < self.threshold).sum()),
                }
            )
        metrics[f"{self.prefix}/num_layers"] = float(len(self.original_indices))
        metrics[f"{self.prefix}/skipped_tokens"] = float(skipped)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _num_batches(loader: Any, limit: int | None) -> int | None:
    try:
        return min(len(loader), limit) if limit is not None else len(loader)
    except TypeError:  # an iterable without len
        return limit


def find_monitor(trainer: pl.Trainer) -> BlockInfluenceMonitor | None:
    """The first :class:`BlockInfluenceMonitor` in ``trainer.callbacks``, or ``None``."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, BlockInfluenceMonitor):
            return callback
    return None


def find_or_add_monitor(trainer: pl.Trainer, who: str, layers_path: str | None = None) -> BlockInfluenceMonitor:
    """The Trainer's :class:`BlockInfluenceMonitor`, or a default one appended to ``trainer.callbacks``.

    Call it from a callback's ``setup``: Lightning goes on to call the appended monitor's ``setup`` in the same loop
    and restores its state from a checkpoint like any other callback's (restoring comes later).
    """
    monitor = find_monitor(trainer)
    if monitor is None:
        rank_zero_info(
            f"{who}: no BlockInfluenceMonitor in the Trainer's callbacks; adding a default one"
            " (add your own to choose its settings)."
        )
        monitor = BlockInfluenceMonitor(layers_path=layers_path)
        trainer.callbacks.append(monitor)  # type: ignore[attr-defined]
    return monitor
