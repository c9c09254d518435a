"""Redistribution: how the pruned weights are handed back to the layers.

A redistribution rule turns per-layer statistics into shares (non-negative, summing to one) on the device.
``prune_counts`` and ``allocate_regrowth_equal`` (sparse momentum's reference rule) or ``allocate_regrowth`` (in
proportion to the shares) then turn a pruning rate and the shares into exact integer counts on the host. Pure
tensor math, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_sparse.functional.init import largest_remainder
from lightning_sparse.functional.passes import abs_sum_where, nonzero_count

# A count computed from a float product such as 0.3 * 10 must not round up because of the last bit.
_EPS = 1e-7


def momentum_shares(
    momenta: Sequence[Tensor], masks: Sequence[Tensor], reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Sparse momentum's redistribution: ``mean |M|`` over each layer's active weights, sum-normalized.

    Returns a 1-D float32 tensor of shares on the device of the first momentum (no host synchronization).
    A layer with no active weight has share 0. If every mean is zero, the shares are uniform. ``reduce`` sums
    the per-layer ``[sum |M|, active count]`` pairs (shape ``[L, 2]``) over the processes holding shards of the
    layers (FSDP2); ``None`` when every layer is whole here.
    """
    sums = torch.stack([torch.stack([abs_sum_where(m, k), nonzero_count(k).float()]) for m, k in zip(momenta, masks)])
    if reduce is not None:
        sums = reduce(sums)
    return _normalize(sums[:, 0] / sums[:, 1].clamp_min(1))


