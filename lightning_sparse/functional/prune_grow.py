"""Which weights leave a layer and which positions join it. Pure tensor math, no Lightning.

Every function takes one layer's tensors and an exact count and returns a new ``torch.bool`` mask; the
selection is a partial selection (``topk``), never a full sort, and on an accelerator never synchronizes
with the host. On the CPU, where there is nothing to synchronize with, ``drop_lowest`` and ``add_highest``
first narrow the candidates (see ``_PREFILTER_MIN``), with the same result up to ties.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# On the CPU, topk ranks a whole row on one thread (nth_element over (value, index) pairs), so the selections
# below rank only the entries that can be chosen. On other devices they keep one topk over the row: it is
# parallel there, and counting the candidates would synchronize with the host.
_PREFILTER_MIN = 1 << 16  # smaller rows: one topk is as fast
_SAMPLE_STRIDE = 32


def drop_lowest(score: Tensor, mask: Tensor, n: int) -> Tensor:
    """Remove from ``mask`` the ``n`` active positions with the lowest ``score``; returns a new mask."""
    new_mask = mask.clone()
    if n <= 0:
        return new_mask
    if mask.device.type == "cpu":  # rank the active entries only
        active = new_mask.view(-1).nonzero().squeeze(1)
        candidates = score.detach().reshape(-1).index_select(0, active).float()
        idx = active[torch.topk(candidates, n, largest=False, sorted=False).indices]
    else:
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
    values = score.detach().float().reshape(-1)
    if values.device.type == "cpu" and values.numel() >= _PREFILTER_MIN:
        idx = _largest_free_cpu(values, ~mask.reshape(-1), n)
    else:
        idx = torch.topk(values.masked_fill(mask.view(-1), float("-inf")), n, largest=True, sorted=False).indices
    new_mask.view(-1)[idx] = True
    return new_mask


def _largest_free_cpu(values: Tensor, free: Tensor, n: int) -> Tensor:
    """Positions of the ``n`` largest ``values`` where ``free`` is True: the same choice as one topk over the
    row (up to ties), ranking only the free entries at or above a threshold taken from a strided sample,
    set 10% low so that more than ``n`` pass; when fewer pass, one topk over the row."""
    sample = values[::_SAMPLE_STRIDE].masked_fill(~free[::_SAMPLE_STRIDE], float("-inf"))
    k = min(sample.numel(), math.ceil(1.1 * n / _SAMPLE_STRIDE) + 64)
    threshold = torch.topk(sample, k, sorted=False).values.min()
    keep = ((values >= threshold) & free).nonzero().squeeze(1)
    if keep.numel() >= n:  # then the n largest free values are all >= threshold, so all in `keep`
        return keep[torch.topk(values.index_select(0, keep), n, sorted=False).indices]
    return torch.topk(values.masked_fill(~free, float("-inf")), n, sorted=False).indices


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
