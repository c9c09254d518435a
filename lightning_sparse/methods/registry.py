"""The methods by name (:data:`ALGORITHMS`) and their lookup (:func:`get_algorithm`)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from lightning_sparse.methods.dst import DST
from lightning_sparse.methods.rules import NONZERO
from lightning_sparse.methods.sparse_algorithm import SparseAlgorithm

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
    """Look up a method by name in ``ALGORITHMS``, in any case (``"RigL"``), or pass a :class:`SparseAlgorithm` /
    :class:`DST` through. An unknown name is refused with the names, and the closest one for a typo."""
    if isinstance(algorithm, (SparseAlgorithm, DST)):
        return algorithm
    if isinstance(algorithm, str) and algorithm.lower() in ALGORITHMS:
        return ALGORITHMS[algorithm.lower()]
    raise ValueError(
        f"`algorithm` can be {', '.join(ALGORITHMS)}, a SparseAlgorithm or a DST, got {algorithm!r}{did_you_mean(algorithm, ALGORITHMS)}"
    )


def did_you_mean(given: object, names: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the name closest to ``given`` (a typo), or ``""``."""
    close = difflib.get_close_matches(given.lower(), list(names), n=1) if isinstance(given, str) else []
    return f"; did you mean {close[0]!r}?" if close else ""
