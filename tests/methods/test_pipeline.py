"""One sparse momentum update on hand-made layers: exact counts at every step of the algorithm."""

import pytest
import torch

from lightning_sparse import ALGORITHMS, LayerState, SparseAlgorithm, UpdateContext
from lightning_sparse.methods import get_algorithm


def _layer(name, weight, mask, momentum):
    return LayerState(name, weight, mask, lambda: momentum)


def _two_layers():
    # layer a: 20 weights, 10 active, |M| = 1 on active weights; layer b: 10 weights, 5 active, |M| = 3
    wa = torch.arange(1, 21, dtype=torch.float32).view(4, 5)
    ma = torch.zeros(4, 5, dtype=torch.bool)
    ma.view(-1)[:10] = True
    mom_a = torch.ones(4, 5)
    mom_a.view(-1)[10:] = torch.arange(10, dtype=torch.float32) / 10  # inactive: 0.0 .. 0.9
    wb = -torch.arange(1, 11, dtype=torch.float32).view(2, 5)
    mb = torch.zeros(2, 5, dtype=torch.bool)
    mb.view(-1)[5:] = True
    mom_b = torch.full((2, 5), 3.0)
    mom_b.view(-1)[:5] = torch.tensor([5.0, 4.0, 0.0, 6.0, 1.0])  # inactive
    wa = wa * ma
    wb = wb * mb
    return [_layer("a", wa, ma, mom_a), _layer("b", wb, mb, mom_b)]


def test_sparse_momentum_counts_positions_and_conservation():
    layers = _two_layers()
    algo = ALGORITHMS["sparse_momentum"]
    result = algo.update(layers, [10, 5], UpdateContext(0.5, generator=torch.Generator().manual_seed(0)))
    # prune ceil(0.5*10) = 5 and ceil(0.5*5) = 3; shares 1/(1+3), 3/(1+3) of R = 8 -> regrow 2 and 6
    assert result.pruned == [5, 3]
    assert result.grown == [2, 6]
    assert result.active == [7, 8]
    assert [int(m.sum()) for m in result.masks] == [7, 8]
    assert sum(result.active) == 15  # total preserved exactly
    a, b = result.masks
    # a: the five smallest |W| among active (1..5) pruned; 6..10 kept; growth takes the largest |M| among
    # the positions free after pruning: the pruned ones (|M| = 1) beat the inactive 0.0..0.9
    assert a.view(-1)[5:10].all()
    assert int(a.view(-1)[:5].sum()) == 2 and not a.view(-1)[10:].any()
    # b: active weights -6..-10 (|W| 6..10): the three smallest (6, 7, 8) pruned, 9 and 10 kept.
    # Free after pruning: 0..7, six grown by |M|: 5,4,6 and the three pruned (|M| = 3) -> position 4 (|M| 1)
    # and position 2 (|M| 0) stay out
    assert b.view(-1).tolist() == [True, True, False, True, False, True, True, True, True, True]


def test_growth_never_picks_an_active_position():
    layers = _two_layers()
    # make the active weights' momentum enormous: growth must still add only positions free after pruning
    # (a growth picking an active one would leave the layer with fewer active weights than counted)
    for layer in layers:
        layer.momentum[layer.mask] = 1e6
    result = ALGORITHMS["sparse_momentum"].update(layers, [10, 5], UpdateContext(0.2, generator=torch.Generator()))
    assert result.grown == [2, 1]  # equal shares of 3: the tie goes to the first layer
    for layer, new, pruned, grown in zip(layers, result.masks, result.pruned, result.grown):
        assert int(new.sum()) == int(layer.mask.sum()) - pruned + grown


