"""Which weights leave a layer and which positions join it. Pure tensor math, no Lightning.

Every function takes one layer's tensors and an exact count and returns a new ``torch.bool`` mask; the
selection is a partial selection (``topk``), never a full sort, and never synchronizes with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def drop_lowest(score: Tensor, mask: Tensor, n: int) -> Tensor:
    """Remove from ``mask`` the ``n`` active positions with the lowest ``score``; returns a new mask."""
    new_mask = mask.clone()
    if n <= 0:
        return new_mask
    candidates = score.detach().float().masked_fill(~mask, float("inf")).view(-1)
    idx = torch.topk(candidates, n, largest=False, sorted=False).indices
    new_mask.view(-1)[idx] = False
    return new_mask


def add_highest(score: Tensor, mask: Tensor, n: int) -> Tensor:
    """Add to ``mask`` the ``n`` inactive positions with the highest ``score``; returns a new mask.

    Already active positions are never picked: they rank below every inactive one (``-inf``), and ``n`` may
    not exceed the number of inactive positions.
    """
    new_mask = mask.clone()
    if n <= 0:
        return new_mask
    candidates = score.detach().float().masked_fill(mask, float("-inf")).view(-1)
    idx = torch.topk(candidates, n, largest=True, sorted=False).indices
    new_mask.view(-1)[idx] = True
    return new_mask


def magnitude_prune(weight: Tensor, mask: Tensor, n: int) -> Tensor:
    """Remove the ``n`` active weights with the smallest ``|W|``."""
    return drop_lowest(weight.detach().abs(), mask, n)


def score_growth(score: Tensor, mask: Tensor, n: int) -> Tensor:
    """Grow the ``n`` inactive positions with the largest ``|score|`` (momentum growth when the score is
    the momentum, RigL's gradient growth when it is the gradient)."""
    return add_highest(score.detach().abs(), mask, n)


def random_growth(mask: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Grow ``n`` inactive positions chosen uniformly at random.

    The random numbers are drawn on the CPU from ``generator`` and moved to the mask's device, so the same
    seed gives the same positions on every device and every process.
    """
    scores = torch.rand(mask.shape, generator=generator).to(mask.device)
    return add_highest(scores, mask, n)


def set_prune(weight: Tensor, mask: Tensor, n: int) -> Tensor:
    """SET's removal (Mocanu et al. 2018): the ``n`` active weights closest to zero *on each side*.

    Half of them (rounded up) are the smallest non-negative weights, the other half the largest negative
    ones; if one side has too few active weights, the other side gives the rest. One host synchronization
    (the number of active non-negative weights).
    """
    new_mask = mask.clone()
    if n <= 0:
        return new_mask
    w = weight.detach().float()
    positive = mask & (w >= 0)
    n_positive = int(positive.sum())
    n_negative = int(mask.sum()) - n_positive
    take_pos = min(n_positive, max((n + 1) // 2, n - n_negative))
    take_neg = n - take_pos
    new_mask = drop_lowest(w, positive, take_pos) | (mask & (w < 0))  # smallest non-negative ones out
    return drop_lowest(-w, new_mask & (w < 0), take_neg) | (new_mask & (w >= 0))  # then the largest negative


def snip_masks(scores: list[Tensor], count: int) -> list[Tensor]:
    """SNIP (Lee et al. 2019): keep the ``count`` entries with the largest score over *all* layers together.

    ``scores`` are per-layer saliencies ``|g * w|``; returns one ``torch.bool`` mask per layer with exactly
    ``count`` True entries in total.
    """
    total = sum(s.numel() for s in scores)
    if not 0 <= count <= total:
        raise ValueError(f"cannot keep {count} of {total} weights")
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores])
    keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, count, sorted=False).indices] = True
    return [m.view(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]
