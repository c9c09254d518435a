"""The examples run end to end (a few batches)."""

import sys
from pathlib import Path

import pytest

# The data come from Debian's dataset-fashion-mnist, which .ci/setup installs: a missing file fails the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import fashion_mnist  # noqa: E402


def test_read_idx_shapes():
    test = fashion_mnist.load_fashion_mnist("test")
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert test.tensors[1].shape == (10000,) and int(test.tensors[1].max()) == 9


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_fashion_mnist_sparse_runs(model, tmp_path):
    result = fashion_mnist.run(model=model, density=0.05, epochs=2, limit_train_batches=5, default_root_dir=tmp_path)
    assert result["final_density"] <= 0.05 + 1e-3
    assert 0.0 <= result["test_error"] <= 100.0
    assert len(result["epoch_times"]) == 2


def test_fashion_mnist_dense_runs(tmp_path):
    result = fashion_mnist.run(model="lenet300", algorithm=None, epochs=1, limit_train_batches=5, default_root_dir=tmp_path)
    assert result["final_density"] == 1.0


IMAGENET = Path(__file__).resolve().parents[1] / "examples" / "imagenet.py"


def test_imagenet_fake_data_runs_under_ddp_and_resumes(tmp_path):
    import subprocess

    import torch

    common = ["--fake-data", "--accelerator", "cpu", "--devices", "2", "--batch-size", "8", "--workers", "0",
              "--image-size", "32", "--root", str(tmp_path), "--checkpoint-every", "2"]
    first = subprocess.run([sys.executable, str(IMAGENET), *common, "--max-steps", "3"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "step.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("SparseTrainingCallback")]
    masks = state["masks"]
    assert len(masks) == 54 and "net.conv1.weight" in masks  # every conv and the fc of ResNet-50
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.1 * total, abs=len(masks))
    resumed = subprocess.run([sys.executable, str(IMAGENET), *common, "--max-steps", "5", "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
