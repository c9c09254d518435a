"""DDP with 2 CPU processes (gloo), the code path Lightning uses on GPUs: masks agree on every process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


def _launch(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("algorithm", ["sparse_momentum", "rigl", "set", "dsr", "snip"])
def test_masks_identical_on_both_ranks_after_every_update(tmp_path, algorithm):
    _launch(tmp_path, "--algorithm", algorithm)
    rank0 = torch.load(tmp_path / f"{algorithm}_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / f"{algorithm}_rank1.pt", weights_only=True)
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


def test_neuron_ablation_under_ddp_gives_the_same_masks_on_both_ranks(tmp_path):
    from lightning_sparse.functional.patterns import check_pattern, unit_counts

    proc = _launch(tmp_path, "--algorithm", "rigl", "--ablation")
    assert "differ across processes" not in proc.stderr + proc.stdout
    rank0 = torch.load(tmp_path / "rigl_ablation_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rigl_ablation_rank1.pt", weights_only=True)
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


def test_diverging_masks_are_replaced_by_rank_zeros(tmp_path):
    proc = _launch(tmp_path, "--algorithm", "sparse_momentum", "--diverge")
    rank0 = torch.load(tmp_path / "sparse_momentum_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "sparse_momentum_rank1.pt", weights_only=True)
    assert "differ across processes; taking rank zero's" in proc.stderr + proc.stdout
    last0, last1 = rank0["masks"][-1], rank1["masks"][-1]
    assert all(torch.equal(last0[k], last1[k]) for k in last0)
