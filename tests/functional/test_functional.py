"""The tensor math on small hand-made tensors, without a Trainer."""

import math

import pytest
import torch

from lightning_sparse.functional import (
    PRUNE_RATE_SCHEDULES,
    allocate_regrowth,
    cosine_decay,
    drop_lowest,
    largest_remainder,
    layer_active_counts,
    linear_decay,
    magnitude_prune,
    momentum_shares,
    nonzero_shares,
    prune_counts,
    random_growth,
    random_mask,
    score_growth,
)

# ----------------------------------------------------------------------------- initialization


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


# ----------------------------------------------------------------------------- schedules


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


# ----------------------------------------------------------------------------- redistribution and counts


def test_prune_count_is_ceil_of_rate_times_active():
    assert prune_counts(0.5, [10, 5, 7], [100, 100, 100]) == [5, 3, 4]
    assert prune_counts(0.3, [10], [100]) == [3]  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert prune_counts(0.0, [10], [100]) == [0]


def test_nearly_dense_growing_layer_prunes_at_most_its_sparsity():
    # layer 0 is dense (sparsity 0) with share 0.6 > 1/2: rate becomes min(0.5, 0) = 0
    assert prune_counts(0.5, [100, 10], [100, 100], shares=[0.6, 0.4]) == [0, 5]
    # 90% dense, share above uniform: rate min(0.5, 0.1) -> ceil(0.1 * 90) = 9
    assert prune_counts(0.5, [90, 10], [100, 100], shares=[0.6, 0.4]) == [9, 5]
    # 90% dense but share below uniform: the usual rate
    assert prune_counts(0.5, [90, 10], [100, 100], shares=[0.4, 0.6]) == [45, 5]
    # without shares the edge case is off
    assert prune_counts(0.5, [100, 10], [100, 100]) == [50, 5]


def test_momentum_shares_are_mean_over_active_weights_normalized():
    m1 = torch.tensor([[1.0, -1.0], [100.0, 100.0]])  # the 100s are inactive: they must not count
    k1 = torch.tensor([[True, True], [False, False]])
    m2 = torch.tensor([3.0, -3.0, 0.0])
    k2 = torch.tensor([True, True, False])  # mean |M| over active = 3
    shares = momentum_shares([m1, m2], [k1, k2])
    assert shares.tolist() == pytest.approx([0.25, 0.75])


def test_momentum_shares_uniform_when_all_zero_and_nonzero_shares():
    shares = momentum_shares([torch.zeros(3), torch.zeros(2)], [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)])
    assert shares.tolist() == [0.5, 0.5]
    assert nonzero_shares([torch.tensor([True, True, True]), torch.tensor([True, False])]).tolist() == pytest.approx([0.75, 0.25])


def test_regrowth_is_proportional_to_share():
    assert allocate_regrowth(8, [0.25, 0.75], [100, 100]) == [2, 6]
    assert allocate_regrowth(10, [0.5, 0.3, 0.2], [100, 100, 100]) == [5, 3, 2]


def test_excess_over_capacity_is_capped_and_redistributed():
    # layer 0 should get 90 but has room for 10; the 80 left go to the others in proportion 1:1
    assert allocate_regrowth(100, [0.9, 0.05, 0.05], [10, 1000, 1000]) == [10, 45, 45]
    # a cascade: capping layer 0 pushes layer 1 over its capacity too
    assert allocate_regrowth(100, [0.6, 0.3, 0.1], [10, 40, 1000]) == [10, 40, 50]


def test_regrowth_falls_back_to_free_room_when_shared_layers_are_full():
    assert allocate_regrowth(10, [1.0, 0.0, 0.0], [4, 3, 3]) == [4, 3, 3]


@pytest.mark.parametrize("seed", range(20))
def test_regrowth_total_is_exact_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=g))
    shares = torch.rand(n, generator=g)
    shares = (shares / shares.sum()).tolist()
    capacity = torch.randint(0, 500, (n,), generator=g).tolist()
    total = int(torch.randint(0, sum(capacity) + 1, (1,), generator=g))
    alloc = allocate_regrowth(total, shares, capacity)
    assert sum(alloc) == total
    assert all(0 <= a <= c for a, c in zip(alloc, capacity))


def test_regrowth_refuses_more_than_capacity():
    with pytest.raises(ValueError, match="cannot regrow 11 weights into 10 free positions"):
        allocate_regrowth(11, [0.5, 0.5], [5, 5])


# ----------------------------------------------------------------------------- prune and grow


def test_magnitude_prune_removes_smallest_active():
    w = torch.tensor([0.1, -0.2, 0.3, -0.05, 0.0, 5.0])
    mask = torch.tensor([True, True, True, True, False, True])  # position 4 (|w|=0) is inactive
    new = magnitude_prune(w, mask, 2)
    assert new.tolist() == [False, True, True, False, False, True]
    assert mask.tolist() == [True, True, True, True, False, True]  # input untouched


def test_drop_lowest_zero_is_a_copy():
    mask = torch.tensor([True, False])
    out = drop_lowest(torch.tensor([1.0, 2.0]), mask, 0)
    assert torch.equal(out, mask) and out is not mask


def test_score_growth_picks_largest_inactive_never_active():
    momentum = torch.tensor([[9.0, -8.0, 0.5], [-0.7, 0.1, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])  # the two largest |M| are active
    new = score_growth(momentum, mask, 2)
    assert new.tolist() == [[True, True, True], [True, False, False]]


def test_growth_can_fill_every_free_position():
    mask = torch.tensor([True, False, False])
    new = score_growth(torch.zeros(3), mask, 2)
    assert new.all()


def test_random_growth_exact_count_seeded_and_only_inactive():
    mask = torch.zeros(50, dtype=torch.bool)
    mask[:10] = True
    a = random_growth(mask, 15, torch.Generator().manual_seed(1))
    b = random_growth(mask, 15, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert int(a.sum()) == 25 and a[:10].all()


@pytest.mark.parametrize("n_fraction", [0.001, 0.05, 0.5, 1.0])
def test_large_layer_selection_equals_a_plain_topk(n_fraction):
    # On the CPU, rows of 65536 or more entries are narrowed before topk; the choice must be the same
    g = torch.Generator().manual_seed(0)
    score = torch.randn(300, 400, generator=g)  # distinct values: one right answer
    mask = torch.rand(300, 400, generator=g) < 0.1
    free = int((~mask).sum())
    n = max(1, int(n_fraction * free))
    grown = score_growth(score, mask, n)
    expected = mask.clone()
    expected.view(-1)[torch.topk(score.abs().masked_fill(mask, -1).view(-1), n).indices] = True
    assert torch.equal(grown, expected)
    active = int(mask.sum())
    k = max(1, int(n_fraction * active))
    pruned = magnitude_prune(score, mask, k)
    expected = mask.clone()
    expected.view(-1)[torch.topk(score.abs().masked_fill(~mask, float("inf")).view(-1), k, largest=False).indices] = False
    assert torch.equal(pruned, expected)
