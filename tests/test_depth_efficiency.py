"""DepthEfficiencyMonitor: logged keys and values (CSV, TensorBoard), events, pictures, summary, resume."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import LAYERS, TinyLM, fast_trainer, loader
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.image import imread
from test_flops import _matmul_params

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor
from lp_callbacks.callbacks.depth_efficiency import DepthEfficiencyMonitor, count_tokens, effective_depth
from lp_callbacks.callbacks.layer_prune import LayerPruneCallback
from lp_callbacks.events import DepthEvent, collect_depth_events
from lp_callbacks.flops import count_parameters, flops_breakdown, flops_per_token
from lp_callbacks.plotting import bi_matrix

SEQ = 16
KEYS = ["num_layers", "original_num_layers", "params_total", "params_trainable", "flops_per_token", "tokens_per_sec",
        "step_time_sec", "peak_memory_bytes", "layers_below_threshold", "effective_depth"]


def _rows(logger: CSVLogger) -> list[dict[str, float]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows if row.get("depth/num_layers")]


def _valid_png(path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[0] > 50


def _mask_tokens_per_batch(batch_size: int = 4) -> list[int]:
    return [int(b["attention_mask"].sum()) for b in loader(batch_size=batch_size)]


class FakeClock:
    """A clock that moves only when told to: timings are exact and do not depend on how loaded the machine is."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _step_seconds(batch_idx: int) -> float:
    """Seconds training batch ``batch_idx`` takes on the fake clock: distinct per batch, exact in binary."""
    return (batch_idx + 1) / 8


