import pytest
import torch
from conftest import FAMILIES, LAYERS, MORE_FAMILIES, TinyLM, random_batch, tiny_model
from torch import nn

from lp_callbacks.architectures import ARCHITECTURES, decoder_stack, find_hf_model, get_decoder_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_found(family):
    model = tiny_model(family)
    layers = get_decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == LAYERS
    assert model.config.model_type in ARCHITECTURES
    # the owner's forward is the one that receives the 2-D attention mask
    owner = decoder_stack(model).owner
    assert any(layers is child for child in owner.children()) or layers in owner.modules()


def test_base_model_without_head():
    base = tiny_model("llama").model  # LlamaModel
    assert get_decoder_layers(base) is base.layers


def test_seen_through_lightning_module_compile_and_peft():
    module = TinyLM()
    expected = module.model.model.layers
    assert get_decoder_layers(module) is expected
    assert get_decoder_layers(torch.compile(module.model)) is expected  # OptimizedModule._orig_mod
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    layers = get_decoder_layers(lora)
    assert len(layers) == LAYERS and layers is lora.base_model.model.model.layers
    assert find_hf_model(lora) is lora.base_model.model


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])


def test_explicit_path_for_custom_models():
    model = Custom()
    assert get_decoder_layers(model, layers_path="backbone.blocks") is model.backbone.blocks


def test_unknown_model_error_names_what_was_searched():
    with pytest.raises(ValueError, match=r"Could not find the decoder layers of Custom \(no HF config\): searched \['model.layers'.*layers_path"):
        get_decoder_layers(Custom())


@pytest.mark.parametrize(
    ("path", "match"),
    [("backbone.nope", "does not name a torch.nn.ModuleList"), ("", "non-empty dotted attribute path")],
    ids=["missing", "empty-string"],
)
def test_bad_layers_path(path, match):
    with pytest.raises(ValueError, match=match):
        get_decoder_layers(Custom(), layers_path=path)


def test_model_with_no_decoder_layers():
    model = tiny_model("llama")
    model.model.layers = nn.ModuleList()
    with pytest.raises(ValueError, match="has no decoder layers"):
        get_decoder_layers(model)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_measure_prune_generate_reload(family, tmp_path):
    """The rest of the table, end to end: BI, removal, cached generation, save/load round trip."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lp_callbacks import block_influence, drop_layers

    model = tiny_model(family)
    batch = random_batch(2, 10)
    captured = []
    hooks = [l.register_forward_hook(lambda m, a, o: captured.append((a[0], o[0] if isinstance(o, tuple) else o)))
             for l in get_decoder_layers(model)]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    reference = torch.stack([1 - F.cosine_similarity(x.double(), y.double(), dim=-1).mean() for x, y in captured])
    torch.testing.assert_close(block_influence(model, [batch]), reference, atol=1e-6, rtol=0)

    drop_layers(model, [2, 3])
    ids = batch["input_ids"][:1, :5]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    assert reloaded.config.num_hidden_layers == LAYERS - 2


def test_several_models_need_layers_path_and_a_frozen_only_model_is_named():  # RELIABILITY 23
    import warnings

    class TwoModels(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = tiny_model().requires_grad_(False)
            self.student = tiny_model(num_layers=4)

    module = TwoModels()
    with pytest.raises(ValueError, match=r"holds 2 Hugging Face models: `teacher` .*all parameters frozen.*`student`.*layers_path='student.model.layers'"):
        get_decoder_layers(module)
    assert find_hf_model(module, "student.model.layers") is module.student  # the causal LM, not its inner base model
    assert get_decoder_layers(module, "student.model.layers") is module.student.model.layers
    assert get_decoder_layers(module.student, "model.layers") is module.student.model.layers  # the usual relative path
    del module.student
    with pytest.warns(UserWarning, match=r"acts on `teacher` .* all its parameters are frozen"):
        find_hf_model(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_hf_model(module.teacher)  # a bare model passed on purpose (offline measurement): no warning
