"""ResNet-50 on ImageNet, sparse from scratch, on every visible GPU (DDP), on one or several nodes.

The sparse momentum paper's setup (Dettmers & Zettlemoyer 2019, section 3.3): torchvision ResNet-50, batch
256 in total, SGD with momentum 0.9, weight decay 1e-4, learning rate 0.1 decayed 10x at epochs 30, 60 and
90, 100 epochs, density 0.1 or 0.2, sparse momentum. ``--algorithm rigl`` gives RigL's setup instead (ERK
initialization, first convolution dense, updates every 100 steps until 75% of training).

The data are an ImageFolder tree (``PATH/train/<class>/*.JPEG``, ``PATH/val/<class>/*.JPEG``) that you
name with ``--data``; nothing is downloaded. ``--fake-data`` uses torchvision's FakeData (small images) so
the script runs end to end on a CPU.

    # one machine, every GPU, bf16
    python examples/imagenet.py --data /data/imagenet --density 0.1
    # two nodes of 8 GPUs (run on each node, or let SLURM's srun start it)
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $RANK --master-addr $MASTER --master-port 29500 \\
        examples/imagenet.py --data /data/imagenet --nodes 2 --devices 8
    # resume after a crash, from the last checkpoint
    python examples/imagenet.py --data /data/imagenet --resume
    # a few steps on 2 CPU processes with fake data
    python examples/imagenet.py --fake-data --accelerator cpu --devices 2 --max-steps 4 --batch-size 8
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
import torchvision
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import transforms as T

from lightning_sparse import SparseTrainingCallback

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetClassifier(L.LightningModule):
    """torchvision ResNet-50 with the paper's optimizer: SGD momentum 0.9, step decay at 30/60/90 epochs."""

    def __init__(
        self,
        num_classes: int = 1000,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        milestones: tuple[int, ...] = (30, 60, 90),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torchvision.models.resnet50(weights=None, num_classes=num_classes)
        self.top1 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.top5 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=min(5, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.top1(logits, y)
        self.top5(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val/top1", self.top1, prog_bar=True)
        self.log("val/top5", self.top5)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class ImageNetData(L.LightningDataModule):
    """ImageFolder ImageNet (or FakeData), with the usual augmentation; StatefulDataLoader so a run killed
    in the middle of an epoch resumes where it stopped."""

    def __init__(
        self,
        data: Path | None,
        batch_size: int,
        workers: int = 8,
        fake_data: bool = False,
        image_size: int = 224,
        fake_size: int = 512,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.workers = workers
        self.fake_data = fake_data
        self.image_size = image_size
        self.fake_size = fake_size
        self.num_classes = num_classes

    def setup(self, stage: str) -> None:
        size = self.image_size
        normalize = T.Normalize(MEAN, STD)
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        val_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), normalize])
        if self.fake_data:
            shape = (3, size, size)
            self.train_set = torchvision.datasets.FakeData(self.fake_size, shape, self.num_classes, T.ToTensor())
            self.val_set = torchvision.datasets.FakeData(self.fake_size // 4, shape, self.num_classes, T.ToTensor(), random_offset=1)
            return
        if self.data is None:
            raise ValueError("name the ImageNet folder with --data PATH (or use --fake-data)")
        self.train_set = torchvision.datasets.ImageFolder(str(Path(self.data) / "train"), train_tf)
        self.val_set = torchvision.datasets.ImageFolder(str(Path(self.data) / "val"), val_tf)

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.workers,
            pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=self.workers > 0,
        )

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(
            self.val_set, batch_size=self.batch_size, num_workers=self.workers, pin_memory=torch.cuda.is_available()
        )


def sparse_callback(algorithm: str, density: float, seed: int) -> SparseTrainingCallback:
    """Sparse momentum as in its paper, or RigL's ImageNet setup (ERK, first convolution dense)."""
    if algorithm == "rigl":
        return SparseTrainingCallback(density=density, algorithm="rigl", init="erk", dense_layers=["net.conv1"], seed=seed)
    return SparseTrainingCallback(density=density, algorithm=algorithm, seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="ImageNet folder with train/ and val/ (ImageFolder layout)")
    parser.add_argument("--fake-data", action="store_true", help="torchvision FakeData instead of --data")
    parser.add_argument("--algorithm", default="sparse_momentum", help="sparse_momentum (default), rigl, or any other")
    parser.add_argument("--density", type=float, default=0.1, help="fraction of weights kept (paper: 0.1 or 0.2)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=256, help="total batch size over all processes")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto", help="devices per node ('auto': every visible GPU)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    parser.add_argument("--workers", type=int, default=8, help="data loading processes per device")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (64 with --fake-data)")
    parser.add_argument("--root", type=Path, default=Path("runs/imagenet"), help="checkpoints and logs")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="also checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in ROOT/checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, workers=True)
    devices: int | str = int(args.devices) if str(args.devices).isdigit() else args.devices
    on_gpu = args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())
    precision = args.precision or ("bf16-mixed" if on_gpu else "32-true")
    checkpoint_dir = args.root / "checkpoints"
    checkpoints = ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    step_checkpoints = ModelCheckpoint(  # the newest step checkpoint, overwritten
        dirpath=checkpoint_dir, every_n_train_steps=args.checkpoint_every, save_top_k=1, filename="step",
        monitor="step", mode="max",
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.nodes,
        strategy="ddp" if devices != 1 or args.nodes > 1 else "auto",
        precision=precision,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        callbacks=[sparse_callback(args.algorithm, args.density, args.seed), checkpoints, step_checkpoints,
                   LearningRateMonitor()],
        default_root_dir=args.root,
        sync_batchnorm=False,
        log_every_n_steps=50,
    )
    world_size = trainer.world_size
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes")
    image_size = args.image_size or (64 if args.fake_data else 224)
    num_classes = 10 if args.fake_data else 1000
    data = ImageNetData(
        args.data, args.batch_size // world_size, args.workers, args.fake_data, image_size, num_classes=num_classes
    )
    model = ImageNetClassifier(num_classes=num_classes, lr=args.lr)
    newest = max(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
    trainer.fit(model, data, ckpt_path=str(newest) if args.resume and newest is not None else None)


if __name__ == "__main__":
    main()
