"""The examples run end to end (a few batches)."""

import sys
from pathlib import Path

import pytest

# The data come from Debian's dataset-fashion-mnist, which .ci/setup installs: a missing file fails the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import fashion_mnist  # noqa: E402


@pytest.fixture
def threads(monkeypatch):
    """The examples set torch's thread count and OMP_NUM_THREADS (--threads): put both back afterwards."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored (or removed) at the end
    monkeypatch.setattr(sys, "argv", ["example.py"])  # the CLIs parse `args`, not pytest's command line
    yield
    torch.set_num_threads(before)


def test_read_idx_shapes():
    test = fashion_mnist.load_fashion_mnist("test")
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert test.tensors[1].shape == (10000,) and int(test.tensors[1].max()) == 9


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# one validation batch (of 1000, out of 6) and one test batch (1000 of 10000) as fractions: the command line reads
# "1" as 1.0 (every batch) in some environments (typing caches Union[int, float] and Union[float, int] as one object,
# in whichever order a process built it first; docs/examples.md), never 0.2 or 0.1
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0.2",
        "--trainer.limit_test_batches", "0.1"]  # fmt: skip


@pytest.mark.slow  # the paper-parity configs on Fashion-MNIST, three runs
@pytest.mark.parametrize("net", ["lenet300", "lenet5"])
def test_fashion_mnist_sparse_runs(net, tmp_path, capsys, threads):
    import re

    import yaml

    config = EXAMPLES / "configs" / f"fashion_mnist_{net}.yaml"  # the paper-parity run, sparse momentum at 5 %
    args = ["fit", "--config", str(config), *TINY, "--trainer.max_epochs", "2",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    result = fashion_mnist.main(args).result
    assert result["final_density"] <= 0.05 + 1e-3
    assert 0.0 <= result["test_error"] <= 100.0
    assert len(result["epoch_times"]) == 2
    # the default logger: one directory per set of options, named by net, method, seed and the options' hash
    log_dir = Path(result["log_dir"])
    assert log_dir.parent == tmp_path / f"{net}_sparse_momentum_0.05" and re.fullmatch(r"seed_0-[0-9a-f]{8}", log_dir.name)
    assert list(log_dir.glob("events.out.tfevents.*")) and (log_dir / "sparsity.png").exists()
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["net"] == net and saved["model"]["lr_milestones"] == [0.5, 0.75]
    assert saved["trainer"]["max_epochs"] == 2  # the command line over the config
    out = capsys.readouterr().out
    assert f"{net} on Fashion-MNIST, sparse_momentum at density 0.05, 2 epochs, seed 0: test error" in out
    assert f"final density {result['final_density']:.4f}" in out
    if net == "lenet300":
        assert Path(fashion_mnist.main(args).result["log_dir"]) == log_dir  # the same options: the same directory
        other = fashion_mnist.main([*args, "--seed_everything", "1"]).result["log_dir"]
        assert Path(other).parent == log_dir.parent and Path(other).name.startswith("seed_1-")


def test_fashion_mnist_fit_prints_the_test_error(tmp_path, capsys, threads):
    import csv

    config = EXAMPLES / "configs" / "fashion_mnist_lenet300.yaml"
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    cli = fashion_mnist.main(["fit", "--config", str(config), *TINY, "--trainer.callbacks", "[]", *logger])  # dense
    result = cli.result
    assert result["final_density"] == 1.0 and result["method"] == "dense"
    metrics = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    assert Path(result["log_dir"]) == metrics.parent
    rows = list(csv.DictReader(metrics.open()))
    assert any(row["val/acc"] for row in rows) and any(row["test/acc"] for row in rows)  # fit ends with test
    out = capsys.readouterr().out
    assert f"lenet300 on Fashion-MNIST, dense, 1 epoch, seed 0: test error {result['test_error']:.2f}%" in out
    assert "final density 1.0000" in out


def test_threads_option_sets_torchs_thread_count(tmp_path, threads):
    import os

    import _cli
    import torch

    validate = ["validate", "--trainer.limit_val_batches", "0.2", "--trainer.default_root_dir", str(tmp_path)]
    fashion_mnist.main([*validate, "--threads", "3"])
    assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"  # DDP's processes keep it
    os.environ.pop("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    fashion_mnist.main(validate)  # the default: 1 thread on at most 2 cores, else torch's
    assert torch.get_num_threads() == (1 if _cli.available_cores() <= 2 else 2)


@pytest.mark.parametrize("example", ["fashion_mnist", "imagenet", "vit_fashion_mnist"])
def test_a_bad_option_gives_lightningclis_error(example, capsys, threads):
    import importlib

    main = importlib.import_module(example).main
    for args in (["fit", "--model.no_such_option", "1"], ["fit", "--threads", "many"], ["--trainer.max_epochs", "1"]):
        with pytest.raises(SystemExit) as exit:
            main(args)
        assert exit.value.code == 2
        assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the former argparse options of the ViT example
        main(["fit", "--epochs", "1"])
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow  # a Fashion-MNIST run
def test_fashion_mnist_run_function(tmp_path):  # the benchmarks' entry point
    result = fashion_mnist.run(model="lenet5", epochs=2, limit_train_batches=3, limit_val_batches=1,
                               limit_test_batches=1, default_root_dir=tmp_path)  # fmt: skip
    assert result["final_density"] <= 0.05 + 1e-3 and len(result["epoch_times"]) == 2


IMAGENET = EXAMPLES / "imagenet.py"


# a squeezenet on 4 fake 32x32 images, one training and one validation batch: about a second a run
TINY_IMAGENET = ["--config", str(EXAMPLES / "configs" / "imagenet_resnet50.yaml"), "--model.arch", "squeezenet1_1",
                 "--data.fake_data", "true", "--data.image_size", "32", "--data.num_classes", "10",
                 "--data.fake_size", "4", "--data.batch_size", "2", "--data.workers", "0",
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                 "--trainer.limit_train_batches", "0.5",  # of 2 batches (not "1": see TINY); validation: 1 batch
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.callbacks.figure", "false", "--trainer.callbacks.table", "false"]  # fmt: skip


def test_imagenet_run_directories_follow_the_options(tmp_path, monkeypatch, threads):
    import re

    import imagenet
    import torch

    args = ["fit", *TINY_IMAGENET, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2"]
    # the first run stops after its first epoch, as if it had been killed: last.ckpt is epoch 0's
    stop = lambda module: setattr(module.trainer, "should_stop", True)  # noqa: E731
    monkeypatch.setattr(imagenet.ImageNetClassifier, "on_train_epoch_end", stop, raising=False)
    first = imagenet.main([*args, "--ckpt_path", "last"]).trainer  # nothing to resume: starts afresh
    run_dir = Path(first.log_dir)
    assert run_dir.parent == tmp_path / "squeezenet1_1_sparse_momentum_0.1"
    assert re.fullmatch(r"seed_0-[0-9a-f]{8}", run_dir.name) and first.global_step == 1
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "config.yaml").exists()
    # other options, another directory: another density; another option of the recipe (the same name, another hash)
    for other, name in ((["--trainer.callbacks.density", "0.2"], "squeezenet1_1_sparse_momentum_0.2"),
                        (["--model.label_smoothing", "0.1"], "squeezenet1_1_sparse_momentum_0.1")):  # fmt: skip
        trainer = imagenet.main([*args, *other, "--ckpt_path", "last"]).trainer
        assert Path(trainer.log_dir).parent.name == name and Path(trainer.log_dir) != run_dir
        assert trainer.ckpt_path is None and trainer.global_step == 1  # the first run's last.ckpt is not theirs
    # the same options (and --ckpt_path last, --threads, the progress bar aside): the same directory, resumed
    monkeypatch.undo()
    resumed = imagenet.main([*args, "--ckpt_path", "last", "--threads", "1"]).trainer
    assert Path(resumed.log_dir) == run_dir and Path(resumed.ckpt_path).parent == run_dir / "checkpoints"
    assert resumed.global_step == 2 and resumed.current_epoch == 2
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


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
              "--threads", "1"]  # fmt: skip
    # 8 images, 4 per process and step on 2 processes: one step per epoch
    first = subprocess.run([sys.executable, str(IMAGENET), *common, "--trainer.max_epochs", "1", "--ckpt_path", "last"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "resnet50_sparse_momentum_0.1").iterdir()  # named by method, density, seed, options
    assert re.fullmatch(r"seed_0-[0-9a-f]{8}", run_dir.name)
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
    # one more epoch is another run (another directory), continued from the first one's last.ckpt
    resumed = subprocess.run([sys.executable, str(IMAGENET), *common, "--trainer.max_epochs", "2",
                              "--ckpt_path", str(checkpoints / "last.ckpt")],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    (second,) = {p for p in (tmp_path / "resnet50_sparse_momentum_0.1").iterdir()} - {run_dir}
    names = sorted(p.name for p in (second / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("epoch=1-top1=") and names[1] == "last.ckpt"
    assert len(list(checkpoints.iterdir())) == 2  # the first run's are untouched
    checkpoint = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
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


VIT = EXAMPLES / "vit_fashion_mnist.py"


def test_vit_fashion_mnist_fit(tmp_path, capsys, threads):
    import re

    import vit_fashion_mnist

    cli = vit_fashion_mnist.main(["fit", *TINY, "--model.method", "rigl", "--trainer.default_root_dir", str(tmp_path)])
    log_dir = Path(cli.result["log_dir"])
    assert log_dir.parent == tmp_path / "vit_rigl_attn0.15_mlp0.05" and re.fullmatch(r"seed_0-[0-9a-f]{8}", log_dir.name)
    out = capsys.readouterr().out
    assert re.search(r"^rigl: test error \d+\.\d\d% \(1000 test images\)$", out, re.M), out
    line = re.search(r"^rigl: density '\*\.attn\.\*' 0\.1\d+ \((\d+)/65536\), '\*' 0\.0\d+ \((\d+)/65536\),", out, re.M)
    assert line and abs(int(line[1]) - 0.15 * 65536) <= 4 and abs(int(line[2]) - 0.05 * 65536) <= 4, out


@pytest.mark.slow  # three processes, each training a ViT
def test_vit_fashion_mnist_density_groups_run(tmp_path):
    import re
    import subprocess

    args = ["fit", *TINY, "--threads", "1", "--trainer.default_root_dir", str(tmp_path)]
    for method in ("dense", "rigl", "sparse_momentum"):
        done = subprocess.run([sys.executable, str(VIT), *args, "--model.method", method],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout
        assert re.search(rf"^{method}: test error \d+\.\d\d% \(1000 test images\)$", out, re.M), out
        assert re.search(rf"^{method}: run time \d+\.\d s \(fit \d+\.\d s, median training epoch", out, re.M), out
        name = "vit_dense" if method == "dense" else f"vit_{method}_attn0.15_mlp0.05"
        (log_dir,) = (tmp_path / name).iterdir()
        assert list(log_dir.glob("events.out.tfevents.*")) and (log_dir / "config.yaml").exists()
        if method == "dense":
            assert re.search(r"^dense: empty attention heads n/a$", out, re.M), out  # no callback, no metric
            # 4 blocks x (qkv 64x192 + proj 64x64) = 65536 attention weights, as many in the MLPs
            dense = r"^dense: density '\*\.attn\.\*' 1\.0000 \(65536/65536\), '\*' 1\.0000 \(65536/65536\)"
            assert re.search(dense, out, re.M), out
            continue
        # the callback's sparse/empty_heads/net.blocks.N.attn, N = 0..3
        heads = rf"^{method}: empty attention heads \d\.\d{{3}} \(mean over 4 attention modules: "
        assert re.search(heads, out, re.M), out
        line = re.search(rf"^{method}: density '\*\.attn\.\*' 0\.1\d+ \((\d+)/65536\), '\*' 0\.0\d+ \((\d+)/65536\),"
                         r" overall 0\.\d+ \(\d+/131072\)$", out, re.M)  # fmt: skip
        assert line, out
        attention, mlp = int(line[1]), int(line[2])
        assert abs(attention - 0.15 * 65536) <= 4 and abs(mlp - 0.05 * 65536) <= 4  # rounding, at most 0.5 per layer
