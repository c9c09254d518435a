"""Sparse training methods as named combinations of small rules.

A method is a :class:`SparseAlgorithm`: a **count** rule (how many active weights each layer loses), a
**prune** rule (which ones), a **redistribution** rule (how the removed weights are shared among the
layers), a **growth** rule (where they come back), a pruning-rate **schedule**, and when it runs. An update
reads like the algorithm (the sparse momentum reference's ``truncate_weights``): statistics → count →
prune → redistribute → grow. Everything here works on plain tensors, without Lightning, so it can be
tested on small hand-made layers.

Rule signatures (write your own and pass them to :class:`SparseAlgorithm`):

* prune ``(layer: LayerState, n: int) -> Tensor``: a copy of ``layer.mask`` with exactly ``n`` fewer
  active entries;
* grow ``(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor``: a copy of
  ``mask`` (the mask after pruning) with exactly ``n`` more active entries, never an already active one;
* redistribute ``(layers: Sequence[LayerState]) -> Tensor | None``: each layer's share (summing to one) of
  the weights removed over the whole model, from statistics taken before pruning; ``None`` lets every
  layer regrow what it lost;
* count ``(layers: Sequence[LayerState], active: list[int], shares: list[float] | None,
  context: UpdateContext) -> list[int]``: how many active weights each layer loses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_sparse.core.distributed import ShardSpec, common_group, local, reduce_layer_sums
from lightning_sparse.core.optimizer import reset_optimizer_state
from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.patterns import (
    Pattern,
    ablation_cutoff,
    fill_units,
    parse_pattern,
    round_half_up,
    round_to_rows,
    trim_units,
    unit_counts,
    unit_shape,
)
from lightning_sparse.functional.prune_grow import add_highest, drop_lowest, random_growth, set_prune
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
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES, gmp_sparsity
from lightning_sparse.functional.selection import hash_scores
from lightning_sparse.methods.dst import DST


class LayerState:
    """What an update may read of one masked layer: its name, weight, mask, and on demand its momentum and
    gradient. ``momentum`` and ``grad`` are computed only when a rule reads them.

    Under FSDP2, ``weight``, ``mask``, ``momentum`` and ``grad`` are this process's row block of the layer
    (``spec`` says which); counts given to and returned by rules are over the whole layer. Rules written with
    :meth:`drop_lowest` / :meth:`add_highest` / :meth:`add_random` work unchanged on shards.

    ``transposed``: the weight is stored ``[in, out]`` (``transformers``' ``Conv1D``). Under a structured pattern
    (:mod:`~lightning_sparse.functional.patterns`), a growth rule's :meth:`add_highest` / :meth:`add_random` fill
    every unit of the pattern (N:M group, row) up to its target, by the given score, instead of choosing over the
    whole layer; ``n`` is then the total they add, known from the counts.
    """

    def __init__(
        self,
        name: str,
        weight: Tensor,
        mask: Tensor,
        momentum_fn: Callable[[], Tensor] | None = None,
        grad_fn: Callable[[], Tensor | None] | None = None,
        spec: ShardSpec | None = None,
        transposed: bool = False,
    ) -> None:
        self.name = name
        self.weight = weight
        self.mask = mask
        self._momentum_fn = momentum_fn
        self._grad_fn = grad_fn
        self.spec = spec if spec is not None else ShardSpec(tuple(weight.shape), 0, weight.shape[0] if weight.dim() else 1)
        self.transposed = transposed
        self._units: tuple[Pattern, int] | None = None  # (pattern, target per unit) while a structured update grows

    @property
    def numel(self) -> int:
        """Number of entries of the whole layer (on every shard)."""
        return self.spec.numel

    @property
    def offset(self) -> int:
        return self.spec.offset

    @property
    def group(self) -> ProcessGroup | None:
        return self.spec.group

    def drop_lowest(self, score: Tensor, mask: Tensor, n: int) -> Tensor:
        """``mask`` without its ``n`` active positions of lowest ``score`` over the whole layer."""
        return drop_lowest(score, mask, n, offset=self.offset, group=self.group)

    def add_highest(self, score: Tensor, mask: Tensor, n: int) -> Tensor:
        """``mask`` plus the ``n`` free positions of highest ``score`` over the whole layer (under a structured
        pattern: every unit filled up to its target by its free positions of highest ``score``)."""
        if self._units is not None:
            pattern, target = self._units
            return fill_units(score.detach(), mask, target, pattern, self.transposed)
        return add_highest(score, mask, n, offset=self.offset, group=self.group)

    def add_random(self, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``mask`` plus ``n`` free positions drawn at random (the same for any number of shards; under a
        structured pattern, every unit filled up to its target at random)."""
        if self._units is not None:
            pattern, target = self._units
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
            scores = hash_scores(seed, self.offset, mask.numel(), mask.device).view(mask.shape)
            return fill_units(scores, mask, target, pattern, self.transposed)
        return random_growth(mask, n, generator, offset=self.offset, group=self.group)

    @cached_property
    def momentum(self) -> Tensor:
        """The layer's momentum (exponentially smoothed gradient), dense over all positions."""
        if self._momentum_fn is None:
            raise RuntimeError(f"no momentum is available for {self.name!r}")
        return self._momentum_fn()

    @cached_property
    def grad(self) -> Tensor:
        """The dense gradient of the last batch (masked weights receive gradients too)."""
        grad = self._grad_fn() if self._grad_fn is not None else None
        if grad is None:
            raise RuntimeError(f"no gradient is available for {self.name!r}")
        return grad


@dataclass
class UpdateContext:
    """What an update knows beyond the layers.

    Attributes:
        rate: the pruning rate (drop fraction) the schedule gives now.
        progress: fraction of the update window done, in [0, 1].
        density: the target density of the run.
        generator: the seeded CPU generator for random choices.
        state: the algorithm's persistent state (checkpointed with the callback), e.g. DSR's threshold.
        pattern: ``"unstructured"``, ``"N:M"`` or ``"fan_in"`` (:mod:`~lightning_sparse.functional.patterns`): the
            units every update keeps whole (see :meth:`SparseAlgorithm.update`).
        ablation: under ``"fan_in"``, SRigL's neuron ablation with this ``gamma_sal`` (see
            :meth:`SparseAlgorithm.update_structured`); ``None``: no ablation.
        keep_neurons: names of the layers whose rows are never ablated.
    """

    rate: float
    progress: float = 0.0
    density: float = 1.0
    generator: torch.Generator = field(default_factory=torch.Generator)
    state: dict[str, Any] = field(default_factory=dict)
    pattern: str | Pattern = "unstructured"
    ablation: float | None = None
    keep_neurons: frozenset[str] = frozenset()


PruneRule = Callable[[LayerState, int], Tensor]
GrowthRule = Callable[[LayerState, Tensor, int, torch.Generator], Tensor]
RedistributionRule = Callable[[Sequence[LayerState]], "Tensor | None"]
CountRule = Callable[[Sequence[LayerState], list[int], "list[float] | None", UpdateContext], list[int]]


# ----------------------------------------------------------------------------- prune rules
def _magnitude_prune(layer: LayerState, n: int) -> Tensor:
    return layer.drop_lowest(layer.weight.detach().abs(), layer.mask, n)


def _set_prune(layer: LayerState, n: int) -> Tensor:
    return set_prune(layer.weight, layer.mask, n, offset=layer.offset, group=layer.group)


# ----------------------------------------------------------------------------- growth rules
def _momentum_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return layer.add_highest(layer.momentum.detach().abs(), mask, n)


def _gradient_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return layer.add_highest(layer.grad.detach().abs(), mask, n)


def _random_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return layer.add_random(mask, n, generator)


def _no_growth(layer: LayerState, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
    return mask


# ----------------------------------------------------------------------------- redistribution rules
def _momentum_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return momentum_shares([layer.momentum for layer in layers], [layer.mask for layer in layers], shard_reducer(layers))


def _magnitude_redistribution(layers: Sequence[LayerState]) -> Tensor:
    return magnitude_shares([layer.weight for layer in layers], [layer.mask for layer in layers], shard_reducer(layers))


def shard_reducer(layers: Sequence[LayerState]) -> Callable[[Tensor], Tensor] | None:
    """Sums per-layer statistics (a tensor ``[L, ...]``) over the shards of the layers; ``None`` when every
    layer is whole on this process."""
    specs = [layer.spec for layer in layers]
    group = common_group(specs)
    if group is None:
        return None
    return partial(reduce_layer_sums, specs=specs, group=group)


def _layer_counts(masks: Sequence[Tensor], reducer: Callable[[Tensor], Tensor] | None) -> list[int]:
    """Active entries of each mask, summed over the shards when ``reducer`` is given (one host read)."""
    counts = torch.stack([m.sum() for m in masks]).to(torch.int64)
    return [int(c) for c in (reducer(counts) if reducer is not None else counts).tolist()]


def _no_redistribution(layers: Sequence[LayerState]) -> None:
    return None


NONZERO = "nonzero"
"""Redistribution in proportion to each layer's active weights *after* pruning (DSR's rule); computed on
the host from the counts, so it has no function."""


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


PRUNE_RULES: dict[str, PruneRule] = {"magnitude": _magnitude_prune, "set": _set_prune}
GROWTH_RULES: dict[str, GrowthRule] = {
    "momentum": _momentum_growth,
    "gradient": _gradient_growth,
    "random": _random_growth,
    "none": _no_growth,
}
REDISTRIBUTION_RULES: dict[str, RedistributionRule | str] = {
    "momentum": _momentum_redistribution,
    "magnitude": _magnitude_redistribution,
    NONZERO: NONZERO,
    "none": _no_redistribution,
}
COUNT_RULES: dict[str, CountRule] = {"ceil": ceil_count, "floor": floor_count, "gmp": gmp_count, "dsr": DSRThreshold()}
STARTS = ("random", "dense", "snip")
EXCESS_RULES = ("equal", "proportional")


def _resolve(kind: str, value: Any, table: dict[str, Any]) -> Any:
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"`{kind}` can be {', '.join(table)} or a function, got {value!r}")
    return table[value]


@dataclass(frozen=True)
class UpdateResult:
    """What one mask update did: the new masks, the masks after pruning (before growth), and per layer the
    active, pruned and grown counts."""

    masks: list[Tensor]
    pruned_masks: list[Tensor]
    active: list[int]
    pruned: list[int]
    grown: list[int]


@dataclass(frozen=True)
class SparseAlgorithm:
    """A sparse training method: rules for an update, its defaults, and when it runs.

    Args:
        prune: ``"magnitude"``, ``"set"`` (closest to zero on each side) or a prune rule.
        grow: ``"momentum"``, ``"gradient"``, ``"random"``, ``"none"`` or a growth rule.
        redistribute: ``"momentum"``, ``"magnitude"``, ``"nonzero"`` (active weights after pruning),
            ``"none"`` (every layer regrows what it lost) or a redistribution rule.
        count: ``"ceil"`` (``ceil(p·active)``), ``"floor"`` (``floor(p·active)``), ``"gmp"`` (down to the
            cubic schedule's density), ``"dsr"`` (below DSR's adaptive threshold) or a count rule.
        nearly_dense_edge_case: with ``count="ceil"`` and shares, a nearly dense layer (density > 0.8) whose
            share exceeds ``1/L`` prunes at most its sparsity (sparse momentum, section 3.2).
        excess: with shares (any ``redistribute`` but ``"none"``), what happens to the regrowth a layer cannot
            take. ``"equal"`` (default; sparse momentum's first edge case, section 3.2, as its reference code
            ``calc_growth_redistribution`` does it): a layer takes at most 99 % of its free positions after
            pruning, and the excess is handed out in equal parts to all the other layers, repeatedly, until
            nothing is left (:func:`~lightning_sparse.functional.allocate_regrowth_equal`); no layer is made
            dense by redistribution. ``"proportional"``: the excess goes to the other layers in proportion to
            their shares, and a layer may fill up completely
            (:func:`~lightning_sparse.functional.allocate_regrowth`; DSR's rule, whose reference hands what a
            layer cannot take back out by the same shares). Either way the total is exact.
        prune_rate: default initial pruning rate / drop fraction.
        schedule: default pruning-rate schedule (``"cosine"``, ``"linear"``, ``"constant"``).
        init: default sparse initialization (``"uniform"``, ``"erk"``, ``"er"``).
        update_interval: default update period in optimizer steps; ``None`` for every epoch.
        stop_at: default end of the update window as a fraction of training; progress for the schedule
            is measured over the window and the first update at or after its end is the last one.
        start: ``"random"`` (masks drawn with ``init``), ``"dense"`` (all weights active: GMP), or
            ``"snip"`` (one batch's ``|g·w|`` at the start of training).
        reset_grown: zero the optimizer state (momentum, Adam's moments) at grown positions, so that a grown
            weight does not inherit the momentum its position gathered while inactive (RigL, SET, DSR, whose
            references keep no state for absent weights). ``False`` keeps it (sparse momentum, whose reference
            grows where that momentum is largest and keeps it). Grown weights always start at zero.
        reinit_when_same: whether a weight dropped and regrown in the same update counts as grown (zeroed, and
            its state reset with ``reset_grown``). ``False`` (RigL's reference default and sparse momentum's):
            it keeps its value and state, and only positions inactive before the update start afresh. ``True``
            (SET, DSR: their references treat every regrown position as a new connection).
        dynamic: ``False`` for masks that never change after the start.

    Example (the paper's ablation "momentum redistribution, random growth"):
        >>> SparseAlgorithm(prune="magnitude", grow="random", redistribute="momentum")  # doctest: +ELLIPSIS
        SparseAlgorithm(prune='magnitude', grow='random', redistribute='momentum', ...)
    """

    prune: str | PruneRule = "magnitude"
    grow: str | GrowthRule = "momentum"
    redistribute: str | RedistributionRule = "momentum"
    count: str | CountRule = "ceil"
    nearly_dense_edge_case: bool = False
    prune_rate: float = 0.5
    schedule: str = "cosine"
    init: str = "uniform"
    update_interval: int | None = None
    stop_at: float = 1.0
    start: str = "random"
    reset_grown: bool = False
    reinit_when_same: bool = False
    excess: str = "equal"
    dynamic: bool = True
    _rules: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.init not in INIT_METHODS:
            raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.schedule not in PRUNE_RATE_SCHEDULES:
            raise ValueError(f"`schedule` can be {', '.join(PRUNE_RATE_SCHEDULES)}, got {self.schedule!r}")
        if self.start not in STARTS:
            raise ValueError(f"`start` can be {', '.join(STARTS)}, got {self.start!r}")
        if not 0.0 < self.stop_at <= 1.0:
            raise ValueError(f"`stop_at` must be in (0, 1], got {self.stop_at}")
        if self.excess not in EXCESS_RULES:
            raise ValueError(f"`excess` can be {', '.join(EXCESS_RULES)}, got {self.excess!r}")
        rules = (
            _resolve("count", self.count, COUNT_RULES),
            _resolve("prune", self.prune, PRUNE_RULES),
            _resolve("redistribute", self.redistribute, REDISTRIBUTION_RULES),
            _resolve("grow", self.grow, GROWTH_RULES),
        )
        object.__setattr__(self, "_rules", rules)

    @property
    def needs_momentum(self) -> bool:
        """Whether the built-in rules read the optimizer's momentum (a user-written rule that reads
        ``layer.momentum`` gets the optimizer checked when it first does)."""
        return self.dynamic and "momentum" in (self.prune, self.grow, self.redistribute, self.count)

    def update(self, layers: Sequence[LayerState], active: Sequence[int], context: UpdateContext) -> UpdateResult:
        """One count–prune–redistribute–grow cycle.

        ``active`` holds each layer's number of active weights (kept on the host, so counting needs no
        synchronization). Unless the growth rule is ``"none"``, the total number of active weights is
        preserved exactly; with redistribution ``"none"`` each layer's own count is. Reading the shares is
        the only host synchronization of the built-in rules (DSR's and SET's counting add one each).

        Under a structured ``context.pattern`` see :meth:`update_structured`.
        """
        count_rule, prune_rule, redistribute_rule, grow_rule = self._rules
        masks = [layer.mask for layer in layers]
        active = list(active)
        if not self.dynamic:
            zeros = [0] * len(layers)
            return UpdateResult(list(masks), list(masks), active, zeros, list(zeros))
        if parse_pattern(context.pattern).structured:
            return self.update_structured(layers, active, context)
        sizes = [layer.numel for layer in layers]
        shares = None
        if redistribute_rule is not NONZERO:
            shares_tensor = redistribute_rule(layers)
            shares = None if shares_tensor is None else [float(s) for s in shares_tensor.tolist()]
        pruned = count_rule(layers, active, shares if self.nearly_dense_edge_case else None, context)
        pruned = [min(max(p, 0), a) for p, a in zip(pruned, active)]
        pruned_masks = [prune_rule(layer, n) for layer, n in zip(layers, pruned)]
        if redistribute_rule is NONZERO:
            survivors = [a - p for a, p in zip(active, pruned)]
            shares = [s / sum(survivors) for s in survivors] if sum(survivors) else [1.0 / len(sizes)] * len(sizes)
        if grow_rule is _no_growth:
            grown = [0] * len(layers)
        elif shares is None:
            grown = list(pruned)
        else:
            capacity = [size - a + p for size, a, p in zip(sizes, active, pruned)]
            allocate = allocate_regrowth_equal if self.excess == "equal" else allocate_regrowth
            grown = allocate(sum(pruned), shares, capacity)
        new_masks = [
            grow_rule(layer, mask, n, context.generator) for layer, mask, n in zip(layers, pruned_masks, grown)
        ]
        new_active = [a - p + g for a, p, g in zip(active, pruned, grown)]
        reducer = shard_reducer(layers)
        if reducer is not None:  # a rule that selects per shard instead of over the layer would break the counts
            counted = _layer_counts(new_masks, reducer)
            wrong = [f"{layer.name}: {c} != {a}" for layer, c, a in zip(layers, counted, new_active) if c != a]
            if wrong:
                raise RuntimeError(
                    "an update rule returned masks whose counts over the shards are not the requested ones"
                    f" ({'; '.join(wrong)}); under FSDP2, rules must select with LayerState.drop_lowest,"
                    " add_highest or add_random, which select over the whole layer"
                )
        return UpdateResult(new_masks, pruned_masks, new_active, pruned, grown)

    def update_structured(
        self, layers: Sequence[LayerState], active: Sequence[int], context: UpdateContext
    ) -> UpdateResult:
        """One update that keeps ``context.pattern`` (``"N:M"`` or ``"fan_in"``, see
        :mod:`~lightning_sparse.functional.patterns`): every unit of a layer (N:M group, row) ends with the same
        number of active weights, its target.

        * The count and prune rules run as in :meth:`update`, over the whole layer.
        * Targets: ``N`` per group under ``"N:M"`` (no redistribution: every layer stays at N/M). Under
          ``"fan_in"`` each row keeps ``active_l / rows_l``, unless the method redistributes (sparse momentum,
          DSR): the counts it hands each layer are then rounded to whole rows by
          :func:`~lightning_sparse.functional.patterns.round_to_rows`, which keeps the total exact (when no
          rounding reaches it, every layer keeps its count at that update).
        * Units above their target (a fan-in layer that redistribution shrinks) drop their active weights of
          lowest ``|W|``; units below it grow by the growth rule, whose ``LayerState.add_highest`` /
          ``add_random`` fill each unit: what a unit lost comes back in that unit, at its free positions of
          highest growth score (momentum, gradient, random hash).
        * GMP (``count="gmp"``): every unit is pruned by ``|W|`` to ``round((1 - s_t) * unit size)``, ``s_t`` the
          cubic schedule to ``1 - density``: ``N_t`` of every ``M`` (reaching ``N`` at the end of the window), or
          ``k_t`` inputs per row.

        The new masks are checked (one host read): a unit off its target, e.g. from a growth rule that sets
        masks without ``add_highest`` / ``add_random``, raises ``RuntimeError`` naming the layers. Under FSDP2 every
        unit lies within a row, so all of this is local to the shards.
        """
        pattern = parse_pattern(context.pattern)
        if context.ablation is not None:
            return self._update_ablating(layers, list(active), context)
        count_rule, prune_rule, redistribute_rule, _ = self._rules
        active = list(active)
        shapes = [unit_shape(layer.spec.shape, pattern, layer.transposed) for layer in layers]
        units = [u for u, _ in shapes]
        current = [a // u if u else 0 for a, u in zip(active, units)]
        reducer = shard_reducer(layers)
        if count_rule is gmp_count:
            sparsity = gmp_sparsity(context.progress, final=1.0 - context.density)
            targets = [min(round_half_up((1.0 - sparsity) * size), c) for (_, size), c in zip(shapes, current)]
            masks = [
                trim_units(layer.weight.detach().abs(), layer.mask, t, pattern, layer.transposed)
                for layer, t in zip(layers, targets)
            ]
            new_active = [u * t for u, t in zip(units, targets)]
            pruned = [a - n for a, n in zip(active, new_active)]
            result = UpdateResult(masks, list(masks), new_active, pruned, [0] * len(layers))
            self._check_units(layers, result.masks, targets, pattern, reducer)
            return result
        moves = pattern.kind == "fan_in" and redistribute_rule is not _no_redistribution
        shares = None
        if moves and redistribute_rule is not NONZERO:
            shares_tensor = redistribute_rule(layers)
            shares = None if shares_tensor is None else [float(s) for s in shares_tensor.tolist()]
        pruned = count_rule(layers, active, shares if self.nearly_dense_edge_case else None, context)
        pruned = [min(max(p, 0), a) for p, a in zip(pruned, active)]
        pruned_masks = [prune_rule(layer, n) for layer, n in zip(layers, pruned)]
        targets = list(current)
        if moves and redistribute_rule is NONZERO:
            survivors = [a - p for a, p in zip(active, pruned)]
            shares = [s / sum(survivors) for s in survivors] if sum(survivors) else [1.0 / len(layers)] * len(layers)
        if moves and shares is not None:
            capacity = [layer.numel - a + p for layer, a, p in zip(layers, active, pruned)]
            allocate = allocate_regrowth_equal if self.excess == "equal" else allocate_regrowth
            allocated = allocate(sum(pruned), shares, capacity)
            wanted = [float(a - p + g) for a, p, g in zip(active, pruned, allocated)]
            targets = round_to_rows(wanted, units, [s for _, s in shapes], sum(active), current)
        if any(t < c for t, c in zip(targets, current)):  # rows of a shrinking layer drop their smallest |W|
            pruned_masks = [
                trim_units(layer.weight.detach().abs(), mask, t, pattern, layer.transposed) if t < c else mask
                for layer, mask, t, c in zip(layers, pruned_masks, targets, current)
            ]
            survivors = _layer_counts(pruned_masks, reducer)
        else:
            survivors = [a - p for a, p in zip(active, pruned)]
        new_active = [u * t for u, t in zip(units, targets)]
        return self._grow_units(layers, pruned_masks, targets, active, survivors, new_active, pattern, reducer, context)

    def _grow_units(
        self,
        layers: Sequence[LayerState],
        pruned_masks: Sequence[Tensor],
        targets: Sequence[int | Tensor],
        active: Sequence[int],
        survivors: Sequence[int],
        new_active: Sequence[int],
        pattern: Pattern,
        reducer: Callable[[Tensor], Tensor] | None,
        context: UpdateContext,
    ) -> UpdateResult:
        """The growth step of a structured update: every unit of each layer filled up to its target (one per layer,
        or one per unit) by the growth rule, from ``pruned_masks`` that hold ``survivors`` weights, to
        ``new_active``; the units are then checked."""
        grow_rule = self._rules[3]
        grown = [n - s for n, s in zip(new_active, survivors)]
        new_masks = []
        for layer, mask, t, g in zip(layers, pruned_masks, targets, grown):
            layer._units = (pattern, t)
            try:
                new_masks.append(grow_rule(layer, mask, g, context.generator))
            finally:
                layer._units = None
        pruned = [a - s for a, s in zip(active, survivors)]
        result = UpdateResult(new_masks, list(pruned_masks), list(new_active), pruned, grown)
        self._check_units(layers, result.masks, targets, pattern, reducer)
        return result

    def _update_ablating(self, layers: Sequence[LayerState], active: list[int], context: UpdateContext) -> UpdateResult:
        """:meth:`update_structured` under ``"fan_in"`` with SRigL's neuron ablation (Lasby et al. 2024, the
        reference's ``dynamic_ablation``): every row of a layer ends with either ``k_l`` active weights or none.

        * Each layer has a budget ``B_l`` (``context.state["fan_in_budgets"]``, its active count at its first
          update): the weights it may hold. Without redistribution it never changes; with it (sparse momentum)
          the budgets are what redistribution hands out, and their total never changes.
        * Count and prune rules run as in :meth:`update`. A weight is *salient* if the prune rule keeps it or it is
          among the layer's ``pruned`` positions of highest growth score over the whole layer (RigL: ``|grad|``,
          sparse momentum: ``|momentum|``; active or not).
        * A row with fewer salient weights than ``max(1, int(gamma_sal * (B_l // rows_l)))`` is ablated (all its
          weights dropped, none grown), unless that would leave fewer than ``B_l // fan_in_l + 1`` rows, the fewest
          that hold the budget: then the cutoff drops to the salient count of the row at that rank
          (:func:`~lightning_sparse.functional.patterns.ablation_cutoff`). Rows of ``context.keep_neurons`` are
          never ablated. An ablated row whose gradient makes it salient again comes back (grown from zero).
        * ``k_l = B_l // alive_l`` (at most the fan-in): a layer holds ``alive_l * k_l <= B_l`` (less than one
          weight per alive row below its budget, SRigL's rounding). With redistribution, ``k_l`` are the budgets
          after redistribution rounded to whole alive rows by
          :func:`~lightning_sparse.functional.patterns.round_to_rows`, keeping the total exact; when no rounding
          reaches it, each layer takes ``floor(B_l / alive_l)`` and keeps its budget for later updates.
        * Alive rows above ``k_l`` drop their weights of lowest ``|W|``; rows below it grow by the growth rule.

        Under FSDP2 the salient counts are reduced over the shards as one histogram per layer.
        """
        pattern = parse_pattern(context.pattern)
        check_ablation(self, pattern, context.ablation)
        gamma = float(context.ablation)  # type: ignore[arg-type]
        count_rule, prune_rule, redistribute_rule, grow_rule = self._rules
        shapes = [unit_shape(layer.spec.shape, pattern, layer.transposed) for layer in layers]
        rows, fan_in = [r for r, _ in shapes], [f for _, f in shapes]
        reducer = shard_reducer(layers)
        stored = context.state.setdefault(ABLATION_BUDGETS, {})
        budgets = [int(stored.get(layer.name, a)) for layer, a in zip(layers, active)]
        moves = redistribute_rule is not _no_redistribution
        shares = None
        if moves and redistribute_rule is not NONZERO:
            shares_tensor = redistribute_rule(layers)
            shares = None if shares_tensor is None else [float(x) for x in shares_tensor.tolist()]
        pruned = count_rule(layers, active, shares if self.nearly_dense_edge_case else None, context)
        pruned = [min(max(p, 0), a) for p, a in zip(pruned, active)]
        pruned_masks = [prune_rule(layer, n) for layer, n in zip(layers, pruned)]

        salient = []  # per local row: weights kept by the prune rule, or among the top `pruned` growth scores
        for layer, kept, n in zip(layers, pruned_masks, pruned):
            wanted = grow_rule(layer, torch.zeros_like(kept), n, context.generator)
            salient.append(unit_counts(kept | wanted, pattern, layer.transposed))
        width = max(fan_in) + 1
        histograms = torch.stack(
            [torch.zeros(width, dtype=torch.int64, device=c.device).scatter_add_(0, c, torch.ones_like(c)) for c in salient]
        )
        histograms = (reducer(histograms) if reducer is not None else histograms).tolist()
        cutoffs = [
            0
            if layer.name in context.keep_neurons or r == 0
            else ablation_cutoff(h, max(1, int(gamma * (b // r) + 1e-9)), b // f + 1)
            for layer, h, r, f, b in zip(layers, histograms, rows, fan_in, budgets)
        ]
        alive = [r - sum(h[:cut]) for r, h, cut in zip(rows, histograms, cutoffs)]

        if moves:
            survivors = [a - p for a, p in zip(active, pruned)]
            if shares is None:  # redistribute="nonzero": in proportion to the weights left after pruning
                total = sum(survivors)
                shares = [x / total for x in survivors] if total else [1.0 / len(layers)] * len(layers)
            capacity = [max(n * f - s, 0) for n, f, s in zip(alive, fan_in, survivors)]
            allocate = allocate_regrowth_equal if self.excess == "equal" else allocate_regrowth
            allocated = allocate(sum(pruned), shares, capacity)
            wanted = [s + g + b - a for s, g, b, a in zip(survivors, allocated, budgets, active)]
            floors = [min(w // n, f) if n else 0 for w, n, f in zip(wanted, alive, fan_in)]
            targets = round_to_rows([float(w) for w in wanted], alive, fan_in, sum(budgets), floors)
            held = [n * t for n, t in zip(alive, targets)]
            budgets = held if sum(held) == sum(budgets) else [min(w, n * f) for w, n, f in zip(wanted, alive, fan_in)]
        else:
            targets = [min(b // n, f) if n else 0 for b, n, f in zip(budgets, alive, fan_in)]

        row_targets = [
            torch.where(c < cut, 0, t).to(torch.int64) for c, cut, t in zip(salient, cutoffs, targets)
        ]  # 0 for the ablated rows
        pruned_masks = [
            trim_units(layer.weight.detach().abs(), mask, t, pattern, layer.transposed)
            for layer, mask, t in zip(layers, pruned_masks, row_targets)
        ]
        survivors = _layer_counts(pruned_masks, reducer)
        new_active = [n * t for n, t in zip(alive, targets)]
        result = self._grow_units(
            layers, pruned_masks, row_targets, active, survivors, new_active, pattern, reducer, context
        )
        stored.update({layer.name: int(b) for layer, b in zip(layers, budgets)})
        return result

    @staticmethod
    def _check_units(
        layers: Sequence[LayerState],
        masks: Sequence[Tensor],
        targets: Sequence[int],
        pattern: Pattern,
        reducer: Callable[[Tensor], Tensor] | None,
    ) -> None:
        """``RuntimeError`` naming the layers with a unit whose active count is not its target (one host read)."""
        if not layers:
            return
        off = torch.stack(
            [(unit_counts(m, pattern, layer.transposed) != t).sum() for layer, m, t in zip(layers, masks, targets)]
        ).to(torch.int64)
        if reducer is not None:
            off = reducer(off)
        wrong = [f"{layer.name}: {n} units" for layer, n in zip(layers, off.tolist()) if n]
        if wrong:
            raise RuntimeError(
                f"pattern={str(pattern)!r}: the update left units off their target ({'; '.join(wrong)}); under a"
                " structured pattern, growth rules must grow with LayerState.add_highest or add_random, which fill"
                " every unit of the pattern"
            )

    def grown_positions(self, before: Sequence[Tensor], result: UpdateResult) -> list[Tensor]:
        """Per layer, the positions that start afresh after ``result``: active now and inactive before the update
        (``before``: the masks the update started from), plus, with ``reinit_when_same``, the ones dropped and
        regrown in it (active now, not kept through pruning)."""
        if self.reinit_when_same:
            return [mask & ~pruned for mask, pruned in zip(result.masks, result.pruned_masks)]
        return [mask & ~old for mask, old in zip(result.masks, before)]

    @torch.no_grad()
    def start_grown_(
        self,
        weights: Sequence[Tensor],
        before: Sequence[Tensor],
        result: UpdateResult,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> list[Tensor]:
        """Set how the grown weights start, as the method's reference does: zero, and with ``reset_grown`` zero
        optimizer state at their positions (:func:`~lightning_sparse.core.optimizer.reset_optimizer_state`). Weights
        dropped and regrown in the same update keep value and state unless ``reinit_when_same``.

        ``weights`` are the parameters the optimizer updates (under FSDP2 the sharded ones: their local rows and
        the local rows of their state are written); ``before`` and ``result`` hold masks shaped like the local
        rows. Returns the positions (:meth:`grown_positions`)."""
        grown = self.grown_positions(before, result)
        for weight, positions in zip(weights, grown):
            local(weight).masked_fill_(positions, 0.0)
            if self.reset_grown and optimizer is not None:
                reset_optimizer_state(optimizer, weight, positions)
        return grown


ABLATION_BUDGETS = "fan_in_budgets"
"""The key of the per-layer budgets (``{layer name: weights}``) of neuron ablation in an algorithm's state."""


def check_ablation(algorithm: SparseAlgorithm | DST, pattern: str | Pattern, ablation: Any) -> float | None:
    """``ablation`` (SRigL's ``gamma_sal``) checked against the method and pattern: ``None``, or a number in
    (0, 1] with ``pattern="fan_in"`` and a dynamic method that grows by a score (its saliency needs one); the
    error names what is allowed."""
    if ablation is None:
        return None
    value = ablation if isinstance(ablation, (int, float)) and not isinstance(ablation, bool) else None
    if value is None or not 0.0 < float(value) <= 1.0:
        raise ValueError(
            "`neuron_ablation` is SRigL's gamma_sal: a number in (0, 1] (the reference uses 0.3), or None for no"
            f" ablation, got {ablation!r}"
        )
    if parse_pattern(pattern).kind != "fan_in":
        raise ValueError(
            f"`neuron_ablation` empties whole rows of a constant fan-in layer: it needs pattern='fan_in', got"
            f" pattern={str(parse_pattern(pattern))!r}"
        )
    scored = (
        isinstance(algorithm, SparseAlgorithm)
        and algorithm.dynamic
        and algorithm.count != "gmp"
        and algorithm.grow not in ("random", "none")
    )
    if not scored:
        raise ValueError(
            "`neuron_ablation` counts each neuron's salient weights, those kept by |W| or wanted by the growth"
            " score: it needs a dynamic method that grows by a score (rigl: gradient, sparse_momentum: momentum,"
            " or a SparseAlgorithm with grow='gradient', 'momentum' or a growth function); not DST, GMP, static,"
            " SNIP, or random growth (set, dsr)"
        )
    return float(value)


ALGORITHMS: dict[str, SparseAlgorithm | DST] = {
    "sparse_momentum": SparseAlgorithm(
        prune="magnitude", grow="momentum", redistribute="momentum", count="ceil", nearly_dense_edge_case=True
    ),
    "rigl": SparseAlgorithm(
        prune="magnitude",
        grow="gradient",
        redistribute="none",
        count="floor",
        prune_rate=0.3,
        init="erk",
        update_interval=100,
        stop_at=0.75,
        reset_grown=True,
    ),
    "set": SparseAlgorithm(
        prune="set",
        grow="random",
        redistribute="none",
        count="ceil",
        prune_rate=0.3,
        schedule="constant",
        init="er",
        reset_grown=True,
        reinit_when_same=True,
    ),
    "dsr": SparseAlgorithm(
        prune="magnitude",
        grow="random",
        redistribute=NONZERO,
        count="dsr",
        prune_rate=0.1,
        schedule="constant",
        update_interval=200,
        reset_grown=True,
        reinit_when_same=True,
        excess="proportional",
    ),
    "static": SparseAlgorithm(dynamic=False, redistribute="none"),
    "snip": SparseAlgorithm(dynamic=False, redistribute="none", start="snip"),
    "gmp": SparseAlgorithm(
        prune="magnitude", grow="none", redistribute="none", count="gmp", update_interval=100, stop_at=0.75, start="dense"
    ),
    "dst": DST(),
}


def get_algorithm(algorithm: str | SparseAlgorithm | DST) -> SparseAlgorithm | DST:
    """Look up a method by name (``ALGORITHMS``) or pass a :class:`SparseAlgorithm` / :class:`DST` through."""
    if isinstance(algorithm, (SparseAlgorithm, DST)):
        return algorithm
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(
            f"`algorithm` can be {', '.join(ALGORITHMS)}, a SparseAlgorithm or a DST, got {algorithm!r}"
        )
    return ALGORITHMS[algorithm]


def window_progress(step: int, total: float, stop_at: float) -> float:
    """Progress through the update window: ``step / (stop_at * total)``, clipped to [0, 1]."""
    end = stop_at * total
    return min(max(step / end, 0.0), 1.0) if end > 0 and math.isfinite(end) else 0.0
