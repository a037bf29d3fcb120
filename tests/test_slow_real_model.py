"""The real SmolLM2-135M (30 Llama blocks) on Shakespeare text, inside a Lightning Trainer.

* the monitor's BI profile measured from the training forwards equals ``block_influence()`` and a textbook reference
  (plain forward hooks, cosine in float64, nothing from lp_callbacks) to 1e-4;
* ``LayerPruneCallback(criterion="block_influence")`` removes exactly the lowest-BI blocks of that independent
  measurement, on the same data;
* the exported model loads with ``AutoModelForCausalLM.from_pretrained`` in a process that cannot import
  lp_callbacks, and gives the same logits and the same cached greedy generation.

One Trainer run (LR 0, so the weights stay those of the fresh model the references measure) serves all three tests.

To run (about a minute on 2 CPU cores; the model is cached by ``load_smollm2``):
    pytest -m slow tests/test_slow_real_model.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lp_callbacks import BlockInfluenceMonitor, LayerPruneCallback, block_influence
from lp_callbacks.harness.data import shakespeare_files
from lp_callbacks.harness.models import load_smollm2

pytestmark = pytest.mark.slow

SEQ, BATCH, STEPS = 128, 4, 2
NUM_LAYERS, NUM_REMOVED = 30, 6
PADDED = 40  # the last row of the last batch ends with this many padding tokens: BI must skip them


class LM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss

    def configure_optimizers(self):
        # lr = 0: the weights stay put, so the training forwards see the model the references measure
        return torch.optim.AdamW(self.parameters(), lr=0.0)


class BIBeforeEvent(pl.Callback):
    """Placed between the monitor and the pruner: the BI the pruner is about to use."""

    def __init__(self, monitor: BlockInfluenceMonitor) -> None:
        self.monitor, self.bi = monitor, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == STEPS:
            self.monitor.flush(trainer)
            self.bi = self.monitor.block_influence.clone()


def shakespeare_batches(tokenizer) -> list[dict[str, torch.Tensor]]:
    """``STEPS + 1`` batches ``(BATCH, SEQ)`` of Hamlet: the training ones (the last row right-padded) + one held out."""
    hamlet = next(p for p in shakespeare_files() if p.name == "hamlet_gut.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(hamlet)["input_ids"])[SEQ : SEQ * (1 + (STEPS + 1) * BATCH)]  # skip the header
    batches = []
    for chunk in ids.view(STEPS + 1, BATCH, SEQ):
        batches.append({"input_ids": chunk.clone(), "attention_mask": torch.ones_like(chunk)})
    last = batches[STEPS - 1]
    last["attention_mask"][-1, -PADDED:] = 0
    last["input_ids"][-1, -PADDED:] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return batches


def reference_bi(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Textbook BI, independent of lp_callbacks: ``1 - cos(block input, block output)`` over real tokens, float64."""
    layers = model.model.layers  # LlamaForCausalLM
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of each block, in order

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        captured.append((x, output[0] if isinstance(output, tuple) else output))

    model.eval()
    for batch in batches:
        captured.clear()
        handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
        try:
            with torch.no_grad():
                model(**batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        mask = batch["attention_mask"].bool()  # (B, T)
        for i, (x, y) in enumerate(captured):
            sums[i] += (1 - F.cosine_similarity(x.double(), y.double(), dim=-1))[mask].sum()
        count += int(mask.sum())
    return sums / count


@pytest.fixture(scope="module")
def one_thread():
    # On a shared 2-core machine two OpenMP threads that wait for each other make each step 3-10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    model, tokenizer = load_smollm2()
    batches = shakespeare_batches(tokenizer)
    train, held_out = batches[:STEPS], batches[STEPS]
    export_dir = tmp_path_factory.mktemp("prune") / "pruned"
    monitor = BlockInfluenceMonitor()
    spy = BIBeforeEvent(monitor)
    prune = LayerPruneCallback(num_layers=NUM_REMOVED, at_steps=[STEPS], criterion="block_influence",
                               export_dir=export_dir, tokenizer=tokenizer)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, spy, prune])
    module = LM(model.train())  # from_pretrained returns eval mode
    trainer.fit(module, DataLoader(train, batch_size=None))

    fresh, _ = load_smollm2()  # the same weights, never trained nor pruned
    return SimpleNamespace(
        pruned=module.model.eval(), tokenizer=tokenizer, train=train, held_out=held_out, export_dir=export_dir,
        prune=prune, monitor_bi=spy.bi, reference=reference_bi(fresh, train), offline=block_influence(fresh, train),
    )


