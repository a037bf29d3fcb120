import csv

import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lp_callbacks import BlockInfluenceMonitor, block_influence, find_monitor


def offline_bi(module, dl, batches=None):
    return block_influence(module.model, dl, max_batches=batches)


def test_training_bi_equals_offline_measurement(tmp_path):
    """lr=0: the weights never move, so BI over the training forwards = BI over the same batches offline."""
    module = TinyLM(lr=0.0)
    monitor = BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=4).fit(module, loader(length=16))
    assert monitor.measured_steps == 4
    torch.testing.assert_close(monitor.block_influence, offline_bi(module, loader(length=16)), atol=1e-6, rtol=0)
    assert find_monitor(fast_trainer(tmp_path, callbacks=[monitor])) is monitor
    assert monitor.recorder is None and all(not l._forward_hooks for l in module.model.model.layers)  # unhooked


def test_every_n_steps_and_token_budget(tmp_path):
    monitor = BlockInfluenceMonitor(every_n_steps=3, max_tokens_per_step=10)
    dl = loader()
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=7).fit(TinyLM(), dl)
    assert monitor.measured_steps == 3  # global steps 0, 3, 6
    # 10 evenly spaced positions of each measured batch (4 x 16 tokens); those that are padding do not count
    positions = torch.linspace(0, 63, 10).round().long()
    masks = dl.dataset.attention_mask.view(-1, 4 * 16)  # one row per batch
    assert monitor.tokens_seen == sum(int(masks[b][positions].sum()) for b in (0, 3, 6)) < 30


def test_validation_and_sanity_check_do_not_pollute(tmp_path):
    ref = BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[ref], max_steps=3).fit(TinyLM(lr=0.0), loader(length=12))
    monitor = BlockInfluenceMonitor()
    trainer = fast_trainer(tmp_path, callbacks=[monitor], max_steps=3, num_sanity_val_steps=2, val_check_interval=1)
    trainer.fit(TinyLM(lr=0.0), loader(length=12), loader(length=8, seed=5))
    assert monitor.tokens_seen == ref.tokens_seen
    torch.testing.assert_close(monitor.block_influence, ref.block_influence, atol=1e-12, rtol=0)


def test_validation_source_measures_validation_only(tmp_path):
    module, val = TinyLM(lr=0.0), loader(length=8, seed=5)
    monitor = BlockInfluenceMonitor(source="validation")
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=2, num_sanity_val_steps=2, val_check_interval=2).fit(
        module, loader(), val
    )
    assert monitor.measured_steps == 1  # one validation run, the sanity check excluded
    torch.testing.assert_close(monitor.block_influence, offline_bi(module, val), atol=1e-6, rtol=0)


def test_calibration_source(tmp_path):
    module, calib = TinyLM(lr=0.0), loader(length=8, seed=7)
    monitor = BlockInfluenceMonitor(source="calibration", calibration_dataloader=calib, every_n_steps=2)
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=4).fit(module, loader())
    assert monitor.measured_steps == 3  # fit start, steps 2 and 4
    torch.testing.assert_close(monitor.block_influence, offline_bi(module, calib), atol=1e-6, rtol=0)


def test_gradient_checkpointing_counts_each_token_once(tmp_path):
    plain, ckpt = BlockInfluenceMonitor(), BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[plain], max_steps=3).fit(TinyLM(), loader())
    module = TinyLM(gradient_checkpointing=True)
    assert module.model.is_gradient_checkpointing
    fast_trainer(tmp_path, callbacks=[ckpt], max_steps=3).fit(module, loader())
    assert ckpt.tokens_seen == plain.tokens_seen
    torch.testing.assert_close(ckpt.block_influence, plain.block_influence, atol=1e-6, rtol=0)


def test_gradient_accumulation_counts_each_micro_batch_once(tmp_path):
    monitor = BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=2, accumulate_grad_batches=4).fit(
        TinyLM(lr=0.0), loader(length=32)
    )
    assert monitor.measured_steps == 2  # optimizer steps, not micro-batches
    torch.testing.assert_close(monitor.block_influence, offline_bi(TinyLM(lr=0.0), loader(length=32)), atol=1e-6, rtol=0)
    expected_tokens = int(loader(length=32).dataset.attention_mask.sum())
    assert monitor.tokens_seen == expected_tokens


