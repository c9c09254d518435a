"""Structured patterns and neuron ablation on FSDP2 row shards (2 CPU processes): the same masks as on one process."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lightning_sparse import Sparsifier
from lightning_sparse.functional.patterns import (
    check_pattern,
    unit_counts,
)
from tests.methods.test_targets import Conv1D


def _sharded_model() -> nn.Module:
    torch.manual_seed(0)  # 31 and 9 rows: uneven splits over 2 processes
    return nn.Sequential(nn.Linear(16, 31), nn.ReLU(), nn.Linear(31, 12), nn.ReLU(), nn.Linear(12, 9))


def _sharded_options(pattern: str) -> dict:
    if ":" in pattern:  # the middle layer's input dimension, 31, is not a multiple of 4
        return {"dense_layers": ["2"]}
    return {"density": 0.3}


def _pattern_steps(model: nn.Module, algorithm: str, pattern: str, **options) -> tuple[list, Sparsifier]:
    """8 steps of ``algorithm`` under ``pattern`` (updates every 2): after each, the host counts and the gathered
    masks; and the ``Sparsifier``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, algorithm=algorithm, pattern=pattern, seed=0, update_interval=2,
                            total_steps=8, mask_kernel="torch", **options)  # fmt: skip
    torch.manual_seed(1)
    x, y = torch.randn(8, 16), torch.randint(0, 9, (8,))
    steps = []
    for _ in range(8):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
        steps.append((list(sparsifier.masking.active), sparsifier.state_dict()["masks"]))  # gathered rows
    return steps, sparsifier


def _ablation_steps(model: nn.Module, algorithm: str) -> dict:
    """:func:`_pattern_steps` with fan_in and neuron ablation (gamma 1.0), and the budgets at the end."""
    steps, sparsifier = _pattern_steps(model, algorithm, "fan_in", density=0.3, neuron_ablation=1.0)
    return {"steps": steps, "updates": sparsifier.num_updates, "budgets": sparsifier.algorithm_state}


def _sharded_on(mesh) -> nn.Module:
    """:func:`_sharded_model` with each Linear and the whole model under ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    model = _sharded_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _sharded_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    try:
        for algorithm, pattern in (("static", "2:4"), ("static", "fan_in"), ("rigl", "2:4"), ("set", "fan_in"),
                                   ("sparse_momentum", "fan_in"), ("gmp", "2:4")):  # fmt: skip
            steps, sparsifier = _pattern_steps(_sharded_on(mesh), algorithm, pattern, **_sharded_options(pattern))
            assert sparsifier.sharded
            results[f"{algorithm} {pattern}"] = {"steps": steps, "updates": sparsifier.num_updates}
        for algorithm in ("rigl", "sparse_momentum"):  # neuron ablation: salient counts reduced over the shards
            results[f"{algorithm} ablation"] = _ablation_steps(_sharded_on(mesh), algorithm)
        conv = nn.Sequential(Conv1D(31, 16))  # stored [16, 31], sharded by its input channels
        fully_shard(conv, mesh=mesh)
        try:
            Sparsifier(conv, torch.optim.SGD(conv.parameters(), lr=0.1), density=0.5, pattern="fan_in", total_steps=100)
            results["conv1d"] = "accepted"
        except ValueError as error:
            results["conv1d"] = str(error)
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.slow
def test_patterns_on_fsdp2_shards_stay_local_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "pattern='fan_in' under FSDP2: the transposed weight(s) ['0.weight']" in rank0["conv1d"]
    assert rank0["conv1d"] == rank1["conv1d"]
    for key in ("static 2:4", "static fan_in", "rigl 2:4", "set fan_in", "sparse_momentum fan_in", "gmp 2:4"):
        algorithm, pattern = key.split()
        r0, r1 = rank0[key], rank1[key]
        assert r0["updates"] == r1["updates"] and (algorithm == "static" or r0["updates"] >= 2)
        for (active0, full0), (active1, full1) in zip(r0["steps"], r1["steps"]):
            assert active0 == active1 == [int(m.sum()) for m in full0.values()]
            for name, mask in full0.items():
                assert torch.equal(mask, full1[name])
                counts = unit_counts(mask, pattern)
                assert int(counts.min()) == int(counts.max()), (key, name)
                if pattern == "2:4" and algorithm != "gmp":
                    assert check_pattern(mask, "2:4")
    for algorithm in ("rigl", "sparse_momentum"):  # neuron ablation: the same masks as on one process
        single = _ablation_steps(_sharded_model(), algorithm)
        r0, r1 = rank0[f"{algorithm} ablation"], rank1[f"{algorithm} ablation"]
        assert r0["updates"] == r1["updates"] == single["updates"] >= 3
        assert r0["budgets"] == r1["budgets"] == single["budgets"]
        emptied = 0
        for (active0, full0), (active1, full1), (active, full) in zip(r0["steps"], r1["steps"], single["steps"]):
            assert active0 == active1 == active == [int(m.sum()) for m in full.values()]
            for name, mask in full.items():
                assert torch.equal(full0[name], mask) and torch.equal(full1[name], mask), (algorithm, name)
                assert check_pattern(mask, "fan_in", empty_rows=True)
                emptied += int((unit_counts(mask, "fan_in") == 0).sum())
        assert emptied > 0
    # random masks are the same as on one process (the hash of the global flat index, selected per unit)
    for key in ("static 2:4", "static fan_in"):
        _, pattern = key.split()
        model = _sharded_model()
        single = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), algorithm="static", pattern=pattern,
                            seed=0, **_sharded_options(pattern))  # fmt: skip
        for name, mask in single.masks.items():
            assert torch.equal(mask, rank0[key]["steps"][0][1][name]), (key, name)
