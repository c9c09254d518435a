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
