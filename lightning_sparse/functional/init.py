"""Sparse initialization: how many weights each layer keeps, and which ones.

Pure tensor math, no Lightning. The distributions are those of ``shared/ALGORITHMS.md``:

* ``uniform``: every layer keeps ``round(density * N_l)`` weights;
* ``erk`` (Erdős–Rényi-Kernel, Evci et al.): layer ``l`` keeps a fraction ``eps * sum(shape) / prod(shape)``;
* ``er`` (Erdős–Rényi, Mocanu et al.): the same without the kernel dimensions, ``(n_out + n_in) / (n_out * n_in)``.

For ERK and ER, ``eps`` is solved so that the total equals ``round(density * sum(N_l))`` exactly; a layer
whose fraction would exceed one is made dense and ``eps`` is solved again over the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

INIT_METHODS = ("uniform", "erk", "er")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _erdos_renyi_scale(shape: Sequence[int], kernel: bool) -> float:
    """``sum(dims) / prod(dims)``; without ``kernel``, only the two first dimensions count (ER)."""
    if len(shape) < 2:
        raise ValueError(f"ER/ERK needs weights with at least 2 dimensions, got shape {tuple(shape)}")
    dims = list(shape) if kernel else list(shape[:2])
    return sum(dims) / math.prod(dims)


def largest_remainder(quotas: Sequence[float], total: int, capacity: Sequence[int]) -> list[int]:
    """Round non-negative real ``quotas`` to integers summing to exactly ``total``, each at most ``capacity``.

    Floors every quota, then hands the missing units, one each, to the entries with the largest fractional
    parts that still have room (ties go to the lower index). Raises if ``total`` exceeds the capacity.
    """
    if total > sum(capacity):
        raise ValueError(f"cannot place {total} units in a total capacity of {sum(capacity)}")
    counts = [min(math.floor(q), c) for q, c in zip(quotas, capacity)]
    missing = total - sum(counts)
    if missing < 0:
        raise ValueError(f"the quotas sum to more than {total}: {list(quotas)}")
    order = sorted(range(len(counts)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while missing > 0:  # a second pass only where capacities cut quotas
        for i in order:
            if missing == 0:
                break
            if counts[i] < capacity[i]:
                counts[i] += 1
                missing -= 1
    return counts


def layer_active_counts(shapes: Sequence[Sequence[int]], density: float, method: str = "uniform") -> list[int]:
    """Number of active weights per layer for a sparse initialization.

    Args:
        shapes: weight shapes, one per masked layer.
        density: overall fraction of active weights, in (0, 1].
        method: one of ``"uniform"``, ``"erk"``, ``"er"``.

    Returns:
        one count per layer. ``uniform`` gives ``round(density * N_l)`` per layer; ``erk``/``er`` give counts
        summing to exactly ``round(density * sum(N_l))``.

    Example:
        >>> layer_active_counts([(300, 784), (100, 300), (10, 100)], 0.05, "uniform")
        [11760, 1500, 50]
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density}")
    if method not in INIT_METHODS:
        raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {method!r}")
    sizes = [_numel(s) for s in shapes]
    if method == "uniform":
        return [int(round(density * n)) for n in sizes]

    scales = [_erdos_renyi_scale(s, kernel=(method == "erk")) for s in shapes]
    target = int(round(density * sum(sizes)))
    dense: set[int] = set()
    while True:
        budget = target - sum(sizes[i] for i in dense)
        denominator = sum(scales[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        if denominator == 0:
            break
        eps = budget / denominator
        newly_dense = {i for i in range(len(sizes)) if i not in dense and eps * scales[i] > 1.0}
        if not newly_dense:
            break
        dense |= newly_dense
    quotas = [float(sizes[i]) if i in dense else eps * scales[i] * sizes[i] for i in range(len(sizes))]
    return largest_remainder(quotas, target, sizes)


def random_mask(shape: Sequence[int], count: int, generator: torch.Generator | None = None) -> Tensor:
    """A ``torch.bool`` mask of ``shape`` with exactly ``count`` True entries at random positions (on the CPU)."""
    numel = _numel(shape)
    if not 0 <= count <= numel:
        raise ValueError(f"cannot choose {count} active entries out of {numel}")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:count]] = True
    return mask.view(*shape)
