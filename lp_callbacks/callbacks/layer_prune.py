"""``LayerPruneCallback``: remove redundant decoder blocks at scheduled points, and keep training."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lp_callbacks.architectures import DecoderStack, decoder_stack
from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor, find_monitor, find_or_add_monitor
from lp_callbacks.checkpoint import before_weights_load, own_prune_state, removal_records, restore_pruned_architecture
from lp_callbacks.distributed import check_strategy_supported, forget_parameters, gather_full_model, is_fsdp2
from lp_callbacks.events import DepthEvent, notify_after_prune, notify_before_prune
from lp_callbacks.export import check_export_dir, save_export
from lp_callbacks.schedules import GradualSchedule, PruneSchedule, plan_removals
from lp_callbacks.selection import CRITERIA, AblationSettings, choose_layers, protected_indices
from lp_callbacks.stepping import OptimizerStepTracker
from lp_callbacks.surgery import check_removal_supported, drop_layers, original_indices
from lp_callbacks.validation import check_amount, check_int

__all__ = ["LayerPruneCallback"]

_EXPORT_WHEN = ("fit_end", "event", "both", "never")
_BY_SCORE = ("block_influence", "angular")  # the criteria that read the BlockInfluenceMonitor


def _stack_if_built(pl_module: nn.Module, layers_path: str | None) -> DecoderStack | None:
    """``None`` when the blocks are not there yet because the module builds its model in ``configure_model``."""
    try:
        return decoder_stack(pl_module, layers_path)
    except ValueError:
        if is_overridden("configure_model", pl_module):
            return None
        raise


def planned_depth(trainer: pl.Trainer) -> int | None:
    """The depth the Trainer's LayerPruneCallbacks will leave at the end of their plans; ``None`` without one."""
    pruners = [c for c in trainer.callbacks if isinstance(c, LayerPruneCallback)]  # type: ignore[attr-defined]
    if not pruners or any(p.original_indices is None for p in pruners):
        return None
    pending = sum(n for p in pruners for event, n in p.plan.items() if event not in p.done_events)
    return len(pruners[0].original_indices or []) - pending


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
        at_steps: events after these optimizer steps (``trainer.global_step`` values; exact under accumulation);
            one int is one event.
        at_epochs: or at the end of these epochs (0-based; one int is one event).
        gradual: or a :class:`~lp_callbacks.schedules.GradualSchedule` (or dict ``start_step``, ``end_step``,
            ``num_events``) spreading the removals over a range of steps.
        criterion: ``"block_influence"`` (ShortGPT: lowest BI), ``"angular"`` (Gromov: the contiguous run with the
            smallest angular distance between its input and output), ``"last"`` (the deepest blocks, a baseline),
            ``"random"`` (a baseline, seeded by ``seed``) or ``"ablation"`` (the blocks whose removal alone changes
            the next-token distributions least, by KL on ``calibration_dataloader``: one forward per block).
        min_layers: floor: never fewer blocks than this.
        protect_first: the first N original blocks are never removed (the first block of an LLM has BI ~ 1).
        protect_last: the last N original blocks are never removed.
        protected_layers: more original block indices never removed.
        seed: seed of the ``"random"`` criterion.
        export_dir: where to ``save_pretrained`` the pruned model (with ``tokenizer`` and ``lp_pruning.json``).
        export_when: ``"fit_end"`` (to ``export_dir``), ``"event"`` (to ``<export_dir>_step_<k>`` after each event),
            ``"both"`` or ``"never"`` (``export_dir`` is then not needed, and not touched when given). Each export is
            written to a temporary directory first, then renamed.
        tokenizer: saved next to the exported model when given.
        layers_path: dotted path of the block list for custom models.
        calibration_dataloader: the batches ``"ablation"`` measures on at each event (unused by the other criteria).
        calibration_batches: at most this many of them per measurement (``None``: all).
        ablation_greedy: ``"ablation"`` one block at a time, re-measured after each choice (SLEB), not all at once.

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
        at_steps: int | Sequence[int] | None = None,
        at_epochs: int | Sequence[int] | None = None,
        gradual: GradualSchedule | Mapping[str, int] | None = None,
        criterion: Literal["block_influence", "angular", "last", "random", "ablation"] = "block_influence",
        min_layers: int = 1,
        protect_first: int = 1,
        protect_last: int = 1,
        protected_layers: Sequence[int] = (),
        seed: int = 0,
        export_dir: str | os.PathLike | None = None,
        export_when: Literal["fit_end", "event", "both", "never"] = "fit_end",
        tokenizer: Any = None,
        layers_path: str | None = None,
        calibration_dataloader: Iterable[Mapping[str, Tensor]] | None = None,
        calibration_batches: int | None = None,
        ablation_greedy: bool = False,
    ) -> None:
        amounts = dict(num_layers=num_layers, fraction=fraction, layers_per_event=layers_per_event)
        self.amount = check_amount(amounts, "how many blocks to remove")  # (name, value) of the one given
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
        check_int("min_layers", min_layers, minimum=1)
        check_int("protect_first", protect_first)
        check_int("protect_last", protect_last)
        for i in protected_layers:
            check_int("protected_layers", i)
        if export_when not in _EXPORT_WHEN:
            raise ValueError(f"`export_when` must be one of {_EXPORT_WHEN}, got {export_when!r}.")
        if export_dir is None and export_when in ("event", "both"):
            raise ValueError(f"`export_when={export_when!r}` needs `export_dir`, got None.")

        self.schedule = PruneSchedule.from_args(at_steps, at_epochs, gradual)
        self.num_layers, self.fraction, self.layers_per_event = num_layers, fraction, layers_per_event
        self.criterion, self.calibration_dataloader = criterion, calibration_dataloader
        self.ablation = AblationSettings.build(criterion, calibration_dataloader, calibration_batches, ablation_greedy)
        self.min_layers = min_layers
        self.protect_first, self.protect_last = protect_first, protect_last
        self.protected_layers = tuple(protected_layers)
        self.seed = seed
        self.export_dir = Path(export_dir).expanduser() if export_dir is not None else None
        self.export_when = export_when
        self.tokenizer = tokenizer
        self.layers_path = layers_path

        self.original_num_layers: int | None = None
        self._stack: DecoderStack | None = None  # the LightningModule's decoder stack, bound in setup
        self.plan: dict[str, int] = {}  # event id -> blocks to remove
        self.removed: list[dict[str, Any]] = []  # one record per event that fired
        self.depth_events: list[DepthEvent] = []  # read by DepthEfficiencyMonitor
        self._monitor: BlockInfluenceMonitor | None = None
        self._steps = OptimizerStepTracker()
        self._resume_hook: Any = None

    @property
    def state_key(self) -> str:  # the class named as such, also for a subclass: checkpoint.prune_states finds it
        return f"LayerPruneCallback{dict(schedule=self.schedule.event_ids(), criterion=self.criterion)!r}"

    @property
    def original_indices(self) -> list[int] | None:
        """Original index of each current block, read from the model (so it also sees another pruner's removals)."""
        return None if self._stack is None else original_indices(self._stack)

    @property
    def done_events(self) -> list[str]:
        return [r["event"] for r in self.removed]

    # ================================================================ setup: validate, rebuild on resume
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # In every stage, a checkpoint being loaded (fit resume, validate/test/predict with ckpt_path) holds the
        # pruned model's weights: a pre-hook on the module's load_state_dict rebuilds that architecture just before
        # Lightning loads them (strictly), which is after setup and configure_model.
        self._resume_hook = before_weights_load(trainer, pl_module, functools.partial(self._load_pruned, trainer, stage))
        if stage != "fit":
            return
        check_strategy_supported(trainer, "LayerPruneCallback", changes_architecture=True)
        self._start_run()
        by_score = self.criterion in _BY_SCORE
        self._monitor = find_or_add_monitor(trainer, "LayerPruneCallback", self.layers_path) if by_score else find_monitor(trainer)
        if self.export_dir is not None and self.export_when != "never":
            self.export_dir = check_export_dir(self.export_dir)
            self._check_event_export_dirs()
        if _stack_if_built(pl_module, self.layers_path) is not None:
            self._bind(trainer, pl_module)
        # else: the model is built in configure_model; bound in the pre-hook (resume) or in on_fit_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.original_num_layers is None:
            self._bind(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        limits = (f"max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs}, {trainer.num_training_batches}"
                  f" batches per epoch, accumulate_grad_batches={trainer.accumulate_grad_batches}")
        # estimated_stepping_batches: all limits of the run (max_steps, max_epochs, batches, accumulation)
        self.schedule.check_reachable(trainer.estimated_stepping_batches, self.done_events, limits)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._resume_hook is not None:
            self._resume_hook.remove()

    on_exception = teardown  # a failed fit gets no teardown: the load wrapper must not outlive it either

    def _start_run(self) -> None:
        """A fit starts a new plan: nothing of an earlier fit of this object carries over (a resume restores it)."""
        self.original_num_layers = None
        self._stack = None
        self.plan = {}
        self.removed = []
        self.depth_events = []

    def _load_pruned(self, trainer: pl.Trainer, stage: str, module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Just before a checkpoint's weights load: this callback's records, then the checkpoint's architecture."""
        if stage == "fit":
            for pruner in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(pruner, LayerPruneCallback) and pruner.original_num_layers is None:
                    pruner._bind(trainer, module)  # a model from configure_model: every pruner binds at full depth
            self._restore_own_state(trainer, checkpoint)
        present = restore_pruned_architecture(module, checkpoint, self.layers_path)
        if stage == "fit":
            self._make_plan(trainer, resumed_at=(checkpoint.get("global_step", 0), checkpoint.get("epoch", 0)))
        if removal_records(checkpoint):
            rank_zero_info(f"LayerPruneCallback: rebuilt the pruned model from the checkpoint ({len(present)} blocks).")

    def _restore_own_state(self, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
        """This callback's records, found under its state key, or under the one key left over after an edit."""
        keys = [c.state_key for c in trainer.callbacks if isinstance(c, LayerPruneCallback)]  # type: ignore[attr-defined]
        state = own_prune_state(checkpoint, self.state_key, keys)
        if state is not None:
            self.load_state_dict(state)  # Lightning loads the same again later

    def _bind(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Everything that needs the model, checked before any training step."""
        self._stack = decoder_stack(pl_module, self.layers_path)
        present = self.original_indices or []
        if present != list(range(len(present))):
            raise ValueError(
                f"LayerPruneCallback: the module's model is already pruned (it holds original blocks {present}), for"
                " example by an earlier `trainer.fit` of this same module object. A fit needs the full-depth model,"
                " also to resume (with `ckpt_path` the pruned architecture is rebuilt from the checkpoint): build a"
                " fresh module and pass it, with `ckpt_path` to continue the pruned run."
            )
        self.original_num_layers = len(present)
        self._check_surgery()
        self._make_plan(trainer)
        monitor = self._monitor  # each BI-driven step event needs a measured training step since the previous one
        if monitor is not None and self.criterion in _BY_SCORE and monitor.source == "train":
            self.schedule.check_measured(monitor.every_n_steps)

    def _check_surgery(self) -> None:
        """Family missing from the table, or blocks that cannot be renumbered: refused now, not at the event."""
        assert self._stack is not None
        reason = check_removal_supported(self._stack)
        trailing_only = self.criterion == "last" and self.protect_last == 0 and not self.protected_layers
        if reason is not None and not trailing_only:
            raise ValueError(
                f"LayerPruneCallback cannot remove blocks of this model exactly: {reason} Only trailing blocks can go:"
                f" use criterion='last' with protect_last=0 and no protected_layers (got criterion={self.criterion!r},"
                f" protect_last={self.protect_last}, protected_layers={list(self.protected_layers)})."
            )

    def _check_event_export_dirs(self) -> None:
        if self.export_when in ("event", "both"):
            for step in self.schedule.steps:
                check_export_dir(self._event_export_dir(step), argument="export_dir (event export)")

    def _event_export_dir(self, step: int) -> Path:
        assert self.export_dir is not None  # a sibling, not a child: the final export replaces export_dir whole
        return self.export_dir.with_name(f"{self.export_dir.name}_step_{step}")

    def _make_plan(self, trainer: pl.Trainer, resumed_at: tuple[int, int] = (0, 0)) -> None:
        """Blocks per event, validated against the model and the Trainer before any training step (a resumed run:
        the events applied keep what they removed, see :func:`~lp_callbacks.schedules.plan_removals`)."""
        self.plan = plan_removals(
            self.schedule, self.amount, self.original_indices or [], self.original_num_layers or 0,
            self._protected_original(), self.min_layers, self.removed, self.criterion, resumed_at,
        )
        self.schedule.check_limits(trainer.max_steps, trainer.max_epochs)
        if self.criterion == "angular" and self._monitor is not None:
            for block_size in {n for event, n in self.plan.items() if event not in self.done_events}:
                self._monitor.track_block_size(block_size)  # Gromov needs distances over exactly that many blocks

    def _protected_original(self) -> set[int]:
        n = self.original_num_layers or 0
        return protected_indices(n, self.protect_first, self.protect_last, self.protected_layers)

    # ================================================================ events
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._steps.batch_started(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._steps.stepped(trainer):
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
        chosen, scores = self._choose(trainer, self.plan[event], event)
        chosen, scores = trainer.strategy.broadcast((chosen, scores), src=0)  # every rank removes what rank 0 chose
        notify_before_prune(trainer, pl_module, chosen)
        original = self._remove(trainer, chosen)
        notify_after_prune(trainer, pl_module, original)
        self._record(trainer, event, chosen, original, scores, time.perf_counter() - started)
        if self.export_when in ("event", "both") and self.export_dir is not None:
            self.export(trainer, pl_module, self._event_export_dir(trainer.global_step))

    def _remove(self, trainer: pl.Trainer, chosen: list[int]) -> list[int]:
        """Remove the blocks at ``chosen`` (current numbering) from the model, the optimizers, the DDP wrapper and
        the monitor's hooks; returns their original indices."""
        stack = self._stack
        assert stack is not None
        dead = [p for i in chosen for p in stack.layers[i].parameters()]
        original = [original_indices(stack)[i] for i in chosen]
        drop_layers(stack, chosen)
        forget_parameters(trainer, dead)
        if self._monitor is not None:
            self._monitor.layers_removed(chosen)  # re-hook; next decision uses BI of the new model only
        return original

    def _record(self, trainer: pl.Trainer, event: str, chosen: list[int], original: list[int], scores: list[float],
                seconds: float) -> None:
        """The event's record and :class:`DepthEvent`, its log line and metrics."""
        remaining = len(self.original_indices or [])
        self.removed.append({
            "event": event, "step": trainer.global_step, "epoch": trainer.current_epoch, "criterion": self.criterion,
            "current_indices": chosen, "original_layers": original, "scores": scores,
            "num_layers_after": remaining, "seconds": seconds,
        })
        self.depth_events.append(DepthEvent(step=trainer.global_step, kind="prune", original_layers=original,
                                            scores=scores if len(scores) == len(original) else [],
                                            detail=f"{self.criterion}: -{len(original)} -> {remaining} blocks"))
        rank_zero_info(
            f"LayerPruneCallback: step {trainer.global_step}: removed original blocks {original} ({self.criterion}"
            f" scores {[round(s, 4) for s in scores]}); {remaining} remain; took {seconds:.2f}s."
        )
        for logger in trainer.loggers:
            logger.log_metrics({"prune/num_layers": float(remaining), "prune/event_seconds": seconds}, step=trainer.global_step)

    def _choose(self, trainer: pl.Trainer, count: int, event: str) -> tuple[list[int], list[float]]:
        original = self.original_indices or []
        protected = {i for i, o in enumerate(original) if o in self._protected_original()}
        seed = self.seed + len(self.removed)
        if self.criterion not in _BY_SCORE:  # "ablation" measures the current model on the calibration batches
            return choose_layers(self.criterion, count, len(original), protected, seed, model=self._stack, ablation=self.ablation)
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
            scores = monitor.measured_block_influence(trainer, "LayerPruneCallback", f"before event {event!r}")
        else:
            monitor.track_block_size(count)
            scores = monitor.angular_distances(count)
            if scores is None:
                raise RuntimeError(f"LayerPruneCallback: no angular distance over {count} blocks measured before event {event!r}.")
        return choose_layers(self.criterion, count, len(original), protected, seed, scores)

    # ================================================================ export
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None and self.export_when in ("fit_end", "both"):
            self.export(trainer, pl_module, self.export_dir)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, directory: str | os.PathLike) -> None:
        """``save_pretrained`` the pruned HF model (+ tokenizer, + ``lp_pruning.json``) atomically, on rank 0.

        Only an earlier export of this package (its ``lp_pruning.json``) is ever replaced; a PEFT model is saved
        with its adapters merged, loadable by plain ``from_pretrained``.
        """
        started = time.perf_counter()
        model: nn.Module | None = decoder_stack(pl_module, self.layers_path).root
        if is_fsdp2(model):  # every rank takes part in gathering the shards
            model = gather_full_model(model, trainer.is_global_zero)
        if trainer.is_global_zero:
            assert model is not None
            rank_zero_info(f"LayerPruneCallback: exporting the pruned model to {directory} ...")
            path = save_export(model, directory, self.export_record(), self.tokenizer, argument="export_dir")
            rank_zero_info(
                f"LayerPruneCallback: exported the {len(self.original_indices or [])}-block model to {path}"
                f" in {time.perf_counter() - started:.1f}s"
            )
        trainer.strategy.barrier("lp_callbacks_export")

    def export_record(self) -> dict[str, Any]:
        """What was removed, when and why: plain types, as written next to the export (``lp_pruning.json``)."""
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
