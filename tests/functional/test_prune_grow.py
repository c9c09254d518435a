"""Prune and grow on one layer (:mod:`lightning_sparse.functional.prune_grow`)."""


import pytest
import torch

from lightning_sparse.functional import (
    drop_lowest,
    magnitude_prune,
    random_growth,
    score_growth,
)


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