def test_monitor_bi_in_trainer_matches_block_influence_and_reference(run):
    assert run.monitor_bi is not None and run.monitor_bi.shape == (NUM_LAYERS,)
    print(f"max |monitor - reference| = {(run.reference - run.monitor_bi).abs().max():.2e},"
          f" max |block_influence() - reference| = {(run.reference - run.offline).abs().max():.2e}")
    # the padded tokens are excluded: the reference counts only real ones
    assert (run.reference - run.monitor_bi).abs().max() < 1e-4
    assert (run.reference - run.offline).abs().max() < 1e-4
    assert (run.offline - run.monitor_bi).abs().max() < 1e-4
    assert run.reference[0] == run.reference.max()  # the first block of an LLM changes its input the most


def test_pruned_blocks_are_the_lowest_bi_of_an_independent_measurement(run):
    candidates = list(range(1, NUM_LAYERS - 1))  # first and last blocks are protected by default
    ranked = sorted(candidates, key=lambda i: float(run.reference[i]))
    expected = sorted(ranked[:NUM_REMOVED])
    # the choice is well determined: the last removed and the first kept block differ by far more than 1e-4
    gap = float(run.reference[ranked[NUM_REMOVED]] - run.reference[ranked[NUM_REMOVED - 1]])
    assert gap > 1e-4, f"near tie in the reference BI ({gap:.2e}): the test would not tell anything"
    print(f"removed {run.prune.removed[0]['original_layers']}, expected {expected}, gap to the next block {gap:.2e},"
          f" event {run.prune.removed[0]['seconds'] * 1e3:.1f} ms")

    (event,) = run.prune.removed
    assert event["original_layers"] == expected and event["step"] == STEPS
    assert event["scores"] == pytest.approx([float(run.reference[i]) for i in expected], abs=1e-4)
    offline_ranked = sorted(candidates, key=lambda i: float(run.offline[i]))
    assert sorted(offline_ranked[:NUM_REMOVED]) == expected
    assert run.pruned.config.num_hidden_layers == NUM_LAYERS - NUM_REMOVED == len(run.pruned.model.layers)


# Runs in a fresh interpreter that refuses any import of lp_callbacks.
_LOADER = textwrap.dedent(
    """
    import importlib.abc, sys

    class RefuseLpCallbacks(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lp_callbacks" or name.startswith("lp_callbacks."):
                raise ImportError(f"this process must not import {name}")
            return None

    sys.meta_path.insert(0, RefuseLpCallbacks())
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir, io_dir = sys.argv[1], sys.argv[2]
    inputs = torch.load(io_dir + "/inputs.pt")
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        logits = model(input_ids=inputs["ids"]).logits
        kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
        prompt = inputs["prompt"]
        cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kwargs)
    assert not [m for m in sys.modules if m.split(".")[0] == "lp_callbacks"]
    torch.save({"logits": logits, "cached": cached, "uncached": uncached, "dtype": str(model.dtype),
                "config_layers": model.config.num_hidden_layers, "layers": len(model.model.layers)},
               io_dir + "/outputs.pt")
    """
)


def test_export_loads_with_plain_transformers_in_a_fresh_process(run, tmp_path):
    record = json.loads((run.export_dir / "lp_pruning.json").read_text())
    assert record["events"][0]["original_layers"] == run.prune.removed[0]["original_layers"]
    assert json.loads((run.export_dir / "config.json").read_text())["num_hidden_layers"] == NUM_LAYERS - NUM_REMOVED

    ids = run.held_out["input_ids"]  # (B, T), text the run never saw
    prompt = ids[:1, :24]
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=run.tokenizer.eos_token_id)
    with torch.no_grad():
        expected = run.pruned(input_ids=ids).logits
        cached = run.pruned.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kwargs)
        uncached = run.pruned.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kwargs)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)  # KV cache consistent after the surgery

    torch.save({"ids": ids, "prompt": prompt}, tmp_path / "inputs.pt")
    script = tmp_path / "load_export.py"
    script.write_text(_LOADER)
    proc = subprocess.run([sys.executable, str(script), str(run.export_dir), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "outputs.pt")
    assert out["config_layers"] == out["layers"] == NUM_LAYERS - NUM_REMOVED
    assert out["dtype"] == "torch.float32"
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["cached"], cached, rtol=0, atol=0)
    torch.testing.assert_close(out["uncached"], cached, rtol=0, atol=0)
