"""LeNet-300-100 and LeNet-5 on Fashion-MNIST, dense or sparse from scratch (sparse momentum by default).

The paper's MNIST setup (Dettmers & Zettlemoyer 2019, section 3.3): SGD with Nesterov momentum 0.9,
learning rate 0.1 decayed by 10x every 25000 mini-batches, weight decay 5e-4, batch size 100, 10% of the
training set held out for validation; test error of the last epoch.

The data are read offline from Debian's ``dataset-fashion-mnist`` package (idx files under
/usr/share/datasets/fashion-mnist/); nothing is downloaded.

    python examples/fashion_mnist.py --model lenet300 --density 0.05 --epochs 10
    python examples/fashion_mnist.py --model lenet5 --dense --epochs 10
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_sparse import SparseTrainingCallback

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


class Classifier(L.LightningModule):
    """Cross-entropy classifier with the paper's optimizer and torchmetrics accuracy."""

    def __init__(self, model: str = "lenet300", lr: float = 0.1, weight_decay: float = 5e-4, lr_step: int = 25000):
        super().__init__()
        self.save_hyperparameters()
        self.net = MODELS[model]()
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

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step, gamma=0.1)
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
    """Train and test one model; ``algorithm=None`` trains dense (no callback). Returns the figures.

    ``density`` is ignored by ``algorithm="dst"``, which learns its density.
    """
    L.seed_everything(seed, workers=True)
    module = Classifier(model, lr=lr)
    timer = EpochTimer()
    callbacks: list[L.Callback] = [timer]
    sparse = None
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
    if sparse is not None:  # the weights the forward pass uses (DST's are the thresholded ones)
        weights = [module.get_submodule(name.removesuffix(".weight")).weight for name in sparse.masks]
    else:
        weights = [m.weight for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    total = sum(w.numel() for w in weights)
    return {
        "model": model,
        "algorithm": algorithm or "dense",
        "density": density,
        "seed": seed,
        "test_error": 100.0 * (1.0 - test["test/acc"]),
        "final_density": nonzero / total,
        "epoch_times": timer.times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    parser.add_argument("--density", type=float, default=0.05, help="fraction of weights kept (default 0.05)")
    parser.add_argument("--dense", action="store_true", help="train dense, without the callback")
    parser.add_argument("--algorithm", default="sparse_momentum", help="any name of lightning_sparse.ALGORITHMS")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction (<=1) or number of batches")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    limit = int(args.limit_train_batches) if args.limit_train_batches > 1 else args.limit_train_batches
    result = run(
        model=args.model,
        density=args.density,
        algorithm=None if args.dense else args.algorithm,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        limit_train_batches=limit,
        data_dir=args.data_dir,
        progress_bar=sys.stdout.isatty(),
    )
    kind = "dense" if args.dense else f"{args.algorithm} at density {args.density}"
    print(
        f"{args.model} on Fashion-MNIST, {kind}, {args.epochs} epochs, seed {args.seed}:"
        f" test error {result['test_error']:.2f}%, final density {result['final_density']:.4f},"
        f" {np.median(result['epoch_times']):.2f} s per epoch (median)"
    )


if __name__ == "__main__":
    main()
