"""Distillation math: the forward KL of next-token distributions in fp32 chunks, and hidden-state alignment.

Pure tensor functions, no Lightning: :class:`~lp_callbacks.DistillationCallback` and
:func:`~lp_callbacks.evaluation.teacher_agreement` both use them, and a module that computes its own loss can too.

The KD term of position ``t`` (whose logits predict token ``t + 1``) at temperature ``T`` is::

    T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

averaged over the real positions (``next_token_mask``), in nats. It is computed in fp32 chunks of ``chunk_size``
positions whatever the logits' dtype; the gradient of each chunk is computed in the same pass
(``(softmax(z_student / T) - p_teacher) / T``) and kept in the logits' dtype, so a 49k or 262k vocabulary never
holds more than one chunk of fp32 probabilities (the logits themselves stay as the models gave them).

Example:
    >>> logits = torch.randn(2, 6, 50)
    >>> mask = next_token_mask(attention_mask=torch.ones(2, 6, dtype=torch.long))
    >>> float(kd_loss(logits, logits, mask))
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lp_callbacks.validation import check_int, check_number

__all__ = [
    "IGNORE_INDEX",
    "aligned_hidden_pairs",
    "hidden_alignment_loss",
    "kd_loss",
    "kl_per_position",
    "next_token_mask",
    "next_token_targets",
]

#: Label value of positions that do not count (Hugging Face's convention).
IGNORE_INDEX = -100


def next_token_mask(labels: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
    """``(B, T)`` bool: True at the positions whose logits predict a real next token.

    With ``labels`` (HF convention, unshifted: ``labels[:, t + 1]`` is the target of position ``t``), a position
    counts when its target is not ``-100``; otherwise when both it and the next token are real
    (``attention_mask`` is 1 at ``t`` and ``t + 1``). The last position never counts.

    Raises:
        ValueError: neither is given, or they are not ``(B, T)``.
    """
    reference = labels if labels is not None else attention_mask
    if reference is None or reference.dim() != 2:
        raise ValueError(
            "`next_token_mask` needs `labels` or `attention_mask` of shape (batch, seq_len), got"
            f" {None if reference is None else tuple(reference.shape)}."
        )
    mask = torch.zeros(reference.shape, dtype=torch.bool, device=reference.device)
    if labels is not None:
        mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        if attention_mask is not None:
            mask[:, :-1] &= attention_mask[:, :-1].bool()
    else:
        assert attention_mask is not None
        real = attention_mask.bool()
        mask[:, :-1] = real[:, :-1] & real[:, 1:]
    return mask


def next_token_targets(
    input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(mask, targets)``, both ``(B, T)``: :func:`next_token_mask` (every position but the last when neither
    ``labels`` nor ``attention_mask`` is given) and the token each position predicts, ``labels[:, t + 1]`` (else
    ``input_ids[:, t + 1]``; 0 at the last position, which never counts)."""
    if labels is None and attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = next_token_mask(labels=labels, attention_mask=attention_mask)
    source = labels if labels is not None else input_ids
    targets = torch.zeros_like(source)
    targets[:, :-1] = source[:, 1:]
    return mask, targets


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, top_k: int | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The student's log-probabilities over the vocabulary, the teacher's (over its ``top_k`` tokens, renormalised,
    whose ids come third; ``None``: the whole vocabulary), in fp32 (fp64 for fp64 input)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = teacher_logits.to(device=student_logits.device, dtype=dtype) / temperature
    tokens = None
    if top_k is not None:
        teacher, tokens = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)
    return log_q, torch.log_softmax(teacher, dim=-1), tokens


def _kl(log_q: Tensor, log_p: Tensor, tokens: Tensor | None) -> Tensor:
    """Per row ``sum p (log p - log q)`` over the teacher's tokens; a token of probability 0 adds 0."""
    p = log_p.exp()
    log_q_at = log_q if tokens is None else log_q.gather(-1, tokens)
    return torch.where(p > 0, p * (log_p - log_q_at), torch.zeros_like(p)).sum(-1)


def kl_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """``KL(teacher || student)`` of each row ``(N, V) -> (N,)``, in fp32 (fp64 for fp64 input), in nats, not scaled.

    With ``top_k`` the teacher keeps its ``k`` largest logits per row (renormalised), and the student's full
    distribution is read at those tokens (sparse KD). Teacher tokens of probability 0 add 0.
    """
    return _kl(*_log_probs(student_logits, teacher_logits, temperature, top_k))


