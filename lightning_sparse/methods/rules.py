"""The rules a method is made of, by name: prune (which active weights leave), growth (where weights come back),
redistribution (how the removed weights are shared among the layers), count (how many each layer loses) and
excess (where the regrowth a layer cannot take goes).

Rule signatures (write your own and pass them to :class:`~lightning_sparse.methods.SparseAlgorithm`):

* prune ``(layer: LayerState, n: int) -> Tensor``: a copy of ``layer.mask`` with exactly ``n`` fewer
  active entries;
* grow ``(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor``: a copy of
  ``mask`` (the mask after pruning) with exactly ``n`` more active entries, never an already active one;
* redistribute ``(layers: Sequence[LayerState]) -> Tensor | None``: each layer's share (summing to one) of
  the weights removed over the whole model, from statistics taken before pruning; ``None`` lets every
  layer regrow what it lost;
* count ``(layers: Sequence[LayerState], active: list[int], shares: list[float] | None,
  context: UpdateContext) -> list[int]``: how many active weights each layer loses.

Every update checks the counts of the masks a prune or growth rule returns (one host read, before the masks are
set): a rule that removes or adds another number than ``n`` raises ``RuntimeError`` naming the layer, the counts
and the rule (:func:`~lightning_sparse.methods.targets.check_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_sparse.functional.prune_grow import set_prune
from lightning_sparse.functional.redistribute import (
    adapt_threshold,
    allocate_regrowth,
    allocate_regrowth_equal,
    below_threshold_counts,
    floor_counts,
    magnitude_shares,
    momentum_shares,
    prune_counts,
)
from lightning_sparse.functional.schedules import gmp_sparsity
from lightning_sparse.methods.base import (
    CountRule,
    GrowthRule,
    LayerState,
    PruneRule,
    RedistributionRule,
    UpdateContext,
    shard_reducer,
)


# ----------------------------------------------------------------------------- prune rules
def _magnitude_prune(layer: LayerState, n: int) -> Tensor:
    return layer.drop_lowest(layer.weight, layer.mask, n, magnitude=True)


def _set_prune(layer: LayerState, n: int) -> Tensor:
    return set_prune(layer.weight, layer.mask, n, offset=layer.offset, shards=layer.shards)


# ----------------------------------------------------------------------------- growth rules
def _momentum_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return layer.add_highest(layer.momentum, mask, n, magnitude=True)


def _gradient_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return layer.add_highest(layer.grad, mask, n, magnitude=True)


def _random_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return layer.add_random(mask, n, generator)


def no_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """The growth rule ``"none"``: ``mask`` unchanged (GMP)."""
    return mask


# ----------------------------------------------------------------------------- redistribution rules
def _momentum_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return momentum_shares([layer.momentum for layer in layers], [layer.mask for layer in layers], shard_reducer(layers))


def _magnitude_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return magnitude_shares([layer.weight for layer in layers], [layer.mask for layer in layers], shard_reducer(layers))


def no_redistribution(layers: Sequence[LayerState]) -> None:
    """The redistribution rule ``"none"``: every layer regrows what it lost."""
    return None


@dataclass(frozen=True)
class SurvivorShares:
    """Redistribution in proportion to each layer's active weights *after* pruning (DSR's rule, ``"nonzero"``).
    It reads the counts, not the layers, so the pipeline calls it after pruning with the survivors; without any,
    the shares are equal."""

    def __call__(self, survivors: Sequence[int]) -> list[float]:
        total = sum(survivors)
        return [s / total for s in survivors] if total else [1.0 / len(survivors)] * len(survivors)


NONZERO = "nonzero"
"""The name of :class:`SurvivorShares` in :data:`REDISTRIBUTION_RULES`."""


# ----------------------------------------------------------------------------- count rules
def ceil_count(layers: Sequence[LayerState], active: list[int], shares: list[float] | None, ctx: UpdateContext) -> list[int]:
    """``ceil(rate * active_l)`` per layer, with sparse momentum's nearly-dense edge case when shares exist."""
    return prune_counts(ctx.rate, active, [layer.numel for layer in layers], shares)


