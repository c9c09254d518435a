"""Targets: what the count → prune → share → target → grow pipeline of
:class:`~lightning_sparse.methods.SparseAlgorithm` aims each layer at after pruning, one class per pattern.

* :class:`Unstructured`: each layer regrows what it lost, or with shares what redistribution hands it.
* :class:`Units` (``"N:M"``, ``"fan_in"``): every unit of a layer (N:M group, row) ends with the same number of
  active weights, its target: ``N`` per group under ``"N:M"`` (no redistribution: every layer stays at N/M);
  under ``"fan_in"`` each row keeps ``active_l / rows_l``, unless the method redistributes (sparse momentum,
  DSR): the counts it hands each layer are then rounded to whole rows by
  :func:`~lightning_sparse.functional.patterns.round_to_rows`, which keeps the total exact (when no rounding
  reaches it, every layer keeps its count at that update). Units above their target (a fan-in layer that
  redistribution shrinks) drop their active weights of lowest ``|W|``; units below it grow by the growth rule,
  whose ``LayerState.add_highest`` / ``add_random`` fill each unit: what a unit lost comes back in that unit, at
  its free positions of highest growth score (momentum, gradient, random hash).
* :class:`ScheduledUnits` (GMP under a pattern): every unit is pruned by ``|W|`` to ``round((1 - s_t) * unit
  size)``, ``s_t`` the cubic schedule to ``1 - density``: ``N_t`` of every ``M`` (reaching ``N`` at the end of the
  window), or ``k_t`` inputs per row; nothing grows.
* :class:`~lightning_sparse.methods.ablation.Ablation`: ``"fan_in"`` with SRigL's neuron ablation.

Every update's new masks are checked (one host read) before they are set: unstructured, each layer's count after
pruning and after growth must be the one asked (:func:`check_counts`: a growth rule that grows ``n // 2`` raises
``RuntimeError`` naming the layer, the counts and the rule); under a pattern, a unit off its target, e.g. from a
growth rule that sets masks without ``add_highest`` / ``add_random``, raises ``RuntimeError`` naming the layers. Under FSDP2 every
unit lies within a row, so all of this is local to the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from lightning_sparse.functional.passes import nonzero_count
from lightning_sparse.functional.patterns import Pattern, unit_counts, unit_shape
from lightning_sparse.functional.schedules import gmp_sparsity
from lightning_sparse.functional.units import round_half_up, round_to_rows, trim_units
from lightning_sparse.methods.base import Counts, LayerState, UpdateContext, UpdateResult, layer_counts, shard_reducer
from lightning_sparse.methods.rules import CountRule, PruneRule

Reducer = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Plan:
    """What a target decides after pruning: the masks growth starts from, the weights they hold, how many each
    layer grows, and under a pattern each layer's unit target (one int, or one per unit)."""

    pruned_masks: list[Tensor]
    survivors: list[int]
    grown: list[int]
    unit_targets: list[int | Tensor] | None = None


