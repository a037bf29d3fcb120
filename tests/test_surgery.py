"""Tests for lp_callbacks.surgery: drop_layers keeps every family exact (forward, KV cache, reload) or refuses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, HIDDEN, LAYERS, VOCAB, random_batch, tiny_model
from torch import nn

from lp_callbacks import architectures
from lp_callbacks.architectures import get_decoder_layers
from lp_callbacks.surgery import drop_layers, drop_optimizer_params

# Families with per-layer facts beyond conftest's set: MoE layouts, NoPE lists, a multimodal wrapper.
EXTRA = ["qwen2_moe_step2", "qwen3_moe", "smollm3", "gemma3_multimodal", "gpt2_inverse_scale"]
ALL = FAMILIES + EXTRA


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is as fast, and avoids spinning OpenMP threads on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _extra_config(name: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=64,
                  num_hidden_layers=6, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "qwen2_moe_step2":
        # experts on blocks 1 and 3 only (step 2, block 5 forced dense); alternating sliding windows
        return tf.Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, shared_expert_intermediate_size=16, decoder_sparse_step=2,
                                 mlp_only_layers=[5], use_sliding_window=True, sliding_window=8, max_window_layers=6)
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, mlp_only_layers=[0, 4])
    if name == "smollm3":
        return tf.SmolLM3Config(**common, num_key_value_heads=2, no_rope_layer_interval=2, use_sliding_window=True,
                                sliding_window=8)
    if name == "gemma3_multimodal":
        text = dict(common, num_key_value_heads=2, head_dim=8, sliding_window=8)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                      patch_size=14)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127,
                               boi_token_index=125, eoi_token_index=126)
    if name == "gpt2_inverse_scale":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=6, n_head=4, n_positions=128, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, scale_attn_by_inverse_layer_idx=True,
                             reorder_and_upcast_attn=True)
    raise ValueError(name)


def _model(name: str) -> nn.Module:
    if name in FAMILIES:
        return tiny_model(name)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_extra_config(name), attn_implementation="eager").eval()


# Removals that move survivors, except for GPT-2 with inverse-index scaling, which only allows trailing ones.
def _drop(name: str) -> list[int]:
    return [4, 5] if name == "gpt2_inverse_scale" else [1, 3]


def _bypass_hook(module, args, kwargs, output):
    # makes a block the identity: what "running only the kept blocks" means on the original model
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def _logits_without(model: nn.Module, removed: list[int], batch: dict) -> torch.Tensor:
    layers = get_decoder_layers(model)
    handles = [layers[i].register_forward_hook(_bypass_hook, with_kwargs=True) for i in removed]
    try:
        return model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()


def _block_attributes(model: nn.Module) -> list:
    """Plain attributes of every submodule of every block (layer_idx, scaling, sliding_window, types...)."""
    plain = (bool, int, float, str, type(None))
    return [
        (i, name, type(m).__name__, {k: v for k, v in vars(m).items() if isinstance(v, plain) and k != "training" and not k.startswith("_lp_")})
        for i, block in enumerate(get_decoder_layers(model))
        for name, m in block.named_modules()
    ]


def _snapshot(model: nn.Module) -> tuple:
    layers = get_decoder_layers(model)
    return ([id(b) for b in layers], json.dumps(model.config.to_dict(), sort_keys=True, default=str),
            _block_attributes(model), [p.requires_grad for p in model.parameters()])


def _text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True)


# --------------------------------------------------------------------------------------------- drop_layers: exact


@pytest.mark.parametrize("name", ALL, ids=ALL)
def test_forward_equals_kept_blocks_of_original(name):
    model = _model(name)
    batch = random_batch()
    removed = _drop(name)
    old_layers = list(get_decoder_layers(model))
    old_types = getattr(_text_config(model), "layer_types", None)
    expected = _logits_without(model, removed, batch)
    params_before = {id(p) for i, b in enumerate(old_layers) if i not in removed for p in b.parameters()}

    kept = drop_layers(model, removed)

    assert kept == [i for i in range(6) if i not in removed]
    layers = get_decoder_layers(model)
    assert [id(b) for b in layers] == [id(old_layers[i]) for i in kept]  # same objects: optimizer identity kept
    assert {id(p) for b in layers for p in b.parameters()} == params_before
    config = _text_config(model)
    assert config.num_hidden_layers == len(kept)
    if old_types is not None:
        assert config.layer_types == [old_types[i] for i in kept]
    for i, block in enumerate(layers):
        assert {m.layer_idx for m in block.modules() if getattr(m, "layer_idx", None) is not None} <= {i}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma2"], ids=["llama", "gemma2"])
def test_indices_use_current_numbering(name):
    model = _model(name)
    batch = random_batch()
    old_types = list(model.config.layer_types or []) if getattr(model.config, "layer_types", None) else None
    expected = _logits_without(model, [1, 2], batch)
    assert drop_layers(model, [1]) == [0, 2, 3, 4, 5]
    assert drop_layers(model, [1]) == [0, 2, 3, 4]  # block 1 is now the original block 2
    if old_types is not None:
        assert model.config.layer_types == [old_types[i] for i in (0, 3, 4, 5)]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL, ids=ALL)
def test_generate_with_cache_equals_without(name):
    model = _model(name)
    drop_layers(model, [5] if name == "gpt2_inverse_scale" else [2])
    prompt = random_batch(batch_size=2, seq_len=12, seed=1)  # past the sliding window of 8 once generating
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**prompt, use_cache=True, **kwargs)
        uncached = model.generate(**prompt, use_cache=False, **kwargs)
    assert cached.shape[1] > 12
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL, ids=ALL)
def test_save_pretrained_round_trip(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(name)
    old_types = getattr(_text_config(model), "layer_types", None)
    kept = drop_layers(model, _drop(name))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()

    config = _text_config(reloaded)
    assert config.num_hidden_layers == len(kept) == len(get_decoder_layers(reloaded))
    if old_types is not None:
        assert config.layer_types == [old_types[i] for i in kept]
    # the rebuilt blocks took the same construction-time decisions (scale, window, RoPE, MoE or dense MLP)
    assert _block_attributes(reloaded) == _block_attributes(model)
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_moe_sparse_step_kept_when_pattern_survives():
    model = _model("qwen2_moe_step2")
    drop_layers(model, [0, 1])  # kept 2,3,4,5 -> 0,1,2,3; experts stay on old 3 = new 1 with step 2
    assert model.config.decoder_sparse_step == 2
    assert model.config.mlp_only_layers == [3]


def test_moe_sparse_step_rewritten_when_pattern_would_shift():
    model = _model("qwen2_moe_step2")
    had_experts = [type(b.mlp).__name__ for b in model.model.layers]
    kept = drop_layers(model, [2])  # old 3 (experts) becomes new 2, which step 2 would make dense
    assert model.config.decoder_sparse_step == 1
    assert model.config.mlp_only_layers == [0, 3, 4]
    assert [type(b.mlp).__name__ for b in model.model.layers] == [had_experts[i] for i in kept]


def test_smollm3_no_rope_layers_sliced():
    model = _model("smollm3")
    old = list(model.config.no_rope_layers)
    drop_layers(model, [1, 3])
    assert model.config.no_rope_layers == [old[i] for i in (0, 2, 4, 5)]
    assert [b.self_attn.use_rope for b in model.model.layers] == model.config.no_rope_layers


def test_gpt2_n_layer_follows_num_hidden_layers():
    model = _model("gpt2")
    drop_layers(model, [0])
    assert model.config.n_layer == model.config.num_hidden_layers == 5
    assert model.config.to_dict()["n_layer"] == 5


def test_reload_in_fresh_process_without_lp_callbacks(tmp_path):
    names = ["llama", "gemma2", "gemma3_text", "gpt2", "falcon", "qwen2_moe_step2", "smollm3"]
    batch = random_batch()
    expected = {}
    for name in names:
        model = _model(name)
        kept = drop_layers(model, _drop(name))
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = (str(tmp_path / name), len(kept), model(**batch).logits)
    torch.save({"batch": batch, "models": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent("""
        import sys, torch
        from transformers import AutoModelForCausalLM
        data = torch.load(sys.argv[1])
        for name, (path, num_layers, logits) in data["models"].items():
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
            config = model.config.get_text_config(decoder=True)
            assert config.num_hidden_layers == num_layers, (name, config.num_hidden_layers)
            with torch.no_grad():
                torch.testing.assert_close(model(**data["batch"]).logits, logits, rtol=1e-5, atol=1e-6, msg=name)
        assert not any(m.startswith("lp_callbacks") for m in sys.modules), "lp_callbacks was imported"
        print("RELOADED", len(data["models"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "expected.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"RELOADED {len(names)}" in done.stdout


def test_custom_model_with_layers_path():
    class Block(nn.Module):
        def __init__(self, idx: int):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.layer_idx = idx

        def forward(self, x):
            return x + self.proj(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block(i) for i in range(4))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    net, x = Net(), torch.randn(2, 4)
    with pytest.raises(ValueError, match="Could not find the decoder layers"):
        drop_layers(net, [1])
    expected = net.blocks[3](net.blocks[2](net.blocks[0](x)))
    assert drop_layers(net, [1], layers_path="blocks") == [0, 2, 3]
    assert [b.layer_idx for b in net.blocks] == [0, 1, 2]
    torch.testing.assert_close(net(x), expected)


def test_works_through_lightning_module_and_compile():
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("llama")

    module = Module()
    assert drop_layers(module, [0]) == [1, 2, 3, 4, 5]
    assert module.model.config.num_hidden_layers == 5
    compiled = torch.compile(module.model)  # wrapping only; nothing is compiled until called
    assert drop_layers(compiled, [4]) == [0, 1, 2, 3]
    assert len(module.model.model.layers) == module.model.config.num_hidden_layers == 4


def test_empty_indices_change_nothing():
    model = _model("gemma2")
    before = _snapshot(model)
    assert drop_layers(model, []) == list(range(6))
    assert _snapshot(model) == before


# ---------------------------------------------------------------------------------------- drop_layers: refusals

BAD_INDICES = [
    pytest.param([6], ValueError, r"`indices` must be layer positions in \[0, 5\].*got \[6\]", id="too-large"),
    pytest.param([-1], ValueError, r"`indices` must be layer positions in \[0, 5\].*got \[-1\]", id="negative"),
    pytest.param([1, 1], ValueError, r"`indices` must be unique.*got \[1\] more than once", id="duplicate"),
    pytest.param(list(range(6)), ValueError, r"`indices` would remove all 6 decoder layers", id="all"),
    pytest.param([1.0], TypeError, r"`indices` must hold ints.*got 1\.0", id="float"),
    pytest.param([True], TypeError, r"`indices` must hold ints.*bool True", id="bool"),
    pytest.param(3, TypeError, r"`indices` must be a sequence of ints.*got 3", id="scalar"),
    pytest.param("1", TypeError, r"`indices` must be a sequence of ints.*got '1'", id="string"),
]


@pytest.mark.parametrize(("indices", "error", "match"), BAD_INDICES)
def test_bad_indices_refused_and_model_untouched(indices, error, match):
    model = _model("gemma2")
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        drop_layers(model, indices)
    assert _snapshot(model) == before


def test_numpy_and_tensor_indices_accepted():
    import numpy as np

    assert drop_layers(_model("llama"), np.array([1, 2])) == [0, 3, 4, 5]
    assert drop_layers(_model("llama"), torch.tensor([0])) == [1, 2, 3, 4, 5]


def test_gpt2_inverse_layer_scale_refuses_moving_blocks():
    model = _model("gpt2_inverse_scale")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"`indices`=\[2\] exactly: .*inverse_layer_idx=True.*indices=\[5\]"):
        drop_layers(model, [2])
    assert _snapshot(model) == before
    assert drop_layers(model, [5]) == [0, 1, 2, 3, 4]  # nothing moves: exact


def test_gpt2_inverse_layer_scale_refusal_is_needed(tmp_path, monkeypatch):
    # Without the refusal a moved block keeps its old scale in memory but gets a new one when reloaded.
    from transformers import AutoModelForCausalLM

    table = dict(architectures.ARCHITECTURES)
    table["gpt2"] = dataclasses.replace(table["gpt2"], renumber_refusal=None)
    monkeypatch.setattr(architectures, "ARCHITECTURES", table)
    model = _model("gpt2_inverse_scale")
    drop_layers(model, [2])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.transformer.h[2].attn.scaling != model.transformer.h[2].attn.scaling
    batch = random_batch()
    with torch.no_grad():
        assert not torch.allclose(reloaded(**batch).logits, model(**batch).logits)


def test_heterogeneous_config_refused():
    model = _model("llama")
    if not hasattr(model.config, "is_heterogeneous"):
        pytest.skip("this transformers has no per_layer_config")
    model.config.per_layer_config = {1: {"intermediate_size": 48}}
    before = _snapshot(model)
    with pytest.raises(ValueError, match="does not support heterogeneous configs"):
        drop_layers(model, [0])
    assert _snapshot(model) == before


def test_unknown_family_refused():
    import transformers as tf

    config = tf.HeliumConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = tf.AutoModelForCausalLM.from_config(config)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"model_type='helium'.*Supported model types: .*llama"):
        drop_layers(model, [1])
    assert _snapshot(model) == before


def test_inconsistent_layer_idx_refused():
    model = _model("llama")
    model.model.layers[3].self_attn.layer_idx = 7
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot renumber LlamaAttention 'self_attn' of block 3: .* is 7"):
        drop_layers(model, [1])
    assert _snapshot(model) == before


def test_config_layer_count_mismatch_refused():
    model = _model("gemma2")
    model.config.num_hidden_layers = 7
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"num_hidden_layers=7 but the decoder holds 6 layers"):
        drop_layers(model, [1])
    assert _snapshot(model) == before


