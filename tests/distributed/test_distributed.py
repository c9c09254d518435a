"""DDP with 2 CPU processes (gloo), the code path Lightning uses on GPUs: masks agree on every process.

One launch of ``ddp_run.py`` runs every fit of this file (module-scoped); the tests read its outputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_sparse.functional.patterns import check_pattern, unit_counts

SCRIPT = Path(__file__).with_name("ddp_run.py")
ALGORITHMS = ["sparse_momentum", "rigl", "set", "dsr", "snip", "granet", "mest", "topkast"]
RUNS = [*ALGORITHMS, "rigl:ablation", "sparse_momentum:diverge", "dst:late"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--runs", *RUNS], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = [run.replace(":", "_") for run in RUNS]
    return {tag: [torch.load(out / f"{tag}_rank{r}.pt", weights_only=True) for r in (0, 1)] for tag in tags}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_masks_identical_on_both_ranks_after_every_update(runs, algorithm):
    rank0, rank1 = runs[algorithm]
    assert rank0["world_size"] == 2
    assert len(rank0["masks"]) == len(rank1["masks"]) == 3 * (6 + 1)  # 3 epochs x (6 steps + epoch end)
    for step, (a, b) in enumerate(zip(rank0["masks"], rank1["masks"])):
        for name in a:
            assert torch.equal(a[name], b[name]), f"{algorithm}: {name} differs after snapshot {step}"
    changes = sum(
        any(not torch.equal(x[k], y[k]) for k in x) for x, y in zip(rank0["masks"], rank0["masks"][1:])
    )
    if algorithm != "snip":
        assert rank0["num_updates"] >= 2 and changes >= 2  # the masks really moved
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
    assert rank0["explored"] == rank1["explored"]  # ITOP's R_s: the same record on both ranks
    for name, explored in rank0["explored_state"].items():
        assert torch.equal(explored, rank1["explored_state"][name])
        assert torch.equal(explored | rank0["masks"][-1][name], explored)  # it holds the current mask


def test_neuron_ablation_under_ddp_gives_the_same_masks_on_both_ranks(runs):
    rank0, rank1 = runs["rigl_ablation"]
    assert not any("differ across processes" in w for w in rank0["warnings"] + rank1["warnings"])
    assert rank0["num_updates"] >= 2
    emptied = 0
    for a, b in zip(rank0["masks"], rank1["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
            assert check_pattern(a[name], "fan_in", empty_rows=True)
            emptied += int((unit_counts(a[name], "fan_in") == 0).sum())
    assert emptied > 0
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name


def test_diverging_masks_are_replaced_by_rank_zeros(runs):
    rank0, rank1 = runs["sparse_momentum_diverge"]
    assert any("differ across processes; taking rank zero's" in w for w in rank0["warnings"] + rank1["warnings"])
    last0, last1 = rank0["masks"][-1], rank1["masks"][-1]
    assert all(torch.equal(last0[k], last1[k]) for k in last0)


def test_dst_with_layers_built_in_configure_model_trains_under_ddp(runs):
    # the thresholds are attached right after `configure_model`, before DDP wraps the model (attached later, the
    # weights' gradients were cut off DDP's averaging: Lightning's unused-parameter error)
    rank0, rank1 = runs["dst_late"]
    assert rank0["world_size"] == 2 and len(rank0["masks"]) == 3 * (6 + 1)
    for a, b in zip(rank0["masks"], rank1["masks"]):
        assert all(torch.equal(a[name], b[name]) for name in a)
    last = rank0["masks"][-1]
    assert set(last) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert 0 < sum(int(m.sum()) for m in last.values()) < sum(m.numel() for m in last.values())  # it learned
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
