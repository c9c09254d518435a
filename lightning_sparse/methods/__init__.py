"""Sparse training methods: the update's inputs and outputs (:mod:`.base`), the rules by name (:mod:`.rules`), the
rule-built :class:`SparseAlgorithm` (:mod:`.sparse_algorithm`) with its targets per pattern (:mod:`.targets`,
:mod:`.ablation`), DST (:mod:`.dst`) and the methods by name (:mod:`.registry`)."""

from lightning_sparse.methods.ablation import ABLATION_BUDGETS, check_ablation
from lightning_sparse.methods.base import (
    CountRule,
    GrowthRule,
    LayerState,
    PruneRule,
    RedistributionRule,
    UpdateContext,
    UpdateResult,
    layer_counts,
    shard_reducer,
)
from lightning_sparse.methods.dst import DST
from lightning_sparse.methods.registry import ALGORITHMS, get_algorithm
from lightning_sparse.methods.rules import (
    COUNT_RULES,
    EXCESS_RULES,
    GROWTH_RULES,
    NONZERO,
    PRUNE_RULES,
    REDISTRIBUTION_RULES,
    STARTS,
    DSRThreshold,
    SurvivorShares,
    ceil_count,
    floor_count,
    gmp_count,
    largest_remainder,
)
from lightning_sparse.methods.sparse_algorithm import SparseAlgorithm

__all__ = [
    "ABLATION_BUDGETS",
    "ALGORITHMS",
    "COUNT_RULES",
    "DST",
    "EXCESS_RULES",
    "GROWTH_RULES",
    "NONZERO",
    "PRUNE_RULES",
    "REDISTRIBUTION_RULES",
    "STARTS",
    "CountRule",
    "DSRThreshold",
    "GrowthRule",
    "LayerState",
    "PruneRule",
    "RedistributionRule",
    "SparseAlgorithm",
    "SurvivorShares",
    "UpdateContext",
    "UpdateResult",
    "ceil_count",
    "check_ablation",
    "floor_count",
    "get_algorithm",
    "gmp_count",
    "largest_remainder",
    "layer_counts",
    "shard_reducer",
]