@pytest.mark.parametrize("aggregation", ["ema", "window"])
def test_ema_and_window_follow_recent_steps(tmp_path, aggregation):
    monitor = BlockInfluenceMonitor(aggregation=aggregation, ema_decay=0.5, window=2)
    cumulative = BlockInfluenceMonitor(prefix="cum")
    fast_trainer(tmp_path, callbacks=[monitor, cumulative], max_steps=6).fit(TinyLM(lr=0.05), loader())
    assert monitor.block_influence.shape == (LAYERS,)
    assert not torch.allclose(monitor.block_influence, cumulative.block_influence)


def logged_bi(tmp_path, monitor, max_steps):
    """Train TinyLM with ``monitor`` and a CSVLogger; the CSV rows holding BI."""
    logger = CSVLogger(tmp_path)
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=max_steps, logger=logger).fit(TinyLM(), loader())
    logger.finalize("success")
    rows = csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv"))
    return [r for r in rows if r.get("block_influence/layer_00")]


def test_logs_per_layer_and_summary(tmp_path):
    monitor = BlockInfluenceMonitor(log_every_n_steps=2, threshold=0.5)
    logged = logged_bi(tmp_path, monitor, max_steps=4)
    assert [int(r["step"]) for r in logged] == [1, 2, 4]
    last = logged[-1]
    bi = monitor.block_influence
    assert float(last["block_influence/layer_03"]) == pytest.approx(bi[3].item(), rel=1e-5)
    assert float(last["block_influence/min"]) == pytest.approx(bi.min().item(), rel=1e-5)
    assert float(last["block_influence/num_below_threshold"]) == (bi < 0.5).sum().item()
    assert [h["step"] for h in monitor.history] == [1, 2, 3, 4]  # every measured step, whatever the cadence


def test_history_is_dense_whatever_the_logging_cadence(tmp_path):
    """Lightning's default log_every_n_steps=50: a 12-step run logs once, its history still has 12 columns."""
    monitor = BlockInfluenceMonitor()
    assert [int(r["step"]) for r in logged_bi(tmp_path, monitor, max_steps=12)] == [1]
    assert [h["step"] for h in monitor.history] == list(range(1, 13))
    assert all(len(h["block_influence"]) == LAYERS and isinstance(h["block_influence"][0], float) for h in monitor.history)
    torch.testing.assert_close(torch.tensor(monitor.history[-1]["block_influence"], dtype=torch.float64),
                               monitor.block_influence, atol=0, rtol=0)


def test_long_history_is_thinned_evenly(monkeypatch):
    from lp_callbacks import metrics

    monkeypatch.setattr(metrics, "HISTORY_SIZE", 10)
    history = metrics.BIHistory()
    for step in range(1, 101):
        history.add(step, [0, 1], torch.tensor([0.1, 0.2], dtype=torch.float64))
    steps = [h["step"] for h in history.records()]
    assert len(steps) <= 10 and steps[0] == 1
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1  # evenly spaced
    assert steps[-1] > 100 - (steps[1] - steps[0])  # reaches the end of the run
    assert history.records()[0]["block_influence"] == [0.1, 0.2]


def test_logs_at_the_cadence_when_measured_steps_miss_its_multiples(tmp_path):
    """every_n_steps=2 finalises at odd steps; log_every_n_steps=4 still logs once per 4 steps."""
    monitor = BlockInfluenceMonitor(every_n_steps=2, log_every_n_steps=4)
    assert [int(r["step"]) for r in logged_bi(tmp_path, monitor, max_steps=9)] == [1, 5, 9]
    assert [h["step"] for h in monitor.history] == [1, 3, 5, 7, 9]