def magnitude_shares(
    weights: Sequence[Tensor], masks: Sequence[Tensor], reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Shares proportional to each layer's mean ``|W|`` over its active weights."""
    return momentum_shares(weights, masks, reduce)


def nonzero_shares(masks: Sequence[Tensor]) -> Tensor:
    """Shares proportional to each layer's number of active weights in ``masks`` (on the device).

    DSR shares by the weights that *survive* pruning; ``SparseAlgorithm.update`` computes that from its host
    counts (``redistribute="nonzero"``), so it never needs this device version.
    """
    return _normalize(torch.stack([k.sum() for k in masks]).float())


def _normalize(values: Tensor) -> Tensor:
    total = values.sum()
    uniform = torch.full_like(values, 1.0 / values.numel())
    return torch.where(total > 0, values / total.clamp_min(torch.finfo(values.dtype).tiny), uniform)


def prune_counts(
    rate: float,
    active: Sequence[int],
    sizes: Sequence[int],
    shares: Sequence[float] | None = None,
    dense_threshold: float = 0.8,
) -> list[int]:
    """How many active weights each layer loses: ``ceil(p_l * active_l)``.

    ``p_l = rate``, except sparse momentum's second edge case (section 3.2): a layer that is nearly dense
    (density above ``dense_threshold``) and whose share exceeds the uniform share ``1/L`` is still growing,
    so its rate is reduced to ``min(rate, sparsity_l)``. Pass ``shares=None`` to switch the edge case off.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the pruning rate must be in [0, 1], got {rate}")
    uniform_share = 1.0 / len(active) if active else 0.0
    counts = []
    for i, (a, n) in enumerate(zip(active, sizes)):
        p = rate
        if shares is not None and a / n > dense_threshold and shares[i] > uniform_share:
            p = min(rate, 1.0 - a / n)
        counts.append(min(a, math.ceil(p * a - _EPS)))
    return counts


def floor_counts(rate: float, active: Sequence[int]) -> list[int]:
    """RigL's per-layer drop count ``floor(rate * active_l)``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the drop fraction must be in [0, 1], got {rate}")
    return [math.floor(rate * a + _EPS) for a in active]


def below_threshold_counts(
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    threshold: float,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> list[int]:
    """DSR's per-layer prune counts: active weights with ``|W| < threshold`` (one host synchronization);
    ``reduce`` sums the local counts over shards as in :func:`momentum_shares`."""
    counts = torch.stack([((w.detach().abs() < threshold) & m).sum() for w, m in zip(weights, masks)]).to(torch.int64)
    if reduce is not None:
        counts = reduce(counts)
    return [int(c) for c in counts.tolist()]


def adapt_threshold(threshold: float, pruned: int, target: float, tolerance: float = 0.1) -> float:
    """DSR's threshold adaptation: double it when fewer than ``(1 - tolerance) * target`` weights were
    pruned, halve it when more than ``(1 + tolerance) * target`` were, keep it otherwise."""
    if pruned < (1.0 - tolerance) * target:
        return threshold * 2.0
    if pruned > (1.0 + tolerance) * target:
        return threshold / 2.0
    return threshold


def _check_regrowth(total: int, capacity: Sequence[int]) -> None:
    if total < 0:
        raise ValueError(f"cannot regrow a negative number of weights: {total}")
    if total > sum(capacity):
        raise ValueError(f"cannot regrow {total} weights into {sum(capacity)} free positions")


def allocate_regrowth(total: int, shares: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Hand ``total`` regrown weights to the layers in proportion to ``shares``, exactly (the ``"proportional"``
    excess rule; sparse momentum's reference rule is :func:`allocate_regrowth_equal`).

    No layer takes more than its ``capacity`` (free positions); what a full layer cannot take goes to the
    others in proportion to their shares (water filling), until all ``total`` are placed. If every layer
    with a positive share is full, the rest goes to the remaining layers in proportion to their free room.
    The result sums to exactly ``total``.

    Example:
        >>> allocate_regrowth(100, [0.5, 0.25, 0.25], [10, 1000, 1000])
        [10, 45, 45]
    """
    _check_regrowth(total, capacity)
    n = len(shares)
    quotas = [0.0] * n
    open_ = [i for i in range(n) if capacity[i] > 0 and shares[i] > 0]
    remaining = float(total)
    while open_ and remaining > 0:
        share_sum = sum(shares[i] for i in open_)
        full = [i for i in open_ if remaining * shares[i] / share_sum >= capacity[i]]
        if not full:
            for i in open_:
                quotas[i] = remaining * shares[i] / share_sum
            remaining = 0.0
            break
        for i in full:
            quotas[i] = float(capacity[i])
            remaining -= capacity[i]
        open_ = [i for i in open_ if i not in full]
    if remaining > 0:  # every layer with a positive share is full: fill the rest by free room
        room = [capacity[i] - quotas[i] for i in range(n)]
        room_sum = sum(room)
        quotas = [q + remaining * r / room_sum for q, r in zip(quotas, room)]
    return largest_remainder(quotas, total, capacity)


MAX_REGROWTH_FRACTION = 0.99
"""Sparse momentum's reference caps a layer's regrowth at 99 % of its free positions after pruning
(``sparselearning/core.py``, ``calc_growth_redistribution``: ``max_regrowth = num_zero + num_remove``, capped at
``0.99*max_regrowth``), so no layer is ever made completely dense by redistribution."""


def allocate_regrowth_equal(
    total: int, shares: Sequence[float], capacity: Sequence[int], max_fraction: float = MAX_REGROWTH_FRACTION
) -> list[int]:
    """Sparse momentum's redistribution with its first edge case as in the paper (section 3.2) and the reference
    code (``calc_growth_redistribution``), exactly.

    Each layer is first given ``shares[l] * total``. A layer may take at most ``floor(max_fraction * capacity[l])``
    (``capacity`` = its free positions after pruning; 0.99 in the reference); what a layer cannot take, the
    excess, is handed out in *equal* parts to all the other layers, again capped, and what those cannot take is
    handed out equally again, until nothing is left (the reference repeats the equal split until the residual is
    zero; its limit is this equal water filling: every layer that is not capped receives the same increment).
    Only if the capped layers cannot hold ``total`` at all does the rest fill layers beyond ``max_fraction``, up
    to ``capacity`` (the reference gives up there with "Layers are too full!" and grows fewer weights).

    The real-valued amounts are then rounded to integers summing to exactly ``total`` (largest remainder, ties
    to the lower index); the reference rounds each layer's first amount up and its growth down and corrects the
    total over later updates with a smoothed residual instead.

    Example (layer 0 wants 180 but can take 99 of its 100 free positions; its excess 81 goes to the other two in
    equal parts, 10 + 40.5 each, and the rounding tie goes to the first):
        >>> allocate_regrowth_equal(200, [0.9, 0.05, 0.05], [100, 1000, 1000])
        [99, 51, 50]
    """
    _check_regrowth(total, capacity)
    n = len(shares)
    if n == 0:
        return []
    share_sum = float(sum(shares))
    quotas = [total * float(s) / share_sum for s in shares] if share_sum > 0 else [total / n] * n
    caps = [min(c, math.floor(max_fraction * c + _EPS)) for c in capacity]
    excess = 0.0
    for i in range(n):
        if quotas[i] > caps[i]:
            excess += quotas[i] - caps[i]
            quotas[i] = float(caps[i])
    excess = _spread_equally(quotas, caps, excess)
    if excess > 0:  # the capped layers cannot hold everything: fill beyond the cap, equally
        _spread_equally(quotas, capacity, excess)
    return largest_remainder(quotas, total, caps if sum(caps) >= total else capacity)


def _spread_equally(quotas: list[float], caps: Sequence[int], excess: float) -> float:
    """Add ``excess`` to ``quotas`` (in place) in equal parts over the entries below their cap, none beyond it
    (water filling); returns what is left when every entry is at its cap."""
    open_ = [i for i in range(len(quotas)) if quotas[i] < caps[i]]
    while excess > 0 and open_:
        part = excess / len(open_)
        full = [i for i in open_ if caps[i] - quotas[i] <= part]
        if not full:
            for i in open_:
                quotas[i] += part
            return 0.0
        for i in full:
            excess -= caps[i] - quotas[i]
            quotas[i] = float(caps[i])
        open_ = [i for i in open_ if i not in full]
    return max(excess, 0.0)
