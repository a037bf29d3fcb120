"""``BlockInfluenceMonitor``: Block Influence of every decoder block, measured while the model trains."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lp_callbacks.checkpoint import before_weights_load, restore_pruned_architecture
from lp_callbacks.depth_stats import bi_log_metrics
from lp_callbacks.measure import calibration_pass
from lp_callbacks.metrics import BIHistory, RunningMean
from lp_callbacks.recorder import BlockInfluenceRecorder
from lp_callbacks.stepping import OptimizerStepTracker
from lp_callbacks.surgery import original_indices
from lp_callbacks.validation import check_fraction, check_int, check_number

__all__ = ["BlockInfluenceMonitor", "find_monitor", "find_or_add_monitor"]

_SOURCES = ("train", "validation", "calibration")
_AGGREGATIONS = ("cumulative", "ema", "window")


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
        max_tokens_per_step: token budget per measured training step (evenly spaced positions, padding among them
            left out; no RNG used), ``source="train"`` only. ``None``: all.
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
        log_every_n_steps: log every N steps (``None``: the Trainer's ``log_every_n_steps``). :attr:`history`
            records every measured step whatever the cadence (at most :data:`~lp_callbacks.metrics.HISTORY_SIZE` records, evenly thinned).
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
        check_int("every_n_steps", every_n_steps, minimum=1)
        check_int("max_tokens_per_step", max_tokens_per_step, minimum=1, allow_none=True)
        check_int("window", window, minimum=1)
        check_int("calibration_batches", calibration_batches, minimum=1, allow_none=True)
        check_int("log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {_AGGREGATIONS}, got {aggregation!r}.")
        check_fraction("ema_decay", ema_decay)
        if source not in _SOURCES:
            raise ValueError(f"`source` must be one of {_SOURCES}, got {source!r}.")
        if source == "calibration" and calibration_dataloader is None:
            raise ValueError("`source='calibration'` needs `calibration_dataloader`, got None.")
        if max_tokens_per_step is not None and source != "train":
            raise ValueError(
                f"`max_tokens_per_step` budgets the tokens of a training step: it needs source='train', got"
                f" source={source!r} (bound that pass with `calibration_batches` or the Trainer's `limit_val_batches`)."
            )
        for n in block_sizes:
            check_int("block_sizes", n, minimum=1)
        check_number("threshold", threshold, 0, 2)  # the range of BI
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
        self._history = BIHistory()
        self._last_log_step = 0
        self.measured_steps = 0  # since the last reset
        self._tokens: Tensor | int = 0  # since the last reset (a device tensor while training)
        self._skipped_since_log: Tensor | int = 0
        self._running = RunningMean(aggregation, ema_decay, window)
        self._running_angular: dict[int, RunningMean] = {n: RunningMean(aggregation, ema_decay, window) for n in self.block_sizes}
        self._steps = OptimizerStepTracker()
        self._pending = False
        self._rebuild_hook: Any = None  # rebuilds a pruned checkpoint's architecture before its weights load

    # ================================================================ public reading API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source, prefix=self.prefix, every_n_steps=self.every_n_steps)

    @property
    def block_influence(self) -> Tensor | None:
        """Current BI of each block, ``(num_layers,)`` float64 on the CPU in the model's current numbering, or
        ``None`` before the first measurement (and right after a :meth:`reset`). Reading it syncs with the GPU."""
        return _cpu(self._running.mean())

    def angular_distances(self, block_size: int = 1) -> Tensor | None:
        """Angular distance from the input of block l to the output of block ``l + block_size - 1``, for each l:
        ``(num_layers - block_size + 1,)``, or ``None`` while not measured. See :meth:`track_block_size`."""
        running = self._running_angular.get(block_size)
        return None if running is None else _cpu(running.mean())

    @property
    def history(self) -> list[dict[str, Any]]:
        """``{"step", "original_indices", "block_influence"}`` of every measured step (evenly thinned to at most
        :data:`~lp_callbacks.metrics.HISTORY_SIZE` records), oldest first; ``block_influence`` in the order of ``original_indices``."""
        return self._history.records()

    @property
    def num_layers(self) -> int | None:
        return None if self.original_indices is None else len(self.original_indices)

    # ================================================================ API for other callbacks
    def track_block_size(self, block_size: int) -> None:
        """Start tracking angular distances over ``block_size`` contiguous blocks (for a Gromov-style pruner)."""
        check_int("block_size", block_size, minimum=1)
        if block_size not in self._running_angular:
            self._running_angular[block_size] = RunningMean(self.aggregation, self._running.ema_decay, self._running.window)
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
            self.original_indices = original_indices(self.recorder.stack)
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

    def measured_block_influence(self, trainer: pl.Trainer, needed_by: str, when: str) -> Tensor:
        """:attr:`block_influence` with the step in progress folded in (:meth:`flush`: every rank calls it
        together); raises, saying who needed it and when, while nothing was measured."""
        self.flush(trainer)
        scores = self.block_influence
        if scores is None:
            raise RuntimeError(
                f"{needed_by}: the BlockInfluenceMonitor measured no Block Influence {when} (its"
                f" every_n_steps={self.every_n_steps}, source={self.source!r}); leave at least one measured step"
                " before it: lower every_n_steps or measure longer."
            )
        return scores

    # ================================================================ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._start_run()
        self._rebuild_hook = None
        if not _has_pruner(trainer):  # a LayerPruneCallback rebuilds it itself, with its records and plan
            rebuild = functools.partial(restore_pruned_architecture, layers_path=self.layers_path)
            self._rebuild_hook = before_weights_load(trainer, pl_module, rebuild)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "validation":
            self._attach(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.source == "calibration" and self.block_influence is None:
            self._calibrate(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._steps.batch_started(trainer)
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
        if not self._steps.stepped(trainer):
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
            self._finalize_step(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        if self._rebuild_hook is not None:
            self._rebuild_hook.remove()

    on_exception = teardown  # a failed fit gets no teardown: nothing of this fit may outlive it

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "original_indices": self.original_indices,
            "history": self.history,
            "history_stride": self._history.stride,
            "history_count": self._history.count,
            "last_log_step": self._last_log_step,
            "measured_steps": self.measured_steps,
            "tokens_seen": self.tokens_seen,  # an int: reading it syncs, fine at checkpoint time
            "running": self._running.state_dict(),
            "running_angular": {n: r.state_dict() for n, r in self._running_angular.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_indices = state_dict.get("original_indices", self.original_indices)
        self._history = BIHistory(
            state_dict.get("history", []), state_dict.get("history_stride", 1), state_dict.get("history_count", 0)
        )
        self._last_log_step = state_dict.get("last_log_step", 0)
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
        self._history = BIHistory()
        self._last_log_step = 0

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
        self.original_indices = original_indices(self.recorder.stack)

    def _detach(self) -> None:
        if self.recorder is not None:
            self.recorder.detach()
            self.recorder = None
        self._pending = False

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None or self.calibration_dataloader is None:
            return
        calibration_pass(self.recorder, self.calibration_dataloader, self.calibration_batches,
                         "BlockInfluenceMonitor: calibration")
        self._finalize_step(trainer)

    def _finalize_step(self, trainer: pl.Trainer) -> None:
        """Reduce this step's sums across ranks, fold them into the running statistics, log, record history."""
        self._pending = False
        recorder = self.recorder
        assert recorder is not None  # every caller holds one: a pending step implies a recorder (_detach clears both)
        (total, count, skipped), angular = recorder.take_sums()
        # Everything stays on the device until a logging step reads it: no GPU sync on ordinary steps.
        self._running.add(total, count)
        for n, (t, c) in angular.items():
            self._running_angular[n].add(t, c)
        self.measured_steps += 1
        self._tokens = self._tokens + count.max()
        self._skipped_since_log = self._skipped_since_log + skipped.max()
        step = trainer.global_step
        if self.original_indices is not None:
            self._history.add(step, self.original_indices, self._running.mean())  # type: ignore[arg-type]
        interval = self.log_every_n_steps or trainer.log_every_n_steps or 1
        # log when a multiple of the interval was reached since the last log (measured steps need not hit one)
        if self.source != "train" or step <= 1 or step // interval > self._last_log_step // interval:
            self._log(trainer)

    @property
    def tokens_seen(self) -> int:
        """Tokens measured (per block) since the start or the last :meth:`reset`, summed over ranks."""
        return int(self._tokens)

    def _log(self, trainer: pl.Trainer) -> None:
        self._last_log_step = trainer.global_step
        skipped, self._skipped_since_log = int(self._skipped_since_log), 0
        if skipped:
            rank_zero_warn(
                f"BlockInfluenceMonitor: skipped {skipped} token(s) with non-finite or zero hidden states up to step"
                f" {trainer.global_step}; BI uses the other tokens."
            )
        bi = self.block_influence
        if bi is None or self.original_indices is None:
            return
        metrics = bi_log_metrics(self.prefix, self.original_indices, bi, self.threshold)
        metrics[f"{self.prefix}/skipped_tokens"] = float(skipped)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _cpu(values: Tensor | None) -> Tensor | None:
    return None if values is None else values.cpu()


def _has_pruner(trainer: pl.Trainer) -> bool:
    from lp_callbacks.callbacks.layer_prune import LayerPruneCallback  # it imports this module

    return any(isinstance(c, LayerPruneCallback) for c in trainer.callbacks)  # type: ignore[attr-defined]


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
