"""FLOPs per layer: FlopCounterMode on a pass, and the same from recorded call shapes (FSDP2's path)."""

import pytest
import torch
from torch import nn

from lightning_sparse.cost import LayerCall, call_flops, flops_from_calls, layer_calls, layer_flops
from tests.cost.nets import CNN, MLP, Tokens, weight_names


@pytest.mark.parametrize(
    "model, x",
    [
        (MLP(), torch.randn(5, 12)),
        (MLP(), torch.randn(4, 7, 12)),  # Linear on [batch, tokens, features]
        (MLP(), torch.randn(2, 3, 4, 12)),
        (CNN(), torch.randn(2, 3, 8, 8)),
        (Tokens(), torch.randn(3, 5, 6)),
    ],
    ids=["mlp", "mlp-3d", "mlp-4d", "cnn-grouped", "tokens-shared-conv3d"],
)
def test_flops_from_shapes_equal_flop_counter_mode(model, x):
    names = weight_names(model)
    expected = layer_flops(model, x, names)
    calls = layer_calls(model, x, names)
    assert flops_from_calls(model, calls) == expected
    assert all(v > 0 for v in expected.values())


def test_layer_calls_records_every_call_and_shapes():
    model = Tokens()
    calls = layer_calls(model, torch.randn(3, 5, 6), ["embed.weight", "mix", "conv.weight"])
    assert calls["embed.weight"] == [LayerCall((3, 5, 6), (3, 5, 10))]
    assert calls["mix"] == [LayerCall((3, 5, 10), (3, 5, 10))] * 2
    assert calls["conv.weight"] == [LayerCall((3, 1, 1, 5, 10), (3, 2, 1, 4, 8))]
    with pytest.raises(ValueError, match="linear/conv layers only"):
        layer_calls(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.randn(1, 2), ["1"])


def test_call_flops_by_hand_and_unbatched_conv():
    assert call_flops(nn.Linear(6, 4), LayerCall((2, 3, 6), (2, 3, 4))) == 2 * 6 * 6 * 4
    conv = nn.Conv2d(4, 6, 3, groups=2)
    # unbatched [C, H, W] input: a batch of one
    assert call_flops(conv, LayerCall((4, 5, 5), (6, 3, 3))) == 2 * 6 * 2 * 9 * 9
    assert (
        call_flops(conv, LayerCall((4, 5, 5), (6, 3, 3)))
        == layer_flops(conv, torch.randn(4, 5, 5), ["weight"])["weight"]
    )
    with pytest.raises(TypeError, match="counts Linear"):
        call_flops(nn.ConvTranspose2d(2, 2, 3), LayerCall((1, 2, 3, 3), (1, 2, 5, 5)))


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
