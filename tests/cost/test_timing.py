"""Measured forward+backward time per layer."""

import pytest
import torch
from torch import nn

from lightning_sparse.cost import layer_times


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
