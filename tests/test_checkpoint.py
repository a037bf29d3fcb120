"""Pruned checkpoints outside `fit` (RELIABILITY 29) and resumes without the pruner (issue 9, item 11)."""

import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lp_callbacks import (
    BlockInfluenceMonitor,
    LayerPruneCallback,
    get_decoder_layers,
    load_pruned_checkpoint,
    restore_pruned_architecture,
)
from lp_callbacks.harness.module import CausalLMModule


def pruned_run(tmp_path, module=None, max_steps=4, **checkpoint_kwargs):
    """Prune 2 blocks at step 2, checkpoint at step 4 (and as `checkpoint_kwargs` say); returns module, callback."""
    module = module or TinyLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", **({"every_n_train_steps": 4} | checkpoint_kwargs))
    fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2]), checkpoint], max_steps=max_steps,
                 enable_checkpointing=True).fit(module, loader(length=16))
    return module, checkpoint


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_validate_and_test_a_pruned_checkpoint_with_the_pruner(tmp_path):
    trained, checkpoint = pruned_run(tmp_path)
    for stage in ("validate", "test"):
        fresh = TinyLM()
        if stage == "test":
            fresh.test_step = fresh.validation_step
        trainer = fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2])])
        getattr(trainer, stage)(fresh, loader(), ckpt_path=checkpoint.best_model_path)
        assert len(get_decoder_layers(fresh)) == LAYERS - 2
        same_weights(fresh, trained)


def test_load_pruned_checkpoint_into_a_fresh_module(tmp_path):
    trained, checkpoint = pruned_run(tmp_path)
    fresh = load_pruned_checkpoint(TinyLM(), checkpoint.best_model_path)
    assert len(get_decoder_layers(fresh)) == LAYERS - 2
    same_weights(fresh, trained)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pruned_checkpoint(TinyLM(), tmp_path / "nope.ckpt")


def test_causal_lm_module_load_from_checkpoint_and_plain_validate(tmp_path):
    trained, checkpoint = pruned_run(tmp_path, module=CausalLMModule(TinyLM().model, lr=1e-2))
    loaded = CausalLMModule.load_from_checkpoint(checkpoint.best_model_path, model=TinyLM().model)
    assert loaded.model.config.num_hidden_layers == LAYERS - 2
    same_weights(loaded, trained)
    fresh = CausalLMModule(TinyLM().model)
    fast_trainer(tmp_path).validate(fresh, loader(), ckpt_path=checkpoint.best_model_path)  # no lp_callbacks callback
    same_weights(fresh, trained)


def test_best_checkpoint_from_before_a_removal_grows_the_model_back(tmp_path):
    module = TinyLM()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2]), checkpoint], max_steps=3,
                           enable_checkpointing=True)
    trainer.fit(module, loader())
    assert len(get_decoder_layers(module)) == LAYERS - 2
    before_removal = str(tmp_path / "ckpt" / "epoch=0-step=1.ckpt")
    reference = load_pruned_checkpoint(TinyLM(), before_removal)  # full depth, in a freshly built module
    batch = next(iter(loader()))
    for stage in ("validate", "test"):  # like trainer.test(ckpt_path="best") when the best predates the removal
        module.test_step = module.validation_step
        getattr(trainer, stage)(module, loader(), ckpt_path=before_removal)
        assert len(get_decoder_layers(module)) == LAYERS and module.model.config.num_hidden_layers == LAYERS
        same_weights(module, reference)
        module.eval(), reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(module(**batch), reference(**batch))
        trainer.validate(module, loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))  # and back
        assert len(get_decoder_layers(module)) == LAYERS - 2
    with pytest.raises(ValueError, match=r"holds the weights of original blocks .* \(of 6\), but the model holds"):
        restore_pruned_architecture(TinyLM(num_layers=8), before_removal)  # another model: refused, not guessed


def test_resume_without_the_pruner_rebuilds_the_architecture(tmp_path):
    _, checkpoint = pruned_run(tmp_path)
    module, monitor = TinyLM(), BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=6).fit(module, loader(length=16), ckpt_path=checkpoint.best_model_path)
    assert len(get_decoder_layers(module)) == LAYERS - 2 and monitor.num_layers == LAYERS - 2


def test_a_checkpoint_at_a_url_is_rebuilt_before_its_weights_load(tmp_path):
    """``ckpt_path`` a URL (``s3://``, ``gs://``; fsspec's ``memory://`` here): read through fsspec, as Lightning reads
    it, and the pruned architecture rebuilt (it was skipped, and the strict weight load then failed)."""
    import fsspec

    pruned, checkpoint = pruned_run(tmp_path)
    url = "memory://lp-checkpoints/pruned.ckpt"
    fsspec.filesystem("memory").pipe(url, open(checkpoint.best_model_path, "rb").read())
    module = TinyLM()
    fast_trainer(tmp_path, callbacks=[LayerPruneCallback(num_layers=2, at_steps=[2])], max_steps=5).fit(
        module, loader(length=16), ckpt_path=url)
    assert len(get_decoder_layers(module)) == LAYERS - 2
    restored = load_pruned_checkpoint(TinyLM(), url)
    same_weights(restored, pruned)


def test_restore_is_idempotent_and_refuses_another_model(tmp_path):
    _, checkpoint = pruned_run(tmp_path)
    state = torch.load(checkpoint.best_model_path, weights_only=False)
    module = TinyLM()
    kept = restore_pruned_architecture(module, state)
    assert restore_pruned_architecture(module, state) == kept and len(kept) == LAYERS - 2
    with pytest.raises(ValueError, match=r"holds the weights of original blocks .* \(of 6\), but the model holds"):
        restore_pruned_architecture(TinyLM(num_layers=8), state)


def test_cli_validate_a_pruned_checkpoint(tmp_path, capsys):
    from test_cli import callback, run, tiny_config

    def checkpoint(config):
        config["trainer"]["enable_checkpointing"] = True
        callback(config, "LayerPruneCallback").update(at_steps=[2], export_dir=None)

    path = tiny_config(tmp_path, checkpoint)
    code, _, err = run(["fit", "-c", path], capsys)
    assert code == 0, err
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    code, out, err = run(["validate", "-c", path, f"--ckpt_path={ckpt}"], capsys)
    assert code == 0 and "val_loss" in out, err
