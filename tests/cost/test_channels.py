"""Channel statistics of whole masks on hand-made masks (row shards: test_sharded_stats.py)."""

import pytest
import torch
from torch import nn

from lightning_sparse.cost import ChainLink, LayerChannelStats, channel_stats, conv_groups
from tests.cost.nets import full


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
