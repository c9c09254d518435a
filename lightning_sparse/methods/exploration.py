"""The rules of the methods that explore more positions than they keep: GraNet's count (gradual pruning with
regrowth), MEST's prune score and soft memory bound, Top-KAST's backward set, and ITOP's recipe for a larger
in-time over-parameterization rate ``R_s`` (:meth:`~lightning_sparse.Sparsifier.explored`). Each is a rule of
:class:`~lightning_sparse.methods.SparseAlgorithm`'s count → prune → grow pipeline; the methods built from them
are in :data:`~lightning_sparse.methods.ALGORITHMS` (``"granet"``, ``"mest"``, ``"topkast"``) and
:func:`itop`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_sparse.functional.schedules import gmp_sparsity
from lightning_sparse.functional.selection import sortable_key
from lightning_sparse.methods.base import Counts, LayerState, UpdateContext, shard_reducer
from lightning_sparse.methods.rules import largest_remainder


def _check_density(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        none = " (or None)" if allow_none else ""
        raise ValueError(f"`{name}` must be a number in (0, 1]{none}, got {value!r}")


def schedule_density(progress: float, density: float, init_density: float) -> float:
    """GraNet's density at ``progress`` of the update window: GMP's cubic schedule (Zhu & Gupta 2018) from
    ``init_density`` (at 0) to ``density`` (from 1 on); a ``density`` above ``init_density`` (a dense group) is
    kept."""
    start = max(init_density, density)
    return 1.0 - gmp_sparsity(progress, final=1.0 - density, initial=1.0 - start)


def global_keep_counts(layers: Sequence[LayerState], keep: int) -> list[int]:
    """Per layer, how many of the ``keep`` active weights of largest ``|W|`` over all ``layers`` together lie in it
    (one threshold over the model; ties at the threshold go to earlier layers, then to lower flat indices, as
    :func:`~lightning_sparse.functional.prune_grow.snip_masks`). The threshold is found by bisection over the
    weights' sortable 32-bit keys: 32 rounds of one small sum (over the FSDP2 shards too)."""
    reducer = shard_reducer(layers)
    keys = [sortable_key(layer.weight.detach().float().abs()) for layer in layers]
    masks = [layer.mask for layer in layers]

    def at_least(threshold: int) -> list[int]:
        local = torch.stack([((k >= threshold) & m).sum() for k, m in zip(keys, masks)]).to(torch.int64)
        return [int(c) for c in (reducer(local) if reducer is not None else local).tolist()]

    if keep <= 0:
        return [0] * len(layers)
    low, high = 0, 2**32  # the largest T with sum(at_least(T)) >= keep lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        if sum(at_least(mid)) >= keep:
            low = mid
        else:
            high = mid
    above, at = at_least(low + 1), at_least(low)
    need = keep - sum(above)
    counts = []
    for a, t in zip(above, at):
        take = min(t - a, max(need, 0))
        need -= take
        counts.append(a + take)
    return counts


