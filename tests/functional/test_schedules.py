"""Pruning-rate schedules (:mod:`lightning_sparse.functional.schedules`)."""

import math

import pytest

from lightning_sparse.functional import (
    PRUNE_RATE_SCHEDULES,
    cosine_decay,
    linear_decay,
)


def test_cosine_schedule_values():
    assert cosine_decay(0.0, 0.5) == 0.5
    assert cosine_decay(0.5, 0.5) == pytest.approx(0.25)
    assert cosine_decay(1.0, 0.5) == pytest.approx(0.0)
    assert cosine_decay(0.25, 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) / 2)
    # the paper's epochs: with 4 epochs the updates after epochs 1, 2, 3 use progress 1/4, 2/4, 3/4
    assert [round(cosine_decay(e / 4, 0.5), 6) for e in (1, 2, 3, 4)] == [0.426777, 0.25, 0.073223, 0.0]


def test_linear_and_constant_schedules():
    assert linear_decay(0.25, 0.4) == pytest.approx(0.3)
    assert PRUNE_RATE_SCHEDULES["constant"](0.9, 0.4) == 0.4
    assert set(PRUNE_RATE_SCHEDULES) == {"cosine", "linear", "constant"}