class Target:
    """One update's target (built per update by :meth:`SparseAlgorithm.update`). ``moves``: whether
    redistribution's shares apply; ``grows``: whether the growth rule runs."""

    moves = True
    grows = True
    pattern: Pattern | None = None
    grown: list[int] | None = None  # per layer, set by a count rule that answers Counts

    def __init__(self, layers: Sequence[LayerState]) -> None:
        self.layers = layers

    @cached_property
    def reducer(self) -> Reducer | None:
        """Sums per-layer statistics over the shards (:func:`~lightning_sparse.methods.base.shard_reducer`)."""
        return shard_reducer(self.layers)

    def count(self, rule: CountRule, layers: Sequence[LayerState], active: list[int], shares: list[float] | None,
              context: UpdateContext) -> list[int]:  # fmt: skip
        """How many active weights each layer loses (the count rule's numbers, clipped to ``[0, active]``). A rule
        that answers :class:`~lightning_sparse.methods.base.Counts` also says how many each layer grows
        (:attr:`grown`, kept for :meth:`plan`)."""
        counted = rule(layers, active, shares, context)
        if isinstance(counted, Counts):
            if self.pattern is not None:
                raise ValueError(
                    f"pattern={str(self.pattern)!r}: the count rule {_name(rule)} sets its own growth counts (GraNet,"
                    " MEST), which only an unstructured update (pattern='unstructured') follows"
                )
            self.grown = [max(g, 0) for g in counted.grown]
            counted = counted.pruned
        return [min(max(p, 0), a) for p, a in zip(counted, active)]

    def prune(self, rule: PruneRule, layers: Sequence[LayerState], pruned: list[int]) -> list[Tensor]:
        """The masks after pruning ``pruned`` weights of each layer."""
        return [rule(layer, n) for layer, n in zip(layers, pruned)]

    def plan(self, algorithm, layers: Sequence[LayerState], active: list[int], pruned: list[int],
             pruned_masks: list[Tensor], shares: list[float] | None, context: UpdateContext) -> Plan:  # fmt: skip
        raise NotImplementedError

    def check(self, layers: Sequence[LayerState], result: UpdateResult) -> None:
        """``RuntimeError`` if the growth rule left masks off their target."""

    def commit(self, context: UpdateContext) -> None:
        """Store what the next update needs in ``context.state`` (after the new masks passed :meth:`check`)."""


class Unstructured(Target):
    """Each layer regrows what it lost; with shares, the total pruned is handed out by them.

    ``rules``: the names of the prune and growth rules (``"magnitude"``, a function's name), for the refusal of
    :meth:`check`."""

    def __init__(self, layers: Sequence[LayerState], rules: tuple[str, str] = ("prune", "grow")) -> None:
        super().__init__(layers)
        self.rule_names = rules

    def plan(self, algorithm, layers, active, pruned, pruned_masks, shares, context) -> Plan:
        survivors = [a - p for a, p in zip(active, pruned)]
        if not algorithm.grows:
            grown = [0] * len(layers)
        elif self.grown is not None:  # the count rule's own growth, within each layer's free positions
            grown = [min(g, layer.numel - s) for g, layer, s in zip(self.grown, layers, survivors)]
        elif shares is None:
            grown = list(pruned)
        else:
            capacity = [layer.numel - s for layer, s in zip(layers, survivors)]
            grown = algorithm.allocate(sum(pruned), shares, capacity)
        return Plan(pruned_masks, survivors, grown)

    def check(self, layers, result) -> None:
        check_counts(layers, result, self.rule_names, self.reducer)


def check_counts(
    layers: Sequence[LayerState], result: UpdateResult, rules: tuple[str, str], reducer: Reducer | None
) -> None:
    """``RuntimeError`` naming the layers whose masks after pruning or after growth do not hold the counts the
    update asked for (``result.active``, and ``active - pruned`` after pruning), and the rule that got them wrong
    (``rules``: the prune and growth rules' names). A rule that grows ``n // 2`` would otherwise leave the masks
    off the asked density while the counts kept on the host (``describe()``, the summary) report the asked ones.
    One host read for both (and one all-reduce under FSDP2, where a rule that selects per shard breaks the counts
    too); it runs before the masks are set, so a refused update leaves the model as it was."""
    if not layers:
        return
    local = torch.stack([torch.stack([nonzero_count(p), nonzero_count(m)]) for p, m in zip(result.pruned_masks, result.masks)])
    counted = (reducer(local) if reducer is not None else local).tolist()  # nonzero_count: int64 already
    wrong = []
    for layer, (kept, now), active, pruned, grown in zip(layers, counted, result.active, result.pruned, result.grown):
        survivors = active - grown
        if kept != survivors:
            wrong.append(
                f"{layer.name}: the prune rule {rules[0]!r} was asked to remove {pruned} of"
                f" {survivors + pruned} active weights and left {kept} (asked {survivors})"
            )
        elif now != active:
            wrong.append(
                f"{layer.name}: the growth rule {rules[1]!r} was asked to grow {grown} weights and grew"
                f" {now - kept} ({now} active, asked {active})"
            )
    if wrong:
        shards = (
            "; under FSDP2 they must select with LayerState.drop_lowest, add_highest or add_random, which select"
            " over the whole layer, not per shard"
            if reducer is not None
            else " (LayerState.drop_lowest, add_highest and add_random select exactly n)"
        )
        raise RuntimeError(
            f"a mask update got counts other than those asked ({'; '.join(wrong)}), which would leave the masks off"
            " the asked density: a prune rule must return `layer.mask` with exactly `n` fewer active entries, a"
            f" growth rule `mask` with exactly `n` more, never an already active one{shards}. The masks and weights"
            " are left as they were"
        )


