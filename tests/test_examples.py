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
