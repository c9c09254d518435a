"""Which weights leave a layer and which positions join it. Pure tensor math, no Lightning.

Every function takes one layer's tensors and an exact count and returns a new ``torch.bool`` mask. The
selections of :mod:`lightning_sparse.functional.selection` are exact and deterministic (ties go to the lowest
flat index), and work the same on FSDP2 row shards (``offset``, ``shards``): the masks are then equal, shard by
shard, to those computed on the full tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sparse.functional.selection import hash_scores, select_highest, sortable_key, toggle_selected
from lightning_sparse.functional.shards import Shards


def drop_lowest(
    score: Tensor,
    mask: Tensor,
    n: int,
    *,
    offset: int = 0,
    shards: Shards | None = None,
    magnitude: bool = False,
    kernel: str = "auto",
) -> Tensor:
    """Remove from ``mask`` the ``n`` active positions with the lowest ``score`` (``magnitude``: ``|score|``; ties:
    the lowest flat index first); returns a new mask. With ``shards``, ``score`` and ``mask`` are this process's row
    block of a weight sharded over them, starting at flat index ``offset``, and ``n`` counts over the whole weight.
    ``kernel``: the selection's path (:func:`~lightning_sparse.functional.selection.select_lowest`)."""
    return toggle_selected(
        score, mask, n, highest=False, magnitude=magnitude, offset=offset, shards=shards, kernel=kernel
    )


def add_highest(
    score: Tensor,
    mask: Tensor,
    n: int,
    *,
    offset: int = 0,
    shards: Shards | None = None,
    magnitude: bool = False,
    kernel: str = "auto",
) -> Tensor:
    """Add to ``mask`` the ``n`` inactive positions with the highest ``score`` (``magnitude``: ``|score|``; ties:
    the lowest flat index first); returns a new mask. Already active positions are never picked, and ``n`` may not
    exceed the number of inactive positions. ``offset``, ``shards`` and ``kernel`` as in :func:`drop_lowest`."""
    return toggle_selected(
        score, mask, n, highest=True, inactive=True, magnitude=magnitude, offset=offset, shards=shards, kernel=kernel
    )


def magnitude_prune(
    weight: Tensor, mask: Tensor, n: int, *, offset: int = 0, shards: Shards | None = None, kernel: str = "auto"
) -> Tensor:
    """Remove the ``n`` active weights with the smallest ``|W|``."""
    return drop_lowest(weight, mask, n, offset=offset, shards=shards, magnitude=True, kernel=kernel)


def score_growth(
    score: Tensor, mask: Tensor, n: int, *, offset: int = 0, shards: Shards | None = None, kernel: str = "auto"
) -> Tensor:
    """Grow the ``n`` inactive positions with the largest ``|score|`` (momentum growth when the score is
    the momentum, RigL's gradient growth when it is the gradient)."""
    return add_highest(score, mask, n, offset=offset, shards=shards, magnitude=True, kernel=kernel)


