"""The update rules (:mod:`lightning_sparse.methods.rules`): sparse momentum's excess rule as its reference does it
(paper section 3.2; TimDettmers/sparse_learning ``sparselearning/core.py`` ``calc_growth_redistribution``): the
excess is handed out equally, a layer takes at most 99 % of its free positions.
"""

import math
import random

import pytest
import torch

from lightning_sparse import ALGORITHMS, LayerState, SparseAlgorithm, UpdateContext
from lightning_sparse.functional import allocate_regrowth, allocate_regrowth_equal


def reference_calc_growth_redistribution(shares, total_removed, zeros, removed):
    """TimDettmers/sparse_learning ``Masking.calc_growth_redistribution`` restated for plain lists (with
    ``adjusted_growth = 0``); returns the real-valued regrowth per layer, which the reference floors at growth.

    Each pass gives every layer the mean residual of the previous pass on top of its amount; a layer above
    ``0.99 * max_regrowth`` (``max_regrowth = num_zero + num_remove``: its free positions after pruning) is set to
    that cap and the rest goes to the residual, until a pass leaves no residual.
    """
    n = len(shares)
    regrowth = [None] * n
    residual, mean_residual, i = 9999, 0.0, 0
    while residual > 0 and i < 1000:
        residual = 0
        for layer in range(n):
            max_regrowth = zeros[layer] + removed[layer]
            amount = regrowth[layer] if regrowth[layer] is not None else math.ceil(shares[layer] * total_removed)
            amount += mean_residual
            if amount > 0.99 * max_regrowth:
                regrowth[layer] = 0.99 * max_regrowth
                residual += amount - regrowth[layer]
            else:
                regrowth[layer] = amount
        mean_residual = residual / n
        i += 1
    return regrowth


def test_equal_excess_matches_the_reference_with_a_cascade():
    # Four layers; free positions after pruning (capacity) 100, 100, 300, 1000 -> caps 0.99x: 99, 99, 297, 990.
    # 600 weights to regrow with shares 0.5, 0.1, 0.2, 0.2 -> first amounts 300, 60, 120, 120.
    # Reference, pass 1: layer 0: 300 > 99 -> 99, residual 201; the others are under their caps.
    #   mean residual 201 / 4 = 50.25.
    # Pass 2: layer 0: 99 + 50.25 > 99 -> residual 50.25; layer 1: 60 + 50.25 = 110.25 > 99 -> 99, residual
    #   + 11.25 = 61.5; layers 2, 3: 170.25. Mean 61.5 / 4 = 15.375.
    # Pass 3 on: layers 0 and 1 bounce back what they get, layers 2 and 3 each get half of every residual:
    #   15.375 * (1 + 1/2 + 1/4 + ...) = 30.75 more -> 201 each.  Result 99, 99, 201, 201 (sum 600).
    capacity = [100, 100, 300, 1000]
    shares = [0.5, 0.1, 0.2, 0.2]
    # (the reference's max_regrowth = num_zero + num_remove; here all of a layer's free positions as num_zero)
    reference = reference_calc_growth_redistribution(shares, 600, zeros=capacity, removed=[0] * 4)
    assert reference == pytest.approx([99, 99, 201, 201])
    assert allocate_regrowth_equal(600, shares, capacity) == [99, 99, 201, 201]
    # the proportional rule (kept as an option) fills layers 0 and 1 completely: 100, 100, then 200, 200
    assert allocate_regrowth(600, shares, capacity) == [100, 100, 200, 200]


def test_equal_excess_goes_to_every_other_layer_even_without_share():
    # Capacity 100, 500, 500 -> caps 99, 495, 495. 200 to regrow with shares 0.9, 0.1, 0.0 -> 180, 20, 0.
    # Layer 0 keeps 99; its excess 81 is split equally: 40.5 each -> 60.5 and 40.5.
    # The reference floors these at growth (99 + 60 + 40 = 199, one weight short, made up later by its smoothing);
    # here the total is exact: the tie of the two .5 remainders goes to the lower index -> 99, 61, 40.
    reference = reference_calc_growth_redistribution([0.9, 0.1, 0.0], 200, [100, 500, 500], [0] * 3)
    assert reference == pytest.approx([99, 60.5, 40.5])
    assert [math.floor(r) for r in reference] == [99, 60, 40]
    assert allocate_regrowth_equal(200, [0.9, 0.1, 0.0], [100, 500, 500]) == [99, 61, 40]
    # proportional: the layer without share gets nothing, layer 0 is filled to 100
    assert allocate_regrowth(200, [0.9, 0.1, 0.0], [100, 500, 500]) == [100, 100, 0]


