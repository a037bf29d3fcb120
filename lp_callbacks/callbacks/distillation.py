"""``DistillationCallback``: heal a model being pruned by distilling from its unpruned self, inside the run."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lp_callbacks.architectures import DecoderStack, decoder_stack
from lp_callbacks.distillation import aligned_hidden_pairs, hidden_alignment_loss, kd_loss, next_token_mask
from lp_callbacks.distributed import check_strategy_supported
from lp_callbacks.reference import called_module, fingerprint, frozen_copy, full_depth_copy
from lp_callbacks.surgery import original_indices, removed_original_indices
from lp_callbacks.validation import check_dtype, check_int, check_number

__all__ = ["DistillationCallback"]

_TEACHERS = ("initial", "before_first_prune")
# Forward keyword arguments that are the student's own business, not the teacher's.
_STUDENT_ONLY = ("labels", "past_key_values", "cache", "use_cache", "output_hidden_states", "output_attentions", "return_dict")


class DistillationCallback(Callback):
    r"""Train with ``alpha * KD + (1 - alpha) * LM``: forward KL from a frozen teacher, the unpruned model.

    The student is the model the run trains (and a :class:`~lp_callbacks.LayerPruneCallback` prunes). The teacher
    is a frozen copy of it taken at fit start (``teacher="initial"``), or just before the first removal
    (``"before_first_prune"``: the model adapted to the run's data so far, whole), or a module you give. Until the
    teacher exists the loss is the LM loss unchanged.

    **How the loss is replaced.** A forward hook on the student (the HF model, or its PEFT wrapper) runs the teacher
    on the same inputs whenever the student runs in training mode with gradients and returns a ``loss`` (it was given
    ``labels``), and replaces ``outputs.loss`` by the mixed loss. A ``training_step`` that returns
    ``self.model(**batch, labels=labels).loss`` (like :class:`~lp_callbacks.harness.CausalLMModule`) needs no change.
    A module that computes its own loss calls :meth:`loss` instead, on the outputs of a forward without ``labels``
    (one with them already holds the mixed loss: refused). A training batch whose forward did neither while
    a teacher exists stops the run with an error, rather than training silently without distillation.

    KD is ``T^2 * KL(teacher || student)`` of the next-token distributions over the real positions (labels not
    ``-100``, or the attention mask), computed in fp32 chunks (:func:`~lp_callbacks.distillation.kd_loss`). The terms
    are logged as ``distill/kd_loss``, ``distill/lm_loss`` (also before the teacher exists) and ``distill/hidden_loss``;
    the loss the module logs (``train_loss``) is the mixed one, so give ``DepthEfficiencyMonitor(loss_key=
    "distill/lm_loss")`` for perplexities of the LM loss. With
    ``hidden_weight > 0``, ``hidden_weight * (1 - cos)`` between each surviving block's output and the output of the
    block of the same original index in the teacher is added (a full-depth teacher).

    The teacher is never a submodule of the LightningModule: not in the optimizer, not wrapped by DDP, not exported.
    It runs without autograd, in ``teacher_dtype`` on ``teacher_device``. Under DDP every rank holds the same teacher
    (checked). Checkpoints hold a copied teacher's weights (in ``teacher_dtype``), so a resume continues exactly; a
    given teacher module is not saved, and a resume with a different one is refused.

    Args:
        teacher: ``"initial"`` (the default: in the healing benchmark it kept out-of-domain text best, 33.3
            against 35.4 perplexity for ``"before_first_prune"``, in-domain alike), ``"before_first_prune"``, or an
            ``nn.Module`` (an HF causal LM with the student's vocabulary), which is frozen and moved in place.
        alpha: weight of KD in ``[0, 1]`` (1: KD only).
        temperature: softening ``T > 0`` of both distributions.
        top_k: distil only the teacher's ``k`` most likely tokens per position; ``None``: the full vocabulary.
        hidden_weight: weight ``>= 0`` of the hidden-state alignment term (0: off).
        teacher_dtype: a floating ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ``"float16"``,
            ``"float64"``); ``None``: the student's.
        teacher_device: e.g. ``"cpu"`` or ``"cuda:1"``; ``None``: the student's device.
        chunk_size: positions per fp32 KL chunk (128 was faster than 1024 on 2 CPU cores and a 49k vocabulary,
            and holds less memory; the README gives the measured step costs).
        layers_path: dotted path of the student's block list, when the module holds several models.

    Example:
        >>> distil = DistillationCallback(teacher="initial", alpha=0.5, teacher_dtype="bfloat16")
        >>> prune = LayerPruneCallback(fraction=0.2, gradual={"start_step": 10, "end_step": 30, "num_events": 3})
        >>> trainer = pl.Trainer(callbacks=[distil, prune], max_steps=40)  # doctest: +SKIP
    """

    def __init__(
        self,
        teacher: Literal["initial", "before_first_prune"] | nn.Module = "initial",
        alpha: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        hidden_weight: float = 0.0,
        teacher_dtype: str | torch.dtype | None = None,
        teacher_device: str | torch.device | None = None,
        chunk_size: int = 128,
        layers_path: str | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module) and teacher not in _TEACHERS:
            raise ValueError(f"`teacher` must be one of {_TEACHERS} or an nn.Module, got {teacher!r}.")
        check_number("alpha", alpha, 0.0, 1.0)
        check_number("temperature", temperature, low=0.0, low_open=True)
        check_int("top_k", top_k, minimum=1, allow_none=True)
        check_number("hidden_weight", hidden_weight, low=0.0)
        check_int("chunk_size", chunk_size, minimum=1)
        self.source = "module" if isinstance(teacher, nn.Module) else teacher
        self.teacher: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self.alpha, self.temperature, self.top_k = alpha, temperature, top_k
        self.hidden_weight, self.chunk_size = hidden_weight, chunk_size
        self.teacher_dtype: torch.dtype | None = check_dtype("teacher_dtype", teacher_dtype, allow_none=True)
        self.teacher_device = torch.device(teacher_device) if teacher_device is not None else None
        self.layers_path = layers_path
        self.teacher_taken_at: int | None = None  # global_step at which a copied teacher was taken
        self.last: dict[str, float] = {}  # the loss terms of the latest training forward
        self._stack: DecoderStack | None = None
        self._student: nn.Module | None = None  # the hooked module
        self._hooks: list[Any] = []
        self._restored: dict[str, Any] | None = None
        self._applied = False  # this batch's loss was distilled
        self._batch_has_teacher = False  # the teacher existed when this batch started
        self._hook_loss: Tensor | None = None  # the mixed loss the forward hook put in this batch's outputs
        self._fingerprint: list[float] | None = None

    # ================================================================ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy_supported(trainer, "DistillationCallback", fsdp2=False)
        others = [c for c in trainer.callbacks if isinstance(c, DistillationCallback) and c is not self]
        if others:
            raise ValueError("DistillationCallback: give one DistillationCallback per Trainer, got several.")
        self._restored, self.teacher_taken_at, self.last = None, None, {}
        if self.source != "module":
            self.teacher = None  # a new fit copies a new teacher (a resume restores it)
        if not is_overridden("configure_model", pl_module):
            decoder_stack(pl_module, self.layers_path)  # a module without a decoder stack is refused now

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stack = decoder_stack(pl_module, self.layers_path)
        self._student = called_module(self._stack.root, pl_module)
        if self._restored is not None:
            self._restore_teacher(trainer, self._restored)
        elif trainer.ckpt_path is not None and self.source == "initial":
            raise ValueError(
                f"DistillationCallback(teacher='initial'): the checkpoint {trainer.ckpt_path!r} holds no teacher of"
                " this callback (it was not in that run), and the model being resumed is not the initial one: resume"
                " without the callback, or give the teacher as a module."
            )
        elif self.source == "initial":
            self._take_teacher(trainer, "at fit start")
        elif self.source == "module":
            self._prepare_teacher(trainer)
        elif removed_original_indices(self._stack):
            raise ValueError(
                "DistillationCallback(teacher='before_first_prune'): the model resumed was already pruned, but the"
                " checkpoint holds no teacher of this callback: the whole model is gone; give the teacher as a module."
            )
        self._check_teacher_depth()
        self._hooks = [
            self._student.register_forward_pre_hook(self._before_student_forward, with_kwargs=True),
            self._student.register_forward_hook(self._after_student_forward, with_kwargs=True),
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _check_teacher_depth(self) -> None:
        if self.hidden_weight == 0 or self.teacher is None or self._stack is None:
            return
        full = len(original_indices(self._stack)) + len(removed_original_indices(self._stack))
        depth = len(decoder_stack(self.teacher).layers)
        if depth != full:
            raise ValueError(
                f"DistillationCallback: `hidden_weight={self.hidden_weight}` aligns each block with the teacher's"
                f" block of the same original index, so the teacher needs the student's original depth {full},"
                f" got {depth} blocks: set hidden_weight=0 or give a full-depth teacher."
            )

    # ================================================================ the teacher
    def on_before_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, current_indices: list[int]) -> None:
        """Called by :class:`~lp_callbacks.LayerPruneCallback` while the model is still whole."""
        if self.source == "before_first_prune" and self.teacher is None:
            self._take_teacher(trainer, "before the first removal")

    def _take_teacher(self, trainer: pl.Trainer, when: str) -> None:
        assert self._student is not None
        self.teacher = frozen_copy(self._student)
        self.teacher_taken_at = trainer.global_step
        self._prepare_teacher(trainer)
        rank_zero_info(f"DistillationCallback: teacher copied {when} (step {trainer.global_step}).")

    def _prepare_teacher(self, trainer: pl.Trainer) -> None:
        """Frozen, in eval mode, in its dtype and on its device; the same on every rank."""
        assert self.teacher is not None and self._student is not None
        device = self.teacher_device or next(self._student.parameters()).device
        self.teacher.requires_grad_(False).eval().to(device=device, dtype=self.teacher_dtype)
        self._fingerprint = fingerprint(self.teacher)
        local = torch.tensor(self._fingerprint, dtype=torch.float64, device=trainer.strategy.root_device)  # NCCL: not CPU
        gathered = trainer.strategy.all_gather(local)
        if gathered.dim() == 2 and not torch.equal(gathered, gathered[:1].expand_as(gathered)):
            raise ValueError(
                f"DistillationCallback: the ranks hold different teachers (weight fingerprints {gathered.tolist()}):"
                " give every rank the same teacher."
            )

    def _restore_teacher(self, trainer: pl.Trainer, state: Mapping[str, Any]) -> None:
        """The checkpoint's teacher: a copied one rebuilt at full depth, or a given one checked against it."""
        assert self._student is not None
        self.teacher_taken_at = state.get("teacher_taken_at")
        weights = state.get("teacher")
        if self.source == "module":
            self._prepare_teacher(trainer)
            if state.get("fingerprint") is not None and not torch.allclose(
                torch.tensor(self._fingerprint, dtype=torch.float64), torch.tensor(state["fingerprint"], dtype=torch.float64), rtol=1e-9
            ):
                raise ValueError(
                    f"DistillationCallback: the teacher module given differs from the run's (weight fingerprint"
                    f" {self._fingerprint} vs {state['fingerprint']} in the checkpoint): give the same teacher to resume."
                )
            return
        if weights is None:
            return  # saved before the teacher was taken
        self.teacher = full_depth_copy(self._student, weights, self.teacher_dtype)
        self._prepare_teacher(trainer)

    # ================================================================ the loss
    def _before_student_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.hidden_weight > 0 and self._active(module):
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def _after_student_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if getattr(output, "loss", None) is None or not (module.training and torch.is_grad_enabled()):
            return None
        if self.teacher is None:  # no teacher yet: the LM loss stays, and is logged as the LM part
            self.last = {"lm_loss": float(output.loss.detach())}
            return None
        output["loss"] = self._hook_loss = self._mixed_loss(output, _named_inputs(module, args, kwargs), output.loss)
        return output

    def _active(self, module: nn.Module) -> bool:
        return self.teacher is not None and module.training and torch.is_grad_enabled()

    def loss(self, student_outputs: Any, batch: Mapping[str, Tensor], lm_loss: Tensor | None = None) -> Tensor:
        """The mixed loss for a module that computes its own: ``student_outputs`` is the HF output of the student
        on ``batch``, called without ``labels`` (``.logits``; ``.hidden_states`` when ``hidden_weight > 0``),
        ``lm_loss`` its LM loss (needed unless ``alpha == 1``). Returns ``lm_loss`` unchanged while there is no
        teacher yet."""
        if self.teacher is None:
            if lm_loss is None:
                raise ValueError("DistillationCallback.loss: `lm_loss` is needed before the teacher exists, got None.")
            return lm_loss
        if lm_loss is None and self.alpha < 1:
            raise ValueError(f"DistillationCallback.loss: `lm_loss` is needed with alpha={self.alpha} < 1, got None.")
        if self._hook_loss is not None and getattr(student_outputs, "loss", None) is self._hook_loss:
            raise ValueError(
                "DistillationCallback.loss: `student_outputs` come from a forward given `labels`, so their `.loss` is"
                " already the mixed loss: return `outputs.loss` as it is, or call the model without `labels`."
            )
        return self._mixed_loss(student_outputs, dict(batch), lm_loss)

    def _mixed_loss(self, output: Any, inputs: Mapping[str, Any], lm_loss: Tensor | None) -> Tensor:
        assert self.teacher is not None and self._stack is not None
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ValueError("DistillationCallback: the student's output has no `.logits` (return_dict=False?).")
        teacher_out = self._teacher_forward(inputs)
        labels, attention_mask = inputs.get("labels"), inputs.get("attention_mask")
        if labels is None and attention_mask is None:
            attention_mask = torch.ones(logits.shape[:2], dtype=torch.long, device=logits.device)
        mask = next_token_mask(labels=labels, attention_mask=attention_mask)
        kd = kd_loss(logits, teacher_out.logits, mask, temperature=self.temperature, top_k=self.top_k,
                     chunk_size=self.chunk_size)
        total = kd if lm_loss is None or self.alpha == 1 else self.alpha * kd + (1 - self.alpha) * lm_loss
        self.last = {"kd_loss": float(kd.detach())}
        if lm_loss is not None:
            self.last["lm_loss"] = float(lm_loss.detach())
        if self.hidden_weight > 0:
            pairs = aligned_hidden_pairs(original_indices(self._stack), len(decoder_stack(self.teacher).layers))
            real = attention_mask.bool() if attention_mask is not None else torch.ones_like(mask)
            hidden = hidden_alignment_loss(output.hidden_states, teacher_out.hidden_states, pairs, real)
            total = total + self.hidden_weight * hidden
            self.last["hidden_loss"] = float(hidden.detach())
        self._applied = True
        return total

    def _teacher_forward(self, inputs: Mapping[str, Any]) -> Any:
        assert self.teacher is not None
        device = next(self.teacher.parameters()).device
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items() if k not in _STUDENT_ONLY}
        with torch.no_grad():
            return self.teacher(**kwargs, use_cache=False, output_hidden_states=self.hidden_weight > 0)

    # ================================================================ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._applied, self.last, self._hook_loss = False, {}, None
        self._batch_has_teacher = self.teacher is not None  # a teacher a pruner takes at this batch's end is for the next

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hook_loss = None
        if self._batch_has_teacher and not self._applied:
            raise RuntimeError(
                "DistillationCallback: this training batch ran without distillation: the student's forward got no"
                " `labels` (so it returned no loss to replace) and `DistillationCallback.loss` was not called. Pass"
                " `labels` to the HF model in training_step and return `outputs.loss`, or compute"
                " `distiller.loss(outputs, batch, lm_loss)` yourself."
            )
        for name, value in self.last.items():
            pl_module.log(f"distill/{name}", value, on_step=True, on_epoch=False, batch_size=_batch_size(batch))

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        copied = self.source != "module" and self.teacher is not None
        return {
            "version": 1,
            "source": self.source,
            "teacher_taken_at": self.teacher_taken_at,
            "fingerprint": self._fingerprint,
            "teacher": self.teacher.state_dict() if copied else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("source") != self.source:
            raise ValueError(
                f"DistillationCallback: the checkpoint's teacher was {state_dict.get('source')!r}, this callback's is"
                f" {self.source!r}: resume with the teacher the run was saved with."
            )
        self._restored = dict(state_dict)  # built in on_fit_start, once the student is restored


def _named_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The student's forward inputs by name: its positional ``args`` bound to the parameter names of its forward."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    inputs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(
                f"DistillationCallback: the student's forward takes `*{name}`, so its positional arguments cannot be"
                f" named for the teacher, got {len(value)} of them: call the model with keyword arguments."
            )
        inputs.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return inputs


def _batch_size(batch: Any) -> int | None:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[0]) if torch.is_tensor(ids) else None
