"""Which blocks to remove (or freeze): pure functions over scores in the model's current numbering.

Example:
    >>> lowest_scores(torch.tensor([0.9, 0.1, 0.3, 0.05]), 2, protected={3})
    [1, 2]
    >>> best_contiguous_block(torch.tensor([0.4, 0.2, 0.3]), block_size=2, num_layers=4, protected={0})
    [1, 2]
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lp_callbacks.validation import check_bool, check_int

__all__ = ["CRITERIA", "AblationSettings", "best_contiguous_block", "choose_layers", "highest_scores", "last_layers",
           "lowest_scores", "protected_indices", "random_layers", "sample_layers"]

#: Selection criteria of :class:`~lp_callbacks.callbacks.LayerPruneCallback`.
CRITERIA: tuple[str, ...] = ("block_influence", "angular", "last", "random", "ablation")


@dataclass(frozen=True)
class AblationSettings:
    """What ``criterion="ablation"`` measures on: ``batches`` (at most ``max_batches`` of them per measurement),
    all blocks at once or one block at a time (``greedy``, SLEB); see :func:`~lp_callbacks.measure.choose_by_ablation`.
    """

    batches: Iterable[Any]
    max_batches: int | None = None
    greedy: bool = False

    @classmethod
    def build(cls, criterion: str, calibration_dataloader: Any, calibration_batches: int | None,
              ablation_greedy: bool) -> AblationSettings | None:
        """The settings of :class:`~lp_callbacks.LayerPruneCallback`'s arguments (``None`` for another criterion,
        which ignores ``calibration_dataloader``); refuses what ``"ablation"`` cannot run with."""
        check_int("calibration_batches", calibration_batches, minimum=1, allow_none=True)
        check_bool("ablation_greedy", ablation_greedy)
        if criterion != "ablation":
            if ablation_greedy:
                raise ValueError(f"`ablation_greedy=True` applies to criterion='ablation' only, got criterion={criterion!r}.")
            return None
        if calibration_dataloader is None:
            raise ValueError("`criterion='ablation'` needs `calibration_dataloader` (the batches each removal is measured"
                             " on), got None.")
        if isinstance(calibration_dataloader, (str, bytes, Mapping)) or not isinstance(calibration_dataloader, Iterable):
            raise TypeError("`calibration_dataloader` must be an iterable of batches (a DataLoader, a list of dicts),"
                            f" got {type(calibration_dataloader).__name__}.")
        return cls(calibration_dataloader, calibration_batches, ablation_greedy)


def _candidates(k: int, num_layers: int, protected: Collection[int]) -> list[int]:
    """The unprotected layers; raises when fewer than ``k``."""
    candidates = [i for i in range(num_layers) if i not in protected]
    if k > len(candidates):
        raise ValueError(
            f"cannot remove {k} of {num_layers} layers: only {len(candidates)} are not protected (protected: {sorted(protected)})."
        )
    return candidates


def _lowest(values: Tensor, k: int, candidates: list[int]) -> list[int]:
    """The ``k`` candidates with the lowest value (ties: lower index first), sorted."""
    order = torch.argsort(values[candidates], stable=True)[:k]
    return sorted(candidates[i] for i in order.tolist())


def lowest_scores(scores: Tensor, k: int, protected: Collection[int] = ()) -> list[int]:
    """ShortGPT: the ``k`` unprotected layers with the lowest score (NaN = not measured = never chosen), sorted.

    Raises ``ValueError`` when fewer than ``k`` unprotected layers have a finite score.
    """
    candidates = _candidates(k, len(scores), protected)
    measured = [i for i in candidates if torch.isfinite(scores[i])]
    if len(measured) < k:
        raise ValueError(
            f"cannot choose {k} layers by score: only {len(measured)} unprotected layers have a measured (finite)"
            f" score, got {scores.tolist()}."
        )
    return _lowest(torch.nan_to_num(scores.double(), nan=math.inf), k, candidates)


def highest_scores(scores: Tensor, k: int, protected: Collection[int] = ()) -> list[int]:
    """The ``k`` unprotected layers with the highest score, sorted; NaN (not measured) counts as the highest, so an
    unmeasured layer is chosen first (what to keep safe), the opposite of :func:`lowest_scores`.

    Example:
        >>> highest_scores(torch.tensor([0.9, float("nan"), 0.3, 0.9]), 2)
        [0, 1]
    """
    candidates = _candidates(k, len(scores), protected)
    return _lowest(-torch.nan_to_num(scores.double(), nan=math.inf), k, candidates)


def best_contiguous_block(distances: Tensor, block_size: int, num_layers: int, protected: Collection[int] = ()) -> list[int]:
    """Gromov et al.: the run of ``block_size`` layers whose input and output are closest (smallest angular distance).

    ``distances[l]`` is the angular distance from the input of layer l to the output of layer l + block_size - 1.
    """
    if len(distances) != num_layers - block_size + 1:
        raise ValueError(f"expected {num_layers - block_size + 1} distances for block_size={block_size}, got {len(distances)}.")
    best, best_value = None, float("inf")
    for start, value in enumerate(torch.nan_to_num(distances.double(), nan=float("inf")).tolist()):
        block = range(start, start + block_size)
        if value < best_value and not any(i in protected for i in block):
            best, best_value = list(block), value
    if best is None:
        raise ValueError(f"no contiguous run of {block_size} unprotected, measured layers among {num_layers} (protected: {sorted(protected)}).")
    return best


def last_layers(num_layers: int, k: int, protected: Collection[int] = ()) -> list[int]:
    """Baseline: the ``k`` deepest unprotected layers."""
    candidates = _candidates(k, num_layers, protected)
    return candidates[len(candidates) - k :]


def random_layers(num_layers: int, k: int, protected: Collection[int] = (), seed: int = 0) -> list[int]:
    """Baseline: ``k`` unprotected layers drawn with a private generator (the global RNG is left alone)."""
    candidates = _candidates(k, num_layers, protected)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:k]
    return sorted(candidates[i] for i in order.tolist())


def sample_layers(num_layers: int, k: int, seed: int, draw: int, weights: Tensor | None = None) -> list[int]:
    """Draw ``k`` of ``num_layers`` layers without replacement, uniformly or with probabilities proportional to
    ``weights``; the same ``(seed, draw)`` always gives the same layers (a private generator: the global RNG is left
    alone, and every process draws alike without sharing state)."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"cannot draw {k} of {num_layers} layers: k must be in [1, {num_layers}].")
    # torch's CPU generator keeps 32 bits of its seed: mix both numbers into them (str seeds hash with SHA-512)
    generator = torch.Generator().manual_seed(random.Random(f"{seed}:{draw}").getrandbits(32))
    if weights is None:
        order = torch.randperm(num_layers, generator=generator)[:k]
    else:
        order = torch.multinomial(weights.to(torch.float64), k, replacement=False, generator=generator)
    return sorted(order.tolist())


