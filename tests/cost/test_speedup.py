"""Speedup estimates: by hand on two linear layers, and their edge cases and errors."""

import math

import pytest
import torch
from torch import nn

from lightning_sparse.cost import (
    ChainLink,
    LayerChannelStats,
    chain_links,
    channel_stats,
    layer_flops,
    speedup_dense_conv,
    speedup_sparse_conv,
)
from tests.cost.nets import full


def test_two_linear_layers_flops_and_speedups_by_hand():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    names = ["0.weight", "1.weight"]
    x = torch.randn(1, 10)
    costs = layer_flops(model, x, names)
    assert costs == {"0.weight": 2 * 10 * 20, "1.weight": 2 * 20 * 5}
    links = chain_links(model, x, names)
    assert links == {"1.weight": ChainLink("0.weight")}

    first, second = full(20, 10), full(5, 20)
    first[:5] = False  # neurons 0-4 empty: eout 5/20, and inputs 0-4 of the second layer idle
    first[:, 9] = False  # input feature 9 empty: ein 1/10
    second[4] = False  # neuron 4 empty: eout 1/5
    second[:, 19] = False  # own input 19 empty: ein (5 + 1) / 20
    stats = channel_stats(names, [first, second], links)
    assert stats["0.weight"] == LayerChannelStats(1 / 10, 5 / 20, (15 * 9) / 200)
    assert stats["1.weight"] == LayerChannelStats(6 / 20, 1 / 5, (4 * 19) / 100)

    empty_in = {n: s.empty_in for n, s in stats.items()}
    empty_out = {n: s.empty_out for n, s in stats.items()}
    dense = (400 + 200) / (400 * (1 - 1 / 10) * (1 - 5 / 20) + 200 * (1 - 6 / 20) * (1 - 1 / 5))
    assert speedup_dense_conv(costs, empty_in, empty_out) == pytest.approx(dense, rel=1e-12)
    assert dense == pytest.approx(600 / 382)  # 270 + 112
    sparse = (400 + 200) / (400 * 135 / 200 + 200 * 76 / 100)
    assert speedup_sparse_conv(costs, {n: s.density for n, s in stats.items()}) == pytest.approx(sparse, rel=1e-12)
    assert sparse == pytest.approx(600 / 422)  # 270 + 152


def test_speedup_edge_cases_and_errors():
    assert speedup_dense_conv({"a": 0, "b": 0}, {"a": 0, "b": 0}, {"a": 0, "b": 0}) == 1.0
    assert speedup_sparse_conv({}, {}) == 1.0
    assert speedup_dense_conv({"a": 5, "b": 0}, {"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.0}) == math.inf
    assert speedup_sparse_conv({"a": 3}, {"a": 0.0}) == math.inf
    assert speedup_sparse_conv({"a": 3, "b": 1}, {"a": 0.5, "b": 1.0, "unused": 0.1}) == 4 / 2.5
    with pytest.raises(ValueError, match=r"`empty_out` has no value for layers \['b'\]"):
        speedup_dense_conv({"a": 1, "b": 1}, {"a": 0, "b": 0}, {"a": 0})
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        speedup_sparse_conv({"a": 1}, {"a": 1.5})
    with pytest.raises(ValueError, match="non-negative"):
        speedup_sparse_conv({"a": -1}, {"a": 0.5})
