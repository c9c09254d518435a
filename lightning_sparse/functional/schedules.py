"""Schedules: closed-form functions of training progress, so a resumed run cannot drift.

``progress`` is the fraction of training done, in [0, 1] (optimizer steps done / total optimizer steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

RateSchedule = Callable[[float], float]
"""A function of progress in [0, 1] that returns the pruning rate."""


def cosine_decay(progress: float, initial: float, final: float = 0.0) -> float:
    """``final + (initial - final) * (1 + cos(pi * progress)) / 2``: ``initial`` at 0, ``final`` at 1.

    The sparse momentum paper decays its pruning rate this way, like a learning rate, to zero on the last epoch.
    """
    progress = min(max(progress, 0.0), 1.0)
    return final + (initial - final) * (1.0 + math.cos(math.pi * progress)) / 2.0


def linear_decay(progress: float, initial: float, final: float = 0.0) -> float:
    """``initial`` at progress 0 falling linearly to ``final`` at 1."""
    progress = min(max(progress, 0.0), 1.0)
    return initial + (final - initial) * progress


def constant(progress: float, initial: float, final: float = 0.0) -> float:
    """Always ``initial``."""
    return initial


PRUNE_RATE_SCHEDULES: dict[str, Callable[..., float]] = {
    "cosine": cosine_decay,
    "linear": linear_decay,
    "constant": constant,
}


def gmp_sparsity(progress: float, final: float, initial: float = 0.0) -> float:
    """Gradual magnitude pruning's cubic schedule (Zhu & Gupta 2018):
    ``s_t = s_f + (s_i - s_f) * (1 - progress)**3``, ``s_i`` at progress 0 and ``s_f`` from progress 1 on."""
    progress = min(max(progress, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3
