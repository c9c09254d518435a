"""The examples run end to end (a few batches)."""

import sys
from pathlib import Path

import pytest

# The data come from Debian's dataset-fashion-mnist, which .ci/setup installs: a missing file fails the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import fashion_mnist  # noqa: E402


def test_read_idx_shapes():
    test = fashion_mnist.load_fashion_mnist("test")
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert test.tensors[1].shape == (10000,) and int(test.tensors[1].max()) == 9


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1"]  # fmt: skip


@pytest.mark.slow  # the paper-parity configs on Fashion-MNIST, three runs
@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_fashion_mnist_sparse_runs(net, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setattr(sys, "argv", ["fashion_mnist.py"])  # the CLI parses `args`, not pytest's command line
    config = EXAMPLES / "configs" / f"fashion_mnist_{net}.yaml"  # the paper-parity run, sparse momentum at 5 %
    args = ["--config", str(config), *TINY, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path)]
    result = fashion_mnist.main(args)
    assert result["final_density"] <= 0.05 + 1e-3
    assert 0.0 <= result["test_error"] <= 100.0
    assert len(result["epoch_times"]) == 2
    # the default logger: one directory per run, named by net and method, versioned
    log_dir = tmp_path / f"{net}_sparse_momentum_0.05" / "version_0"
    assert Path(result["log_dir"]) == log_dir
    assert list(log_dir.glob("events.out.tfevents.*")) and (log_dir / "sparsity.png").exists()
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["net"] == net and saved["model"]["lr_milestones"] == [0.5, 0.75]
    assert saved["trainer"]["max_epochs"] == 2  # the command line over the config
    out = capsys.readouterr().out
    assert f"{net} on Fashion-MNIST, sparse_momentum at density 0.05, 2 epochs, seed 0: test error" in out
    assert f"final density {result['final_density']:.4f}" in out
    if net == "lenet300":
        fashion_mnist.main(args)  # the same command again: a new version, nothing overwritten
        assert (log_dir.parent / "version_1" / "sparsity.png").exists()


def test_fashion_mnist_dense_runs(tmp_path, monkeypatch):
    import csv

    monkeypatch.setattr(sys, "argv", ["fashion_mnist.py"])
    config = EXAMPLES / "configs" / "fashion_mnist_lenet300.yaml"
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    result = fashion_mnist.main(["--config", str(config), *TINY, "--trainer.callbacks", "[]", *logger])  # no callback
    assert result["final_density"] == 1.0 and result["method"] == "dense"
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert Path(result["log_dir"]) == metrics.parent
    rows = list(csv.DictReader(metrics.open()))
    assert any(row["val/acc"] for row in rows) and any(row["test/acc"] for row in rows)


@pytest.mark.slow  # a Fashion-MNIST run
def test_fashion_mnist_run_function(tmp_path):  # the benchmarks' entry point
    result = fashion_mnist.run(model="lenet5", epochs=2, limit_train_batches=3, limit_val_batches=1,
                               limit_test_batches=1, default_root_dir=tmp_path)  # fmt: skip
    assert result["final_density"] <= 0.05 + 1e-3 and len(result["epoch_times"]) == 2


IMAGENET = EXAMPLES / "imagenet.py"


@pytest.mark.slow  # two launches of a 2-process DDP run (the resume is a second command)
def test_imagenet_fake_data_runs_under_ddp_and_resumes(tmp_path):
    import re
    import subprocess

    import torch

    common = ["fit", "--config", str(EXAMPLES / "configs" / "imagenet_resnet50.yaml"), "--data.fake_data", "true",
              "--data.image_size", "32", "--data.num_classes", "10", "--data.fake_size", "8", "--data.batch_size", "4",
              "--data.workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks.figure", "false",
              "--checkpoint.monitor", "step", "--checkpoint.save_top_k", "1",  # keep the newest epoch only
              "--ckpt_path", "last"]  # fmt: skip
    # 8 images, 4 per process and step on 2 processes: one step per epoch
    first = subprocess.run([sys.executable, str(IMAGENET), *common, "--trainer.max_epochs", "1"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "resnet50_sparse_momentum_0.1" / "seed_0"  # named by method, density and seed
    checkpoints = run_dir / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert len(names) == 2 and re.fullmatch(r"epoch=0-top1=\d\.\d{4}\.ckpt", names[0]) and names[1] == "last.ckpt"
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "config.yaml").exists()
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 1
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("SparseTrainingCallback")]
    masks = state["masks"]
    assert len(masks) == 54 and "net.conv1.weight" in masks  # every conv and the fc of ResNet-50
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.1 * total, abs=len(masks))
    assert state["num_updates"] == 0  # the update after epoch 0 runs at the next epoch's first step
    # the same command with one more epoch continues from last.ckpt
    resumed = subprocess.run([sys.executable, str(IMAGENET), *common, "--trainer.max_epochs", "2"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    names = sorted(p.name for p in checkpoints.iterdir())  # bounded: epoch 0's is gone
    assert len(names) == 2 and names[0].startswith("epoch=1-top1=") and names[1] == "last.ckpt"
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("SparseTrainingCallback")]
    assert state["num_updates"] == 1


def test_imagenet_lr_schedule():
    import imagenet

    # 10 steps per epoch; 2 epochs of linear warm-up from 0.01 x lr, then x0.1 at epochs 3 and 5
    step = imagenet.ImageNetClassifier(arch="resnet18", num_classes=10, warmup_epochs=2, milestones=[3, 5])
    factors = [step.lr_factor(s, 10, 80) for s in (0, 10, 19, 20, 29, 30, 49, 50, 79)]
    assert factors == pytest.approx([0.01, 0.505, 0.9505, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    cosine = imagenet.ImageNetClassifier(arch="resnet18", num_classes=10, warmup_epochs=1, schedule="cosine")
    factors = [cosine.lr_factor(s, 10, 110) for s in (5, 10, 60, 110)]
    assert factors == pytest.approx([0.505, 1.0, 0.5, 0.0])
    assert imagenet.ImageNetClassifier(arch="resnet18", num_classes=10).lr_factor(0, 10, 100) == 1.0  # the paper's


def test_imagenet_slurm_script_parses():
    import subprocess

    script = EXAMPLES / "slurm" / "imagenet.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    text = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --ntasks-per-node="):
        assert line in text
    assert "srun python examples/imagenet.py fit" in text and "--trainer.num_nodes" in text


VIT = Path(__file__).resolve().parents[2] / "examples" / "vit_fashion_mnist.py"


@pytest.mark.slow  # a process training three ViTs
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
