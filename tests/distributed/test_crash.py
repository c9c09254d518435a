"""A fit killed mid-epoch (SIGKILL) and resumed from ModelCheckpoint's last.ckpt ends like the uninterrupted one.

One launch of ``crash_run.py`` runs every fit of this file (module-scoped); the tests read its outputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

CRASH = Path(__file__).with_name("crash_run.py")
ALGORITHMS = ["sparse_momentum", "set"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash")
    proc = subprocess.run([sys.executable, str(CRASH), "--out", str(out), "--algorithms", *ALGORITHMS],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_killed_mid_epoch_and_resumed_ends_like_the_uninterrupted_run(out, algorithm):
    killed = torch.load(out / algorithm / "killed.pt", weights_only=True)
    assert killed["exit_code"] == -9  # SIGKILL: nothing ran after the kill
    assert killed["last_ckpt"] and not killed["result"]
    a = torch.load(out / algorithm / "full" / "result.pt", weights_only=True)
    b = torch.load(out / algorithm / "crash" / "result.pt", weights_only=True)
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    for key in ("prune_rate", "last_update_step", "num_updates"):
        assert a["state"][key] == b["state"][key], key
    assert torch.equal(a["state"]["generator_state"], b["state"]["generator_state"])
