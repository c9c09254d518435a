"""Chain links found with torch.fx, and the input channels they idle."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.cost import ChainLink, LayerChannelStats, chain_links, channel_stats
from tests.cost.nets import full


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
