"""Sparse initialization (:mod:`lightning_sparse.functional.init`): per-layer counts (uniform, ERK, ER) and random masks."""

import math

import pytest
import torch

from lightning_sparse.functional import (
    largest_remainder,
    layer_active_counts,
    random_mask,
)


def test_uniform_counts_are_rounded_per_layer():
    assert layer_active_counts([(300, 784), (100, 300), (10, 100)], 0.05) == [11760, 1500, 50]
    assert layer_active_counts([(3, 3)], 0.5) == [4]  # round(4.5) = 4 (banker's rounding, as Python)


@pytest.mark.parametrize("method", ["erk", "er"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.2, 0.5, 0.9])
def test_erk_er_totals_are_exact(method, density):
    shapes = [(64, 3, 7, 7), (64, 64, 3, 3), (128, 64, 3, 3), (256, 128, 1, 1), (1000, 256), (10, 1000)]
    counts = layer_active_counts(shapes, density, method)
    sizes = [math.prod(s) for s in shapes]
    assert sum(counts) == round(density * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes))


def test_erk_matches_hand_computed_epsilon():
    # Two linear layers 10x10 (p = 20/100 = 0.2) and 10x40 (p = 50/400 = 0.125), density 0.1 of 500 = 50.
    # eps * (0.2*100 + 0.125*400) = 50  =>  eps = 50/70; counts 20*eps = 14.29 -> 14, 50*eps = 35.71 -> 36
    assert layer_active_counts([(10, 10), (10, 40)], 0.1, "erk") == [14, 36]


def test_erk_makes_small_layers_dense_and_resolves():
    # The 2x2 layer would get eps*p > 1: it is made dense and eps is solved again over the big layer.
    shapes = [(2, 2), (100, 100)]
    counts = layer_active_counts(shapes, 0.5, "erk")
    assert counts[0] == 4
    assert sum(counts) == round(0.5 * 10004)


def test_er_ignores_kernel_dimensions_erk_does_not():
    shapes = [(16, 16, 3, 3), (16, 16, 1, 1), (10, 64)]
    er = layer_active_counts(shapes, 0.3, "er")
    erk = layer_active_counts(shapes, 0.3, "erk")
    assert er != erk
    # ER: the density of the two convs (same n_in, n_out) is the same
    assert abs(er[0] / (16 * 16 * 9) - er[1] / (16 * 16)) < 0.01


def test_init_rejects_bad_values():
    with pytest.raises(ValueError, match=r"`init` can be uniform, erk, er, got 'gaussian'"):
        layer_active_counts([(2, 2)], 0.5, "gaussian")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layer_active_counts([(2, 2)], 0.0)


def test_random_mask_exact_count_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_mask((7, 9), 20, g1), random_mask((7, 9), 20, g2)
    assert a.dtype == torch.bool and a.shape == (7, 9) and int(a.sum()) == 20
    assert torch.equal(a, b)


def test_largest_remainder_sums_exactly_and_respects_capacity():
    assert largest_remainder([1.5, 1.5, 1.0], 4, [10, 10, 10]) == [2, 1, 1]
    assert largest_remainder([0.4, 0.4, 0.2], 1, [0, 10, 10]) == [0, 1, 0]
    with pytest.raises(ValueError, match="cannot place 5 units"):
        largest_remainder([1.0, 1.0], 5, [2, 2])