class Units(Target):
    """Every unit of ``pattern`` at one target per layer (see the module docstring)."""

    def __init__(self, layers: Sequence[LayerState], pattern: Pattern, active: Sequence[int], redistributes: bool) -> None:
        super().__init__(layers)
        self.reducer = shard_reducer(layers)  # now: weights sharded over several groups are refused first
        self.pattern = pattern
        self.moves = pattern.kind == "fan_in" and redistributes
        shapes = [unit_shape(layer.spec.shape, pattern, layer.transposed) for layer in layers]
        self.units, self.sizes = [u for u, _ in shapes], [s for _, s in shapes]
        self.current = [a // u if u else 0 for a, u in zip(active, self.units)]
        self.targets: list[int] = list(self.current)

    def plan(self, algorithm, layers, active, pruned, pruned_masks, shares, context) -> Plan:
        if shares is not None:
            capacity = [layer.numel - a + p for layer, a, p in zip(layers, active, pruned)]
            allocated = algorithm.allocate(sum(pruned), shares, capacity)
            wanted = [float(a - p + g) for a, p, g in zip(active, pruned, allocated)]
            self.targets = round_to_rows(wanted, self.units, self.sizes, sum(active), self.current)
        if any(t < c for t, c in zip(self.targets, self.current)):  # rows of a shrinking layer drop their smallest |W|
            pruned_masks = [
                trim_units(layer.weight.detach().abs(), mask, t, self.pattern, layer.transposed) if t < c else mask
                for layer, mask, t, c in zip(layers, pruned_masks, self.targets, self.current)
            ]
            survivors = layer_counts(pruned_masks, self.reducer)
        else:
            survivors = [a - p for a, p in zip(active, pruned)]
        grown = [u * t - s for u, t, s in zip(self.units, self.targets, survivors)]
        return Plan(pruned_masks, survivors, grown, list(self.targets))

    def check(self, layers, result) -> None:
        check_units(layers, result.masks, self.targets, self.pattern, self.reducer)


class ScheduledUnits(Units):
    """GMP under a pattern: every unit pruned by ``|W|`` to the cubic schedule's count; the count and prune rules
    are not used, and nothing grows."""

    moves = False
    grows = False

    def __init__(self, layers: Sequence[LayerState], pattern: Pattern, active: Sequence[int], context: UpdateContext) -> None:
        super().__init__(layers, pattern, active, redistributes=False)
        sparsity = gmp_sparsity(context.progress, final=1.0 - context.density)
        self.targets = [min(round_half_up((1.0 - sparsity) * size), c) for size, c in zip(self.sizes, self.current)]

    def count(self, rule, layers, active, shares, context) -> list[int]:
        return [a - u * t for a, u, t in zip(active, self.units, self.targets)]

    def prune(self, rule, layers, pruned) -> list[Tensor]:
        return [
            trim_units(layer.weight.detach().abs(), layer.mask, t, self.pattern, layer.transposed)
            for layer, t in zip(layers, self.targets)
        ]

    def plan(self, algorithm, layers, active, pruned, pruned_masks, shares, context) -> Plan:
        survivors = [u * t for u, t in zip(self.units, self.targets)]
        return Plan(pruned_masks, survivors, [0] * len(layers), list(self.targets))


def check_units(
    layers: Sequence[LayerState],
    masks: Sequence[Tensor],
    targets: Sequence[int | Tensor],
    pattern: Pattern,
    reducer: Reducer | None,
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


def _name(rule: object) -> str:
    return repr(getattr(rule, "__qualname__", None) or type(rule).__name__)