def test_equal_excess_fills_beyond_the_cap_only_when_it_must():
    # Capacity 10 and 20 -> caps 9 and 19 (28 in all); 29 to regrow must use one position beyond the caps.
    assert allocate_regrowth_equal(29, [0.5, 0.5], [10, 20]) == [10, 19]
    assert allocate_regrowth_equal(28, [0.5, 0.5], [10, 20]) == [9, 19]
    # a single dense layer (its only free positions are the ones just pruned) regrows all of them
    assert allocate_regrowth_equal(7, [1.0], [7]) == [7]
    with pytest.raises(ValueError):
        allocate_regrowth_equal(31, [0.5, 0.5], [10, 20])


def test_equal_excess_exact_total_and_cap_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 6)
        capacity = [rng.randint(0, 400) for _ in range(n)]
        shares = [rng.random() ** 3 for _ in range(n)]
        total = rng.randint(0, sum(capacity))
        grown = allocate_regrowth_equal(total, shares, capacity)
        assert sum(grown) == total
        assert all(0 <= g <= c for g, c in zip(grown, capacity))
        caps = [math.floor(0.99 * c + 1e-7) for c in capacity]
        if sum(caps) >= total:  # the capacity exists: no layer takes more than 99 % of its free positions
            assert all(g <= cap for g, cap in zip(grown, caps))
        assert grown == allocate_regrowth_equal(total, shares, capacity)  # deterministic


def _momentum_layers(active_b):
    # layer a: 100 positions, 10 active (|W| 1..10), |M| 1 everywhere.
    # layer b: 10 positions, `active_b` active (|W| 1..), |M| 9 everywhere: share 9 / (1 + 9) = 0.9.
    wa = torch.zeros(100)
    ma = torch.zeros(100, dtype=torch.bool)
    ma[:10] = True
    wa[:10] = torch.arange(1, 11, dtype=torch.float32)
    wb = torch.zeros(10)
    mb = torch.zeros(10, dtype=torch.bool)
    mb[:active_b] = True
    wb[:active_b] = torch.arange(1, active_b + 1, dtype=torch.float32)
    return [
        LayerState("a", wa, ma, lambda: torch.ones(100)),
        LayerState("b", wb, mb, lambda: torch.full((10,), 9.0)),
    ]


def test_sparse_momentum_never_fills_a_layer_and_keeps_pruning_it():
    # Rate 0.5: a prunes ceil(5) = 5, b (8 active, density 0.8: not above 0.8, no rate cut) prunes ceil(4) = 4.
    # R = 9; a's free positions after pruning 95 (cap 94), b's 6 (cap floor(5.94) = 5).
    # Shares 0.1, 0.9 -> 0.9 and 8.1. b is capped at 5; its excess 3.1 goes (equally) to the only other layer:
    # a gets 4.0 -> grown 4 and 5; a ends at 9 active, b at 9 of 10.
    ctx = UpdateContext(0.5, generator=torch.Generator().manual_seed(0))
    result = ALGORITHMS["sparse_momentum"].update(_momentum_layers(8), [10, 8], ctx)
    assert result.pruned == [5, 4] and result.grown == [4, 5] and result.active == [9, 9]
    # the proportional rule fills b: grown 3 and 6, b at 10 of 10
    proportional = SparseAlgorithm(nearly_dense_edge_case=True, excess="proportional")
    result_p = proportional.update(_momentum_layers(8), [10, 8], ctx)
    assert result_p.grown == [3, 6] and result_p.active == [8, 10]
    # Next update. Equal: b at 9 of 10 (density 0.9 > 0.8, share 0.9 > 1/2) prunes at rate min(0.5, 0.1):
    # ceil(0.1 * 9) = 1. Proportional: b is dense, its rate is min(0.5, 0) = 0 and it never prunes again.
    assert ALGORITHMS["sparse_momentum"].update(_momentum_layers(9), [10, 9], ctx).pruned[1] == 1
    assert proportional.update(_momentum_layers(10), [10, 10], ctx).pruned[1] == 0


def test_excess_rule_defaults_and_validation():
    assert SparseAlgorithm().excess == "equal"
    assert ALGORITHMS["sparse_momentum"].excess == "equal"
    assert ALGORITHMS["dsr"].excess == "proportional"  # DSR's reference re-shares by the same proportions
    with pytest.raises(ValueError, match="`excess` can be equal, proportional"):
        SparseAlgorithm(excess="uniform")
