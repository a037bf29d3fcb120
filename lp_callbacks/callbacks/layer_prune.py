"""``LayerPruneCallback``: remove redundant decoder blocks at scheduled points, and keep training."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lp_callbacks.architectures import find_hf_model, get_decoder_layers
from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor, find_monitor, find_or_add_monitor
from lp_callbacks.checkpoint import load_checkpoint, prune_states, removal_records, restore_pruned_architecture
from lp_callbacks.distributed import check_strategy_supported, rebuild_ddp
from lp_callbacks.events import DepthEvent
from lp_callbacks.export import check_export_dir, save_export
from lp_callbacks.schedules import GradualSchedule, PruneSchedule, split_evenly, unmeasured_events
from lp_callbacks.selection import CRITERIA, best_contiguous_block, last_layers, lowest_scores, random_layers
from lp_callbacks.surgery import (
    check_removal_supported,
    drop_emptied_param_groups,
    drop_layers,
    drop_optimizer_params,
    original_layer_indices,
)

__all__ = ["LayerPruneCallback"]

_EXPORT_WHEN = ("fit_end", "event", "both", "never")


def _nonneg_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}.")


def _model_exists(pl_module: nn.Module, layers_path: str | None) -> bool:
    """``False`` when the blocks are not there yet because the module builds its model in ``configure_model``."""
    try:
        get_decoder_layers(pl_module, layers_path)
    except ValueError:
        if is_overridden("configure_model", pl_module):
            return False
        raise
    return True


def _drop_from_optimizer(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, dead: list[nn.Parameter]) -> None:
    """Forget removed parameters; groups they leave empty go too (with their LR scheduler entries)."""
    filled = [g for g, group in enumerate(optimizer.param_groups) if group["params"]]
    drop_optimizer_params(optimizer, dead)
    emptied = [g for g in filled if not optimizer.param_groups[g]["params"]]
    if emptied:
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        drop_emptied_param_groups(optimizer, emptied, schedulers)


class LayerPruneCallback(Callback):
    r"""Delete the least important decoder blocks at scheduled points of a run; training goes on and heals the model.

    At each event the blocks are chosen from Block Influence measured on the *current* model since the previous
    event (by the :class:`~lp_callbacks.BlockInfluenceMonitor` in the Trainer, created when absent), removed
    physically with :func:`~lp_callbacks.surgery.drop_layers` (config, ``layer_idx``, per-layer fields kept
    consistent), dropped from the optimizers in place (survivors keep their Adam moments, the LR scheduler keeps
    its place), and, under DDP, every rank removes the blocks rank 0 chose and the wrapper is rebuilt.
    A resumed run (``fit(ckpt_path=...)``) rebuilds the pruned architecture in ``setup``, before the weights load.

    Args:
        num_layers: total number of blocks to remove over all events.
        fraction: or the total as a fraction of the original depth, in (0, 1).
        layers_per_event: or the number removed at each event (total = this x number of events).
        at_steps: events after these optimizer steps (``trainer.global_step`` values; exact under accumulation).
        at_epochs: or at the end of these epochs (0-based).
        gradual: or a :class:`~lp_callbacks.schedules.GradualSchedule` (or dict ``start_step``, ``end_step``,
            ``num_events``) spreading the removals over a range of steps.
        criterion: ``"block_influence"`` (ShortGPT: lowest BI), ``"angular"`` (Gromov: the contiguous run with the
            smallest angular distance between its input and output), ``"last"`` (the deepest blocks, a baseline) or
            ``"random"`` (a baseline, seeded by ``seed``).
        min_layers: floor: never fewer blocks than this.
        protect_first: the first N original blocks are never removed (the first block of an LLM has BI ~ 1).
        protect_last: the last N original blocks are never removed.
        protected_layers: more original block indices never removed.
        seed: seed of the ``"random"`` criterion.
        export_dir: where to ``save_pretrained`` the pruned model (with ``tokenizer`` and ``lp_pruning.json``).
        export_when: ``"fit_end"`` (to ``export_dir``), ``"event"`` (to ``<export_dir>_step_<k>`` after each event),
            ``"both"`` or ``"never"``. Each export is written to a temporary directory first, then renamed.
        tokenizer: saved next to the exported model when given.
        layers_path: dotted path of the block list for custom models.

    Example:
        >>> prune = LayerPruneCallback(num_layers=6, at_steps=[200, 400], export_dir="pruned")
        >>> trainer = pl.Trainer(callbacks=[BlockInfluenceMonitor(), prune], max_steps=1000)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule)  # doctest: +SKIP
        >>> prune.removed[0]["original_layers"]  # doctest: +SKIP
        [14, 21, 25]
    """

    def __init__(
        self,
        num_layers: int | None = None,
        fraction: float | None = None,
        layers_per_event: int | None = None,
        at_steps: Sequence[int] | None = None,
        at_epochs: Sequence[int] | None = None,
        gradual: GradualSchedule | Mapping[str, int] | None = None,
        criterion: Literal["block_influence", "angular", "last", "random"] = "block_influence",
        min_layers: int = 1,
        protect_first: int = 1,
        protect_last: int = 1,
        protected_layers: Sequence[int] = (),
        seed: int = 0,
        export_dir: str | os.PathLike | None = None,
        export_when: Literal["fit_end", "event", "both", "never"] = "fit_end",
        tokenizer: Any = None,
        layers_path: str | None = None,
    ) -> None:
        amounts = {k: v for k, v in (("num_layers", num_layers), ("fraction", fraction), ("layers_per_event", layers_per_event)) if v is not None}
        if len(amounts) != 1:
            raise ValueError(f"give exactly one of `num_layers`, `fraction` or `layers_per_event`, got {sorted(amounts) or 'none'}.")
        for name in ("num_layers", "layers_per_event"):
            value = amounts.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1):
            raise ValueError(f"`fraction` must be a number in (0, 1), got {fraction!r}.")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
        if isinstance(min_layers, bool) or not isinstance(min_layers, int) or min_layers < 1:
            raise ValueError(f"`min_layers` must be a positive int, got {min_layers!r}.")
        _nonneg_int("protect_first", protect_first)
        _nonneg_int("protect_last", protect_last)
        for i in protected_layers:
            _nonneg_int("protected_layers", i)
        if export_when not in _EXPORT_WHEN:
            raise ValueError(f"`export_when` must be one of {_EXPORT_WHEN}, got {export_when!r}.")
        if export_dir is None and export_when != "fit_end":
            raise ValueError(f"`export_when={export_when!r}` needs `export_dir`, got None.")

        self.schedule = PruneSchedule.from_args(at_steps, at_epochs, gradual)
        self.num_layers, self.fraction, self.layers_per_event = num_layers, fraction, layers_per_event
        self.criterion = criterion
        self.min_layers = min_layers
        self.protect_first, self.protect_last = protect_first, protect_last
        self.protected_layers = tuple(protected_layers)
        self.seed = seed
        self.export_dir = Path(export_dir).expanduser() if export_dir is not None else None
        self.export_when = export_when
        self.tokenizer = tokenizer
        self.layers_path = layers_path

        self.original_num_layers: int | None = None
        self._model: nn.Module | None = None  # the LightningModule, bound in setup
        self.plan: dict[str, int] = {}  # event id -> blocks to remove
        self.removed: list[dict[str, Any]] = []  # one record per event that fired
        self.depth_events: list[DepthEvent] = []  # read by DepthEfficiencyMonitor
        self._monitor: BlockInfluenceMonitor | None = None
        self._step_at_batch_start: int | None = None
        self._resume_hook: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule.event_ids(), criterion=self.criterion)

    @property
    def original_indices(self) -> list[int] | None:
        """Original index of each current block, read from the model (so it also sees another pruner's removals)."""
        return None if self._model is None else original_layer_indices(self._model, self.layers_path)

    @property
    def done_events(self) -> list[str]:
        return [r["event"] for r in self.removed]

    # ================================================================ setup: validate, rebuild on resume
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # In every stage, a checkpoint being loaded (fit resume, validate/test/predict with ckpt_path) holds the
        # pruned model's weights: a pre-hook on the module's load_state_dict rebuilds that architecture just before
        # Lightning loads them (strictly), which is after setup and configure_model.
        self._resume_hook = pl_module.register_load_state_dict_pre_hook(self._before_weights_load(trainer, stage))
        if stage != "fit":
            return
        check_strategy_supported(trainer, "LayerPruneCallback")
        self._start_run()
        self._monitor = self._find_or_add_monitor(trainer)
        self._model = pl_module
        if self.export_dir is not None:
            self.export_dir = check_export_dir(self.export_dir)
            self._check_event_export_dirs()
        if _model_exists(pl_module, self.layers_path):
            self._bind(trainer, pl_module)
        # else: the model is built in configure_model; bound in the pre-hook (resume) or in on_fit_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_resume_hook()
        if self.original_num_layers is None:
            self._bind(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_steps_reachable(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_resume_hook()

    def _remove_resume_hook(self) -> None:
        if self._resume_hook is not None:
            self._resume_hook.remove()
            self._resume_hook = None

    def _start_run(self) -> None:
        """A fit starts a new plan: nothing of an earlier fit of this object carries over (a resume restores it)."""
        self.original_num_layers = None
        self.plan = {}
        self.removed = []
        self.depth_events = []

    def _before_weights_load(self, trainer: pl.Trainer, stage: str):
        def hook(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            if self._resume_hook is None:  # once (removing the handle here would mutate the hooks being iterated)
                return
            self._resume_hook = None
            checkpoint = load_checkpoint(trainer.ckpt_path) if trainer.ckpt_path else None  # set by now
            if checkpoint is None:
                return
            if stage == "fit":
                if self.original_num_layers is None:  # the model came from configure_model: bind it at full depth
                    self._bind(trainer, module)
                self._restore_own_state(trainer, checkpoint)
            restore_pruned_architecture(module, checkpoint, self.layers_path)
            if stage == "fit":
                self._make_plan(trainer, resumed_at=(checkpoint.get("global_step", 0), checkpoint.get("epoch", 0)))
            if removal_records(checkpoint):
                rank_zero_info(f"LayerPruneCallback: rebuilt the pruned model from the checkpoint ({len(self.original_indices or [])} blocks).")

        return hook

    def _restore_own_state(self, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
        """This callback's records, found under its state key, or under the one key left over after an edit."""
        states = prune_states(checkpoint)
        if self.state_key in states:
            self.load_state_dict(states[self.state_key])  # Lightning loads the same again later
            return
        current = {c.state_key for c in trainer.callbacks if isinstance(c, LayerPruneCallback)}  # type: ignore[attr-defined]
        orphans = {k: v for k, v in states.items() if k not in current}
        unmatched = [c for c in trainer.callbacks if isinstance(c, LayerPruneCallback) and c.state_key not in states]  # type: ignore[attr-defined]
        if len(orphans) == 1 and len(unmatched) == 1:  # arguments edited since the checkpoint: same callback
            self.load_state_dict(next(iter(orphans.values())))
        elif orphans:
            raise ValueError(
                f"LayerPruneCallback: the checkpoint holds pruning state under {sorted(orphans)}, which matches none"
                f" of this Trainer's LayerPruneCallbacks {sorted(current)}. With several pruners, resume with the"
                " arguments they were saved with."
            )

    def _find_or_add_monitor(self, trainer: pl.Trainer) -> BlockInfluenceMonitor | None:
        if self.criterion not in ("block_influence", "angular"):
            return find_monitor(trainer)
        return find_or_add_monitor(trainer, "LayerPruneCallback", self.layers_path)

    def _bind(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Everything that needs the model, checked before any training step."""
        self._model = pl_module
        present = self.original_indices or []
        if present != list(range(len(present))):
            raise ValueError(
                f"LayerPruneCallback: the model was already pruned (it holds original blocks {present}), but this fit"
                " does not resume a checkpoint of that run: pass `ckpt_path` to resume it, or start from a fresh"
                " model; a new plan is made from the full model."
            )
        self.original_num_layers = len(present)
        self._check_surgery(pl_module)
        self._make_plan(trainer)
        self._check_measured(trainer)

    def _check_surgery(self, pl_module: nn.Module) -> None:
        """Family missing from the table, or blocks that cannot be renumbered: refused now, not at the event."""
        reason = check_removal_supported(pl_module, self.layers_path)
        trailing_only = self.criterion == "last" and self.protect_last == 0 and not self.protected_layers
        if reason is not None and not trailing_only:
            raise ValueError(
                f"LayerPruneCallback cannot remove blocks of this model exactly: {reason} Only trailing blocks can go:"
                f" use criterion='last' with protect_last=0 and no protected_layers (got criterion={self.criterion!r},"
                f" protect_last={self.protect_last}, protected_layers={list(self.protected_layers)})."
            )

    def _check_measured(self, trainer: pl.Trainer) -> None:
        """Each BI-driven step event needs a measured training step since the previous event."""
        monitor = self._monitor
        if monitor is None or self.criterion not in ("block_influence", "angular") or monitor.source != "train":
            return
        gaps = unmeasured_events(self.schedule.steps, monitor.every_n_steps)
        if gaps:
            raise ValueError(
                f"LayerPruneCallback: the events at steps {gaps} have no measured step since the previous event"
                f" (BlockInfluenceMonitor every_n_steps={monitor.every_n_steps} measures the steps that start at a"
                f" multiple of it; events at {list(self.schedule.steps)}): lower every_n_steps or move the events."
            )

    def _check_event_export_dirs(self) -> None:
        if self.export_when in ("event", "both"):
            for step in self.schedule.steps:
                check_export_dir(self._event_export_dir(step), argument="export_dir (event export)")

    def _event_export_dir(self, step: int) -> Path:
        assert self.export_dir is not None  # a sibling, not a child: the final export replaces export_dir whole
        return self.export_dir.with_name(f"{self.export_dir.name}_step_{step}")

    def _check_steps_reachable(self, trainer: pl.Trainer) -> None:
        total = trainer.estimated_stepping_batches  # all limits of the run: max_steps, max_epochs, batches, accumulation
        late = [s for s in self.schedule.steps if math.isfinite(total) and s > total and f"step:{s}" not in self.done_events]
        if late:
            raise ValueError(
                f"`at_steps`/`gradual` has steps {late} that this run never reaches: it ends after {int(total)}"
                f" optimizer steps (max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs},"
                f" {trainer.num_training_batches} batches per epoch, accumulate_grad_batches={trainer.accumulate_grad_batches})."
            )

    def _make_plan(self, trainer: pl.Trainer, resumed_at: tuple[int, int] = (0, 0)) -> None:
        """Blocks per event, validated against the model and the Trainer before any training step.

        On resume, the events already applied keep what they removed; the others must lie after the checkpoint and
        share what is left of the total (a plan edited since the checkpoint applies to future events only).
        """
        total_layers = self.original_num_layers or 0
        step, epoch = resumed_at
        done = {r["event"]: len(r["original_layers"]) for r in self.removed}
        future = [e for e in self.schedule.event_ids() if e not in done]
        past = [e for e in future if (e.startswith("step:") and int(e[5:]) <= step) or (e.startswith("epoch:") and int(e[6:]) < epoch)]
        if past:
            self._refuse_plan(f"events {past} lie at or before the checkpoint (step {step}, epoch {epoch}) and never fired")
        already = sum(done.values())
        if self.min_layers >= total_layers:
            raise ValueError(f"`min_layers` must be below the model's {total_layers} decoder layers, got {self.min_layers}.")
        if self.layers_per_event is not None:
            counts = [self.layers_per_event] * len(future)
        else:
            total = self.num_layers if self.num_layers is not None else math.floor(self.fraction * total_layers + 0.5)
            if total < 1:
                raise ValueError(f"`fraction={self.fraction}` of {total_layers} layers removes no layer; raise it.")
            left = total - already
            if left < 0 or (left > 0 and not future):
                self._refuse_plan(f"the total of {total} blocks does not fit the {already} removed already and {len(future)} events to come")
            if left < len(future):
                to_come = " to come" if done else ""
                raise ValueError(f"{left} layer(s) to remove cannot be spread over {len(future)} events{to_come}; give fewer events.")
            counts = split_evenly(left, len(future)) if future else []
        protected = self._protected_original()
        present = self.original_indices or []  # after every pruner's recorded removals were replayed
        removable = len([i for i in present if i not in protected])
        floor = max(self.min_layers, len(protected))
        if sum(counts) > removable or len(present) - sum(counts) < self.min_layers:
            raise ValueError(
                f"cannot remove {already + sum(counts)} of the model's {total_layers} decoder layers: at most"
                f" {already + min(removable, len(present) - self.min_layers)} can go (min_layers={self.min_layers},"
                f" {len(protected)} protected: {sorted(protected)}); {floor} must remain."
            )
        if self.criterion == "angular" and len(set(counts)) > 1:
            raise ValueError(f"`criterion='angular'` removes one contiguous block per event: give a total divisible by the {len(future)} events (got {counts}).")
        max_steps = trainer.max_steps
        late = [s for s in self.schedule.steps if max_steps is not None and max_steps > 0 and s > max_steps]
        if late:
            raise ValueError(f"`at_steps`/`gradual` has steps {late} past the Trainer's max_steps={max_steps}; they would never fire.")
        max_epochs = trainer.max_epochs
        late = [e for e in self.schedule.epochs if max_epochs is not None and max_epochs > 0 and e >= max_epochs]
        if late:
            raise ValueError(f"`at_epochs` has epochs {late} that a run of max_epochs={max_epochs} never ends (epochs are 0-based).")
        self.plan = {**done, **dict(zip(future, counts))}
        if self.criterion == "angular" and self._monitor is not None:
            for block_size in set(counts):
                self._monitor.track_block_size(block_size)  # Gromov needs distances over exactly that many blocks

    def _refuse_plan(self, why: str) -> None:
        applied = {r["event"]: r["original_layers"] for r in self.removed}
        raise ValueError(
            f"LayerPruneCallback: cannot resume with this plan: {why}. The checkpoint's run removed {applied or 'nothing'}"
            f" (criterion {sorted({r['criterion'] for r in self.removed}) or '-'}); the plan now is events"
            f" {self.schedule.event_ids()} removing {self._amount()} with criterion={self.criterion!r}. Resume with"
            " the arguments the run was saved with, or change only events after the checkpoint."
        )

    def _amount(self) -> str:
        if self.layers_per_event is not None:
            return f"layers_per_event={self.layers_per_event}"
        return f"num_layers={self.num_layers}" if self.num_layers is not None else f"fraction={self.fraction}"

    def _protected_original(self) -> set[int]:
        n = self.original_num_layers or 0
        bad = [i for i in self.protected_layers if i >= n]
        if bad:
            raise ValueError(f"`protected_layers` must be original block indices in [0, {n - 1}], got {bad}.")
        return set(range(min(self.protect_first, n))) | set(range(max(0, n - self.protect_last), n)) | set(self.protected_layers)

    # ================================================================ events
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step moved iff the optimizer stepped: under gradient accumulation, only the last micro-batch.
        if self._step_at_batch_start is None or trainer.global_step == self._step_at_batch_start:
            return
        for step in self.schedule.steps:
            event = f"step:{step}"
            if step <= trainer.global_step and event not in self.done_events:
                self._prune(trainer, pl_module, event)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        event = f"epoch:{trainer.current_epoch}"
        if trainer.current_epoch in self.schedule.epochs and event not in self.done_events:
            self._prune(trainer, pl_module, event)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str) -> None:
        started = time.perf_counter()
        count = self.plan[event]
        chosen, scores = self._choose(trainer, count, event)
        chosen = trainer.strategy.broadcast(chosen, src=0)  # every rank removes what rank 0 chose
        scores = trainer.strategy.broadcast(scores, src=0)
        layers = get_decoder_layers(pl_module, self.layers_path)
        dead = [p for i in chosen for p in layers[i].parameters()]
        original = [self.original_indices[i] for i in chosen]
        drop_layers(pl_module, chosen, self.layers_path)
        for optimizer in trainer.optimizers:
            _drop_from_optimizer(trainer, optimizer, dead)
        rebuild_ddp(trainer)
        if self._monitor is not None:
            self._monitor.layers_removed(chosen)  # re-hook; next decision uses BI of the new model only
        seconds = time.perf_counter() - started
        remaining = len(get_decoder_layers(pl_module, self.layers_path))
        record = {
            "event": event, "step": trainer.global_step, "epoch": trainer.current_epoch, "criterion": self.criterion,
            "current_indices": chosen, "original_layers": original, "scores": scores,
            "num_layers_after": remaining, "seconds": seconds,
        }
        self.removed.append(record)
        self.depth_events.append(DepthEvent(step=trainer.global_step, kind="prune", original_layers=original,
                                            scores=scores if len(scores) == len(original) else [],
                                            detail=f"{self.criterion}: -{len(original)} -> {remaining} blocks"))
        rank_zero_info(
            f"LayerPruneCallback: step {trainer.global_step}: removed original blocks {original} ({self.criterion}"
            f" scores {[round(s, 4) for s in scores]}); {remaining} remain; took {seconds:.2f}s."
        )
        for logger in trainer.loggers:
            logger.log_metrics({"prune/num_layers": float(remaining), "prune/event_seconds": seconds}, step=trainer.global_step)
        if self.export_when in ("event", "both") and self.export_dir is not None:
            self.export(trainer, pl_module, self._event_export_dir(trainer.global_step))

    def _choose(self, trainer: pl.Trainer, count: int, event: str) -> tuple[list[int], list[float]]:
        original = self.original_indices or []
        protected = {i for i, o in enumerate(original) if o in self._protected_original()}
        num_layers = len(original)
        if self.criterion == "last":
            return last_layers(num_layers, count, protected), []
        if self.criterion == "random":
            return random_layers(num_layers, count, protected, seed=self.seed + len(self.removed)), []
        monitor = self._monitor
        if monitor is None:
            raise RuntimeError("LayerPruneCallback lost its BlockInfluenceMonitor.")
        monitor.flush(trainer)
        if monitor.tokens_seen == 0:
            raise RuntimeError(
                f"LayerPruneCallback: no real token was measured before event {event!r} (every attention mask was"
                " zero, or every hidden state non-finite, since the previous event): refusing to remove blocks on"
                " missing scores."
            )
        if self.criterion == "block_influence":
            bi = monitor.block_influence
            if bi is None:
                raise RuntimeError(
                    f"LayerPruneCallback: no Block Influence was measured before event {event!r}; leave at least"
                    f" one measured step (monitor every_n_steps={monitor.every_n_steps}) before each event."
                )
            chosen = lowest_scores(bi, count, protected)
            return chosen, [float(bi[i]) for i in chosen]
        monitor.track_block_size(count)
        distances = monitor.angular_distances(count)
        if distances is None:
            raise RuntimeError(f"LayerPruneCallback: no angular distance over {count} blocks measured before event {event!r}.")
        chosen = best_contiguous_block(distances, count, num_layers, protected)
        return chosen, [float(distances[chosen[0]])] * len(chosen)

    # ================================================================ export
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None and self.export_when in ("fit_end", "both"):
            self.export(trainer, pl_module, self.export_dir)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: str | os.PathLike) -> None:
        """``save_pretrained`` the pruned HF model (+ tokenizer, + ``lp_pruning.json``) atomically, on rank 0.

        Only an earlier export of this package (its ``lp_pruning.json``) is ever replaced; a PEFT model is saved
        with its adapters merged, loadable by plain ``from_pretrained``.
        """
        if trainer.is_global_zero:
            started = time.perf_counter()
            rank_zero_info(f"LayerPruneCallback: exporting the pruned model to {directory} ...")
            model = find_hf_model(pl_module, self.layers_path)
            path = save_export(model, directory, self.record(), self.tokenizer, argument="export_dir")
            rank_zero_info(
                f"LayerPruneCallback: exported the {len(self.original_indices or [])}-block model to {path}"
                f" in {time.perf_counter() - started:.1f}s"
            )
        trainer.strategy.barrier("lp_callbacks_export")

    def record(self) -> dict[str, Any]:
        """What was removed, when and why: plain types, as written next to the export."""
        return {
            "original_num_layers": self.original_num_layers,
            "kept_original_layers": self.original_indices,
            "events": self.removed,
            "criterion": self.criterion,
        }

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "original_num_layers": self.original_num_layers,
            "original_indices": self.original_indices,
            "plan": self.plan,
            "removed": self.removed,
            "depth_events": [e.to_dict() for e in self.depth_events],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.removed = [dict(r) for r in state_dict.get("removed", [])]
        self.original_num_layers = state_dict.get("original_num_layers", self.original_num_layers)
        # original_indices stay those of the model, rebuilt before the weights loaded
        self.depth_events = [DepthEvent.from_dict(d) for d in state_dict.get("depth_events", [])]
