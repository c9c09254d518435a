"""LeNet-300-100 and LeNet-5 on Fashion-MNIST, dense or sparse from scratch, on LightningCLI.

The paper's MNIST setup (Dettmers & Zettlemoyer 2019, section 3.3) is the default: SGD with Nesterov momentum 0.9,
learning rate 0.1 decayed by 10x every 25000 mini-batches, weight decay 5e-4, batch size 100, 10% of the training
set held out for validation; test error of the last epoch. Every option of the Trainer (``--trainer.*``, the
logger included), the model (``--model.*``), the data (``--data.*``) and the callbacks comes from the command
line or a YAML file (``--config``). Without a callback the network trains dense; the sparse method is
``lightning_sparse.SparseTrainingCallback``, added as any Lightning callback. ``fit`` ends by testing the final
model and prints the test error and the final density (``validate`` and ``test`` are LightningCLI's).

The command line is the one the three examples share (``examples/_cli.py``): ``--threads N`` (default: 1 on a
machine with at most 2 cores, torch's choice otherwise), and each run logs to TensorBoard (CSV files when
tensorboard is not installed) in its own directory, named by the options that distinguish it,
``runs/fashion_mnist/<net>_<method>/seed_<seed>-<hash>/`` (``<hash>``: of every other option), so different
options never share a directory (``--trainer.logger`` replaces it; ``--trainer.default_root_dir`` moves it).

The data are read offline from Debian's ``dataset-fashion-mnist`` package (idx files under
/usr/share/datasets/fashion-mnist/); nothing is downloaded.

    # LeNet-300-100 at 5 % weights (sparse momentum), 10 epochs
    python examples/fashion_mnist.py fit --model.net lenet300 \\
        --trainer.callbacks+=lightning_sparse.SparseTrainingCallback --trainer.callbacks.density 0.05 \\
        --trainer.max_epochs 10
    # LeNet-5, dense (no sparse callback), on 2 threads
    python examples/fashion_mnist.py fit --model.net lenet5 --trainer.max_epochs 10 --threads 2
    # the paper-parity benchmark's run (20 epochs, lr /10 at 1/2 and 3/4), with RigL instead of sparse momentum
    python examples/fashion_mnist.py fit --config examples/configs/fashion_mnist_lenet300.yaml \\
        --trainer.callbacks.algorithm rigl
    python examples/fashion_mnist.py fit --help              # every option; --print_config shows a full YAML
    python examples/fashion_mnist.py fit --trainer.callbacks.help lightning_sparse.SparseTrainingCallback
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_sparse import SparseTrainingCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ExampleCLI, method_name, sparse_callbacks  # noqa: E402  (the examples' shared command line)

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {data_dir}: install Debian's package with"
        " `apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR"
    )


def load_fashion_mnist(split: str, data_dir: Path = DATA_DIR) -> TensorDataset:
    """The ``"train"`` (60000) or ``"test"`` (10000) split as normalized float images [N, 1, 28, 28]."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"))
    x = (torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


class LeNet300100(nn.Sequential):
    """LeNet-300-100: a 784-300-100-10 MLP."""

    def __init__(self) -> None:
        super().__init__(
            nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )


class LeNet5(nn.Sequential):
    """LeNet-5 (Caffe variant, as in SNIP and the sparse momentum paper): conv 20@5x5, conv 50@5x5, fc 500."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(),
            nn.Linear(500, 10),
        )


MODELS = {"lenet300": LeNet300100, "lenet5": LeNet5}


class ClassifierSteps(L.LightningModule):
    """The steps of a 10-class Fashion-MNIST classifier ``self.net`` (set by the subclass): cross-entropy
    training loss, torchmetrics accuracy on validation and test. Shared with ``vit_fashion_mnist.py``."""

    def __init__(self) -> None:
        super().__init__()
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)


class Classifier(ClassifierSteps):
    """Cross-entropy classifier with the paper's optimizer and torchmetrics accuracy.

    Args:
        net: ``"lenet300"`` (LeNet-300-100) or ``"lenet5"`` (LeNet-5, Caffe variant).
        lr: SGD's learning rate.
        momentum: SGD's momentum.
        nesterov: Nesterov momentum.
        weight_decay: SGD's weight decay.
        lr_step: multiply the learning rate by ``lr_gamma`` every that many optimizer steps (the paper: 25000);
            ``None``: constant. Ignored when ``lr_milestones`` is given.
        lr_milestones: multiply the learning rate by ``lr_gamma`` at each of these fractions of training (of
            ``trainer.estimated_stepping_batches``), e.g. ``[0.5, 0.75]``.
        lr_gamma: the decay factor.
    """

    def __init__(
        self,
        net: Literal["lenet300", "lenet5"] = "lenet300",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        lr_step: int | None = 25000,
        lr_milestones: list[float] | None = None,
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if net not in MODELS:
            raise ValueError(f"`net` can be {', '.join(sorted(MODELS))}, got {net!r}")
        if lr_milestones is not None and not all(0.0 < f <= 1.0 for f in lr_milestones):
            raise ValueError(f"`lr_milestones` are fractions of training in (0, 1], got {lr_milestones}")
        self.save_hyperparameters()
        self.net = MODELS[net]()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        if hp.lr_milestones is not None:
            total = self.trainer.estimated_stepping_batches
            milestones = sorted(int(f * total) for f in hp.lr_milestones)
            scheduler: Any = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=hp.lr_gamma)
        elif hp.lr_step:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step, gamma=hp.lr_gamma)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FashionMNIST(L.LightningDataModule):
    """Fashion-MNIST from local idx files: 54000 train / 6000 validation (fixed split) / 10000 test."""

    def __init__(self, batch_size: int = 100, data_dir: Path = DATA_DIR, val_fraction: float = 0.1) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.data_dir = Path(data_dir)
        self.val_fraction = val_fraction

    def setup(self, stage: str) -> None:
        full = load_fashion_mnist("train", self.data_dir)
        n_val = int(len(full) * self.val_fraction)
        self.train_set, self.val_set = random_split(
            full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(0)
        )
        self.test_set = load_fashion_mnist("test", self.data_dir)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)


class EpochTimer(L.Callback):
    """Wall time of each training epoch (training batches only, validation excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self._val_time = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._val_time = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_time += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start - self._val_time)


def final_density(module: nn.Module, callbacks: Sequence[Any]) -> float:
    """Nonzero fraction of the weights the forward pass uses: the sparse callbacks' masked weights (DST's are the
    thresholded ones), or every Linear/Conv2d weight without a sparse callback."""
    sparse = sparse_callbacks(callbacks)
    if sparse:
        weights = []
        for cb in sparse:
            for name in cb.masks:
                owner, _, attribute = name.rpartition(".")
                weights.append(getattr(module.get_submodule(owner), attribute))
    else:
        weights = [m.weight for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    return nonzero / sum(w.numel() for w in weights)


def run(
    model: str = "lenet300",
    density: float | None = 0.05,
    algorithm: str | None = "sparse_momentum",
    epochs: int = 10,
    seed: int = 0,
    batch_size: int = 100,
    lr: float = 0.1,
    limit_train_batches: int | float = 1.0,
    data_dir: Path = DATA_DIR,
    progress_bar: bool = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train and test one model from Python (the benchmarks' entry point; no logger unless ``logger=`` is given);
    ``algorithm=None`` trains dense (no callback). Returns the figures.

    ``density`` is ignored by ``algorithm="dst"``, which learns its density.
    """
    L.seed_everything(seed, workers=True)
    module = Classifier(model, lr=lr)
    timer = EpochTimer()
    callbacks: list[L.Callback] = [timer]
    if algorithm is not None:
        sparse = SparseTrainingCallback(density=None if algorithm == "dst" else density, algorithm=algorithm, seed=seed)
        callbacks.insert(0, sparse)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=trainer_kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_train_batches=limit_train_batches,
        deterministic=True,
        default_root_dir=trainer_kwargs.pop("default_root_dir", "runs/fashion_mnist"),
        **trainer_kwargs,
    )
    data = FashionMNIST(batch_size=batch_size, data_dir=data_dir)
    trainer.fit(module, data)
    test = trainer.test(module, data, verbose=False)[0]
    return {
        "model": model,
        "algorithm": algorithm or "dense",
        "density": density,
        "seed": seed,
        "test_error": 100.0 * (1.0 - test["test/acc"]),
        "final_density": final_density(module, callbacks),
        "epoch_times": timer.times,
    }


class FashionMNISTCLI(ExampleCLI):
    """The examples' CLI (``examples/_cli.py``: ``--threads``, one directory per set of options,
    ``<default_root_dir>/<net>_<method>/seed_<seed>-<hash>/``); ``fit`` ends by testing the final model and printing
    the test error and the final density (``self.result`` holds the figures)."""

    result: dict[str, Any] | None = None

    def model_name(self) -> str:
        return self.model.hparams.net

    def after_fit(self) -> None:
        trainer, module = self.trainer, self.model
        timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
        test = trainer.test(module, self.datamodule, verbose=False)[0]
        sparse = sparse_callbacks(trainer.callbacks)
        self.result = result = {
            "model": module.hparams.net,
            "method": method_name(sparse),
            "seed": self.config["fit"]["seed_everything"],
            "test_error": 100.0 * (1.0 - test["test/acc"]),
            "final_density": final_density(module, sparse),
            "epoch_times": timer.times,
            "log_dir": trainer.log_dir,
        }
        kind = ", ".join(
            f"{c.algorithm_name} at density {c.density}"
            if c.density is not None
            else f"{c.algorithm_name} (learned density)"
            for c in sparse
        )
        epochs = f"{len(timer.times)} epoch" + "s" * (len(timer.times) != 1)
        median = f"{np.median(timer.times):.2f} s per epoch (median)" if timer.times else "no epoch"
        print(
            f"{result['model']} on Fashion-MNIST, {kind or 'dense'}, {epochs}, seed {result['seed']}:"
            f" test error {result['test_error']:.2f}%, final density {result['final_density']:.4f},"
            f" {median}, {torch.get_num_threads()} thread(s); logs in {result['log_dir']}",
            flush=True,
        )


def main(args: list[str] | None = None) -> FashionMNISTCLI:
    """Run the command line ``args`` (default: ``sys.argv``), e.g. ``["fit", "--model.net", "lenet5"]``; after
    ``fit``, the returned CLI's ``result`` holds the figures printed."""
    return FashionMNISTCLI(
        Classifier,
        FashionMNIST,
        args=args,
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": 10,
            "deterministic": True,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": sys.stdout.isatty(),
            "default_root_dir": "runs/fashion_mnist",
            "callbacks": [EpochTimer()],  # always there, not configurable
        },
        parser_kwargs={"description": "LeNet-300-100 / LeNet-5 on Fashion-MNIST, dense or sparse from scratch."},
    )


if __name__ == "__main__":
    main()
