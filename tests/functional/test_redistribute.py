"""Redistribution and counts (:mod:`lightning_sparse.functional.redistribute`): shares, prune counts, regrowth."""


import pytest
import torch

from lightning_sparse.functional import (
    allocate_regrowth,
    momentum_shares,
    nonzero_shares,
    prune_counts,
)


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