def test_per_layer_field_of_wrong_length_refused():
    model = _model("gemma2")
    model.config.__dict__["layer_types"] = ["full_attention"] * 5  # bypass config validation
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"config.layer_types should hold one entry per layer \(6\)"):
        drop_layers(model, [1])
    assert _snapshot(model) == before


# -------------------------------------------------------------------------------------- drop_optimizer_params


def test_drop_optimizer_params_keeps_survivor_state():
    model = _model("llama").train()
    block = model.model.layers[2]
    dead = list(block.parameters())
    dead_ids = {id(p) for p in dead}
    # the removed block gets its own group: it must stay, empty, for the scheduler's per-group LRs
    optimizer = torch.optim.Adam([
        {"params": [p for p in model.parameters() if id(p) not in dead_ids]},
        {"params": dead, "lr": 1e-4},
    ], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batch = random_batch()

    def step():
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        scheduler.step()

    step()
    step()
    moments = {id(p): optimizer.state[p]["exp_avg"].clone() for p in optimizer.param_groups[0]["params"]}
    drop_layers(model, [2])
    assert drop_optimizer_params(optimizer, dead) == len(dead)

    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"] == []
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.parameters()}
    assert not any(id(p) in dead_ids for p in optimizer.state)
    for p in optimizer.param_groups[0]["params"]:
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], moments[id(p)], rtol=0, atol=0)
    step()  # the pruned model still trains
    assert scheduler.get_last_lr() == [1e-3 * 0.5**3, 1e-4 * 0.5**3]

    state = optimizer.state_dict()
    fresh = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [], "lr": 1e-4}], lr=1e-3)
    fresh.load_state_dict(state)
    for p in model.parameters():
        torch.testing.assert_close(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"], rtol=0, atol=0)


def test_drop_optimizer_params_validates():
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer, got list"):
        drop_optimizer_params([], [])
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="`params` must hold tensors, got int"):
        drop_optimizer_params(optimizer, [1])