def test_excess_regrowth_is_capped_by_layer_room():
    # layer b has 10 positions, 8 active: after pruning 4 it has 6 free, but its share (0.9) asks for more
    wa = torch.randn(100).abs() + 0.1
    ma = torch.zeros(100, dtype=torch.bool)
    ma[:10] = True
    wb = torch.randn(10).abs() + 0.1
    mb = torch.zeros(10, dtype=torch.bool)
    mb[:8] = True
    mom_a = torch.full((100,), 1.0)
    mom_b = torch.full((10,), 9.0)
    layers = [_layer("a", wa * ma, ma, mom_a), _layer("b", wb * mb, mb, mom_b)]
    result = ALGORITHMS["sparse_momentum"].update(layers, [10, 8], UpdateContext(0.5, generator=torch.Generator()))
    assert result.pruned == [5, 4]
    # b wanted 8.1 but takes at most 99 % of its 6 free positions (5, the reference's cap); the 3.1 left went
    # to a (the excess is shared equally among the other layers: a is the only one)
    assert result.grown == [4, 5]
    assert result.active == [9, 9]
    assert sum(result.active) == 18
    # excess="proportional": b fills its 6 free positions, the 3 left go to a by share
    proportional = SparseAlgorithm(nearly_dense_edge_case=True, excess="proportional")
    result = proportional.update(layers, [10, 8], UpdateContext(0.5, generator=torch.Generator()))
    assert result.grown == [3, 6]
    assert result.active == [8, 10]


def test_dense_and_growing_layer_is_not_pruned():
    # layer b is dense and has the larger momentum share: its rate is min(p, sparsity) = 0
    wa = torch.rand(50) + 0.1
    ma = torch.zeros(50, dtype=torch.bool)
    ma[:20] = True
    wb = torch.rand(10) + 0.1
    mb = torch.ones(10, dtype=torch.bool)
    layers = [_layer("a", wa * ma, ma, torch.ones(50)), _layer("b", wb, mb, torch.full((10,), 5.0))]
    result = ALGORITHMS["sparse_momentum"].update(layers, [20, 10], UpdateContext(0.5, generator=torch.Generator()))
    assert result.pruned == [10, 0]
    assert result.grown == [10, 0]  # b has no room, so all regrowth goes back to a
    assert torch.equal(result.masks[1], mb)


def test_zero_rate_changes_nothing():
    layers = _two_layers()
    result = ALGORITHMS["sparse_momentum"].update(layers, [10, 5], UpdateContext(0.0, generator=torch.Generator()))
    assert result.pruned == [0, 0] and result.grown == [0, 0]
    assert all(torch.equal(new, layer.mask) for new, layer in zip(result.masks, layers))


def test_static_never_changes_and_needs_no_momentum():
    layers = [LayerState("a", torch.ones(4), torch.tensor([True, False, True, False]))]
    static = ALGORITHMS["static"]
    assert not static.needs_momentum
    result = static.update(layers, [2], UpdateContext(0.5, generator=torch.Generator()))
    assert torch.equal(result.masks[0], layers[0].mask) and result.active == [2]


def test_momentum_is_read_only_when_a_rule_needs_it():
    calls = []

    def momentum():
        calls.append(1)
        return torch.ones(4)

    layer = LayerState("a", torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([True, True, False, False]), momentum)
    algo = SparseAlgorithm(grow="random", redistribute="none")
    assert not algo.needs_momentum
    algo.update([layer], [2], UpdateContext(0.5, generator=torch.Generator()))
    assert calls == []
    assert ALGORITHMS["sparse_momentum"].needs_momentum


def test_custom_rules_are_called():
    def keep_first_prune(layer, n):
        new = layer.mask.clone()
        new[new.nonzero().view(-1)[-n:]] = False
        return new

    algo = SparseAlgorithm(prune=keep_first_prune, grow="random", redistribute="none")
    layer = LayerState("a", torch.ones(6), torch.tensor([True, True, True, True, False, False]))
    result = algo.update([layer], [4], UpdateContext(0.5, generator=torch.Generator().manual_seed(0)))
    assert result.masks[0][:2].all() and result.active == [4]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"`algorithm` can be sparse_momentum, rigl, set, dsr, static, snip, gmp, granet, mest, topkast, dst, a SparseAlgorithm or a DST, got 'foo'"):
        get_algorithm("foo")
    with pytest.raises(ValueError, match=r"`grow` can be momentum, gradient, random, none or a function, got 'gradient_x'"):
        SparseAlgorithm(grow="gradient_x")
    with pytest.raises(ValueError, match=r"`redistribute` can be momentum, magnitude, nonzero, none"):
        SparseAlgorithm(redistribute="equal")
    with pytest.raises(ValueError, match=r"`prune` can be magnitude, set or a function, got 'random'"):
        SparseAlgorithm(prune="random")
