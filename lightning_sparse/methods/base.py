"""What a method reads and returns: one layer's state (:class:`LayerState`), what an update knows beyond the
layers (:class:`UpdateContext`), what it did (:class:`UpdateResult`), the rule signatures, and the sums over
FSDP2 shards that rules and targets share (:func:`shard_reducer`, :func:`layer_counts`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_sparse.core.distributed import ShardSpec, common_group, reduce_layer_sums, shards_of
from lightning_sparse.functional.passes import nonzero_count
from lightning_sparse.functional.patterns import Pattern
from lightning_sparse.functional.prune_grow import add_highest, drop_lowest, random_growth
from lightning_sparse.functional.selection import hash_scores
from lightning_sparse.functional.shards import Shards
from lightning_sparse.functional.units import fill_units


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

    ``kernel``: how :meth:`drop_lowest` / :meth:`add_highest` select on the CPU (``"auto"``, ``"cpp"``,
    ``"torch"``: :func:`~lightning_sparse.functional.selection.select_lowest`); every path chooses the same.
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
        kernel: str = "auto",
    ) -> None:
        self.name = name
        self.weight = weight
        self.mask = mask
        self._momentum_fn = momentum_fn
        self._grad_fn = grad_fn
        self.spec = spec if spec is not None else ShardSpec(tuple(weight.shape), 0, weight.shape[0] if weight.dim() else 1)
        self.transposed = transposed
        self.kernel = kernel
        self._units: tuple[Pattern, int | Tensor] | None = None  # (pattern, unit target) while a structured update grows

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

    @cached_property
    def shards(self) -> Shards | None:
        """The processes this layer's rows are split over, for the functional selections (``None``: whole)."""
        return shards_of(self.spec.group)

    def drop_lowest(self, score: Tensor, mask: Tensor, n: int, *, magnitude: bool = False) -> Tensor:
        """``mask`` without its ``n`` active positions of lowest ``score`` (``magnitude``: ``|score|``, computed
        within the selection's passes) over the whole layer."""
        return drop_lowest(score, mask, n, offset=self.offset, shards=self.shards, magnitude=magnitude, kernel=self.kernel)

    def add_highest(self, score: Tensor, mask: Tensor, n: int, *, magnitude: bool = False) -> Tensor:
        """``mask`` plus the ``n`` free positions of highest ``score`` (``magnitude``: ``|score|``) over the whole
        layer (under a structured pattern: every unit filled up to its target by its free positions of highest
        score)."""
        if self._units is not None:
            pattern, target = self._units
            score = score.detach().abs() if magnitude else score.detach()
            return fill_units(score, mask, target, pattern, self.transposed)
        return add_highest(score, mask, n, offset=self.offset, shards=self.shards, magnitude=magnitude, kernel=self.kernel)

    def add_random(self, mask: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``mask`` plus ``n`` free positions drawn at random (the same for any number of shards; under a
        structured pattern, every unit filled up to its target at random)."""
        if self._units is not None:
            pattern, target = self._units
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
            scores = hash_scores(seed, self.offset, mask.numel(), mask.device).view(mask.shape)
            return fill_units(scores, mask, target, pattern, self.transposed)
        return random_growth(mask, n, generator, offset=self.offset, shards=self.shards)

    @contextmanager
    def filling_units(self, pattern: Pattern, target: int | Tensor) -> Iterator[LayerState]:
        """Within the block, :meth:`add_highest` / :meth:`add_random` fill every unit of ``pattern`` up to
        ``target`` (one int, or one per unit) instead of choosing over the whole layer."""
        self._units = (pattern, target)
        try:
            yield self
        finally:
            self._units = None

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
            units every update keeps whole (see :mod:`~lightning_sparse.methods.targets`).
        ablation: under ``"fan_in"``, SRigL's neuron ablation with this ``gamma_sal`` (see
            :mod:`~lightning_sparse.methods.ablation`); ``None``: no ablation.
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


@dataclass(frozen=True)
class UpdateResult:
    """What one mask update did: the new masks, the masks after pruning (before growth), and per layer the
    active, pruned and grown counts."""

    masks: list[Tensor]
    pruned_masks: list[Tensor]
    active: list[int]
    pruned: list[int]
    grown: list[int]


class Counts(NamedTuple):
    """A count rule's answer when a layer does not regrow what it loses (GraNet, MEST): per layer, how many active
    weights leave (``pruned``) and how many positions the growth rule adds after pruning (``grown``). A count rule
    that returns a plain list prunes that many and, unstructured, regrows the same number (or what
    redistribution hands each layer)."""

    pruned: list[int]
    grown: list[int]


PruneRule = Callable[[LayerState, int], Tensor]
GrowthRule = Callable[[LayerState, Tensor, int, torch.Generator], Tensor]
RedistributionRule = Callable[[Sequence[LayerState]], "Tensor | None"]
CountRule = Callable[[Sequence[LayerState], list[int], "list[float] | None", UpdateContext], "list[int] | Counts"]


def shard_reducer(layers: Sequence[LayerState]) -> Callable[[Tensor], Tensor] | None:
    """Sums per-layer statistics (a tensor ``[L, ...]``) over the shards of the layers; ``None`` when every
    layer is whole on this process."""
    specs = [layer.spec for layer in layers]
    group = common_group(specs)
    if group is None:
        return None
    return partial(reduce_layer_sums, specs=specs, group=group)


def layer_counts(masks: Sequence[Tensor], reducer: Callable[[Tensor], Tensor] | None) -> list[int]:
    """Active entries of each mask, summed over the shards when ``reducer`` is given (one host read)."""
    counts = torch.stack([nonzero_count(m) for m in masks])
    return [int(c) for c in (reducer(counts) if reducer is not None else counts).tolist()]