def test_restore_layers_rebuilds_the_original_model(family):  # for checkpoints written before a removal
    from lp_callbacks.surgery import removed_original_indices, restore_layers

    model = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    batch = random_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    drop_layers(model, [1, 3])
    assert removed_original_indices(model) == [1, 3]
    assert all(p.is_meta for i in (1, 3) for p in get_decoder_layers(model).__dict__["_lp_removed_blocks"][i].parameters())
    assert restore_layers(model, range(LAYERS)) == list(range(LAYERS)) and removed_original_indices(model) == []
    model.load_state_dict(state)
    assert model.config.to_dict() == config
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected)
    with pytest.raises(ValueError, match=r"cannot restore original blocks \[7\]"):
        restore_layers(model, [7])


def test_restore_after_moe_layout_rewrite_gives_back_the_original_config(tmp_path):
    """drop_layers may state a Qwen-MoE layout explicitly (decoder_sparse_step=1 + mlp_only_layers); growing the
    blocks back must restore the original step too, or the reloaded model puts experts on every block."""
    import transformers as tf

    from lp_callbacks.surgery import restore_layers

    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, intermediate_size=64, num_hidden_layers=5, moe_intermediate_size=16,
                               num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    original, state = model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    drop_layers(model, [0])
    assert model.config.decoder_sparse_step == 1  # the rewrite this test is about
    restore_layers(model, range(5))
    model.load_state_dict(state)
    assert model.config.to_dict() == original
    model.save_pretrained(tmp_path / "restored")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "restored", attn_implementation="eager").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
