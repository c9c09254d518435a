"""Speedup estimates: channel statistics, chain links, FLOPs and timing on small hand-made models."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.cost.profiling import chain_links, conv_groups, layer_flops, layer_times
from lightning_sparse.cost.speedup import (
    ChainLink,
    LayerChannelStats,
    channel_stats,
    speedup_dense_conv,
    speedup_sparse_conv,
)


def full(*shape):
    return torch.ones(*shape, dtype=torch.bool)


# ----------------------------------------------------------------------------- channel statistics


def test_conv_channel_stats_on_a_hand_made_mask():
    mask = full(4, 3, 3, 3)
    mask[:, 1] = False  # input channel 1 empty
    mask[0] = False  # output channels 0 and 2 empty
    mask[2] = False
    mask[1, 0, 0, 0] = False  # a single weight: no channel emptied
    stats = channel_stats(["conv.weight"], [mask])
    assert stats == {"conv.weight": LayerChannelStats(empty_in=1 / 3, empty_out=2 / 4, density=(2 * 2 * 9 - 1) / 108)}


def test_linear_channel_stats_from_weights_nonzero_is_active():
    weight = torch.randn(5, 4)
    weight[:, [0, 3]] = 0.0  # input features 0 and 3 empty
    weight[4] = 0.0  # output neuron 4 empty
    stats = channel_stats(["fc.weight"], [weight])["fc.weight"]
    assert (stats.empty_in, stats.empty_out, stats.density) == (2 / 4, 1 / 5, 8 / 20)


def test_grouped_conv_counts_real_input_channels_per_group():
    conv = nn.Conv2d(4, 4, 1, groups=2)  # weight [4, 2, 1, 1]: group 0 reads channels 0, 1; group 1 reads 2, 3
    mask = full(4, 2, 1, 1)
    mask[0:2, 0] = False  # real input channel 0 (group 0, index 0) empty
    model = nn.Sequential(conv)
    groups = conv_groups(model, ["0.weight"])
    assert groups == {"0.weight": 2}
    assert channel_stats(["0.weight"], [mask], groups=groups)["0.weight"].empty_in == 1 / 4
    # without groups, index 0 is not empty in group 1, so no input index of the weight is empty
    assert channel_stats(["0.weight"], [mask])["0.weight"].empty_in == 0.0
    with pytest.raises(ValueError, match="dividing the 4 output channels"):
        channel_stats(["0.weight"], [mask], groups={"0.weight": 3})


def test_channel_stats_rejects_misaligned_and_unknown_inputs():
    with pytest.raises(ValueError, match="aligned"):
        channel_stats(["a", "b"], [full(2, 2)])
    with pytest.raises(ValueError, match="at least|non-empty weight mask"):
        channel_stats(["a"], [full(3)])
    with pytest.raises(ValueError, match="sources that are not in `names`"):
        channel_stats(["a"], [full(2, 2)], links={"a": ChainLink("missing")})
    with pytest.raises(ValueError, match="4 inputs, but 'b' has 3 input channels"):
        channel_stats(["a", "b"], [full(2, 2), full(2, 3)], links={"b": ChainLink("a", 2)})


# ----------------------------------------------------------------------------- chain links


def test_conv_bn_relu_conv_chain_idles_the_matching_input_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3))
    names = ["0.weight", "3.weight"]
    links = chain_links(model, torch.randn(2, 3, 8, 8), names)
    assert links == {"3.weight": ChainLink("0.weight", 1)}
    first, second = full(4, 3, 3, 3), full(5, 4, 3, 3)
    first[1] = False  # output channel 1 of the first conv is empty ...
    second[:, 3] = False  # ... and the second conv's own input channel 3 is empty
    stats = channel_stats(names, [first, second], links)
    assert stats["0.weight"] == LayerChannelStats(0.0, 1 / 4, 3 / 4)
    assert stats["3.weight"] == LayerChannelStats(2 / 4, 0.0, 3 / 4)  # channels 1 (idle) and 3 (own)
    assert channel_stats(names, [first, second])["3.weight"].empty_in == 1 / 4  # without the link


def test_conv_pool_flatten_linear_chain_idles_the_channel_features():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    names = ["0.weight", "4.weight"]
    links = chain_links(model, torch.randn(1, 1, 6, 6), names)  # conv: [3, 4, 4] -> pool [3, 2, 2] -> 12
    assert links == {"4.weight": ChainLink("0.weight", repeat=4)}
    conv, fc = full(3, 1, 3, 3), full(4, 12)
    conv[2] = False  # conv output channel 2 feeds features 8, 9, 10, 11
    fc[:, 0] = False
    stats = channel_stats(names, [conv, fc], links)
    assert stats["4.weight"].empty_in == 5 / 12


def test_functional_lenet_links_through_functions_and_view():
    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 3, 3)
            self.fc1, self.fc2 = nn.Linear(3 * 2 * 2, 6), nn.Linear(6, 2)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [N, 2, 6, 6]
            x = F.max_pool2d(torch.relu(self.conv2(x)), 2)  # [N, 3, 2, 2]
            x = x.view(x.size(0), -1)
            x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
            return self.fc2(x)

    names = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert chain_links(LeNet(), torch.randn(2, 1, 14, 14), names) == {
        "conv2.weight": ChainLink("conv1.weight", 1),
        "fc1.weight": ChainLink("conv2.weight", 4),
        "fc2.weight": ChainLink("fc1.weight", 1),
    }


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_residual_addition_is_not_linked():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Residual(4), nn.Conv2d(4, 2, 1))
    names = ["0.weight", "1.conv.weight", "2.weight"]
    links = chain_links(model, torch.randn(1, 3, 5, 5), names)
    # the residual conv reads the first conv's output directly; the last conv reads x + conv(x): no link
    assert links == {"1.conv.weight": ChainLink("0.weight", 1)}
    first = full(4, 3, 1, 1)
    first[0] = False
    stats = channel_stats(names, [first, full(4, 4, 3, 3), full(2, 4, 1, 1)], links)
    assert stats["1.conv.weight"].empty_in == 1 / 4
    assert stats["2.weight"].empty_in == 0.0  # channel 0 still carries the residual branch


def test_branches_are_linked_but_a_concatenation_is_not():
    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.left, self.right = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 3, padding=1)
            self.merge = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = F.relu(self.stem(x))
            return self.merge(torch.cat([self.left(x), self.right(x)], dim=1))

    names = ["stem.weight", "left.weight", "right.weight", "merge.weight"]
    assert chain_links(Inception(), torch.randn(1, 3, 4, 4), names) == {
        "left.weight": ChainLink("stem.weight"),
        "right.weight": ChainLink("stem.weight"),
    }


def test_untraceable_model_gives_no_links_with_a_warning():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if x.sum() > 0 else self.b(-x)

    with pytest.warns(UserWarning, match="cannot trace"):
        assert chain_links(DataDependent(), torch.randn(1, 3), ["a.weight", "b.weight"]) == {}


# ----------------------------------------------------------------------------- FLOPs and speedups


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


def test_layer_flops_of_a_small_conv_net_keys_and_values():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2))
            self.head = nn.Linear(6 * 3 * 3, 5)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    x = torch.randn(2, 3, 8, 8)
    flops = layer_flops(Net(), x, ["features.0.weight", "features.2", "head.weight"])
    conv0 = 2 * 2 * 4 * 3 * 3 * 3 * 8 * 8  # 2 * batch * out * in * k * k * H_out * W_out
    conv2 = 2 * 2 * 6 * 4 * 3 * 3 * 3 * 3
    fc = 2 * 2 * 54 * 5
    assert flops == {"features.0.weight": conv0, "features.2": conv2, "head.weight": fc}
    # backward: the first conv only computes its weight gradient (its input needs none), the others both
    both = layer_flops(Net(), x, ["features.0.weight", "features.2.weight", "head.weight"], backward=True)
    assert both == {"features.0.weight": 2 * conv0, "features.2.weight": 3 * conv2, "head.weight": 3 * fc}


def test_layer_flops_leaves_the_model_unchanged_and_rejects_unknown_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    before = model[1].running_mean.clone()
    assert layer_flops(model, torch.randn(4, 1, 5, 5), ["0.weight"]) == {"0.weight": 2 * 4 * 2 * 9 * 9}
    assert torch.equal(model[1].running_mean, before) and model.training and model[1].training
    with pytest.raises(ValueError, match=r"'1.bias' is neither.*\['0.weight'\]"):
        layer_flops(model, torch.randn(1, 1, 5, 5), ["1.bias"])


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


# ----------------------------------------------------------------------------- measured time


def test_layer_times_are_positive_for_every_layer_and_side_effect_free():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    names = ["0.weight", "4.weight"]
    before = model[1].running_mean.clone()
    times = layer_times(model, torch.randn(2, 3, 8, 8), names, repeats=3, warmup=1)
    assert list(times) == names
    assert all(isinstance(t, float) and t > 0 for t in times.values())
    assert torch.equal(model[1].running_mean, before) and model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="`repeats` must be an integer >= 1"):
        layer_times(model, torch.randn(2, 3, 8, 8), names, repeats=0)
