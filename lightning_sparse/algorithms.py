"""Sparse training methods as named combinations of a prune rule, a growth rule and a redistribution rule.

An update reads like the algorithm (the sparse momentum reference's ``truncate_weights``): statistics →
prune → redistribute → grow. Everything here works on plain tensors, without Lightning, so it can be tested
on small hand-made layers.

Rule signatures (write your own and pass them to :class:`SparseAlgorithm`):

* prune ``(layer: LayerState, n: int) -> Tensor``: a copy of ``layer.mask`` with exactly ``n`` fewer
  active entries;
* grow ``(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor``: a copy of
  ``mask`` (the mask after pruning) with exactly ``n`` more active entries, never an already active one;
* redistribute ``(layers: Sequence[LayerState]) -> Tensor | None``: each layer's share (summing to one) of
  the weights pruned over the whole model, or ``None`` to let every layer regrow what it pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.prune_grow import magnitude_prune, random_growth, score_growth
from lightning_sparse.functional.redistribute import (
    allocate_regrowth,
    magnitude_shares,
    momentum_shares,
    nonzero_shares,
    prune_counts,
)


class LayerState:
    """What an update may read of one masked layer: its name, weight, mask, and on demand its momentum.

    ``momentum`` is computed only when a rule reads it, so methods that do not use it never pay for it.
    """

    def __init__(
        self,
        name: str,
        weight: Tensor,
        mask: Tensor,
        momentum_fn: Callable[[], Tensor] | None = None,
    ) -> None:
        self.name = name
        self.weight = weight
        self.mask = mask
        self._momentum_fn = momentum_fn

    @cached_property
    def momentum(self) -> Tensor:
        """The layer's momentum (exponentially smoothed gradient), dense over all positions."""
        if self._momentum_fn is None:
            raise RuntimeError(f"no momentum is available for {self.name!r}")
        return self._momentum_fn()


PruneRule = Callable[[LayerState, int], Tensor]
GrowthRule = Callable[[LayerState, Tensor, int, torch.Generator], Tensor]
RedistributionRule = Callable[[Sequence[LayerState]], "Tensor | None"]


def _magnitude_prune(layer: LayerState, n: int) -> Tensor:
    return magnitude_prune(layer.weight, layer.mask, n)


def _momentum_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return score_growth(layer.momentum, mask, n)


def _random_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return random_growth(mask, n, generator)


def _momentum_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return momentum_shares([layer.momentum for layer in layers], [layer.mask for layer in layers])


def _magnitude_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return magnitude_shares([layer.weight for layer in layers], [layer.mask for layer in layers])


def _nonzero_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return nonzero_shares([layer.mask for layer in layers])


def _no_redistribution(layers: Sequence[LayerState]) -> None:
    return None


PRUNE_RULES: dict[str, PruneRule] = {"magnitude": _magnitude_prune}
GROWTH_RULES: dict[str, GrowthRule] = {"momentum": _momentum_growth, "random": _random_growth}
REDISTRIBUTION_RULES: dict[str, RedistributionRule] = {
    "momentum": _momentum_redistribution,
    "magnitude": _magnitude_redistribution,
    "nonzero": _nonzero_redistribution,
    "none": _no_redistribution,
}


def _resolve(kind: str, value: str | Callable, table: dict[str, Callable]) -> Callable:
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"`{kind}` can be {', '.join(table)} or a function, got {value!r}")
    return table[value]


@dataclass(frozen=True)
class UpdateResult:
    """What one mask update did: the new masks and, per layer, the active, pruned and grown counts."""

    masks: list[Tensor]
    active: list[int]
    pruned: list[int]
    grown: list[int]


