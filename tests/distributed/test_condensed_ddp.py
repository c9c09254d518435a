"""``compute="condensed"`` under DDP with 2 CPU processes (gloo, ``accelerator="cpu", strategy="ddp"``): the masks
agree on both ranks after every step and equal those of the ``compute="dense"`` run, and so do the weights (float
tolerance). One launch of ``ddp_run.py`` runs both fits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")

pytestmark = pytest.mark.slow


def test_condensed_ddp_equals_dense_ddp(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--runs", "rigl:fanin", "rigl:condensed"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {
        tag: [torch.load(tmp_path / f"rigl_{tag}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        for tag in ("fanin", "condensed")
    }
    (dense0, dense1), (cond0, cond1) = runs["fanin"], runs["condensed"]
    assert cond0["world_size"] == 2 and cond0["num_updates"] == dense0["num_updates"] > 0
    for snapshots in zip(dense0["masks"], dense1["masks"], cond0["masks"], cond1["masks"]):
        for name in snapshots[0]:
            assert all(torch.equal(snapshots[0][name], other[name]) for other in snapshots[1:]), name
    for name, weight in dense0["weights"].items():
        assert torch.equal(cond0["weights"][name], cond1["weights"][name]), name  # DDP: replicas stay equal
        assert torch.allclose(cond0["weights"][name], weight, rtol=1e-4, atol=1e-5), name
