"""Which weights ``find_layers`` refuses, and what its messages tell the user to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_sparse import Sparsifier


def _sparsifier(model: nn.Module, **kwargs) -> Sparsifier:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Sparsifier(model, optimizer, total_steps=100, density=0.5, **kwargs)


def test_torch_prune_layers_are_refused_naming_prune_remove_or_kept_dense():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    prune.l1_unstructured(model[2], "weight", amount=0.5)  # weight_orig * weight_mask, by a forward pre-hook
    with pytest.raises(
        ValueError,
        match=r"cannot mask 2.weight \(pruned with torch.nn.utils.prune: weight_orig \* weight_mask.*"
        r"`dense_layers`.*`torch.nn.utils.prune.remove\(module, 'weight'\)`",
    ) as refused:
        _sparsifier(model)
    assert "weight_norm" not in str(refused.value)
    assert list(_sparsifier(model, dense_layers=["2"]).masks) == ["0.weight"]
    prune.remove(model[2], "weight")  # what the message says: the weight is a plain parameter again
    assert list(_sparsifier(model).masks) == ["0.weight", "2.weight"]


def test_weight_norm_hook_is_still_named_as_such():
    with pytest.warns(FutureWarning):  # the old hook-based weight_norm
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 8)), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"cannot mask 0.weight \(computed by a forward hook: weight_norm"):
        _sparsifier(model)