@dataclass(frozen=True)
class SparseAlgorithm:
    """A sparse training method: which weights to drop, where to grow, how to share growth across layers.

    Args:
        prune: ``"magnitude"`` or a prune rule (see the module docstring).
        grow: ``"momentum"``, ``"random"`` or a growth rule.
        redistribute: ``"momentum"``, ``"magnitude"``, ``"nonzero"``, ``"none"`` or a redistribution rule.
        init: default sparse initialization, ``"uniform"``, ``"erk"`` or ``"er"``.
        dynamic: ``False`` for a mask that never changes after initialization.
        nearly_dense_edge_case: sparse momentum's rule that a nearly dense layer (density > 0.8) whose share
            exceeds ``1/L`` prunes at most its sparsity.

    Example (the paper's ablation "momentum redistribution, random growth"):
        >>> SparseAlgorithm(prune="magnitude", grow="random", redistribute="momentum")  # doctest: +ELLIPSIS
        SparseAlgorithm(prune='magnitude', grow='random', redistribute='momentum', ...)
    """

    prune: str | PruneRule = "magnitude"
    grow: str | GrowthRule = "momentum"
    redistribute: str | RedistributionRule = "momentum"
    init: str = "uniform"
    dynamic: bool = True
    nearly_dense_edge_case: bool = True
    _rules: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.init not in INIT_METHODS:
            raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {self.init!r}")
        rules = (
            _resolve("prune", self.prune, PRUNE_RULES),
            _resolve("grow", self.grow, GROWTH_RULES),
            _resolve("redistribute", self.redistribute, REDISTRIBUTION_RULES),
        )
        object.__setattr__(self, "_rules", rules)

    @property
    def needs_momentum(self) -> bool:
        """Whether an update reads the optimizer's momentum (always assumed for user-written rules)."""
        if not self.dynamic:
            return False
        return any(
            callable(rule) or rule == "momentum" for rule in (self.prune, self.grow, self.redistribute)
        )

    def update(
        self,
        layers: Sequence[LayerState],
        active: Sequence[int],
        rate: float,
        generator: torch.Generator,
    ) -> UpdateResult:
        """One prune–redistribute–grow cycle at pruning rate ``rate``.

        ``active`` holds each layer's number of active weights (kept on the host, so counting needs no
        synchronization). The total number of active weights is preserved exactly; with redistribution
        ``"none"`` each layer's own count is preserved. The only host synchronization is reading the shares.
        """
        prune_rule, grow_rule, redistribute_rule = self._rules
        masks = [layer.mask for layer in layers]
        if not self.dynamic:
            zeros = [0] * len(layers)
            return UpdateResult([m.clone() for m in masks], list(active), zeros, list(zeros))
        sizes = [m.numel() for m in masks]
        shares_tensor = redistribute_rule(layers)
        shares = None if shares_tensor is None else shares_tensor.tolist()
        pruned = prune_counts(rate, active, sizes, shares if self.nearly_dense_edge_case else None)
        pruned_masks = [prune_rule(layer, n) for layer, n in zip(layers, pruned)]
        if shares is None:
            grown = list(pruned)
        else:
            capacity = [size - a + p for size, a, p in zip(sizes, active, pruned)]
            grown = allocate_regrowth(sum(pruned), shares, capacity)
        new_masks = [
            grow_rule(layer, mask, n, generator) for layer, mask, n in zip(layers, pruned_masks, grown)
        ]
        new_active = [a - p + g for a, p, g in zip(active, pruned, grown)]
        return UpdateResult(new_masks, new_active, pruned, grown)


ALGORITHMS: dict[str, SparseAlgorithm] = {
    "sparse_momentum": SparseAlgorithm(prune="magnitude", grow="momentum", redistribute="momentum"),
    "static": SparseAlgorithm(dynamic=False, redistribute="none", nearly_dense_edge_case=False),
}


def get_algorithm(algorithm: str | SparseAlgorithm) -> SparseAlgorithm:
    """Look up a method by name (``ALGORITHMS``) or pass a :class:`SparseAlgorithm` through."""
    if isinstance(algorithm, SparseAlgorithm):
        return algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` can be {', '.join(ALGORITHMS)} or a SparseAlgorithm, got {algorithm!r}")
    return ALGORITHMS[algorithm]