def _chunk_rows(student: Tensor, teacher: Tensor, chunk: Tensor) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's logits at the positions ``chunk`` (indexed on each one's device)."""
    return student.index_select(0, chunk), teacher.index_select(0, chunk.to(teacher.device))


def _kl_and_grad(student_rows: Tensor, teacher_rows: Tensor, temperature: float, top_k: int | None) -> tuple[Tensor, Tensor]:
    """Summed ``KL(teacher || student)`` of the rows and its gradient with respect to the student's logits,
    ``(softmax(z_s / T) - p_teacher) / T`` (``p_teacher`` scattered over the vocabulary under ``top_k``)."""
    log_q, log_p, tokens = _log_probs(student_rows, teacher_rows, temperature, top_k)
    kl = _kl(log_q, log_p, tokens).sum()
    grad = log_q.exp_()  # q, in place of log_q (no longer needed)
    if tokens is None:
        grad.sub_(log_p.exp())
    else:
        grad.scatter_add_(-1, tokens, -log_p.exp())
    return kl, grad.div_(temperature)


class _ChunkedKD(torch.autograd.Function):
    """The summed KL and, chunk by chunk in the same pass, its gradient (as fused losses do, e.g. Liger's): one
    softmax per chunk instead of a forward, a recomputed forward and its backward; the gradient is kept in the
    logits' dtype, the tensor autograd would build for them in backward anyway."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, rows: Tensor, temperature: float,  # type: ignore[override]
                top_k: int | None, chunk_size: int) -> Tensor:
        grad = torch.zeros_like(student)
        total = 0
        for chunk in rows.split(chunk_size):
            kl, chunk_grad = _kl_and_grad(*_chunk_rows(student, teacher, chunk), temperature, top_k)
            total = total + kl
            grad.index_copy_(0, chunk, chunk_grad.to(grad.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
    if student_logits.dim() != 3 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "student and teacher logits must both be (batch, seq_len, vocab) of the same shape, got"
            f" {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} (a teacher with another vocabulary"
            " cannot be distilled from token by token)."
        )
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"`mask` must have shape {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}.")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = 128,
) -> Tensor:
    """Mean over the real positions of ``T^2 * KL(teacher || student)`` of the next-token distributions.

    Args:
        student_logits: ``(B, T, V)``, any dtype; gradients flow into it.
        teacher_logits: ``(B, T, V)``, any dtype and device (moved chunk by chunk); never differentiated.
        mask: ``(B, T)`` bool of the positions that count (:func:`next_token_mask`).
        temperature: softening ``T > 0`` of both distributions; the loss is scaled by ``T^2`` (Hinton et al.) so
            its gradients keep their size.
        top_k: keep only the teacher's ``k`` most likely tokens per position (``None``: the full vocabulary).
        chunk_size: positions per fp32 chunk (memory ``~ chunk_size * V * 4`` bytes a few times over, plus the
            gradient of the logits in their dtype, which backward needs anyway).

    Returns:
        A scalar fp32 tensor (0 with a graph when no position counts, so ``backward`` still works).
    """
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_int("top_k", top_k, minimum=1, allow_none=True)
    check_int("chunk_size", chunk_size, minimum=1)
    _check_logits(student_logits, teacher_logits, mask)
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    rows = mask.reshape(-1).nonzero().squeeze(-1).to(student.device)
    if rows.numel() == 0:
        return student_logits.sum().float() * 0.0
    with torch.autocast(device_type=student.device.type, enabled=False):  # fp32 whatever the region's dtype
        if student.requires_grad:
            total = _ChunkedKD.apply(student, teacher, rows, temperature, top_k, chunk_size)
        else:
            total = sum(kl_per_position(*_chunk_rows(student, teacher, chunk), temperature, top_k).sum()
                        for chunk in rows.split(chunk_size))
    return total.float() * (temperature**2 / rows.numel())


def aligned_hidden_pairs(student_original_indices: Sequence[int], teacher_num_layers: int) -> list[tuple[int, int]]:
    """``(student index, teacher index)`` into HF ``hidden_states`` tuples: each surviving block's output with the
    output of the block of the same original index in the full-depth teacher.

    HF convention: ``hidden_states[i]`` is the input of block ``i`` and ``hidden_states[L]`` the final, *normed*
    output. So the output of student block ``j`` (original ``o``) is ``student[j + 1]``, matched with
    ``teacher[o + 1]``; the last entries (both normed) are matched together; a student block whose teacher output
    is the normed last one (the teacher's last block survives as a non-last block: impossible) is skipped.
    """
    num_student = len(student_original_indices)
    pairs = [
        (j + 1, o + 1) for j, o in enumerate(student_original_indices[:-1]) if o + 1 < teacher_num_layers
    ]
    return [*pairs, (num_student, teacher_num_layers)]


def hidden_alignment_loss(
    student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], pairs: Sequence[tuple[int, int]], mask: Tensor
) -> Tensor:
    """Mean over ``pairs`` of the mean over real tokens (``mask`` ``(B, T)``) of ``1 - cos`` between the student's
    and the teacher's hidden state, in fp32: scale-free, 0 when every aligned state points the same way."""
    if not pairs:
        raise ValueError("`pairs` must name at least one (student, teacher) hidden-state pair, got none.")
    real = mask.bool()
    losses = []
    for s, t in pairs:
        student_states = student_hidden[s][real].float()
        teacher_states = teacher_hidden[t].to(student_states.device)[real.to(teacher_hidden[t].device)].float()
        losses.append((1.0 - F.cosine_similarity(student_states, teacher_states, dim=-1, eps=1e-8)).mean())
    return torch.stack(losses).mean()
