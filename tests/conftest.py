"""Tiny randomly initialised HF models, one per supported family: fast, no downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128
HIDDEN = 32
LAYERS = 6


def _common(**extra):
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=64,
               num_hidden_layers=LAYERS, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(extra)
    return cfg


def tiny_config(family: str, num_layers: int = LAYERS):
    """A tiny config of ``family`` with ``num_layers`` decoder blocks."""
    import transformers as tf

    L = num_layers
    if family == "llama":
        return tf.LlamaConfig(**_common(num_hidden_layers=L, num_key_value_heads=2))
    if family == "mistral":
        return tf.MistralConfig(**_common(num_hidden_layers=L, num_key_value_heads=2, sliding_window=8))
    if family == "qwen2":
        return tf.Qwen2Config(**_common(num_hidden_layers=L, num_key_value_heads=2, use_sliding_window=False))
    if family == "qwen3":
        return tf.Qwen3Config(**_common(num_hidden_layers=L, num_key_value_heads=2, head_dim=8))
    if family == "gemma":
        return tf.GemmaConfig(**_common(num_hidden_layers=L, num_key_value_heads=2, head_dim=8))
    if family == "gemma2":
        return tf.Gemma2Config(**_common(num_hidden_layers=L, num_key_value_heads=2, head_dim=8, sliding_window=8))
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**_common(num_hidden_layers=L, num_key_value_heads=2, head_dim=8,
                                             sliding_window=8))
    if family == "phi":
        return tf.PhiConfig(**_common(num_hidden_layers=L))
    if family == "phi3":
        return tf.Phi3Config(**_common(num_hidden_layers=L, num_key_value_heads=2))
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=L, n_head=4, n_positions=128,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**_common(num_hidden_layers=L))
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=4,
                            ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=HIDDEN, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
    if family == "falcon":
        return tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=4,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, new_decoder_architecture=False, multi_query=True)
    if family == "mixtral":
        return tf.MixtralConfig(**_common(num_hidden_layers=L, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2))
    if family in ("olmo", "olmo2", "granite", "cohere", "starcoder2", "stablelm"):
        cls = {"olmo": tf.OlmoConfig, "olmo2": tf.Olmo2Config, "granite": tf.GraniteConfig, "cohere": tf.CohereConfig,
               "starcoder2": tf.Starcoder2Config, "stablelm": tf.StableLmConfig}[family]
        return cls(**_common(num_hidden_layers=L, num_key_value_heads=2))
    if family == "gptj":
        return tf.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=L, n_head=4, rotary_dim=4, n_positions=128,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bloom":
        return tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=L, n_head=4, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown test family {family!r}")


# Also in the architecture table, checked by one end-to-end test each (tests/test_architectures.py).
MORE_FAMILIES = ["mixtral", "olmo", "olmo2", "granite", "cohere", "starcoder2", "stablelm", "gptj", "bloom"]

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2",
            "gpt_neox", "opt", "falcon"]


def tiny_model(family: str = "llama", num_layers: int = LAYERS, seed: int = 0):
    """A tiny causal LM of ``family`` in eval mode, fp32, with fixed random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, num_layers)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def random_batch(batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids in [1, VOCAB) (0 is padding) with an all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not spin against other jobs on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_corpus(directory, lines: int = 300):
    """A small text file of random verse words: enough byte tokens for a few dozen blocks of 32."""
    import random
    from pathlib import Path

    rng = random.Random(0)
    words = "shall i compare thee to a summer's day thou art more lovely and more temperate".split()
    path = Path(directory) / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)))
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- a user's LightningModule
import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402


class RandomTokens(Dataset):
    """``length`` random sequences, right-padded to ``seq_len`` with a random number of pads (0 to seq_len/2)."""

    def __init__(self, length: int = 32, seq_len: int = 16, seed: int = 0, pad: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (length, seq_len), generator=g)
        self.attention_mask = torch.ones_like(self.input_ids)
        if pad:
            for i, n in enumerate(torch.randint(0, seq_len // 2, (length,), generator=g).tolist()):
                if n:
                    self.input_ids[i, -n:] = 0
                    self.attention_mask[i, -n:] = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}


class TinyLM(pl.LightningModule):
    """What a user writes: an HF causal LM attribute and a loss; nothing specific to lp_callbacks."""

    def __init__(self, family: str = "llama", num_layers: int = LAYERS, lr: float = 1e-2, optimizer: str = "adam",
                 seed: int = 0, gradient_checkpointing: bool = False, scheduler: bool = False) -> None:
        super().__init__()
        self.model = tiny_model(family, num_layers, seed).train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lr, self.optimizer_name, self.use_scheduler = lr, optimizer, scheduler

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        self.log("val_loss", out.loss)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader(length: int = 32, batch_size: int = 4, seq_len: int = 16, seed: int = 0, pad: bool = True) -> DataLoader:
    return DataLoader(RandomTokens(length, seq_len, seed, pad), batch_size=batch_size, shuffle=False)


def fast_trainer(tmp_path, **kwargs) -> pl.Trainer:
    """A CPU Trainer with the fast flags of Lightning's own tests."""
    defaults = dict(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=4, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


# ----------------------------------------------------------------------------- two-process runs
def launch_two_process(script, jobs: list[dict], timeout: int = 600) -> None:
    """Run ``jobs`` (dicts with ``job``, ``out`` and the job's settings) one after the other in one launch of
    ``script`` (tests/ddp_script.py, tests/fsdp2_script.py): two processes started once, not once per run."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(jobs, default=str)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory):
    """Every 2-process DDP job of tests/ddp_script.py, run once for the session: ``ddp_runs(name)`` gives the job's
    ``[rank0, rank1]`` results."""
    from pathlib import Path

    base = tmp_path_factory.mktemp("ddp_runs")
    names = ["monitor", "prune", "distill", "freeze", "freeze_prune", "sample"]
    launch_two_process(Path(__file__).parent / "ddp_script.py", [{"job": n, "out": base / n} for n in names])
    return lambda name: [torch.load(base / name / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
