"""CausalLMModule: fast CPU Trainer runs on a tiny Llama: loss, logging, optimizer groups, LR schedule, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_batch, tiny_model
from lightning.pytorch import Callback, Trainer
from test_data import char_tokenizer, random_text

from lp_callbacks.harness.data import TextDataModule
from lp_callbacks.harness.models import ModelSpec
from lp_callbacks.harness.module import CausalLMModule, lr_factor

TINY_SPEC = {"config": {"model_type": "llama", "vocab_size": 260, "hidden_size": 16, "intermediate_size": 32,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
             "tokenizer": "bytes"}


def fast_trainer(**kwargs) -> Trainer:
    kwargs = {"max_steps": 3, "accelerator": "cpu", "devices": 1, "enable_checkpointing": False, "logger": False,
              "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    return Trainer(**kwargs)


class Recorder(Callback):
    """Loss and learning rate of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def repeated(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    return [batch] * n  # a list of ready batches: use with DataLoader(batch_size=None)


def loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_fit_lowers_the_loss_changes_weights_and_logs():
    module = CausalLMModule(tiny_model("llama"), lr=1e-2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    recorder = Recorder()
    trainer = fast_trainer(callbacks=[recorder], limit_val_batches=1, val_check_interval=3)
    batch = random_batch(batch_size=4, seq_len=16)
    trainer.fit(module, loader(repeated(batch, 3)), loader(repeated(batch, 1)))

    assert len(recorder.losses) == 3 and all(math.isfinite(x) for x in recorder.losses)
    assert recorder.losses[-1] < recorder.losses[0]
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_ppl"} <= set(metrics)
    assert torch.isclose(metrics["val_ppl"], torch.exp(metrics["val_loss"]))


def test_fit_on_text_datamodule(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(2000, seed=0))
    dm = TextDataModule(path, tokenizer=char_tokenizer(), block_size=16, batch_size=4, val_fraction=0.1,
                        cache_dir=tmp_path / "cache")
    module = CausalLMModule(tiny_model("llama"), lr=1e-3, lr_schedule="cosine", warmup_steps=1)
    trainer = fast_trainer(limit_val_batches=2, val_check_interval=3)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))