class ClockedLM(TinyLM):
    """A TinyLM whose steps move a :class:`FakeClock`: ``step_seconds(batch_idx)`` per training batch and
    ``validation_seconds`` per validation batch; records the ``global_step`` of each validation batch."""

    def __init__(self, clock: FakeClock, step_seconds: Callable[[int], float] = _step_seconds,
                 validation_seconds: float = 1024.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock, self.step_seconds, self.validation_seconds = clock, step_seconds, validation_seconds
        self.validated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        self.clock.advance(self.step_seconds(batch_idx))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.clock.advance(self.validation_seconds)
        self.validated_at.append(self.trainer.global_step)


class ScriptedDepthChanges(Callback):
    """Stands in for the pruning/freezing callbacks: acts at fixed steps and reports through `depth_events`."""

    def __init__(self, freeze_at: int | None = None, prune_at: int | None = None, prune_layer: int = 2) -> None:
        self.freeze_at, self.prune_at, self.prune_layer = freeze_at, prune_at, prune_layer
        self.depth_events: list[DepthEvent] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        done = {(e.kind, e.step) for e in self.depth_events}
        if step == self.freeze_at and ("freeze", step) not in done:
            for p in pl_module.model.model.layers[0].parameters():
                p.requires_grad_(False)
            self.depth_events.append(DepthEvent(step, "freeze", [0], [0.5], detail="scripted"))
        if step == self.prune_at and ("prune", step) not in done:
            model, i = pl_module.model, self.prune_layer
            del model.model.layers[i]  # a minimal llama surgery, enough for training to go on
            for j, layer in enumerate(model.model.layers):
                layer.self_attn.layer_idx = j
            model.config.num_hidden_layers -= 1
            monitor = next(c for c in trainer.callbacks if isinstance(c, BlockInfluenceMonitor))
            original = monitor.original_indices[i]
            monitor.layers_removed([i])
            self.depth_events.append(DepthEvent(step, "prune", [original], [0.01]))

    def state_dict(self):
        return {"depth_events": [e.to_dict() for e in self.depth_events]}

    def load_state_dict(self, state):
        self.depth_events = [DepthEvent.from_dict(d) for d in state.get("depth_events", [])]


def test_csv_logs_every_key_with_independent_values(tmp_path):
    clock = FakeClock()
    module = ClockedLM(clock)
    logger = CSVLogger(tmp_path, name="csv")
    monitor = DepthEfficiencyMonitor(log_every_n_steps=2, clock=clock)
    trainer = fast_trainer(tmp_path, max_steps=6, logger=logger, callbacks=[BlockInfluenceMonitor(), monitor])
    trainer.fit(module, loader())

    rows = _rows(logger)
    assert [int(r["step"]) for r in rows] == [1, 2, 4, 6]
    for row in rows:
        assert all(f"depth/{k}" in row for k in KEYS), sorted(row)
        assert row["depth/num_layers"] == row["depth/original_num_layers"] == LAYERS
        assert row["depth/params_total"] == row["depth/params_trainable"] == module.model.num_parameters()
        independent = 2 * _matmul_params(module.model) + 4.0 * 4 * 8 * SEQ * LAYERS
        assert row["depth/flops_per_token"] == pytest.approx(independent)
        assert row["depth/peak_memory_bytes"] > 2**20
        assert 0 <= row["depth/layers_below_threshold"] <= LAYERS
        assert 1 <= row["depth/effective_depth"] <= LAYERS

    # per interval (batches [a, b)): step time = the clock's seconds / steps, tokens/s = attention-mask sum / seconds
    per_batch = _mask_tokens_per_batch()
    for row, (a, b) in zip(rows, [(0, 1), (1, 2), (2, 4), (4, 6)]):
        seconds = sum(_step_seconds(i) for i in range(a, b))
        assert row["depth/step_time_sec"] == seconds / (b - a)
        assert row["depth/tokens_per_sec"] == sum(per_batch[a:b]) / seconds

    summary = json.loads((tmp_path / "csv" / "version_0" / "depth" / "summary.json").read_text())
    assert summary["metrics"] == {k: v for k, v in rows[-1].items() if k.startswith("depth/")}
    assert summary["num_layers"] == {"before": LAYERS, "after": LAYERS}
    assert summary["tokens_seen"] == sum(per_batch[:6])
    assert summary["loss"]["before"] > 0 and summary["perplexity"]["after"] == pytest.approx(
        math.exp(summary["loss"]["after"]))
    for name in ("bi_heatmap.png", "bi_profile.png", "events.png"):
        _valid_png(tmp_path / "csv" / "version_0" / "depth" / name)


def _csv_rows(logger: CSVLogger) -> list[dict[str, float]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _table(text: str) -> dict[str, list[str]]:
    """The summary table as ``{label: cells}``: a label fills the 20 columns after the 2-space indent."""
    return {line[2:22].strip(): line[22:].split() for line in text.splitlines()[2:]}


def _fmt(value: float, kind: str) -> str:
    return {"int": f"{int(value):,}", "sci": f"{value:.3e}", "num": f"{value:.4g}"}[kind]


def test_summary_figures_are_the_logged_values_they_name(tmp_path, monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr("lp_callbacks.callbacks.depth_efficiency.rank_zero_info", printed.append)
    clock = FakeClock()
    logger = CSVLogger(tmp_path, name="csv")
    monitor = DepthEfficiencyMonitor(log_every_n_steps=2, clock=clock)  # loss_window=10: longer than the run
    callbacks = [BlockInfluenceMonitor(log_every_n_steps=1), LayerPruneCallback(num_layers=1, at_steps=[3]), monitor]
    steps = 6
    trainer = fast_trainer(tmp_path, max_steps=steps, logger=logger, log_every_n_steps=1, callbacks=callbacks)
    trainer.fit(ClockedLM(clock), loader())

    rows = _csv_rows(logger)
    losses = [r["train_loss"] for r in rows if "train_loss" in r]  # what the module logged, every step
    depth = [r for r in rows if "depth/num_layers" in r]
    first, last = depth[0], depth[-1]
    summary = monitor.run_summary
    assert len(losses) == steps and losses[0] != losses[-1]
    assert summary["loss"] == {"before": losses[0], "after": losses[-1]}
    assert summary["perplexity"] == {"before": math.exp(losses[0]), "after": math.exp(losses[-1])}
    for key in ("num_layers", "params_total", "params_trainable", "flops_per_token"):
        assert summary[key] == {"before": first[f"depth/{key}"], "after": last[f"depth/{key}"]}, key
    assert summary["num_layers"] == {"before": LAYERS, "after": LAYERS - 1}
    for key in ("peak_memory_bytes", "effective_depth", "layers_below_threshold"):
        assert summary[key] == last[f"depth/{key}"], key

    train_seconds = sum(_step_seconds(i) for i in range(steps))
    tokens = sum(_mask_tokens_per_batch()[:steps])
    logged_steps = [0] + [int(r["step"]) for r in depth]
    per_interval = [b - a for a, b in zip(logged_steps, logged_steps[1:])]
    assert sum(r["depth/step_time_sec"] * n for r, n in zip(depth, per_interval)) == train_seconds
    assert summary["train_time_sec"] == train_seconds and summary["tokens_seen"] == tokens
    assert summary["step_time_sec_mean"] == train_seconds / steps
    assert summary["tokens_per_sec_mean"] == tokens / train_seconds

    (text,) = printed
    table = _table(text)
    figures = {"decoder layers": ("num_layers", "int"), "params total": ("params_total", "int"),
               "params trainable": ("params_trainable", "int"), "FLOPs/token (fwd)": ("flops_per_token", "sci")}
    for label, (key, kind) in figures.items():
        assert table[label][:2] == [_fmt(first[f"depth/{key}"], kind), _fmt(last[f"depth/{key}"], kind)], label
    change = f"({(losses[-1] - losses[0]) / losses[0]:+.1%})"
    assert table["train loss"] == [_fmt(losses[0], "num"), _fmt(losses[-1], "num"), change]
    assert table["perplexity"][:2] == [_fmt(math.exp(losses[0]), "num"), _fmt(math.exp(losses[-1]), "num")]
    assert table["tokens/s (mean)"] == [_fmt(tokens / train_seconds, "num")]
    assert table["step time s (mean)"] == [_fmt(train_seconds / steps, "num")]
    assert table["peak memory MiB"] == [_fmt(last["depth/peak_memory_bytes"] / 2**20, "num")]
    assert table["effective depth"] == [_fmt(last["depth/effective_depth"], "num")]
    (event,) = [r for r in rows if "depth/event_loss_after" in r]
    before, after = _fmt(event["depth/event_loss_before"], "num"), _fmt(event["depth/event_loss_after"], "num")
    assert f"step 3: prune {monitor.events[0]['original_layers']}, loss {before} -> {after}" in text


def test_tokens_seen_counts_intervals_the_clock_did_not_time(tmp_path):
    monitor = DepthEfficiencyMonitor(log_every_n_steps=1, write_summary=False, save_plots_on_fit_end=False,
                                     clock=FakeClock())  # never moves: no rates, but every token still counts
    fast_trainer(tmp_path, max_steps=3, callbacks=[monitor]).fit(TinyLM("llama", num_layers=2), loader())
    assert "depth/tokens_per_sec" not in monitor.last_metrics and "depth/step_time_sec" not in monitor.last_metrics
    summary = monitor.run_summary
    assert summary["tokens_seen"] == sum(_mask_tokens_per_batch()[:3]) and summary["train_time_sec"] == 0.0
    assert summary["tokens_per_sec_mean"] is None and summary["step_time_sec_mean"] == 0.0


def test_tensorboard_gets_scalars_and_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fast_trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1,
                           callbacks=[BlockInfluenceMonitor(), DepthEfficiencyMonitor()])
    trainer.fit(TinyLM("llama", num_layers=3), loader())
    assert list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    assert {f"depth/{k}" for k in KEYS} <= set(events.Tags()["scalars"])
    assert {"depth/bi_heatmap", "depth/bi_profile", "depth/events"} <= set(events.Tags()["images"])
    assert [e.value for e in events.Scalars("depth/num_layers")] == [3.0, 3.0, 3.0]


def test_synthetic_freeze_and_prune_events(tmp_path, monkeypatch):
    printed: list[str] = []
    monkeypatch.setattr("lp_callbacks.callbacks.depth_efficiency.rank_zero_info", printed.append)
    module = TinyLM("llama")
    layer_params = count_parameters(module.model.model.layers[0]).total
    per_layer_flops = flops_breakdown(module.model.config, SEQ).layers[0].total
    logger = CSVLogger(tmp_path, name="csv")
    monitor = DepthEfficiencyMonitor(loss_window=2)
    bi = BlockInfluenceMonitor()
    # the scripted callback acts before the monitor logs at the same step (callback order)
    trainer = fast_trainer(tmp_path, max_steps=8, logger=logger, log_every_n_steps=2,
                           callbacks=[bi, ScriptedDepthChanges(freeze_at=2, prune_at=4), monitor])
    trainer.fit(module, loader())

    rows = {int(r["step"]): r for r in _rows(logger)}
    total = float(module.model.num_parameters()) + layer_params  # what it was before the prune
    assert rows[2]["depth/params_trainable"] == total - layer_params  # frozen at step 2, logged at step 2
    assert rows[4]["depth/num_layers"] == LAYERS - 1 and rows[4]["depth/original_num_layers"] == LAYERS
    assert rows[4]["depth/params_total"] == total - layer_params
    assert rows[2]["depth/flops_per_token"] - rows[4]["depth/flops_per_token"] == pytest.approx(per_layer_flops)
    assert "depth/event_loss_after" in rows[4] or "depth/event_loss_after" in rows[6]

    kinds = [(e["kind"], e["step"], e["original_layers"], e["source"]) for e in monitor.events]
    assert kinds == [("freeze", 2, [0], "ScriptedDepthChanges"), ("prune", 4, [2], "ScriptedDepthChanges")]
    for event in monitor.events:
        assert event["loss_before"] > 0 and event["loss_after"] > 0
        assert event["status"] in ("recovered", "recovering")
        assert event["status"] != "recovered" or event["recovery_steps"] >= 0

    matrix, steps = bi_matrix(bi.history, LAYERS)
    after = [j for j, s in enumerate(steps) if s > 4]
    assert after and all(math.isnan(matrix[2, j]) for j in after)  # the removed layer shows as removed

    out = tmp_path / "csv" / "version_0" / "depth"
    _valid_png(out / "events.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_layers"] == {"before": LAYERS, "after": LAYERS - 1}
    assert summary["params_total"]["after"] == summary["params_total"]["before"] - layer_params
    assert [e["kind"] for e in summary["events"]] == ["freeze", "prune"]
    (table,) = printed
    assert "DepthEfficiencyMonitor summary" in table and "step 4: prune [2], loss" in table


def test_gradient_accumulation_counts_micro_batches(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    seen: list[float] = []

    class Recording(TinyLM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append(loss.item())
            return loss

    monitor = DepthEfficiencyMonitor(log_every_n_steps=2)
    trainer = fast_trainer(tmp_path, max_steps=4, logger=logger, accumulate_grad_batches=2, callbacks=[monitor])
    trainer.fit(Recording("llama", num_layers=2), loader())
    per_step = [(seen[2 * i] + seen[2 * i + 1]) / 2 for i in range(4)]
    assert [v for _, v in monitor._losses.log] == pytest.approx(per_step, rel=1e-5)
    rows = {int(r["step"]): r for r in _rows(logger)}
    per_batch = _mask_tokens_per_batch()
    assert rows[4]["depth/tokens_per_sec"] * rows[4]["depth/step_time_sec"] * 2 == pytest.approx(sum(per_batch[4:8]))


def test_validation_time_is_not_step_time(tmp_path):
    clock = FakeClock()
    module = ClockedLM(clock, num_layers=2)
    monitor = DepthEfficiencyMonitor(log_every_n_steps=2, write_summary=False, save_plots_on_fit_end=False,
                                     clock=clock)
    trainer = fast_trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, callbacks=[monitor])
    trainer.fit(module, loader(), loader(length=4))

    assert module.validated_at == [2, 4]  # the first validation falls inside the interval logged at step 4
    assert monitor.last_logged_step == 4
    train_seconds = _step_seconds(2) + _step_seconds(3)  # batches 2 and 3 are the optimizer steps 3 and 4
    assert monitor.last_metrics["depth/step_time_sec"] == train_seconds / 2  # (1024 + 7/8) / 2 if counted
    tokens = sum(_mask_tokens_per_batch()[2:4])
    assert monitor.last_metrics["depth/tokens_per_sec"] == tokens / train_seconds


def test_resume_keeps_events_and_original_depth(tmp_path):
    kw = {"log_every_n_steps": 2, "enable_checkpointing": False}
    first = DepthEfficiencyMonitor(write_summary=False, save_plots_on_fit_end=False)
    trainer = fast_trainer(tmp_path, max_steps=4, callbacks=[first, ScriptedDepthChanges(freeze_at=2)], **kw)
    module = TinyLM("llama", num_layers=3)
    trainer.fit(module, loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    resumed_tokens: list[int] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            resumed_tokens.append(int(batch["attention_mask"].sum()))

    second = DepthEfficiencyMonitor(output_dir=tmp_path / "out")
    trainer = fast_trainer(tmp_path, max_steps=6, callbacks=[second, ScriptedDepthChanges(freeze_at=2), Spy()], **kw)
    trainer.fit(TinyLM("llama", num_layers=3), loader(), ckpt_path=tmp_path / "last.ckpt")
    assert [e["kind"] for e in second.events] == ["freeze"]  # restored once, not counted twice
    assert second.original_num_layers == 3 and second.baseline == first.baseline
    assert len(resumed_tokens) == 2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tokens_seen"] == sum(_mask_tokens_per_batch()[:4]) + sum(resumed_tokens)


def test_first_loss_restored_from_new_and_old_checkpoint_states():
    monitor = DepthEfficiencyMonitor()
    monitor.load_state_dict({"first_loss": 5.5})
    assert monitor._losses.first_loss == 5.5 and monitor.state_dict()["first_loss"] == 5.5
    monitor.load_state_dict({"first_losses": [5.0, 4.0]})  # saved before the summary used the first step's loss
    assert monitor._losses.first_loss == 5.0


def test_save_plots_on_demand_and_without_bi_monitor(tmp_path):
    monitor = DepthEfficiencyMonitor(save_plots_on_fit_end=False, write_summary=False)
    with pytest.raises(ValueError, match="needs the Trainer"):
        monitor.save_plots()
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=[monitor])
    with pytest.warns(UserWarning, match="no BlockInfluenceMonitor"):
        trainer.fit(TinyLM("llama", num_layers=2), loader())
    assert "depth/effective_depth" not in monitor.last_metrics and "depth/num_layers" in monitor.last_metrics
    paths = monitor.save_plots(output_dir=tmp_path / "plots")
    assert sorted(p.name for p in paths.values()) == ["bi_heatmap.png", "bi_profile.png", "events.png"]
    for path in paths.values():
        _valid_png(path)
    assert not (tmp_path / "depth").exists()  # nothing written at fit end when both are off


def test_effective_depth_definition():
    assert effective_depth([0.1] * 6) == pytest.approx(6.0)
    assert effective_depth([0.3, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_depth([0.2, 0.2, float("nan"), 0.0]) == pytest.approx(2.0)
    assert effective_depth([0.0, 0.0]) is None
    assert 1 < effective_depth([0.5, 0.1, 0.1]) < 3


def test_count_tokens_formats():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert int(count_tokens({"input_ids": ids, "attention_mask": mask})) == 8
    assert count_tokens({"input_ids": ids}) == 10
    assert count_tokens(ids) == 10 and count_tokens((ids, ids)) == 10
    assert count_tokens({"text": "x"}) == 0


def test_collect_events_and_event_validation():
    class A:
        depth_events = [DepthEvent(5, "freeze", [1]), {"step": 2, "kind": "prune", "original_layers": [3]}]

    class B:
        depth_events = None

    assert [(s, e.step) for s, e in collect_depth_events([A(), B(), object()])] == [("A", 2), ("A", 5)]
    with pytest.raises(ValueError, match="kind.*one of .*'prune', 'freeze', 'unfreeze'.*'drop'"):
        DepthEvent(1, "drop", [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one score per layer \\(2\\), got 1"):
        DepthEvent(1, "prune", [0, 1], [0.1])
    with pytest.raises(ValueError, match="non-negative int"):
        DepthEvent(-1, "prune", [0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "`log_every_n_steps` must be an int >= 1 or None, got 0"),
        ({"loss_window": 0}, "`loss_window` must be an int >= 1, got 0"),
        ({"threshold": 3.0}, r"`threshold` must be a number in \[0, 2\] or None, got 3.0"),
        ({"recovery_tolerance": 1.5}, r"`recovery_tolerance` must be a number in \[0, 1\), got 1.5"),
        ({"seq_len": -1}, "`seq_len` must be an int >= 1 or None, got -1"),
        ({"prefix": ""}, "`prefix` must be a non-empty string"),
    ],
    ids=["interval", "window", "threshold", "tolerance", "seq_len", "prefix"],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthEfficiencyMonitor(**kwargs)
    with pytest.raises(TypeError, match="`tokens_fn` must be callable"):
        DepthEfficiencyMonitor(tokens_fn=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`clock` must be callable"):
        DepthEfficiencyMonitor(clock=0.0)  # type: ignore[arg-type]


def test_flops_follow_explicit_seq_len(tmp_path):
    monitor = DepthEfficiencyMonitor(seq_len=64, causal_flops=True, write_summary=False, save_plots_on_fit_end=False)
    module = TinyLM("llama", num_layers=2)
    fast_trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(module, loader())
    expected = flops_per_token(module.model.config, 64, causal=True)
    assert monitor.last_metrics["depth/flops_per_token"] == pytest.approx(expected)
    assert monitor.baseline["seq_len"] == 64


def test_real_pruning_event_reported_end_to_end(tmp_path):
    """LayerPruneCallback + DepthEfficiencyMonitor together: logged depth, the event with its losses, the pictures."""
    import csv as _csv
    import json as _json

    from conftest import LAYERS, TinyLM, fast_trainer, loader
    from lightning.pytorch.loggers import CSVLogger

    from lp_callbacks import BlockInfluenceMonitor, DepthEfficiencyMonitor, LayerPruneCallback

    logger = CSVLogger(tmp_path)
    depth = DepthEfficiencyMonitor(log_every_n_steps=1, loss_window=2)
    prune = LayerPruneCallback(num_layers=2, at_steps=[3])
    fast_trainer(tmp_path, callbacks=[BlockInfluenceMonitor(log_every_n_steps=1), prune, depth], max_steps=6,
                 logger=logger).fit(TinyLM(), loader())
    rows = [r for r in _csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")) if r.get("depth/num_layers")]
    layers = {int(r["step"]): float(r["depth/num_layers"]) for r in rows}
    assert layers[min(layers)] == LAYERS and layers[max(layers)] == LAYERS - 2
    summary = _json.loads((Path(logger.log_dir) / "depth" / "summary.json").read_text())
    (event,) = summary["events"]
    assert event["source"] == "LayerPruneCallback" and event["step"] == 3
    assert event["original_layers"] == prune.removed[0]["original_layers"] and event["loss_before"] is not None
    for name in ("bi_heatmap.png", "bi_profile.png", "events.png"):
        assert (Path(logger.log_dir) / "depth" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
