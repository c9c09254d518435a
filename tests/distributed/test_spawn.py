"""``ddp_spawn``: the main process gets back the trained sparse model and the callback's masks (one launch of
spawn_run.py, which fits once per algorithm)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ALGORITHMS = ("set", "dst")


@pytest.fixture(scope="module")
def spawn_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spawn")
    script = Path(__file__).with_name("spawn_run.py")
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--algorithms", *ALGORITHMS],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ddp_spawn_returns_the_trained_sparse_model_and_masks(spawn_dir, algorithm):
    result = torch.load(spawn_dir / f"{algorithm}.pt", weights_only=True)
    masks, weights = result["masks"], result["weights"]
    assert set(masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert set(weights) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}  # plain keys
    for name, mask in masks.items():
        assert int((weights[name][~mask] != 0).sum()) == 0, name  # the main process holds the sparse weights
        assert not torch.equal(weights[name], result["initial"][name])  # ... and they were trained
    if algorithm == "set":
        assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * (64 * 32 + 32 * 16 + 16 * 10))
        assert result["state"]["num_updates"] == 1
        assert all(torch.equal(result["state"]["masks"][k], m) for k, m in masks.items())
    else:
        assert 0 < sum(int(m.sum()) for m in masks.values()) < 64 * 32 + 32 * 16 + 16 * 10