def protected_indices(num_layers: int, first: int, last: int, extra: Collection[int] = ()) -> set[int]:
    """The first ``first``, the last ``last`` and the ``extra`` indices of ``num_layers`` layers (never removed).

    Raises ``ValueError`` for an ``extra`` index (``protected_layers``) out of range.
    """
    bad = [i for i in extra if i >= num_layers]
    if bad:
        raise ValueError(f"`protected_layers` must be original block indices in [0, {num_layers - 1}], got {bad}.")
    return set(range(min(first, num_layers))) | set(range(max(0, num_layers - last), num_layers)) | set(extra)


def choose_layers(
    criterion: str,
    k: int,
    num_layers: int,
    protected: Collection[int] = (),
    seed: int = 0,
    scores: Tensor | None = None,
    model: Any = None,
    ablation: AblationSettings | None = None,
) -> tuple[list[int], list[float]]:
    """The ``k`` layers to remove by ``criterion`` (one of :data:`CRITERIA`) and the score of each (``[]`` without).

    ``scores`` are the BI of each layer for ``"block_influence"``, the angular distances over ``k`` layers (see
    :func:`best_contiguous_block`) for ``"angular"``; ``seed`` seeds ``"random"``; ``"ablation"`` measures
    ``model`` (its blocks numbered as now) on ``ablation.batches`` and scores each chosen layer by its KL.
    """
    if criterion == "ablation":
        if model is None or ablation is None:
            raise ValueError("`criterion='ablation'` measures the model: it needs `model` and `ablation`, got None.")
        from lp_callbacks.measure import choose_by_ablation  # measure imports this module

        chosen, kl, _ = choose_by_ablation(model, ablation.batches, k, protected, greedy=ablation.greedy,
                                           max_batches=ablation.max_batches)
        return chosen, kl
    if criterion == "last":
        return last_layers(num_layers, k, protected), []
    if criterion == "random":
        return random_layers(num_layers, k, protected, seed=seed), []
    if scores is None:
        raise ValueError(f"`criterion={criterion!r}` chooses by score: it needs `scores`, got None.")
    if criterion == "block_influence":
        chosen = lowest_scores(scores, k, protected)
        return chosen, [float(scores[i]) for i in chosen]
    chosen = best_contiguous_block(scores, k, num_layers, protected)
    return chosen, [float(scores[chosen[0]])] * len(chosen)