def random_growth(
    mask: Tensor,
    n: int,
    generator: torch.Generator | None = None,
    *,
    offset: int = 0,
    shards: Shards | None = None,
) -> Tensor:
    """Grow ``n`` inactive positions chosen uniformly at random.

    One seed is drawn from ``generator``; the positions are the free ones with the highest counter-based hash
    of (seed, flat index) (:func:`~lightning_sparse.functional.selection.hash_scores`), so the same generator
    state gives the same positions on every device, every process and any number of FSDP2 shards.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
    if n <= 0:
        return mask.clone()
    scores = hash_scores(seed, offset, mask.numel(), mask.device).view(mask.shape)
    return add_highest(scores, mask, n, offset=offset, shards=shards)


def set_prune(weight: Tensor, mask: Tensor, n: int, *, offset: int = 0, shards: Shards | None = None) -> Tensor:
    """SET's removal (Mocanu et al. 2018): the ``n`` active weights closest to zero *on each side*.

    Half of them (rounded up) are the smallest non-negative weights, the other half the largest negative
    ones; if one side has too few active weights, the other side gives the rest. One host synchronization
    (the number of active non-negative and negative weights, summed over the ``shards``).
    """
    if n <= 0:
        return mask.clone()
    w = weight.detach().float()
    positive = mask & (w >= 0)
    negative = mask & (w < 0)
    counts = torch.stack([positive.sum(), negative.sum()]).to(torch.int64)
    if shards is not None:
        shards.sum_(counts)
    n_positive, n_negative = (int(c) for c in counts.tolist())
    take_pos = min(n_positive, max((n + 1) // 2, n - n_negative))
    take_neg = n - take_pos
    kept_pos = drop_lowest(w, positive, take_pos, offset=offset, shards=shards)  # smallest non-negative ones out
    kept_neg = drop_lowest(-w, negative, take_neg, offset=offset, shards=shards)  # then the largest negative
    return kept_pos | kept_neg


def snip_masks(
    scores: list[Tensor],
    count: int,
    *,
    offsets: list[int] | None = None,
    shards: Shards | None = None,
    sharded: list[bool] | None = None,
) -> list[Tensor]:
    """SNIP (Lee et al. 2019): keep the ``count`` entries with the largest score over *all* layers together.

    ``scores`` are per-layer saliencies ``|g * w|``; returns one ``torch.bool`` mask per layer with exactly
    ``count`` True entries in total. Ties at the threshold go to earlier layers first, then to lower flat
    indices. With ``shards``, the scores of the layers flagged in ``sharded`` are row blocks starting at flat index
    ``offsets[l]`` (the others are whole on every process) and counts are summed over the shards: the result
    is the same as on the full scores. The threshold is found by bisection over the scores' sortable 32-bit keys
    (32 rounds of one small sum over the shards; a one-off at the start of training).
    """
    n_layers = len(scores)
    offsets = offsets or [0] * n_layers
    sharded = sharded or [shards is not None] * n_layers
    reduce = _layer_reducer(sharded, shards)
    keys = [sortable_key(s.detach().float()).reshape(-1) for s in scores]
    total = int(reduce(torch.tensor([k.numel() for k in keys], dtype=torch.int64)).sum())
    if not 0 <= count <= total:
        raise ValueError(f"cannot keep {count} of {total} weights")

    def count_at_least(threshold: int) -> Tensor:
        local = torch.stack([(k >= threshold).sum() for k in keys]).to(torch.int64).cpu()
        return reduce(local)

    low, high = 0, 2**32  # the largest T with count_at_least(T) >= count lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        if int(count_at_least(mid).sum()) >= count:
            low = mid
        else:
            high = mid
    threshold = low
    above = count_at_least(threshold + 1) if count > 0 else torch.zeros(n_layers, dtype=torch.int64)
    ties = count_at_least(threshold) - above if count > 0 else torch.zeros(n_layers, dtype=torch.int64)
    need = count - int(above.sum())
    per_layer = []
    for a, t in zip(above.tolist(), ties.tolist()):
        take = min(t, max(need, 0))
        need -= take
        per_layer.append(a + take)
    masks = []
    for score, k, n, offset, is_sharded in zip(scores, keys, per_layer, offsets, sharded):
        key = k.view(score.shape)
        everywhere = torch.ones(score.shape, dtype=torch.bool, device=key.device)
        masks.append(select_highest(key, everywhere, n, offset=offset, shards=shards if is_sharded else None))
    return masks


def _layer_reducer(sharded: list[bool], shards: Shards | None):
    """Sums per-layer counts over the ``shards``: sharded layers from every process, whole layers from the first."""
    if shards is None:
        return lambda t: t
    whole = torch.tensor([not s for s in sharded])

    def reduce(t: Tensor) -> Tensor:
        t = t.masked_fill(whole, 0) if shards.rank != 0 else t.clone()
        return shards.sum_(t)

    return reduce
