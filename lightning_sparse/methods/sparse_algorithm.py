"""The sparse training method built from rules (:class:`SparseAlgorithm`) and its update: one
count → prune → share → target → grow pipeline, the target chosen by the pattern
(:mod:`~lightning_sparse.methods.targets`, :mod:`~lightning_sparse.methods.ablation`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_sparse.core.distributed import local
from lightning_sparse.core.optimizer import reset_optimizer_state
from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.passes import zero_where_
from lightning_sparse.functional.patterns import parse_pattern
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES
from lightning_sparse.methods.ablation import Ablation
from lightning_sparse.methods.base import LayerState, UpdateContext, UpdateResult
from lightning_sparse.methods.rules import (
    EXCESS_RULES,
    STARTS,
    CountRule,
    GrowthRule,
    PruneRule,
    RedistributionRule,
    Rules,
    SurvivorShares,
    gmp_count,
    no_growth,
    no_redistribution,
    resolve_rules,
)
from lightning_sparse.methods.targets import Plan, ScheduledUnits, Target, Units, Unstructured


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
            references keep no state for absent weights; sparse momentum's default too, although its reference
            keeps it: a layer that grows from 5 % to 99 % in one update then takes one step of all that momentum,
            and LeNet-5 diverged so on Fashion-MNIST). ``False`` keeps it (sparse momentum's reference, which grows
            where that momentum is largest). Grown weights always start at zero.
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
    rules: Rules = field(init=False, repr=False, compare=False)

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
        rules = resolve_rules(self.count, self.prune, self.redistribute, self.grow, self.excess)
        object.__setattr__(self, "rules", rules)

    # ------------------------------------------------------------------ what the method reads
    @property
    def needs_momentum(self) -> bool:
        """Whether the built-in rules read the optimizer's momentum (a user-written rule that reads
        ``layer.momentum`` gets the optimizer checked when it first does)."""
        return self.dynamic and "momentum" in (self.prune, self.grow, self.redistribute, self.count)

    @property
    def needs_gradient(self) -> bool:
        """Whether the rules read this step's gradient: RigL's ``grow="gradient"``, or a rule that says so with a
        ``reads_gradient = True`` attribute (MEST's prune score, :class:`~lightning_sparse.methods.MESTScore`)."""
        return self.dynamic and (
            self.grow == "gradient" or any(getattr(r, "reads_gradient", False) for r in (self.rules.prune, self.rules.grow))
        )

    @property
    def reaches_target(self) -> bool:
        """Whether the method ends its update window at the run's density by its own schedule (GMP, GraNet, MEST's
        soft memory bound): the window's last step is then always an update."""
        return self.prunes_to_schedule or bool(getattr(self.rules.count, "reaches_target", False))

    @property
    def supports_patterns(self) -> bool:
        """Whether the method can keep a structured pattern (GraNet's and MEST's own growth counts cannot)."""
        return self.prunes_to_schedule or not getattr(self.rules.count, "reaches_target", False)

    @property
    def start_density(self) -> float | None:
        """The density the masks start from when the count rule sets one (GraNet's ``init_density``; 1.0 starts
        dense); ``None``: the run's density."""
        value = getattr(self.rules.count, "init_density", None)
        return None if value is None else float(value)

    @property
    def prunes_to_schedule(self) -> bool:
        """Whether the method prunes towards the target density on GMP's cubic schedule (``count="gmp"``)."""
        return self.count == "gmp"

    @property
    def grows_by_score(self) -> bool:
        """Whether the method is dynamic and grows by a score (momentum, gradient or a growth function), as
        neuron ablation's saliency needs."""
        return self.dynamic and not self.prunes_to_schedule and self.grow not in ("random", "none")

    @property
    def grows(self) -> bool:
        """Whether the growth rule adds weights (all but ``grow="none"``)."""
        return self.rules.grow is not no_growth

    @property
    def redistributes(self) -> bool:
        """Whether removed weights are shared among the layers (all but ``redistribute="none"``)."""
        return self.rules.redistribute is not no_redistribution

    def allocate(self, total: int, shares: Sequence[float], capacity: Sequence[int]) -> list[int]:
        """``total`` regrown weights handed out by ``shares`` within each layer's ``capacity`` (``excess``'s rule)."""
        return self.rules.allocate(total, shares, capacity)

    # ------------------------------------------------------------------ the update
    def update(self, layers: Sequence[LayerState], active: Sequence[int], context: UpdateContext) -> UpdateResult:
        """One count → prune → share → target → grow cycle.

        ``active`` holds each layer's number of active weights (kept on the host, so counting needs no
        synchronization). Shares come from the redistribution rule before pruning (``"nonzero"``: after it);
        the count and prune rules run over the whole layer; the target of ``context.pattern``
        (:mod:`~lightning_sparse.methods.targets`) then decides what each layer regrows, and the growth rule grows
        it. Unstructured, unless the growth rule is ``"none"``, the total number of active weights is preserved
        exactly; with redistribution ``"none"`` each layer's own count is. Reading the shares is the only host
        synchronization of the built-in rules (DSR's and SET's counting add one each), besides the check of the new
        masks (one): every layer's count after pruning and after growth is the one asked, or, under a pattern,
        every unit's; rules that get them wrong raise ``RuntimeError`` naming the layer, the counts and the rule,
        before anything is set.
        """
        active = list(active)
        if not self.dynamic:
            masks = [layer.mask for layer in layers]
            zeros = [0] * len(layers)
            return UpdateResult(list(masks), list(masks), active, zeros, list(zeros))
        target = self._target(layers, active, context)
        shares = self._shares(layers) if target.moves else None
        pruned = target.count(self.rules.count, layers, active, shares if self.nearly_dense_edge_case else None, context)
        pruned_masks = target.prune(self.rules.prune, layers, pruned)
        if target.moves and isinstance(self.rules.redistribute, SurvivorShares):
            shares = self.rules.redistribute([a - p for a, p in zip(active, pruned)])
        plan = target.plan(self, layers, active, pruned, pruned_masks, shares, context)
        masks = self._grow(layers, plan, target, context) if target.grows else list(plan.pruned_masks)
        result = UpdateResult(
            masks,
            list(plan.pruned_masks),
            [s + g for s, g in zip(plan.survivors, plan.grown)],
            [a - s for a, s in zip(active, plan.survivors)],
            list(plan.grown),
        )
        target.check(layers, result)
        target.commit(context)
        return result

    def update_structured(self, layers: Sequence[LayerState], active: Sequence[int], context: UpdateContext) -> UpdateResult:
        """:meth:`update` under a structured ``context.pattern`` (its targets: :mod:`~lightning_sparse.methods.targets`)."""
        return self.update(layers, active, context)

    def _target(self, layers: Sequence[LayerState], active: list[int], context: UpdateContext) -> Target:
        pattern = parse_pattern(context.pattern)
        if not pattern.structured:
            return Unstructured(layers, (_rule_name(self.prune), _rule_name(self.grow)))
        if context.ablation is not None:
            return Ablation(self, layers, active, context)
        if self.rules.count is gmp_count:
            return ScheduledUnits(layers, pattern, active, context)
        return Units(layers, pattern, active, self.redistributes)

    def _shares(self, layers: Sequence[LayerState]) -> list[float] | None:
        """Each layer's share of the regrowth from the statistics before pruning; ``None`` without any."""
        rule = self.rules.redistribute
        if not self.redistributes or isinstance(rule, SurvivorShares):
            return None
        shares = rule(layers)
        return None if shares is None else [float(s) for s in shares.tolist()]

    def _grow(self, layers: Sequence[LayerState], plan: Plan, target: Target, context: UpdateContext) -> list[Tensor]:
        """The growth rule on each layer; under a pattern it fills every unit up to its target."""
        grow = self.rules.grow
        if plan.unit_targets is None:
            return [grow(layer, mask, n, context.generator) for layer, mask, n in zip(layers, plan.pruned_masks, plan.grown)]
        masks = []
        for layer, mask, t, n in zip(layers, plan.pruned_masks, plan.unit_targets, plan.grown):
            with layer.filling_units(target.pattern, t):
                masks.append(grow(layer, mask, n, context.generator))
        return masks

    # ------------------------------------------------------------------ after the update
    def grown_positions(self, before: Sequence[Tensor], result: UpdateResult) -> list[Tensor]:
        """Per layer, the positions that start afresh after ``result``: active now and inactive before the update
        (``before``: the masks the update started from), plus, with ``reinit_when_same``, the ones dropped and
        regrown in it (active now, not kept through pruning)."""
        # on bool tensors `a > b` is `a & ~b`, in one pass and one temporary instead of two
        if self.reinit_when_same:
            return [mask > pruned for mask, pruned in zip(result.masks, result.pruned_masks)]
        return [mask > old for mask, old in zip(result.masks, before)]

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
            zero_where_([local(weight)], positions)
            if self.reset_grown and optimizer is not None:
                reset_optimizer_state(optimizer, weight, positions)
        return grown


def _rule_name(rule: object) -> str:
    """A rule as the user gave it: its name (``"momentum"``), or a function's qualified name."""
    if isinstance(rule, str):
        return rule
    return getattr(rule, "__qualname__", None) or getattr(type(rule), "__qualname__", repr(rule))