@dataclass(frozen=True)
class GraNetCount:
    """GraNet's count (Liu et al., "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration",
    NeurIPS 2021; reference code github.com/VITA-Group/GraNet): at each update, gradual magnitude pruning to the
    density of GMP's cubic schedule from ``init_density`` to the run's ``density``
    (:func:`schedule_density`), then zero-cost neuroregeneration: each layer drops ``floor(rate · kept_l)`` more
    of its active weights of lowest ``|W|`` and regrows as many (by the growth rule: the gradient, as RigL).
    Each layer loses ``active_l − kept_l + regrown_l`` and grows ``regrown_l``, so the model holds exactly
    ``round(d_t · N)`` active weights after the update and exactly ``density · N`` from the end of the window on.

    Args:
        init_density: the density the run starts from (in (0, 1]; 1.0: dense, GraNet's dense-to-sparse variant).
        global_pruning: ``True`` (GraNet's choice): the pruning step keeps the ``round(d_t · N)`` weights of
            largest ``|W|`` over all layers together (:func:`global_keep_counts`), so layer densities are learned;
            ``False``: every layer is pruned to ``round(d_t · N_l)`` (largest remainders), as GMP here.
    """

    init_density: float = 0.5
    global_pruning: bool = True
    reaches_target: ClassVar[bool] = True  # the end of the window is always an update (as GMP)

    def __post_init__(self) -> None:
        _check_density("init_density", self.init_density)
        if not isinstance(self.global_pruning, bool):
            raise ValueError(f"`global_pruning` must be True or False, got {self.global_pruning!r}")

    def density_at(self, progress: float, density: float) -> float:
        """The schedule's density at ``progress`` (:func:`schedule_density`)."""
        return schedule_density(progress, density, self.init_density)

    def __call__(self, layers: Sequence[LayerState], active: list[int], shares: list[float] | None,
                 ctx: UpdateContext) -> Counts:  # fmt: skip
        d_t = self.density_at(ctx.progress, ctx.density)
        sizes = [layer.numel for layer in layers]
        if self.global_pruning:
            keep = min(int(round(d_t * sum(sizes))), sum(active))
            kept = global_keep_counts(layers, keep)
        else:
            kept = [min(a, t) for a, t in zip(active, largest_remainder([d_t * n for n in sizes]))]
        regrown = [math.floor(ctx.rate * k) for k in kept]
        return Counts([a - k + r for a, k, r in zip(active, kept, regrown)], regrown)


@dataclass(frozen=True)
class MESTScore:
    """MEST's prune rule (Yuan et al., "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the
    Edge", NeurIPS 2021; reference code github.com/boone891214/MEST): drop the active weights of lowest
    ``|W| + λ·|∂L/∂W|`` (``λ``: ``gradient_weight``), the gradient of the update's batch, which a sparse run
    computes for its active weights anyway. ``gradient_weight=0`` is magnitude pruning."""

    gradient_weight: float = 1.0
    reads_gradient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        w = self.gradient_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or not math.isfinite(w):
            raise ValueError(f"`gradient_weight` must be a finite number >= 0, got {w!r}")

    def __call__(self, layer: LayerState, n: int) -> Tensor:
        if n <= 0:
            return layer.mask.clone()
        score = layer.weight.detach().abs()
        if self.gradient_weight:
            score = score + self.gradient_weight * layer.grad.detach().abs()
        return layer.drop_lowest(score, layer.mask, n)


@dataclass(frozen=True)
class SoftMemoryBound:
    """MEST's soft memory bound (MEST+EM&S): grow first, prune later. Each layer's budget ``b_l`` is its active
    count at the first update (the run's density). An update prunes the layer back to ``b_l`` (its
    ``active_l − b_l`` weights of lowest score, the ones grown at the previous update included: they have trained
    for one interval) and then grows ``floor(rate · b_l)`` new ones, so between updates a layer holds up to
    ``b_l + floor(rate · b_l)`` weights (the soft bound) and exactly ``b_l`` after the window's last update, which
    grows nothing. The budgets live in the algorithm's state (``"mest_budget"``, checkpointed)."""

    reaches_target: ClassVar[bool] = True

    def __call__(self, layers: Sequence[LayerState], active: list[int], shares: list[float] | None,
                 ctx: UpdateContext) -> Counts:  # fmt: skip
        budget = ctx.state.setdefault("mest_budget", {})
        for layer, a in zip(layers, active):
            budget.setdefault(layer.name, int(a))
        base = [budget[layer.name] for layer in layers]
        grow = ctx.progress < 1.0  # the window's last update leaves every layer at its budget
        grown = [math.floor(ctx.rate * b) if grow else 0 for b in base]
        return Counts([max(a - b, 0) for a, b in zip(active, base)], grown)


