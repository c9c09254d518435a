"""Density groups: an update runs the method once per group of layers (each group keeps its own total; weights
move only within it), on the layers that train (frozen layers keep their masks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from lightning_sparse.methods.base import LayerState, UpdateContext, UpdateResult
from lightning_sparse.methods.sparse_algorithm import SparseAlgorithm


def update_groups(
    algorithm: SparseAlgorithm,
    layers: Sequence[LayerState],
    active: Sequence[int],
    masks: Sequence[Tensor],
    groups: Mapping[str, Sequence[int]],
    trained: Sequence[int],
    context: Callable[[str], UpdateContext],
) -> UpdateResult:
    """``algorithm.update`` on each group's trained layers (``groups``: layer indices by group; ``context``: the
    update's context for a group), widened to every layer: the others keep ``masks`` and ``active``."""
    trained_set = set(trained)
    result = None
    for group, indices in groups.items():
        chosen = [i for i in indices if i in trained_set]
        if not chosen:
            continue
        if len(chosen) == len(layers):
            result = algorithm.update(layers, active, context(group))
        else:
            part = algorithm.update([layers[i] for i in chosen], [active[i] for i in chosen], context(group))
            base = result or _splice(None, [], list(masks), list(active))
            result = _splice(part, chosen, base.masks, base.active, base)
    return result if result is not None else _splice(None, [], list(masks), list(active))


def _splice(
    result: UpdateResult | None,
    trained: list[int],
    masks: list[Tensor],
    active: list[int],
    into: UpdateResult | None = None,
) -> UpdateResult:
    """An update of the ``trained`` layers only, widened to every layer (the others keep ``masks``, or what
    ``into`` holds for them)."""
    if into is None:
        into = UpdateResult(list(masks), list(masks), list(active), [0] * len(masks), [0] * len(masks))
    full = UpdateResult(list(into.masks), list(into.pruned_masks), list(into.active), list(into.pruned), list(into.grown))
    if result is None:
        return full
    for j, i in enumerate(trained):
        full.masks[i], full.pruned_masks[i], full.active[i] = result.masks[j], result.pruned_masks[j], result.active[j]
        full.pruned[i], full.grown[i] = result.pruned[j], result.grown[j]
    return full
