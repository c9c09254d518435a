"""The methods by name (:data:`ALGORITHMS`) and their lookup (:func:`get_algorithm`).

The methods that explore (:mod:`~lightning_sparse.methods.exploration`), with their papers' settings where these
fit a run of this library and this library's RigL/GMP update interval (100 steps) and window (75 %) otherwise:

* ``"granet"``: GraNet (Liu et al., NeurIPS 2021; github.com/VITA-Group/GraNet): starts at ``init_density`` 0.5
  (ERK), prunes by ``|W|`` over the whole model to GMP's cubic schedule's density, and at every update drops and
  regrows by the gradient ``floor(rate · kept)`` per layer, rate 0.5 with cosine decay (the reference's
  ``--death-rate 0.5``); grown weights and their optimizer state start at zero. Never dense.
* ``"mest"``: MEST+EM&S (Yuan et al., NeurIPS 2021; github.com/boone891214/MEST): prune score ``|W| + λ|∇W|``
  (λ = 1 here), random growth, the soft memory bound (grow first, prune at the next update: up to ``1 + rate``
  times the budget between updates), rate 0.3 with cosine decay.
* ``"topkast"``: Top-KAST (Jayakumar et al., NeurIPS 2020; no official code): forward set = the mask, backward
  set of density ``backward_density`` (default twice the density) bounding each update's swaps, magnitude out,
  gradient in. What differs from the paper: the library's weights are zero off the mask, so the weights of
  ``B \\ A`` do not keep trained values between updates (the paper trains them in the backward pass and keeps
  them); they are chosen by the gradient at the update and start at zero, and the paper's exploration penalty
  (L2 on ``A``, scaled by ``1/D`` on ``B \\ A``) acts on zeros there, so it is left to the optimizer's weight
  decay on the active weights.
* ITOP's recipe: :func:`~lightning_sparse.methods.exploration.itop` (``itop("rigl", update_interval=...)``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from lightning_sparse.methods.dst import DST
from lightning_sparse.methods.exploration import BackwardSet, GraNetCount, MESTScore, SoftMemoryBound
from lightning_sparse.methods.rules import NONZERO
from lightning_sparse.methods.sparse_algorithm import SparseAlgorithm

ALGORITHMS: dict[str, SparseAlgorithm | DST] = {
    "sparse_momentum": SparseAlgorithm(
        prune="magnitude",
        grow="momentum",
        redistribute="momentum",
        count="ceil",
        nearly_dense_edge_case=True,
        reset_grown=True,  # the reference keeps the grown weights' momentum: that diverged (docs/methods.md)
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
    "granet": SparseAlgorithm(
        prune="magnitude",
        grow="gradient",
        redistribute="none",
        count=GraNetCount(init_density=0.5),
        prune_rate=0.5,
        schedule="cosine",
        update_interval=100,
        stop_at=0.75,
        init="erk",
        reset_grown=True,
    ),
    "mest": SparseAlgorithm(
        prune=MESTScore(gradient_weight=1.0),
        grow="random",
        redistribute="none",
        count=SoftMemoryBound(),
        prune_rate=0.3,
        schedule="cosine",
        update_interval=100,
        stop_at=0.75,
        init="erk",
        reset_grown=True,
        reinit_when_same=True,
    ),
    "topkast": SparseAlgorithm(
        prune="magnitude",
        grow="gradient",
        redistribute="none",
        count=BackwardSet(backward_density=None),
        prune_rate=0.3,
        schedule="cosine",
        update_interval=100,
        stop_at=1.0,
        init="uniform",
        reset_grown=True,
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
