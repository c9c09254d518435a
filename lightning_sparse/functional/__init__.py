"""Tensor math of sparse training, free of Lightning and of ``torch.distributed``: initialization, pruning, growth,
redistribution, schedules, structured patterns. Every function works on plain tensors and can be tested on small
hand-made examples; on FSDP2 row shards the sums over the processes come in as a
:class:`~lightning_sparse.functional.shards.Shards`."""

from lightning_sparse.functional.init import INIT_METHODS, largest_remainder, layer_active_counts, random_mask
from lightning_sparse.functional.patterns import (
    Pattern,
    check_pattern,
    nm_groups_view,
    parse_pattern,
    rows_view,
    unit_counts,
)
from lightning_sparse.functional.prune_grow import (
    add_highest,
    drop_lowest,
    magnitude_prune,
    random_growth,
    score_growth,
)
from lightning_sparse.functional.redistribute import (
    allocate_regrowth,
    allocate_regrowth_equal,
    magnitude_shares,
    momentum_shares,
    nonzero_shares,
    prune_counts,
)
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES, constant, cosine_decay, linear_decay
from lightning_sparse.functional.shards import Shards
from lightning_sparse.functional.units import topk_per_unit

__all__ = [
    "INIT_METHODS",
    "PRUNE_RATE_SCHEDULES",
    "Pattern",
    "Shards",
    "check_pattern",
    "nm_groups_view",
    "parse_pattern",
    "rows_view",
    "topk_per_unit",
    "unit_counts",
    "add_highest",
    "allocate_regrowth",
    "allocate_regrowth_equal",
    "constant",
    "cosine_decay",
    "drop_lowest",
    "largest_remainder",
    "layer_active_counts",
    "linear_decay",
    "magnitude_prune",
    "magnitude_shares",
    "momentum_shares",
    "nonzero_shares",
    "prune_counts",
    "random_growth",
    "random_mask",
    "score_growth",
]
