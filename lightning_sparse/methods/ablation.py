"""SRigL's neuron ablation (Lasby et al. 2024, the reference's ``dynamic_ablation``) as a target of the update
pipeline: under ``"fan_in"``, every row of a layer ends with either ``k_l`` active weights or none.

* Each layer has a budget ``B_l`` (``context.state["fan_in_budgets"]``, its active count at its first update):
  the weights it may hold. Without redistribution it never changes; with it (sparse momentum) the budgets are
  what redistribution hands out, and their total never changes.
* Count and prune rules run as without ablation. A weight is *salient* if the prune rule keeps it or it is among
  the layer's ``pruned`` positions of highest growth score over the whole layer (RigL: ``|grad|``, sparse
  momentum: ``|momentum|``; active or not).
* A row with fewer salient weights than ``max(1, int(gamma_sal * (B_l // rows_l)))`` is ablated (all its weights
  dropped, none grown), unless that would leave fewer than ``B_l // fan_in_l + 1`` rows, the fewest that hold the
  budget: then the cutoff drops to the salient count of the row at that rank
  (:func:`~lightning_sparse.functional.patterns.ablation_cutoff`). Rows of ``context.keep_neurons`` are never
  ablated. An ablated row whose gradient makes it salient again comes back (grown from zero).
* ``k_l = B_l // alive_l`` (at most the fan-in): a layer holds ``alive_l * k_l <= B_l`` (less than one weight per
  alive row below its budget, SRigL's rounding). With redistribution, ``k_l`` are the budgets after
  redistribution rounded to whole alive rows by :func:`~lightning_sparse.functional.patterns.round_to_rows`,
  keeping the total exact; when no rounding reaches it, each layer takes ``floor(B_l / alive_l)`` and keeps its
  budget for later updates.
* Alive rows above ``k_l`` drop their weights of lowest ``|W|``; rows below it grow by the growth rule.

Under FSDP2 the salient counts are reduced over the shards as one histogram per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_sparse.functional.patterns import Pattern, parse_pattern, unit_counts, unit_shape
from lightning_sparse.functional.units import ablation_cutoff, round_to_rows, trim_units
from lightning_sparse.methods.base import LayerState, UpdateContext, layer_counts, shard_reducer
from lightning_sparse.methods.rules import SurvivorShares
from lightning_sparse.methods.targets import Plan, Target, check_units

ABLATION_BUDGETS = "fan_in_budgets"
"""The key of the per-layer budgets (``{layer name: weights}``) of neuron ablation in an algorithm's state."""


def check_ablation(algorithm: Any, pattern: str | Pattern, ablation: Any) -> float | None:
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
    if not getattr(algorithm, "grows_by_score", False):
        raise ValueError(
            "`neuron_ablation` counts each neuron's salient weights, those kept by |W| or wanted by the growth"
            " score: it needs a dynamic method that grows by a score (rigl: gradient, sparse_momentum: momentum,"
            " or a SparseAlgorithm with grow='gradient', 'momentum' or a growth function); not DST, GMP, static,"
            " SNIP, or random growth (set, dsr)"
        )
    return float(value)


class Ablation(Target):
    """The target of neuron ablation (see the module docstring)."""

    def __init__(self, algorithm: Any, layers: Sequence[LayerState], active: Sequence[int], context: UpdateContext) -> None:
        super().__init__(layers)
        self.pattern = parse_pattern(context.pattern)
        check_ablation(algorithm, self.pattern, context.ablation)
        self.gamma = float(context.ablation)  # type: ignore[arg-type]
        shapes = [unit_shape(layer.spec.shape, self.pattern, layer.transposed) for layer in layers]
        self.rows, self.fan_in = [r for r, _ in shapes], [f for _, f in shapes]
        self.reducer = shard_reducer(layers)  # now: weights sharded over several groups are refused first
        self.stored = context.state.setdefault(ABLATION_BUDGETS, {})
        self.budgets = [int(self.stored.get(layer.name, a)) for layer, a in zip(layers, active)]
        self.moves = algorithm.redistributes
        self.row_targets: list = []

    def plan(self, algorithm, layers, active, pruned, pruned_masks, shares, context) -> Plan:
        pattern, rows, fan_in, budgets = self.pattern, self.rows, self.fan_in, self.budgets
        salient = []  # per local row: weights kept by the prune rule, or among the top `pruned` growth scores
        for layer, kept, n in zip(layers, pruned_masks, pruned):
            wanted = algorithm.rules.grow(layer, torch.zeros_like(kept), n, context.generator)
            salient.append(unit_counts(kept | wanted, pattern, layer.transposed))
        width = max(fan_in) + 1
        histograms = torch.stack(
            [torch.zeros(width, dtype=torch.int64, device=c.device).scatter_add_(0, c, torch.ones_like(c)) for c in salient]
        )
        histograms = (self.reducer(histograms) if self.reducer is not None else histograms).tolist()
        cutoffs = [
            0
            if layer.name in context.keep_neurons or r == 0
            else ablation_cutoff(h, max(1, int(self.gamma * (b // r) + 1e-9)), b // f + 1)
            for layer, h, r, f, b in zip(layers, histograms, rows, fan_in, budgets)
        ]
        alive = [r - sum(h[:cut]) for r, h, cut in zip(rows, histograms, cutoffs)]

        if self.moves:
            survivors = [a - p for a, p in zip(active, pruned)]
            if shares is None:  # a rule without shares: in proportion to the weights left after pruning
                shares = SurvivorShares()(survivors)
            capacity = [max(n * f - s, 0) for n, f, s in zip(alive, fan_in, survivors)]
            allocated = algorithm.allocate(sum(pruned), shares, capacity)
            wanted = [s + g + b - a for s, g, b, a in zip(survivors, allocated, budgets, active)]
            floors = [min(w // n, f) if n else 0 for w, n, f in zip(wanted, alive, fan_in)]
            targets = round_to_rows([float(w) for w in wanted], alive, fan_in, sum(budgets), floors)
            held = [n * t for n, t in zip(alive, targets)]
            self.budgets = held if sum(held) == sum(budgets) else [min(w, n * f) for w, n, f in zip(wanted, alive, fan_in)]
        else:
            targets = [min(b // n, f) if n else 0 for b, n, f in zip(budgets, alive, fan_in)]

        self.row_targets = [
            torch.where(c < cut, 0, t).to(torch.int64) for c, cut, t in zip(salient, cutoffs, targets)
        ]  # 0 for the ablated rows
        pruned_masks = [
            trim_units(layer.weight.detach().abs(), mask, t, pattern, layer.transposed)
            for layer, mask, t in zip(layers, pruned_masks, self.row_targets)
        ]
        survivors = layer_counts(pruned_masks, self.reducer)
        grown = [n * t - s for n, t, s in zip(alive, targets, survivors)]
        return Plan(pruned_masks, survivors, grown, list(self.row_targets))

    def check(self, layers, result) -> None:
        check_units(layers, result.masks, self.row_targets, self.pattern, self.reducer)

    def commit(self, context: UpdateContext) -> None:
        self.stored.update({layer.name: int(b) for layer, b in zip(self.layers, self.budgets)})
