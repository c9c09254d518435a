"""``DSTSparsifier`` refusals (issue 20, items 9 and 11): a model DDP wrapped before its thresholds were attached,
and refusals that leave the model and the optimizer as they were."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse import Sparsifier
from lightning_sparse.methods.dst_sparsifier import attach_dst_thresholds


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def _parametrized(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_ddp_model_without_thresholds_is_refused_naming_attach_dst_thresholds(single_process_group):
    # thresholds attached after DDP wrapped the model would cut the weights off DDP's gradient averaging
    model = _mlp()
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters())
    with pytest.raises(ValueError, match=r"DDP has wrapped already.*`lightning_sparse.attach_dst_thresholds\(model\)`"):
        Sparsifier(wrapped, optimizer, algorithm="dst")
    assert _parametrized(model) == [] and len(optimizer.param_groups) == 1
    model = _mlp()
    attach_dst_thresholds(model)  # before wrapping: DDP averages the thresholds' gradients with the weights'
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=0.1)
    sparsifier = Sparsifier(wrapped, optimizer, algorithm="dst")
    for _ in range(3):  # DDP raises at the next forward if a weight's gradient never reached its hooks
        wrapped(torch.randn(4, 8)).sum().backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    assert set(sparsifier.masks) == {"module.0.weight", "module.2.weight"}


def test_a_refused_dst_sparsifier_leaves_no_thresholds_and_the_optimizer_as_it_was():
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    other = _mlp()
    state = Sparsifier(other, torch.optim.Adam(other.parameters()), algorithm="dst", dense_layers=["2"]).state_dict()
    with pytest.raises(ValueError, match=r"the checkpoint's DST layers \['0.weight'\] do not match"):
        Sparsifier(model, optimizer, algorithm="dst", state=state)
    assert _parametrized(model) == []
    assert len(optimizer.param_groups) == 1 and len(optimizer.param_groups[0]["params"]) == 4