def test_val_loss_is_the_mean_over_all_tokens():
    """Batches with different numbers of real tokens: the mean per token, not the mean of the batch means."""
    model = tiny_model("llama")
    full = random_batch(batch_size=2, seq_len=12, seed=1)
    padded = random_batch(batch_size=2, seq_len=12, seed=2)
    padded["attention_mask"][:, 4:] = 0  # right padding: 3 predicted tokens per row instead of 11
    padded["input_ids"][:, 4:] = 0

    def token_losses(batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                   reduction="none", ignore_index=-100)
        return losses[labels[:, 1:].flatten() != -100]

    expected = torch.cat([token_losses(full), token_losses(padded)]).mean()
    result = fast_trainer().validate(CausalLMModule(model), loader([full, padded]), verbose=False)[0]
    assert result["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)


def test_labels_mask_padding_by_attention_mask_not_pad_id():
    """Pad id == EOS id (as in SmolLM2): EOS tokens inside the text still count, padded positions do not."""
    model = tiny_model("llama")
    module = CausalLMModule(model)
    batch = random_batch(batch_size=2, seq_len=10)
    batch["input_ids"][:, 3] = 2  # EOS in the text
    batch["input_ids"][1, 7:] = 2  # padding with the EOS id
    batch["attention_mask"][1, 7:] = 0
    labels = batch["input_ids"].clone()
    labels[1, 7:] = -100
    with torch.no_grad():
        loss, n_tokens = module._lm_loss(batch)
        expected = model(**batch, labels=labels).loss
    assert torch.equal(loss, expected)
    assert n_tokens == 9 + 6


def test_warmup_cosine_schedule_steps_per_optimizer_step():
    module = CausalLMModule(tiny_model("llama"), lr=0.1, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    recorder = Recorder()
    batch = random_batch(batch_size=2, seq_len=8)
    fast_trainer(max_steps=6, callbacks=[recorder], limit_val_batches=0).fit(module, loader(repeated(batch, 6)))
    expected = [0.1 * lr_factor(s, warmup_steps=2, total_steps=6, min_lr_ratio=0.1) for s in range(6)]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.lrs[:3] == pytest.approx([0.05, 0.1, 0.1])


def test_optimizer_groups_and_constant_lr():
    module = CausalLMModule(tiny_model("llama"), lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)  # constant LR without warmup: no scheduler at all
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.9)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_trainable = sum(1 for p in module.model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = random_batch(batch_size=2, seq_len=8)
    grads = []
    for checkpointing in (False, True):
        module = CausalLMModule(tiny_model("llama", seed=3), gradient_checkpointing=checkpointing)
        assert module.model.training  # tiny_model is in eval mode (as from_pretrained); HF checkpoints only in training
        loss, _ = module._lm_loss(batch)
        loss.backward()
        grads.append([p.grad for p in module.model.parameters()])
        is_on = getattr(module.model, "is_activation_checkpointing", None)
        assert (is_on if is_on is not None else module.model.is_gradient_checkpointing) is checkpointing
    assert module.model.config.use_cache is False
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_model_from_a_callable():
    module = CausalLMModule(lambda: tiny_model("gpt2", num_layers=2))
    assert type(module.model).__name__ == "GPT2LMHeadModel"
    assert "model" not in module.hparams


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        ("not a model", {}, TypeError, r"`model` must be a ModelSpec, a torch.nn.Module or a callable building one, got str"),
        (lambda: 3, {}, TypeError, r"callable must return a torch.nn.Module, it returned int"),
        (None, {"lr": 0}, ValueError, r"`lr` must be a number > 0, got 0"),
        (None, {"weight_decay": -1.0}, ValueError, r"`weight_decay` must be a number >= 0, got -1.0"),
        (None, {"betas": (0.9, 1.0)}, ValueError, r"`betas` must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        (None, {"lr_schedule": "linear"}, ValueError,
         r"`lr_schedule` must be one of \['constant', 'cosine'\], got 'linear'"),
        (None, {"warmup_steps": -1}, ValueError, r"`warmup_steps` must be an int >= 0, got -1"),
        (None, {"warmup_steps": 5, "total_steps": 5}, ValueError,
         r"`total_steps` must be None or an integer > warmup_steps=5, got 5"),
        (None, {"min_lr_ratio": 1.5}, ValueError, r"`min_lr_ratio` must be a number in \[0, 1\], got 1.5"),
        (torch.nn.Linear(2, 2), {"gradient_checkpointing": True}, TypeError,
         r"Linear has no activation_checkpointing_enable\(\)"),
    ],
    ids=["model_str", "callable_int", "lr0", "wd_neg", "betas", "schedule", "warmup", "total", "min_ratio", "gc"],
)
def test_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        CausalLMModule(model if model is not None else tiny_model("llama", num_layers=1), **kwargs)


@pytest.mark.parametrize("as_dict", [False, True], ids=["spec", "dict"])
def test_model_from_a_spec_keeps_tokenizer_and_hyperparameters(as_dict):
    module = CausalLMModule(TINY_SPEC if as_dict else ModelSpec(**TINY_SPEC), lr=1e-3)
    assert type(module.model).__name__ == "LlamaForCausalLM" and module.model.training
    assert len(module.tokenizer) == 259 and module.model_spec == ModelSpec(**TINY_SPEC)
    assert module.hparams["model"] == ModelSpec(**TINY_SPEC).as_dict()  # a plain dict: weights-only loads accept it


def test_model_object_has_no_tokenizer():
    module = CausalLMModule(tiny_model("llama", num_layers=1))
    assert module.tokenizer is None and module.model_spec is None and "model" not in module.hparams


def test_load_from_checkpoint_rebuilds_the_model_from_its_spec(tmp_path):
    module = CausalLMModule(ModelSpec(**TINY_SPEC), lr=1e-3)
    trainer = fast_trainer(max_steps=1, default_root_dir=tmp_path)
    batch = random_batch(batch_size=2, seq_len=8)
    trainer.fit(module, loader(repeated(batch, 1)))
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    loaded = CausalLMModule.load_from_checkpoint(path)  # no model given: the spec in the hyperparameters builds it
    assert loaded.lr == 1e-3 and len(loaded.tokenizer) == 259
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
