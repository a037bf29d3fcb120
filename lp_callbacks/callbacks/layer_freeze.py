"""``LayerFreezeCallback``: domain adaptation with the most important decoder blocks frozen (measured in
``benchmarks/forgetting_benchmark.py``: see the README)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from torch import Tensor

from lp_callbacks.architectures import DecoderStack, decoder_stack
from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor, find_monitor, find_or_add_monitor
from lp_callbacks.callbacks.layer_prune import planned_depth
from lp_callbacks.checkpoint import before_weights_load
from lp_callbacks.distributed import check_strategy_supported
from lp_callbacks.events import DepthEvent
from lp_callbacks.freezing import (
    check_fits_model,
    check_freeze_arguments,
    check_warmup,
    count_frozen,
    decision_due,
    fixed_params,
    freeze_events,
    freeze_metrics,
    present_scores,
    sample_frozen,
    select_frozen,
    training_sizes,
)
from lp_callbacks.measure import measure_depth
from lp_callbacks.param_switch import ParamSwitch
from lp_callbacks.stepping import OptimizerStepTracker
from lp_callbacks.surgery import original_indices, removed_original_indices

__all__ = ["LayerFreezeCallback"]


class LayerFreezeCallback(Callback):
    r"""Freeze the decoder blocks with the highest Block Influence and train only the others.

    *Which* blocks: the ``k`` highest-BI ones, with ``k`` given by exactly one of ``num_frozen`` /
    ``fraction_frozen`` or, equivalently, ``num_trainable`` / ``fraction_trainable`` (that many lowest-BI blocks stay
    trainable). BI comes from one of: ``scores`` (one number per block, e.g. saved by an earlier run), a
    ``calibration_dataloader`` measured at fit start, or the :class:`BlockInfluenceMonitor` over the first
    ``warmup_steps`` training steps (a default monitor is added when the Trainer has none).

    *When*: at fit start (``scores`` or ``calibration_dataloader``) or right after optimizer step ``warmup_steps``;
    with ``reevaluate_every_n_steps`` the choice is made again from the monitor's current BI every that many steps
    (blocks leaving the frozen set train again with fresh optimizer state, in their original param group).

    *Sampling (LISA)*: with ``resample_every_n_steps`` the trainable blocks are drawn at random instead, and drawn
    again every that many steps: ``sampling="uniform"`` (no importance source needed; the default, and what forgot
    least in ``benchmarks/forgetting_benchmark.py``) or ``"low_bi"`` (probability proportional to 1 / BI from the
    one importance source given; with ``warmup_steps`` the monitor's current BI at each draw). Each draw depends
    only on ``seed`` and its number, so every rank draws alike and a resumed run draws what the uninterrupted one
    would have.

    *Effect*: frozen parameters get ``requires_grad=False`` and are removed, in place, from the optimizers'
    ``param_groups`` and ``state`` (nothing can move them, their state memory is released); trainable ones keep
    their state. The embeddings, LM head and final norm are frozen from fit start unless their flags say otherwise;
    other parameters outside the blocks (e.g. a classifier head) are left as they are. Under DDP every rank freezes
    rank 0's choice and the DDP wrapper is rebuilt; with gradient checkpointing and frozen embeddings HF's
    ``enable_input_require_grads`` is turned on. The model stays frozen after ``fit``.

    *With pruning* (:class:`~lp_callbacks.LayerPruneCallback`): the frozen set is kept in original block numbering;
    a removed block leaves the set, the optimizer layout and the records; ``fraction_*`` follows the current depth.

    *Record*: :attr:`record` (the current choice: blocks, scores, parameter counts, optimizer-state bytes) and
    :attr:`history` (every choice), logged as ``{prefix}/...`` and checkpointed; a resume re-applies the frozen set
    before the optimizer state loads. Each change is a ``freeze`` / ``unfreeze`` :class:`~lp_callbacks.DepthEvent`.

    Args:
        num_trainable: keep this many lowest-BI blocks trainable, freeze the rest.
        fraction_trainable: in (0, 1): keep ``round(fraction * L)`` lowest-BI blocks trainable.
        num_frozen: freeze this many highest-BI blocks.
        fraction_frozen: in (0, 1): freeze ``round(fraction * L)`` highest-BI blocks.
        scores: one importance score per decoder block (higher = more important = frozen first); a list or tensor.
        warmup_steps: measure BI with the monitor over this many optimizer steps, then freeze.
        calibration_dataloader: batches (dicts with ``input_ids``, optional ``attention_mask``) measured at fit
            start when neither ``scores`` nor ``warmup_steps`` is given.
        calibration_batches: at most this many calibration batches.
        freeze_embeddings: freeze the input embeddings (and learned position embeddings).
        freeze_lm_head: freeze the output embeddings (LM head). Tied to the input embeddings, the shared weight is
            frozen when either flag is on.
        freeze_final_norm: freeze the norm applied after the last block.
        also_freeze: dotted names of further modules to keep frozen (relative to the HF model, or the LightningModule).
        reevaluate_every_n_steps: re-pick the frozen set every N steps after the first choice (needs the monitor).
        resample_every_n_steps: draw the trainable blocks at random (LISA), again every N steps.
        sampling: how they are drawn: ``"uniform"`` or ``"low_bi"`` (needs an importance source).
        seed: seeds the draws.
        layers_path: dotted path of the decoder block ``ModuleList`` for custom models.
        prefix: logged keys start with it, e.g. ``layer_freeze/trainable_params``.

    Raises:
        ValueError: for a bad argument, at construction; for one that depends on the model (a count that freezes
            every block, ``scores`` of the wrong length, a module that does not exist), at fit start, before the
            first training step.

    Example:
        >>> # scores from an earlier run: freeze the 15 most important of 30 blocks, right away
        >>> freeze = LayerFreezeCallback(num_frozen=15, scores=previous_monitor.block_influence)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        num_trainable: int | None = None,
        fraction_trainable: float | None = None,
        num_frozen: int | None = None,
        fraction_frozen: float | None = None,
        scores: Sequence[float] | Tensor | None = None,
        warmup_steps: int = 0,
        calibration_dataloader: Iterable[Mapping[str, Tensor]] | None = None,
        calibration_batches: int | None = None,
        freeze_embeddings: bool = True,
        freeze_lm_head: bool = True,
        freeze_final_norm: bool = True,
        also_freeze: Sequence[str] = (),
        reevaluate_every_n_steps: int | None = None,
        resample_every_n_steps: int | None = None,
        sampling: Literal["uniform", "low_bi"] = "uniform",
        seed: int = 0,
        layers_path: str | None = None,
        prefix: str = "layer_freeze",
    ) -> None:
        amounts = dict(num_trainable=num_trainable, fraction_trainable=fraction_trainable, num_frozen=num_frozen,
                       fraction_frozen=fraction_frozen)
        flags = dict(freeze_embeddings=freeze_embeddings, freeze_lm_head=freeze_lm_head,
                     freeze_final_norm=freeze_final_norm)
        self.mode, self.amount, self.scores, self.source, self.sampling = check_freeze_arguments(
            amounts, scores=scores, warmup_steps=warmup_steps, calibration_dataloader=calibration_dataloader,
            calibration_batches=calibration_batches, reevaluate_every_n_steps=reevaluate_every_n_steps,
            resample_every_n_steps=resample_every_n_steps, sampling=sampling, seed=seed, flags=flags,
            also_freeze=also_freeze, prefix=prefix,
        )  # source None: uniform sampling
        self.resample_every_n_steps = resample_every_n_steps
        self.seed = seed
        self.warmup_steps = warmup_steps
        self.calibration_dataloader = calibration_dataloader
        self.calibration_batches = calibration_batches
        self.protect = {"embeddings": freeze_embeddings, "lm_head": freeze_lm_head, "final_norm": freeze_final_norm}
        self.also_freeze = tuple(also_freeze)
        self.reevaluate_every_n_steps = reevaluate_every_n_steps
        self.layers_path = layers_path
        self.prefix = prefix

        # what is saved in checkpoints
        self.frozen_blocks: list[int] | None = None  # original numbering; None until the first choice
        self.record: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.depth_events: list[DepthEvent] = []  # read by DepthEfficiencyMonitor
        self._last_decision_step: int | None = None
        self._draws = 0  # LISA draws made
        self._pending: str | None = None  # a choice a removal made due, taken as the next step starts
        self._calibrated: dict[int, float] = {}  # BI measured at fit start, by original block (a LISA weight)
        # bound to one fit (on_fit_start)
        self._monitor: BlockInfluenceMonitor | None = None
        self._stack: DecoderStack | None = None
        self._switch: ParamSwitch | None = None  # applies the frozen set
        self._fixed_names: list[str] = []  # protected modules and also_freeze, as parameter names
        self._steps = OptimizerStepTracker()
        self._load_hook: Any = None

    # ================================================================ public reading API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, amount=self.amount, source=self.source, prefix=self.prefix,
                                        **({"sampling": self.sampling} if self.sampling else {}))

    @property
    def trainable_blocks(self) -> list[int] | None:
        """Blocks that train (original numbering, like :attr:`frozen_blocks`), or ``None`` before the first choice."""
        if self.frozen_blocks is None or self._stack is None:
            return self.record.get("trainable_blocks")
        return [o for o in original_indices(self._stack) if o not in set(self.frozen_blocks)]

    # ================================================================ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.load_state_dict({})  # a fit starts a fresh plan (a second fit too); a resume restores its state later
        check_strategy_supported(trainer, "LayerFreezeCallback")
        self._load_hook = before_weights_load(
            trainer, pl_module, lambda _, checkpoint: self._before_checkpoint_load(trainer, checkpoint), late=True
        )
        check_warmup(self.warmup_steps, trainer.max_steps)
        needs_monitor = bool(self.warmup_steps or self.reevaluate_every_n_steps)
        self._monitor = find_or_add_monitor(trainer, "LayerFreezeCallback", self.layers_path) if needs_monitor else find_monitor(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer, pl_module)
        if self.frozen_blocks is not None:  # resume: the same set, before the optimizer state loads
            self._apply(trainer, self.frozen_blocks)
        elif self.source == "scores":
            self._decide(trainer, pl_module, self._fixed_scores(), "scores")
        elif self.source == "calibration_dataloader":
            bi = measure_depth(self._stack, self.calibration_dataloader, self.calibration_batches).block_influence
            self._calibrated = dict(zip(original_indices(self._stack), bi.tolist(), strict=True))
            self._decide(trainer, pl_module, bi, "calibration")
        elif self.source is None:  # uniform sampling
            self._decide(trainer, pl_module, None, "sampling")
        else:  # warm-up: only the protected modules now, the blocks later
            self._apply(trainer, [])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._steps.batch_started(trainer)
        # Choices that make blocks trainable again are taken as a step starts, never right before a checkpoint: a
        # checkpoint then never holds a trainable parameter without optimizer state (FSDP2's loader refuses one).
        if self.frozen_blocks is not None and (self._pending or self._decision_due(trainer.global_step)):
            scores, source = (self._last_scores(), self._pending) if self._pending else self._decision_input(trainer)
            self._pending = None
            self._decide(trainer, pl_module, scores, source)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._steps.stepped(trainer):
            return
        if self.frozen_blocks is None and self._decision_due(trainer.global_step):  # the end of the warm-up
            self._decide(trainer, pl_module, *self._decision_input(trainer))
        self._log(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()
        self.teardown(trainer, pl_module, "fit")  # a failed fit gets no teardown

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "frozen_blocks": self.frozen_blocks,
            "last_decision_step": self._last_decision_step,
            "draws": self._draws,
            "pending": self._pending,
            "calibrated": self._calibrated,
            "record": self.record,
            "history": self.history,
            "depth_events": [e.to_dict() for e in self.depth_events],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        blocks = state_dict.get("frozen_blocks")
        self.frozen_blocks = None if blocks is None else [int(i) for i in blocks]
        self._last_decision_step = state_dict.get("last_decision_step")
        self._draws = int(state_dict.get("draws", 0))
        self._pending = state_dict.get("pending")
        self._calibrated = {int(k): float(v) for k, v in state_dict.get("calibrated", {}).items()}
        self.record = dict(state_dict.get("record", {}))
        self.history = list(state_dict.get("history", []))
        self.depth_events = [DepthEvent.from_dict(d) for d in state_dict.get("depth_events", [])]

    def _before_checkpoint_load(self, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
        """FSDP2 loads a checkpoint after ``on_fit_start`` built the optimizers: its frozen set is applied first, so
        that the optimizer state fits (elsewhere the checkpoint loads before, and Lightning restores this state)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None or not trainer.strategy.restore_checkpoint_after_setup:
            return
        self.load_state_dict(state)  # Lightning loads the same again later
        self._follow_removals(trainer, trainer.lightning_module)  # a pruner rebuilt the pruned model just before
        if self.frozen_blocks is not None:
            self._apply(trainer, self.frozen_blocks)

    # ================================================================ blocks removed by a LayerPruneCallback
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._switch is not None:  # the optimizer state loaded (a resume) since on_fit_start: new group objects
            self._switch.refresh_groups(trainer.optimizers)
        final_depth = planned_depth(trainer)
        if final_depth is not None:  # the count must still leave a trainable block at the pruned depth
            count_frozen(self.mode, self.amount, final_depth)

    def on_before_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, current_indices: list[int]) -> None:
        """The configured layouts for the removal: :meth:`ParamSwitch.restore_layouts`."""
        if self._switch is not None:
            self._switch.restore_layouts(trainer.optimizers)

    def on_after_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, original_layers: list[int]) -> None:
        """Blocks left the model: the frozen set keeps the survivors (original numbering), the layouts lose the
        removed parameters, and later decisions pick among the blocks that exist."""
        self._follow_removals(trainer, pl_module)
        self._apply(trainer, self.frozen_blocks or [])  # in the warm-up too: the fixed parameters leave again
        if self.frozen_blocks is None:
            return
        if self.sampling is not None or not self.trainable_blocks:  # draw again / no block left to train
            if self.sampling is None:
                rank_zero_warn(f"LayerFreezeCallback: the removal of blocks {original_layers} left no trainable block;"
                               " the frozen set is chosen again from the last scores of the blocks left.")
            self._pending = "resampling" if self.sampling else "removal"  # before the next step
        self.record.update(frozen_blocks=list(self.frozen_blocks), trainable_blocks=self.trainable_blocks,
                           original_indices=original_indices(self._stack))  # type: ignore[arg-type]

    def _follow_removals(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Drop removed blocks from the frozen set; :meth:`ParamSwitch.follow_removals`."""
        if self._stack is None:
            return
        present = set(original_indices(self._stack))
        if self.frozen_blocks is not None:
            self.frozen_blocks = [o for o in self.frozen_blocks if o in present]
        assert self._switch is not None
        self._switch.follow_removals(trainer, {id(p) for p in pl_module.parameters()})

    # ================================================================ internals: binding
    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find blocks, protected modules and optimizer layout; validate everything that needs the model."""
        stack = decoder_stack(pl_module, self.layers_path)
        num_layers = len(stack.layers)
        count_frozen(self.mode, self.amount, num_layers)  # a count that freezes every block is refused now
        check_fits_model(self.scores, self.frozen_blocks, original_indices(stack), removed_original_indices(stack))
        fixed = fixed_params(stack, pl_module, self.protect, self.also_freeze)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._fixed_names = sorted(names.get(id(p), "?") for p in fixed)
        self._stack = stack
        self._switch = ParamSwitch(stack, fixed, trainer.optimizers, self._switch.frozen if self._switch else None)

    # ================================================================ internals: deciding
    def _decision_due(self, step: int) -> bool:
        return decision_due(step, decided=self.frozen_blocks is not None, source=self.source,
                            warmup_steps=self.warmup_steps, last_step=self._last_decision_step,
                            every=self.resample_every_n_steps or self.reevaluate_every_n_steps)

    def _decision_input(self, trainer: pl.Trainer) -> tuple[Tensor | None, str]:
        """The scores a decision due now rests on, and the name of the decision."""
        if self.frozen_blocks is None or self.sampling is None:  # the end of the warm-up, or a re-evaluation
            return self._monitor_scores(trainer), "warmup" if self.frozen_blocks is None else "reevaluation"
        if self.source == "scores":
            return self._fixed_scores(), "resampling"
        if self.source == "calibration_dataloader":
            return present_scores(self._calibrated, original_indices(self._stack)), "resampling"
        return (None if self.source is None else self._monitor_scores(trainer)), "resampling"

    def _last_scores(self) -> Tensor | None:
        """The last decision's scores of the blocks that exist now (``None`` when it had none: uniform sampling)."""
        last = self.history[-1] if self.history else {}  # as decided (the record follows removals since)
        if not last.get("scores"):
            return None
        by_original = dict(zip(last["original_indices"], last["scores"], strict=True))
        return present_scores(by_original, original_indices(self._stack))  # type: ignore[arg-type]

    def _fixed_scores(self) -> Tensor:
        """The user's ``scores`` of the blocks that exist now."""
        assert self.scores is not None and self._stack is not None
        return self.scores[original_indices(self._stack)]

    def _monitor_scores(self, trainer: pl.Trainer) -> Tensor:
        assert self._monitor is not None  # set in setup whenever warm-up or re-evaluation is on
        return self._monitor.measured_block_influence(trainer, "LayerFreezeCallback", f"by step {trainer.global_step}")

    def _decide(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: Tensor | None, source: str
    ) -> None:
        assert self._stack is not None and (scores is not None or self.sampling == "uniform")
        num_layers = len(self._stack.layers)
        if scores is not None and len(scores) != num_layers:
            raise RuntimeError(f"LayerFreezeCallback: got {len(scores)} block scores for {num_layers} decoder blocks.")
        original = original_indices(self._stack)
        count = count_frozen(self.mode, self.amount, num_layers)
        if self.sampling is None:
            positions = select_frozen(scores, count)
        else:
            positions = sample_frozen(num_layers, count, self.seed, self._draws, scores)
            self._draws += 1
        chosen = [original[i] for i in positions]
        before = set(self.frozen_blocks or [])
        self.frozen_blocks = trainer.strategy.broadcast(chosen, src=0)  # every rank freezes rank 0's choice
        self._apply(trainer, self.frozen_blocks)
        by_original = {} if scores is None else {o: float(scores[i]) for i, o in enumerate(original)}
        self.depth_events += freeze_events(trainer.global_step, source, before, self.frozen_blocks, original, by_original)
        self._last_decision_step = trainer.global_step
        self.record = self._describe(trainer, pl_module, scores, source)
        self.history.append(dict(self.record))
        (rank_zero_debug if source == "resampling" else rank_zero_info)(
            f"LayerFreezeCallback: step {trainer.global_step} ({source}): frozen blocks {self.frozen_blocks},"
            f" trainable blocks {self.record['trainable_blocks']},"
            f" trainable params {self.record['trainable_params']:,}."
        )

    # ================================================================ internals: applying
    def _apply(self, trainer: pl.Trainer, originals: Sequence[int]) -> None:
        """:meth:`ParamSwitch.apply` to the blocks with these original indices."""
        assert self._switch is not None and self._stack is not None
        wanted = set(originals)
        self._switch.apply(trainer, [i for i, o in enumerate(original_indices(self._stack)) if o in wanted])

    def _release(self) -> None:
        if self._switch is not None:
            self._switch.release()

    # ================================================================ internals: recording
    def _describe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: Tensor | None, source: str
    ) -> dict[str, Any]:
        assert self._stack is not None and self.frozen_blocks is not None
        return {
            "step": trainer.global_step,
            "source": source,
            "scores": [] if scores is None else [float(s) for s in scores],
            **({"draw": self._draws - 1} if self.sampling else {}),
            "frozen_blocks": list(self.frozen_blocks),
            "trainable_blocks": self.trainable_blocks,
            "original_indices": original_indices(self._stack),
            "frozen_modules": list(self._fixed_names),
            **training_sizes(pl_module, trainer.optimizers),
        }

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sizes = training_sizes(pl_module, trainer.optimizers)
        if self.record:
            self.record.update(sizes)  # optimizer state fills in lazily after the first steps
        num_layers = len(self._stack.layers) if self._stack is not None else 0
        metrics = freeze_metrics(self.prefix, sizes, num_layers, len(self.frozen_blocks or []))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