@dataclass(frozen=True)
class BackwardSet:
    """Top-KAST's backward set (Jayakumar et al., "Top-KAST: Top-K Always Sparse Training", NeurIPS 2020; no
    official code; the paper's algorithm 1) as a count rule: the forward set ``A`` is the mask (``density``), the
    backward set ``B ⊃ A`` holds ``round(backward_density · N_l)`` positions, so at most ``|B \\ A|`` weights of
    a layer can enter ``A`` at an update. Each layer swaps ``min(floor(rate · active_l), |B \\ A|)`` weights: its
    lowest ``|W|`` out, the positions of highest ``|∂L/∂W|`` in (the growth rule), which are where the weights of
    ``B \\ A`` would grow fastest.

    Args:
        backward_density: density of ``B`` (in (0, 1], above the run's density; ``None``: twice the density,
            capped at 1, e.g. the paper's 80 % forward / 60 % backward sparsity for a 20 % density is 0.4).
    """

    backward_density: float | None = None

    def __post_init__(self) -> None:
        _check_density("backward_density", self.backward_density, allow_none=True)

    def density_of_b(self, density: float) -> float:
        """``backward_density``, or when ``None`` ``min(1, 2 · density)``."""
        return self.backward_density if self.backward_density is not None else min(1.0, 2.0 * density)

    def __call__(self, layers: Sequence[LayerState], active: list[int], shares: list[float] | None,
                 ctx: UpdateContext) -> list[int]:  # fmt: skip
        b = self.density_of_b(ctx.density)
        if ctx.density < 1.0 and b <= ctx.density:
            raise ValueError(
                f"Top-KAST's `backward_density` ({b}) must be above the run's density ({ctx.density}): the backward"
                " set holds the forward set and the positions that may enter it"
            )
        room = [max(round(b * layer.numel) - a, 0) for layer, a in zip(layers, active)]
        return [min(math.floor(ctx.rate * a), r) for a, r in zip(active, room)]


ITOP_DEFAULTS: dict[str, Any] = {"prune_rate": 0.5, "stop_at": 1.0}
"""ITOP's recipe (Liu et al., "Do We Actually Need Dense Over-Parameterization? In-Time Over-Parameterization
in Sparse Training", ICML 2021; reference code github.com/Shiweiliu/In-Time-Over-Parameterization): explore
with a large drop fraction (0.5) over the whole run (updates until the end, ``stop_at=1.0``), at an update interval
long enough that the grown weights train before they are judged. The interval depends on the run; give it."""


def itop(algorithm: Any = "rigl", *, update_interval: int, prune_rate: float = 0.5, stop_at: float = 1.0) -> Any:
    """A method with ITOP's recipe for a higher ``R_s`` (:data:`ITOP_DEFAULTS`): ``algorithm`` (a name in
    :data:`~lightning_sparse.methods.ALGORITHMS` or a :class:`~lightning_sparse.methods.SparseAlgorithm`; ITOP uses
    RigL and SET) with updates every ``update_interval`` optimizer steps until ``stop_at`` of training and
    drop fraction ``prune_rate``. ITOP's finding: the accuracy follows ``R_s``, and ``R_s`` grows with the number
    of updates × the drop fraction, as long as ``update_interval`` leaves the grown weights time to train (the
    paper's CIFAR runs use 4000 steps at batch 128 for RigL-ITOP). Read the result's ``R_s`` with
    :meth:`~lightning_sparse.Sparsifier.explored` (logged as ``sparse/explored``).

    Example:
        >>> itop("set", update_interval=500).update_interval
        500
    """
    from lightning_sparse.methods.registry import get_algorithm
    from lightning_sparse.methods.sparse_algorithm import SparseAlgorithm

    base = get_algorithm(algorithm)
    if not isinstance(base, SparseAlgorithm) or not base.dynamic or not base.grows:
        raise ValueError(
            f"ITOP explores by dropping and regrowing weights: `algorithm` must be a dynamic method that regrows"
            f" (sparse_momentum, rigl, set, dsr, mest, topkast or such a SparseAlgorithm), got {algorithm!r}"
        )
    if isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
        raise ValueError(f"`update_interval` must be an int >= 1, got {update_interval!r}")
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not 0.0 < prune_rate <= 1.0:
        raise ValueError(f"`prune_rate` must be in (0, 1], got {prune_rate!r}")
    return dataclasses.replace(base, update_interval=update_interval, prune_rate=float(prune_rate), stop_at=stop_at)
