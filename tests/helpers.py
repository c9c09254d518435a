"""Tiny models and data for Trainer tests: scikit-learn's bundled digits (1797 8x8 images), no download."""

from __future__ import annotations

import tempfile
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        x, y = load_digits(return_X_y=True)
        _DIGITS = (torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y))
    return _DIGITS


def digits_loader(n: int = 600, batch_size: int = 50, image: bool = False, offset: int = 0) -> DataLoader:
    x, y = digits()
    x, y = x[offset : offset + n], y[offset : offset + n]
    if image:
        x = x.view(-1, 1, 8, 8)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class DigitsMLP(L.LightningModule):
    """64-32-16-10 MLP; ``optimizer`` is ``"sgd"`` (momentum 0.9), ``"adam"`` or ``"plain_sgd"``."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
        self.optimizer = optimizer
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr / 100)
        momentum = 0.0 if self.optimizer == "plain_sgd" else 0.9
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=momentum, weight_decay=5e-4)


class DigitsCNN(DigitsMLP):
    """A two-conv CNN on 8x8 digits (Conv2d, BatchNorm, Linear)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__(optimizer, lr)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def trainer(**kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer; keyword arguments override the defaults."""
    defaults: dict[str, Any] = dict(
        default_root_dir=tempfile.mkdtemp(prefix="lightning-sparse-test-"),
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class MaskRecorder(Callback):
    """Checks after every optimizer step that masked-out weights are zero, and records masks per epoch."""

    def __init__(self, sparse: Callback) -> None:
        self.sparse = sparse
        self.steps_checked = 0
        self.epoch_masks: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.sparse.masks.items():
            assert mask.dtype == torch.bool and mask.device == params[name].device
            leaked = params[name].detach()[~mask]
            assert torch.all(leaked == 0), f"{name}: {int((leaked != 0).sum())} masked weights are non-zero"
        self.steps_checked += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_masks.append({k: v.clone() for k, v in self.sparse.masks.items()})


def resumable_digits_loader(n: int = 600, batch_size: int = 50) -> StatefulDataLoader:
    """torchdata's StatefulDataLoader: Lightning saves its position, so a mid-epoch resume continues exactly.
    Not shuffled: a shuffled order drawn from the global RNG is not restored on resume."""
    x, y = digits()
    return StatefulDataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=False)
