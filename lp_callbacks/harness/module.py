"""A small LightningModule for training a Hugging Face causal LM: a convenience, not a requirement.

The callbacks of lp_callbacks work with any LightningModule that holds an HF model (they find it among the
submodules); :class:`CausalLMModule` is what the ``lp-callbacks`` CLI and the examples use.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> module = CausalLMModule(AutoModelForCausalLM.from_pretrained("my/model"), lr=3e-4,  # doctest: +SKIP
    ...                         lr_schedule="cosine", warmup_steps=100)
    >>> module = CausalLMModule(ModelSpec(smollm2=True), lr=1e-4)  # doctest: +SKIP
    >>> Trainer(max_steps=1000).fit(module, datamodule=TextDataModule(..., tokenizer=module.tokenizer))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lp_callbacks.checkpoint import restore_pruned_architecture
from lp_callbacks.harness.models import ModelSpec
from lp_callbacks.validation import check_int, check_number

__all__ = ["CausalLMModule", "lr_factor"]

_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warmup, then constant or cosine.

    Warmup rises from ``1 / warmup_steps`` to 1 (never 0, so the first step trains). With ``total_steps`` the
    factor then follows a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps`` and stays there.

    Example:
        >>> [round(lr_factor(s, warmup_steps=2, total_steps=6, min_lr_ratio=0.0), 2) for s in range(7)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(LightningModule):
    """Train a Hugging Face causal LM with the language-modelling loss and AdamW.

    Batches are dicts with ``input_ids`` and optionally ``attention_mask`` and ``labels`` (as
    :class:`~lp_callbacks.harness.data.TextDataModule` yields). Without ``labels``, the labels are ``input_ids`` with padding
    (``attention_mask == 0``) set to -100; the mask, not ``pad_token_id``, decides, since many tokenizers pad with EOS.

    A pruned run's checkpoint loads into a freshly built, full-depth module (``load_from_checkpoint``,
    ``validate``/``test`` with ``ckpt_path``): ``on_load_checkpoint`` rebuilds the recorded architecture first.

    Logs ``train_loss`` every step, and ``val_loss`` (mean over all predicted tokens) and ``val_ppl`` per validation
    (``test_loss`` and ``test_ppl`` for ``trainer.test``, on the same held-out blocks).

    Args:
        model: where the HF causal LM comes from: a :class:`~lp_callbacks.harness.models.ModelSpec` (or a dict of
            its fields; what a config gives, e.g. ``{smollm2: true}``), loaded at once with its tokenizer, which is
            kept as ``self.tokenizer``; or the model itself (an ``nn.Module`` whose forward takes ``labels`` and
            returns ``.loss``), or a callable without arguments that builds it (``self.tokenizer`` is then
            ``None``). The model is stored as ``self.model`` and built at once, so callbacks see it in their
            ``setup``.
        lr: peak learning rate, ``> 0``.
        weight_decay: AdamW decoupled weight decay, ``>= 0``; applied to matrices only (not to norms and biases).
        betas: AdamW betas, each in ``[0, 1)``.
        lr_schedule: ``"constant"`` (after the warmup) or ``"cosine"`` (decay to ``min_lr_ratio * lr``).
        warmup_steps: optimizer steps of linear warmup, ``>= 0``.
        total_steps: optimizer steps of the cosine schedule; ``None`` takes ``trainer.estimated_stepping_batches``.
        min_lr_ratio: final learning rate of the cosine, as a fraction of ``lr``, in ``[0, 1]``.
        gradient_checkpointing: recompute activations in the backward pass (HF gradient checkpointing) to save memory.

    Raises:
        TypeError: when ``model`` is neither a spec, an ``nn.Module`` nor a callable returning one.
        FileNotFoundError: when a spec names a model directory, GGUF file or tokenizer that does not exist.
        ValueError: for an argument out of range; the message names it, the valid range and the value.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                      vocab_size=128)
        >>> module = CausalLMModule(lambda: LlamaForCausalLM(config), lr=1e-3, warmup_steps=10)
        >>> type(module.model).__name__
        'LlamaForCausalLM'
    """

    def __init__(
        self,
        model: ModelSpec | nn.Module | Callable[[], nn.Module],
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        lr_schedule: Literal["constant", "cosine"] = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # Cheap checks first: a spec may take seconds to load.
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        if lr_schedule not in _SCHEDULES:
            raise ValueError(f"`lr_schedule` must be one of {list(_SCHEDULES)}, got {lr_schedule!r}.")
        check_int("warmup_steps", warmup_steps, minimum=0)
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= warmup_steps
        ):
            raise ValueError(
                f"`total_steps` must be None or an integer > warmup_steps={warmup_steps}, got {total_steps!r}."
            )
        check_number("min_lr_ratio", min_lr_ratio, 0.0, 1.0)

        if isinstance(model, dict):  # a checkpoint's hyperparameters, or a hand-written config
            model = ModelSpec(**model)
        self.model_spec = model if isinstance(model, ModelSpec) else None
        self.tokenizer: Any = None
        if isinstance(model, ModelSpec):
            built, self.tokenizer = model.load()
        elif isinstance(model, nn.Module):
            built = model
        elif callable(model):
            built = model()
            if not isinstance(built, nn.Module):
                raise TypeError(
                    f"The `model` callable must return a torch.nn.Module, it returned {type(built).__name__}."
                )
        else:
            raise TypeError(
                f"`model` must be a ModelSpec, a torch.nn.Module or a callable building one, got {type(model).__name__}."
            )

        self.model = built
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.gradient_checkpointing = gradient_checkpointing
        # A model object is not a hyperparameter; a spec is, as a plain dict (weights-only checkpoint loads accept
        # it): load_from_checkpoint then rebuilds the model from it.
        self.save_hyperparameters(ignore=["model"])
        if self.model_spec is not None:
            self.save_hyperparameters({"model": self.model_spec.as_dict()})
        # Token-weighted mean over the whole validation (or test) set (the mean of batch means would weight batches
        # equally); torchmetrics sums across DDP ranks.
        self.val_loss_mean = MeanMetric()

        # from_pretrained returns a model in eval mode and Lightning keeps the mode it finds: without this, dropout
        # and HF gradient checkpointing (active only when training) would be silently off.
        self.model.train()
        if gradient_checkpointing:
            _enable_checkpointing(self.model)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._lm_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._lm_loss(batch)
        self.val_loss_mean.update(loss.detach(), weight=n_tokens)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._log_held_out("val")

    def on_test_epoch_end(self) -> None:
        self._log_held_out("test")

    def _log_held_out(self, prefix: str) -> None:
        if not self.val_loss_mean.update_called:
            return
        loss = self.val_loss_mean.compute()
        self.val_loss_mean.reset()
        self.log(f"{prefix}_loss", loss, prog_bar=True)
        self.log(f"{prefix}_ppl", torch.exp(loss))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A pruned run's checkpoint holds fewer blocks: shrink this (full-depth) model to match before the weights
        # load, in every stage and in `load_from_checkpoint`.
        restore_pruned_architecture(self.model, checkpoint)

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                # Matrices (linear, embedding) decay; vectors (norm scales, biases) do not.
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer

        total_steps = None
        if self.lr_schedule == "cosine":
            total_steps = self.total_steps or self._estimated_total_steps()
        factor = functools.partial(
            lr_factor, warmup_steps=self.warmup_steps, total_steps=total_steps, min_lr_ratio=self.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ----------------------------------------------------------------------------------------------- helpers

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token loss of the batch and the number of tokens it averages over."""
        input_ids = batch["input_ids"]  # (B, T)
        attention_mask = batch.get("attention_mask")  # (B, T) or None
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.clone()
            if attention_mask is not None:
                labels[attention_mask == 0] = -100
        inputs = {"input_ids": input_ids, "labels": labels}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if "position_ids" in batch:
            inputs["position_ids"] = batch["position_ids"]
        loss = self.model(**inputs).loss
        n_tokens = (labels[:, 1:] != -100).sum()  # HF shifts: position t predicts label t + 1
        return loss, n_tokens

    def _estimated_total_steps(self) -> int:
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError(
                "`lr_schedule='cosine'` needs a finite length: set `total_steps`, or the Trainer's max_steps or"
                " max_epochs."
            )
        return max(int(steps), self.warmup_steps + 1)


def _enable_checkpointing(model: nn.Module) -> None:
    # transformers >= 5.x names it activation_checkpointing_enable (gradient_checkpointing_enable is deprecated).
    # Non-reentrant checkpointing: works with frozen inputs (embeddings) and is the one PyTorch recommends.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(
            f"`gradient_checkpointing=True` needs a Hugging Face model, {type(model).__name__} has no"
            " activation_checkpointing_enable() or gradient_checkpointing_enable()."
        )
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a KV cache is useless in training and HF warns when it meets recompute