def test_checkpoint_resume_no_double_counting(tmp_path):
    # 3 batches an epoch: the step-3 checkpoint ends epoch 0, so the resumed run sees the same batches
    full = BlockInfluenceMonitor(log_every_n_steps=1)
    fast_trainer(tmp_path / "a", callbacks=[full], max_steps=6).fit(TinyLM(lr=1e-3), loader(length=12))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = BlockInfluenceMonitor(log_every_n_steps=1)
    fast_trainer(tmp_path / "b", callbacks=[first, ckpt], max_steps=3, enable_checkpointing=True).fit(
        TinyLM(lr=1e-3), loader(length=12)
    )
    resumed = BlockInfluenceMonitor(log_every_n_steps=1)
    fast_trainer(tmp_path / "b", callbacks=[resumed], max_steps=6).fit(
        TinyLM(lr=1e-3), loader(length=12), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    )
    assert resumed.measured_steps == full.measured_steps == 6
    assert resumed.tokens_seen == full.tokens_seen
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    torch.testing.assert_close(resumed.block_influence, full.block_influence, atol=1e-6, rtol=0)


def test_two_instances_have_distinct_state_keys(tmp_path):
    a, b = BlockInfluenceMonitor(), BlockInfluenceMonitor(source="validation")
    assert a.state_key != b.state_key


def test_bf16_training_keeps_float64_statistics(tmp_path):
    monitor = BlockInfluenceMonitor()
    fast_trainer(tmp_path, callbacks=[monitor], max_steps=2, precision="bf16-true").fit(TinyLM(), loader())
    bi = monitor.block_influence
    assert bi.dtype == torch.float64 and torch.isfinite(bi).all()


def test_non_finite_hidden_states_are_skipped_with_a_warning(tmp_path):
    module = TinyLM(lr=0.0)
    layer = module.model.model.layers[2]

    def poison(mod, args, out):  # one token's output overflows
        out = out.clone()
        out[0, 0] = float("inf")
        return out

    layer.register_forward_hook(poison)
    monitor = BlockInfluenceMonitor()
    with pytest.warns(UserWarning, match=r"skipped \d+ token\(s\) with non-finite"):
        fast_trainer(tmp_path, callbacks=[monitor], max_steps=1).fit(module, loader())
    assert torch.isfinite(monitor.block_influence).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` must be an int >= 1, got 0"),
        ({"max_tokens_per_step": -5}, r"`max_tokens_per_step` must be an int >= 1 or None, got -5"),
        ({"aggregation": "mean"}, r"`aggregation` must be one of \('cumulative', 'ema', 'window'\), got 'mean'"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be a number in \(0, 1\), got 1.0"),
        ({"source": "test"}, r"`source` must be one of"),
        ({"source": "calibration"}, r"needs `calibration_dataloader`"),
        ({"source": "validation", "max_tokens_per_step": 4}, r"`max_tokens_per_step` budgets the tokens of a"
                                                              r" training step: it needs source='train', got"
                                                              r" source='validation'"),
        ({"block_sizes": (0,)}, r"`block_sizes` must be an int >= 1, got 0"),
        ({"threshold": -1}, r"`threshold` must be a number in \[0, 2\]"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else next(iter(v)),
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockInfluenceMonitor(**kwargs)


def test_unknown_architecture_fails_before_training(tmp_path):
    class NoHF(TinyLM):
        def __init__(self):
            super().__init__()
            self.model.model.layers_renamed = self.model.model.layers
            del self.model.model.layers
            self.model.config.model_type = "mystery"
            self.steps = 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return super().training_step(batch, batch_idx)

    module = NoHF()
    with pytest.raises(ValueError, match=r"model_type='mystery'.*searched"):
        fast_trainer(tmp_path, callbacks=[BlockInfluenceMonitor()], max_steps=1).fit(module, loader())
    assert module.steps == 0


def test_ddp_two_ranks_equal_single_process_over_union(ddp_runs):
    """2 CPU processes (gloo) on different shards: BI = single-process BI over the union of their tokens."""
    from lp_callbacks import measure_depth

    ranks = ddp_runs("monitor")
    for key in ("bi", "angular2"):  # every rank holds the reduced values
        assert torch.equal(ranks[0][key], ranks[1][key])
    assert ranks[0]["tokens"] == ranks[1]["tokens"]
    union = measure_depth(TinyLM(lr=0.0).model, loader(length=16, batch_size=16), block_sizes=(2,))
    assert ranks[0]["bi"].dtype == torch.float64
    torch.testing.assert_close(ranks[0]["bi"], union.block_influence, atol=1e-6, rtol=0)
    torch.testing.assert_close(ranks[0]["angular2"], union.angular_distances[2], atol=1e-6, rtol=0)
    assert ranks[0]["tokens"] == union.tokens
