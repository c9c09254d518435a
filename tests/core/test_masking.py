"""Masking without a Trainer: which weights are masked, applying, saving and loading masks."""

import pytest
import torch
from torch import nn

from lightning_sparse import Masking, maskable_parameters
from lightning_sparse.functional import layer_active_counts


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(4, 4, 1)
        self.conv3d = nn.Conv3d(2, 2, 1)
        self.head = nn.Linear(8, 5)
        self.tied = nn.Linear(8, 5)
        self.tied.weight = self.head.weight  # a shared weight is masked once
        self.norm = nn.LayerNorm(5)


def test_maskable_parameters_masks_conv_and_linear_weights_only():
    names = list(maskable_parameters(Net()))
    assert names == ["conv.weight", "conv1d.weight", "conv3d.weight", "head.weight"]


def test_dense_layers_by_module_name_param_name_and_glob():
    net = Net()
    assert list(maskable_parameters(net, ["conv"])) == ["conv1d.weight", "conv3d.weight", "head.weight"]
    assert list(maskable_parameters(net, ["head.weight"])) == ["conv.weight", "conv1d.weight", "conv3d.weight"]
    assert list(maskable_parameters(net, ["conv*"])) == ["head.weight"]
    with pytest.raises(ValueError, match="leaves no layer to mask"):
        maskable_parameters(net, ["*"])


def test_random_masking_counts_dtype_and_apply():
    net = Net()
    params = maskable_parameters(net)
    masking = Masking.random(params, 0.25, "uniform", torch.Generator().manual_seed(0))
    expected = layer_active_counts([tuple(p.shape) for p in params.values()], 0.25)
    assert masking.active == expected
    assert [int(m.sum()) for m in masking.masks] == expected
    assert all(m.dtype == torch.bool and m.shape == p.shape for m, p in zip(masking.masks, params.values()))
    with torch.no_grad():
        for p in params.values():
            p.fill_(1.0)
    masking.apply_()
    assert masking.nonzero_counts() == expected
    assert masking.density == pytest.approx(sum(expected) / sum(p.numel() for p in params.values()))


def test_state_dict_round_trip_and_weights_only_load(tmp_path):
    net = Net()
    params = maskable_parameters(net)
    masking = Masking.random(params, 0.3, "erk", torch.Generator().manual_seed(1))
    path = tmp_path / "masks.pt"
    torch.save(masking.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    other = Masking.random(params, 0.3, "erk", torch.Generator().manual_seed(2))
    other.load_masks(loaded)
    assert all(torch.equal(a, b) for a, b in zip(masking.masks, other.masks))
    assert other.active == masking.active


def test_load_masks_rejects_mismatches():
    params = maskable_parameters(Net())
    masking = Masking.random(params, 0.3)
    state = masking.state_dict()
    with pytest.raises(ValueError, match=r"missing \['head.weight'\], unexpected \['fc.weight'\]"):
        masking.load_masks({**{k: v for k, v in state.items() if k != "head.weight"}, "fc.weight": state["head.weight"]})
    with pytest.raises(ValueError, match=r"mask 'conv.weight' must be torch.bool, got torch.float32"):
        masking.load_masks({**state, "conv.weight": state["conv.weight"].float()})
