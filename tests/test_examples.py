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


VIT = Path(__file__).resolve().parents[1] / "examples" / "vit_fashion_mnist.py"


def test_vit_fashion_mnist_density_groups_run(tmp_path):
    import re
    import subprocess

    args = ["--epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "1",
            "--limit-test-batches", "1", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run([sys.executable, str(VIT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for method in ("dense", "rigl", "sparse_momentum"):
        assert re.search(rf"^{method}: test error \d+\.\d\d% \(1000 test images\)$", out, re.M), out
        assert re.search(rf"^{method}: run time \d+\.\d s \(fit \d+\.\d s, median training epoch", out, re.M), out
        assert (tmp_path / method / "version_0" / "metrics.csv").exists()
    assert re.search(r"^dense: empty attention heads n/a$", out, re.M), out  # no callback, no metric
    # 4 blocks x (qkv 64x192 + proj 64x64) = 65536 attention weights, as many in the MLPs
    assert re.search(r"^dense: density '\*\.attn\.\*' 1\.0000 \(65536/65536\), '\*' 1\.0000 \(65536/65536\)", out, re.M)
    for method in ("rigl", "sparse_momentum"):
        # the callback's sparse/empty_heads/net.blocks.N.attn, N = 0..3
        heads = rf"^{method}: empty attention heads \d\.\d{{3}} \(mean over 4 attention modules: "
        assert re.search(heads, out, re.M), out
        line = re.search(rf"^{method}: density '\*\.attn\.\*' 0\.1\d+ \((\d+)/65536\), '\*' 0\.0\d+ \((\d+)/65536\),"
                         r" overall 0\.\d+ \(\d+/131072\)$", out, re.M)  # fmt: skip
        assert line, out
        attention, mlp = int(line[1]), int(line[2])
        assert abs(attention - 0.15 * 65536) <= 4 and abs(mlp - 0.05 * 65536) <= 4  # rounding, at most 0.5 per layer
