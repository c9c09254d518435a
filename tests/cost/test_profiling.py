"""The shape-based cost model (FSDP2's path) against FlopCounterMode, and InputCapture, on plain models."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_sparse.cost.profiling import (
    CostModel,
    InputCapture,
    LayerCall,
    call_flops,
    flops_from_calls,
    layer_calls,
    layer_flops,
)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, groups=4),  # grouped
            nn.BatchNorm2d(12),
            nn.Conv2d(12, 12, 1, groups=12, bias=False),  # depthwise
            nn.Conv2d(12, 6, 3, padding=1, padding_mode="reflect"),
        )
        self.conv1d = nn.Conv1d(6, 4, 2)
        self.head = nn.Linear(4 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # [N, 6, 3, 3]
        x = self.conv1d(x.flatten(2))  # [N, 4, 8]
        return self.head(x.flatten(1))


class Tokens(nn.Module):
    """A linear layer on [batch, tokens, features], one applied twice, and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.mix = nn.Linear(10, 10)
        self.conv = nn.Conv3d(1, 2, (1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(torch.relu(self.mix(self.embed(x))))  # mix called twice
        return self.conv(h[:, None, None]).sum() + h.transpose(1, 2).sum()


def _weight_names(model: nn.Module) -> list[str]:
    return [
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]


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
    names = _weight_names(model)
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


def test_cost_model_from_calls_matches_build_but_has_no_links():
    model = CNN()
    x = torch.randn(2, 3, 8, 8)
    built = CostModel.build(model.features, "features", x)
    local = layer_calls(model.features, x, _weight_names(model.features))
    shaped = CostModel.from_calls(model.features, "features", local)
    assert shaped.flops == built.flops
    assert list(shaped.flops) == ["features.0.weight", "features.2.weight", "features.4.weight", "features.5.weight"]
    assert (
        shaped.groups
        == built.groups
        == {
            "features.0.weight": 1,
            "features.2.weight": 4,
            "features.4.weight": 12,
            "features.5.weight": 1,
        }
    )
    assert built.links and shaped.links == {} and shaped.times is None
    # a layer missing from the calls was not called
    partial = CostModel.from_calls(model.features, "", {"0.weight": local["0.weight"]})
    assert partial.flops["0.weight"] == built.flops["features.0.weight"] and partial.flops["5.weight"] == 0
    with pytest.raises(ValueError, match="not linear/conv layers"):
        CostModel.from_calls(model.features, "", {"1.weight": []})


class Wrapper(nn.Module):
    """Like a LightningModule: called with (batch, index) first, its network then called on tensors."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.extra = nn.Linear(3, 3)  # outside `net`: not under the captured root

    def forward(self, batch, index=None):
        if isinstance(batch, tuple):
            x, _ = batch
            return self.net(x).sum() + self.net(x[:1]).sum() + self.extra(torch.ones(1, 3)).sum()
        return self.net(batch)


@pytest.mark.parametrize("model_cls, shape", [(MLP, (5, 4, 12)), (CNN, (2, 3, 8, 8))])
def test_input_capture_sharded_and_unsharded_paths_agree(model_cls, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    layers = {}
    for sharded in (False, True):
        wrapper = Wrapper(model_cls())
        masked = [f"net.{n}" for n, m in wrapper.net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        capture = InputCapture(wrapper, masked)
        wrapper((x, None), 0).backward()  # the net runs twice; only its first call counts
        wrapper((x, None), 1)  # later steps are not recorded either
        cost_model = capture.cost_model(measure_time=False, sharded=sharded)
        assert cost_model is not None
        layers[sharded] = cost_model
        assert not wrapper._forward_hooks and not wrapper._forward_pre_hooks
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in wrapper.modules())
    expected = CostModel.build(wrapper.net, "net", x)
    assert layers[False] == expected
    assert layers[True].flops == expected.flops
    assert layers[True].groups == expected.groups
    assert layers[True].links == {} and layers[True].times is None


def test_input_capture_measure_time_when_sharded_warns_and_counts_flops(caplog):
    model = Wrapper(MLP())
    capture = InputCapture(model, ["net.net.0", "net.head"])
    model(torch.randn(2, 12))  # the wrapper itself is the outermost module called on tensors
    with caplog.at_level(logging.WARNING, logger="lightning_sparse.cost.profiling"):
        cost_model = capture.cost_model(measure_time=True, sharded=True)
    assert "cannot be measured on a sharded model" in caplog.text
    assert cost_model is not None and cost_model.times is None
    assert cost_model.flops == layer_flops(model, torch.randn(2, 12), list(cost_model.flops))
    assert "extra.weight" in cost_model.flops and cost_model.flops["extra.weight"] == 0  # not called in that pass


def test_input_capture_nothing_called_gives_none():
    model = Wrapper(MLP())
    capture = InputCapture(model, ["net.head"])
    model.extra(torch.randn(1, 3))  # no module containing net.head is called
    assert capture.cost_model(measure_time=False, sharded=True) is None
    assert InputCapture(model, []).finish() is None
