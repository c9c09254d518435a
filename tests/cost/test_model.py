"""The cost model built by running a model and from recorded shapes, and InputCapture's training-step capture."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_sparse.cost import CostModel, InputCapture, layer_calls, layer_flops
from tests.cost.nets import CNN, MLP, Wrapper, weight_names


def test_cost_model_from_calls_matches_build_but_has_no_links():
    model = CNN()
    x = torch.randn(2, 3, 8, 8)
    built = CostModel.build(model.features, "features", x)
    local = layer_calls(model.features, x, weight_names(model.features))
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
    with caplog.at_level(logging.WARNING, logger="lightning_sparse.cost.capture"):
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
