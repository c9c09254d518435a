"""How a tensor is split over processes, as the functional code sees it: :class:`Shards` carries this process's
rank, the number of processes and a ``sum_`` that adds a tensor up over them. The functional code runs no
collective of its own; :func:`lightning_sparse.core.distributed.shards_of` builds a :class:`Shards` from a
process group (an ``all_reduce``), and tests can build one from anything that sums."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Shards:
    """The processes over which a tensor's rows are split.

    Attributes:
        rank: this process's index, in ``[0, size)``.
        size: the number of processes (:func:`~lightning_sparse.core.distributed.shards_of` gives ``None`` instead
            of one process; a one-process :class:`Shards` with an identity ``sum_`` runs the sharded code paths
            in one process, as the tests do).
        sum_: adds a tensor up over the processes, in place, and returns it; every process must call it with a
            tensor of the same shape and dtype, in the same order.
    """

    rank: int
    size: int
    sum_: Callable[[Tensor], Tensor]

    def gather(self, row: Tensor) -> Tensor:
        """Every process's ``row`` (1-D, the same length everywhere), stacked in rank order: one :attr:`sum_`."""
        table = row.new_zeros(self.size, row.numel())
        table[self.rank] = row
        return self.sum_(table)