def floor_count(layers: Sequence[LayerState], active: list[int], shares: list[float] | None, ctx: UpdateContext) -> list[int]:
    """RigL: ``floor(rate * active_l)`` per layer."""
    return floor_counts(ctx.rate, active)


def gmp_count(layers: Sequence[LayerState], active: list[int], shares: list[float] | None, ctx: UpdateContext) -> list[int]:
    """GMP: prune each layer down to ``round((1 - s_t) * N_l)`` active weights, ``s_t`` the cubic schedule
    from dense to the target sparsity ``1 - density``."""
    sparsity = gmp_sparsity(ctx.progress, final=1.0 - ctx.density)
    targets = largest_remainder([(1.0 - sparsity) * layer.numel for layer in layers])
    return [max(0, a - t) for a, t in zip(active, targets)]


def largest_remainder(shares: Sequence[float]) -> list[int]:
    """Round ``shares`` to integers whose sum is ``round(sum(shares))``: floors, plus one for the largest
    fractional parts (ties to the first)."""
    floors = [math.floor(s) for s in shares]
    missing = int(round(sum(shares))) - sum(floors)
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in order[: max(missing, 0)]:
        floors[i] += 1
    return floors


@dataclass(frozen=True)
class DSRThreshold:
    """DSR (Mostafa & Wang 2019): prune every active weight with ``|W|`` below one global threshold ``H``,
    then adapt ``H`` (double or halve) so the number pruned tracks ``rate * total active``.

    Args:
        initial: the first threshold ``H_0``.
        tolerance: ``δ``: ``H`` changes when the count leaves ``[(1 − δ), (1 + δ)] × target``.
    """

    initial: float = 1e-3
    tolerance: float = 0.1

    def __call__(self, layers: Sequence[LayerState], active: list[int], shares: list[float] | None, ctx: UpdateContext) -> list[int]:
        threshold = float(ctx.state.get("dsr_threshold", self.initial))
        counts = below_threshold_counts(
            [layer.weight for layer in layers], [layer.mask for layer in layers], threshold, shard_reducer(layers)
        )
        ctx.state["dsr_threshold"] = adapt_threshold(threshold, sum(counts), ctx.rate * sum(active), self.tolerance)
        return counts


ExcessRule = Callable[[int, Sequence[float], Sequence[int]], list[int]]

PRUNE_RULES: dict[str, PruneRule] = {"magnitude": _magnitude_prune, "set": _set_prune}
GROWTH_RULES: dict[str, GrowthRule] = {
    "momentum": _momentum_growth,
    "gradient": _gradient_growth,
    "random": _random_growth,
    "none": no_growth,
}
REDISTRIBUTION_RULES: dict[str, RedistributionRule | SurvivorShares] = {
    "momentum": _momentum_redistribution,
    "magnitude": _magnitude_redistribution,
    NONZERO: SurvivorShares(),
    "none": no_redistribution,
}
COUNT_RULES: dict[str, CountRule] = {"ceil": ceil_count, "floor": floor_count, "gmp": gmp_count, "dsr": DSRThreshold()}
EXCESS_RULES: dict[str, ExcessRule] = {"equal": allocate_regrowth_equal, "proportional": allocate_regrowth}
STARTS = ("random", "dense", "snip")


class Rules(NamedTuple):
    """The rules of one method, resolved from names (:func:`resolve_rules`)."""

    count: CountRule
    prune: PruneRule
    redistribute: RedistributionRule | SurvivorShares
    grow: GrowthRule
    allocate: ExcessRule


def _resolve(kind: str, value: Any, table: dict[str, Any]) -> Any:
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"`{kind}` can be {', '.join(table)} or a function, got {value!r}")
    return table[value]


def resolve_rules(count: Any, prune: Any, redistribute: Any, grow: Any, excess: str) -> Rules:
    """The rules named (or given as functions); ``ValueError`` naming the known names of the first unknown one."""
    return Rules(
        _resolve("count", count, COUNT_RULES),
        _resolve("prune", prune, PRUNE_RULES),
        _resolve("redistribute", redistribute, REDISTRIBUTION_RULES),
        _resolve("grow", grow, GROWTH_RULES),
        EXCESS_RULES[excess],
    )
