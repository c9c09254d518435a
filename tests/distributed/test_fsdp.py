"""FSDP2 (Lightning's ModelParallelStrategy over 2 CPU processes, gloo): masks sharded like their weights, updates
computed on the shards, never a full tensor; and a world-size-1 FSDP2 model in this process.

One launch of ``fsdp_run.py`` runs every two-process fit of this file (module-scoped); the tests read its outputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_sparse import Masking, Sparsifier, attach_dst_thresholds, maskable_parameters

SCRIPT = Path(__file__).with_name("fsdp_run.py")
ALGORITHMS = ["sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp"]
DYNAMIC = {"sparse_momentum", "rigl", "set", "dsr", "gmp"}
ROWS = {"net.0.weight": 31, "net.2.weight": 16, "net.4.weight": 10}
TOTAL = 31 * 64 + 16 * 31 + 10 * 16  # masked weights of the 64-31-16-10 MLP


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--algorithms", *ALGORITHMS, "dst",
                           "--resume"], capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {a: [torch.load(out / f"{a}_rank{r}.pt", weights_only=True) for r in (0, 1)] for a in [*ALGORITHMS, "dst"]}
    return {**runs, "resume": torch.load(out / "resume_rank0.pt", weights_only=True)}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_under_fsdp2(runs, algorithm):
    rank0, rank1 = runs[algorithm]
    steps = len(rank0["counts"])
    assert steps == 12 and rank0["sharded"] == rank1["sharded"] == 3 * steps  # every masked weight was a DTensor
    assert rank0["leaks"] == rank1["leaks"] == 0  # local weights zero outside the local masks after every step
    assert rank0["forbidden_calls"] == rank1["forbidden_calls"] == {"full_tensor": 0, "redistribute": 0}
    # masks are sharded exactly like their weights: rank 0 holds ceil(rows / 2) rows, rank 1 the rest
    for name, rows in ROWS.items():
        assert rank0["local_masks"][0][name].shape[0] == (rows + 1) // 2
        assert rank1["local_masks"][0][name].shape[0] == rows // 2
    # exact counts after every step, the same on both processes
    assert rank0["counts"] == rank1["counts"]
    totals = [sum(c.values()) for c in rank0["counts"]]
    target = round(0.2 * TOTAL)
    if algorithm == "gmp":
        assert totals[0] == TOTAL and totals[-1] == target and totals == sorted(totals, reverse=True)
    else:
        assert totals == [target] * steps
    if algorithm in ("rigl", "set"):  # no redistribution: each layer keeps its own count
        assert all(c == rank0["counts"][0] for c in rank0["counts"])
    # the checkpointed (gathered) masks are the two row blocks, identical on both processes
    for name, full in rank0["full_masks"].items():
        assert torch.equal(full, rank1["full_masks"][name])
        assert torch.equal(full, torch.cat([rank0["local_masks"][-1][name], rank1["local_masks"][-1][name]]))
    changes = sum(
        any(not torch.equal(x[k], y[k]) for k in x) for x, y in zip(rank0["local_masks"], rank0["local_masks"][1:])
    )
    if algorithm in DYNAMIC:
        assert rank0["num_updates"] >= 2 and changes >= 2
    else:
        assert changes == 0
    weights = rank0["weights"]  # full weights after fit: zero outside the full masks
    for name, full in rank0["full_masks"].items():
        assert int((weights[name][~full] != 0).sum()) == 0


@pytest.mark.slow
def test_dst_under_fsdp2(runs):
    rank0, rank1 = runs["dst"]
    steps = len(rank0["counts"])
    assert steps == 12 and rank0["sharded"] == rank1["sharded"] == 3 * steps  # raw weights are DTensors
    for r in (rank0, rank1):  # thresholds attached before `fully_shard`: sharded by it, trained by the optimizer
        assert r["state"] == {"thresholds_sharded": True, "optimized_thresholds": 3, "final_local_leaks": 0}
    assert rank0["forbidden_calls"] == rank1["forbidden_calls"] == {"full_tensor": 0, "redistribute": 0}
    for name, rows in ROWS.items():
        assert rank0["local_masks"][0][name].shape[0] == (rows + 1) // 2
        assert rank1["local_masks"][0][name].shape[0] == rows // 2
    assert rank0["counts"] == rank1["counts"]  # all-reduced counts agree
    totals = [sum(c.values()) for c in rank0["counts"]]
    assert totals[-1] < totals[0] < TOTAL  # the thresholds rise: the learned density falls
    for name, full in rank0["full_masks"].items():  # counts are the sums of the two shards' masks
        assert torch.equal(full, rank1["full_masks"][name])
        assert int(full.sum()) == rank0["counts"][-1][name]
        raw = rank0["weights"][name.replace(".weight", ".parametrizations.weight.original")]
        assert int((raw[~full] != 0).sum()) == 0 and bool((raw[full] != 0).all())  # finish() zeroed the rest


@pytest.mark.slow
def test_sharded_random_masks_equal_the_single_process_ones(runs):
    # the same seed gives the same masks whatever the number of processes: draw them here, unsharded
    model = nn.Sequential(nn.Linear(64, 31), nn.ReLU(), nn.Linear(31, 16), nn.ReLU(), nn.Linear(16, 10))
    params = {f"net.{k}": v for k, v in maskable_parameters(model).items()}
    generator = torch.Generator().manual_seed(7)
    single = Masking.random(params, 0.2, "uniform", generator, kernel="torch")
    for name, mask in single.items():
        assert torch.equal(mask, runs["static"][0]["full_masks"][name]), name


@pytest.mark.slow
def test_resume_under_fsdp2_continues_like_the_uninterrupted_run(runs):
    full, resumed = runs["resume"]["full"], runs["resume"]["resumed"]
    assert full["state"]["num_updates"] == resumed["state"]["num_updates"] == 2
    for name, mask in full["state"]["masks"].items():
        assert torch.equal(mask, resumed["state"]["masks"][name]), name
    for name, value in full["weights"].items():
        assert torch.equal(value, resumed["weights"][name]), name


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_on_one_process(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,))
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    fully_shard(model, mesh=mesh)
    assert isinstance(model[0].weight, DTensor)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="set", init="uniform", seed=0, mask_kernel="torch")
    assert sparsifier.masking.active == [24, 9]
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
    sparsifier.update()
    assert sparsifier.masking.active == [24, 9] == [int(m.sum()) for m in sparsifier.masks.values()]
    for name, mask in sparsifier.masks.items():
        weight = dict(model.named_parameters())[name].to_local()
        assert int((weight.detach()[~mask] != 0).sum()) == 0


def test_dst_on_fsdp2_needs_thresholds_attached_before_sharding(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    fully_shard(plain, mesh=mesh)
    with pytest.raises(ValueError, match=r"layer\(s\) \['0.weight', '2.weight'\] have no DST thresholds.*before `fully_shard`"):
        Sparsifier(plain, torch.optim.SGD(plain.parameters(), lr=0.1), algorithm="dst")
    assert not any("threshold" in n for n, _ in plain.named_parameters())  # nothing attached by the refusal

    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    thresholds = attach_dst_thresholds(model)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(t.threshold, DTensor) for t in thresholds.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sparsifier = Sparsifier(model, optimizer, algorithm="dst")
    assert sparsifier.names == ["0.weight", "2.weight"]
    with torch.no_grad():
        for t in thresholds.values():
            t.threshold.fill_(0.2)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
    masks = dict(sparsifier.masks)
    densities = sparsifier.densities()
    for name, mask in masks.items():
        assert densities[name] == int(mask.sum()) / mask.numel()
    assert densities["0.weight"] < 1.0
    sparsifier.finish()  # FSDP2 keeps the parametrization; the raw weights are zeroed outside the masks
    for name, mask in masks.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        raw = module.parametrizations.weight.original.to_local()
        assert torch.equal(sparsifier.masks[name], mask)
        assert int((raw.detach()[~mask] != 0).sum()) == 0 and bool((raw.detach()[mask] != 0).all())
