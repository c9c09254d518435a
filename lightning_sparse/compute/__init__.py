"""How masked layers compute during training: :mod:`~lightning_sparse.compute.condensed` (``compute="condensed"``)."""

from lightning_sparse.compute.condensed import (
    CondensedCompute,
    CondensedLinearFunction,
    CondensedPlan,
    condensable,
    condensed_linear,
)

__all__ = ["CondensedCompute", "CondensedLinearFunction", "CondensedPlan", "condensable", "condensed_linear"]
