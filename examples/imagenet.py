"""ResNet-50 on ImageNet, sparse from scratch, on every visible GPU (DDP), on one or several nodes, on LightningCLI.

``examples/configs/imagenet_resnet50.yaml`` is the sparse momentum paper's setup (Dettmers & Zettlemoyer 2019,
section 3.3): torchvision ResNet-50, batch 256 in total, SGD with momentum 0.9, weight decay 1e-4, learning rate
0.1 decayed 10x at epochs 30, 60 and 90, 100 epochs, sparse momentum at density 0.1 (or 0.2), bf16. Every option
of the Trainer (``--trainer.*``), the model (``--model.*``), the data (``--data.*``), the sparse callback
(``--trainer.callbacks.*``, the last callback of the list) and the checkpoints (``--checkpoint.*``,
``--recovery.*``) comes from the command line or the YAML file; ``--help`` lists them.

Recipe options (``--model.*``): ``label_smoothing``, ``warmup_epochs`` (linear, from ``warmup_start_factor`` x lr)
then ``schedule`` ``step`` (x ``gamma`` at each of ``milestones``, in epochs) or ``cosine`` (to 0 at the end),
``nesterov``, ``momentum``, ``weight_decay``, ``arch`` (any torchvision classification model). The reference's
partially dense ResNet-50 keeps the first convolution and the downsample (shortcut) convolutions dense:
``--trainer.callbacks.dense_layers '[net.conv1, "*.downsample.*"]'``.

**Batch size.** ``--data.batch_size`` is per device (per process), as torchvision's reference scripts count it:
the total batch is ``batch_size x devices x num_nodes``. The paper's 256 is 32 on 8 GPUs, 16 on 2 nodes of 8.

**Runs and checkpoints.** The command line is the one the three examples share (``examples/_cli.py``):
``--threads N`` (torch's CPU threads; default: 1 on a machine with at most 2 cores, torch's choice otherwise), and
each run has its own directory, named by the options that distinguish it:
``<default_root_dir>/<arch>_<method>/seed_<seed>-<hash>/`` (``runs/imagenet/resnet50_sparse_momentum_0.1/
seed_0-1a2b3c4d/``), ``<hash>`` being that of every other option (all but ``--ckpt_path``, ``--threads``, the
progress bar and the like), so runs with different options never share a directory. It holds the TensorBoard
logs (CSV without tensorboard), ``config.yaml``, SLURM's ``hpc_ckpt_N.ckpt`` and ``checkpoints/``: ``last.ckpt``
(the newest state: at the end of every epoch, by ``--checkpoint``, and every 1000 steps, by ``--recovery``) and
the 3 best by ``val/top1`` (``--checkpoint.save_top_k``); nothing else is kept. ``--ckpt_path last`` resumes from
the newest of that directory's ``last.ckpt`` and ``hpc_ckpt_N.ckpt`` (starts afresh when there is none), so the
same command starts a run and continues it, and never resumes a run with other options. To continue a finished
run for more epochs (another ``--trainer.max_epochs``: a new directory), name its checkpoint:
``--ckpt_path runs/imagenet/.../checkpoints/last.ckpt``. ``--trainer.logger`` replaces the logger (and the
directory).

The data are an ImageFolder tree (``ROOT/train/<class>/*.JPEG``, ``ROOT/val/<class>/*.JPEG``) named with
``--data.root``; nothing is downloaded. ``--data.fake_data true`` uses torchvision's FakeData (random images) so
the script runs end to end on a CPU.

    CONFIG=examples/configs/imagenet_resnet50.yaml
    # one machine, every GPU (8 x 32 = 256), resumes when run again
    python examples/imagenet.py fit --config $CONFIG --data.root /data/imagenet --ckpt_path last
    # density 0.2, partially dense (first conv and downsample layers dense)
    python examples/imagenet.py fit --config $CONFIG --data.root /data/imagenet --trainer.callbacks.density 0.2 \\
        --trainer.callbacks.dense_layers '[net.conv1, "*.downsample.*"]'
    # RigL's setup: ERK, first convolution dense, an update every 100 steps until 75 % of training
    python examples/imagenet.py fit --config $CONFIG --data.root /data/imagenet --trainer.callbacks.algorithm rigl \\
        --trainer.callbacks.init erk --trainer.callbacks.dense_layers '[net.conv1]'
    # a tuned recipe: label smoothing, 5 epochs of linear warm-up, cosine decay, Nesterov
    python examples/imagenet.py fit --config $CONFIG --data.root /data/imagenet --model.label_smoothing 0.1 \\
        --model.warmup_epochs 5 --model.schedule cosine --model.nesterov true
    # two nodes of 8 GPUs under SLURM (srun, requeued on the time limit): examples/slurm/imagenet.sbatch
    sbatch examples/slurm/imagenet.sbatch
    # a few steps on 2 CPU processes with fake data
    python examples/imagenet.py fit --config $CONFIG --data.fake_data true --data.image_size 32 --data.num_classes 10 \\
        --data.batch_size 4 --data.workers 0 --trainer.accelerator cpu --trainer.devices 2 \\
        --trainer.precision 32-true --trainer.max_steps 4
    # top-1/top-5 of a checkpoint
    python examples/imagenet.py validate --config $CONFIG --data.root /data/imagenet --ckpt_path PATH.ckpt
"""

from __future__ import annotations

import glob
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ExampleCLI  # noqa: E402  (the examples' shared command line)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetClassifier(L.LightningModule):
    """A torchvision classifier (ResNet-50) trained with SGD; the defaults are the paper's.

    Args:
        arch: a torchvision classification model (``torchvision.models.get_model``), random initialization.
        num_classes: set from ``--data.num_classes``.
        lr: peak learning rate (after the warm-up).
        momentum: SGD's momentum.
        nesterov: Nesterov momentum.
        weight_decay: SGD's weight decay (every parameter).
        label_smoothing: of the training loss (the validation loss has none).
        schedule: ``"step"``: lr x ``gamma`` at each of ``milestones`` (epochs); ``"cosine"``: from lr after the
            warm-up to 0 at the end of training.
        milestones: epochs of the step schedule.
        gamma: factor of the step schedule.
        warmup_epochs: epochs (fractions allowed) of linear warm-up, from ``warmup_start_factor`` x lr to lr, step
            by step; 0: none.
        warmup_start_factor: the learning rate at the first step, as a fraction of ``lr``.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 1000,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        schedule: Literal["step", "cosine"] = "step",
        milestones: Sequence[int] = (30, 60, 90),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.01,
    ) -> None:
        super().__init__()
        if schedule not in ("step", "cosine"):
            raise ValueError(f"`schedule` can be 'step' or 'cosine', got {schedule!r}")
        if warmup_epochs < 0 or not 0.0 < warmup_start_factor <= 1.0:
            raise ValueError(
                f"need warmup_epochs >= 0 and 0 < warmup_start_factor <= 1, got {warmup_epochs}, {warmup_start_factor}"
            )
        self.save_hyperparameters()
        self.net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        self.top1 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.top5 = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=min(5, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.top1(logits, y)
        self.top5(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val/top1", self.top1, prog_bar=True)
        self.log("val/top5", self.top5)

    def lr_factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The learning rate at optimizer step ``step`` (0-based), as a fraction of ``lr``."""
        hp = self.hparams
        warmup = round(hp.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return hp.warmup_start_factor + (1.0 - hp.warmup_start_factor) * step / warmup
        if hp.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        epoch = step / steps_per_epoch
        return hp.gamma ** sum(epoch >= m for m in hp.milestones)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)  # also sizes the training set
        per_epoch = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, per_epoch, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ImageNetData(L.LightningDataModule):
    """ImageFolder ImageNet (or FakeData), with the usual augmentation; StatefulDataLoader so a run killed
    in the middle of an epoch resumes where it stopped.

    Args:
        root: the folder with ``train/`` and ``val/`` (ImageFolder layout).
        batch_size: per device (per process); the total is ``batch_size x devices x num_nodes``.
        workers: data loading processes per device.
        fake_data: torchvision's FakeData instead of ``root``: ``fake_size`` training images, a quarter of that for
            validation.
        image_size: training crop and validation center crop (validation resizes to ``image_size x 256 / 224``).
        fake_size: number of fake training images.
        num_classes: classes (also the model's).
    """

    def __init__(
        self,
        root: Path | None = None,
        batch_size: int = 32,
        workers: int = 8,
        fake_data: bool = False,
        image_size: int = 224,
        fake_size: int = 512,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.root = root
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
            shape, tf = (3, size, size), T.ToTensor()
            self.train_set = torchvision.datasets.FakeData(self.fake_size, shape, self.num_classes, tf)
            self.val_set = torchvision.datasets.FakeData(
                self.fake_size // 4, shape, self.num_classes, tf, random_offset=1
            )
            return
        if self.root is None:
            raise ValueError("name the ImageNet folder with --data.root PATH (or use --data.fake_data true)")
        self.train_set = torchvision.datasets.ImageFolder(str(Path(self.root) / "train"), train_tf)
        self.val_set = torchvision.datasets.ImageFolder(str(Path(self.root) / "val"), val_tf)

    def train_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.workers,
            pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=self.workers > 0,
        )  # fmt: skip

    def val_dataloader(self) -> StatefulDataLoader:
        return StatefulDataLoader(
            self.val_set, batch_size=self.batch_size, num_workers=self.workers, pin_memory=torch.cuda.is_available()
        )


def newest_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest of the ``last*.ckpt`` of the trainer's ModelCheckpoints and the ``hpc_ckpt_N.ckpt`` (what
    Lightning saves on SLURM's SIGUSR1 before requeueing) in ``default_root_dir``."""
    candidates = glob.glob(os.path.join(glob.escape(str(trainer.default_root_dir)), "hpc_ckpt_*.ckpt"))
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last:
            directory = cb.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
            candidates += glob.glob(os.path.join(glob.escape(str(directory)), "last*.ckpt"))
    return max(candidates, key=os.path.getmtime, default=None)


class ImageNetCLI(ExampleCLI):
    """The examples' CLI (``examples/_cli.py``: ``--threads``, one directory per set of options,
    ``<default_root_dir>/<arch>_<method>/seed_<seed>-<hash>/``) with the two checkpoint callbacks, and
    ``--ckpt_path last`` that also finds SLURM's ``hpc_ckpt_N.ckpt``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.num_classes", "model.num_classes")
        # the 3 best by val/top1 (epoch ends) and last.ckpt; both callbacks write last.ckpt, whichever saved last
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/top1", "checkpoint.mode": "max", "checkpoint.save_top_k": 3,
            "checkpoint.save_last": True, "checkpoint.filename": "epoch={epoch}-top1={val/top1:.4f}",
            "checkpoint.auto_insert_metric_name": False, "checkpoint.enable_version_counter": False,
        })  # fmt: skip
        # last.ckpt every 1000 optimizer steps too, for crashes in the middle of an epoch (0: never)
        parser.add_lightning_class_args(ModelCheckpoint, "recovery")
        parser.set_defaults({
            "recovery.every_n_train_steps": 1000, "recovery.save_top_k": 0, "recovery.save_last": True,
            "recovery.enable_version_counter": False,
        })  # fmt: skip

    def model_name(self) -> str:
        return self.model.hparams.arch

    def before_fit(self) -> None:
        config = self.config_init["fit"]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = newest_checkpoint(self.trainer) or "last"  # "last" without one: starts afresh


def main(args: list[str] | None = None) -> ImageNetCLI:
    """Run the command line ``args`` (default: ``sys.argv``), e.g. ``["fit", "--config", CONFIG]``."""
    return ImageNetCLI(
        ImageNetClassifier,
        ImageNetData,
        args=args,
        seed_everything_default=0,
        trainer_defaults={"max_epochs": 100, "default_root_dir": "runs/imagenet", "log_every_n_steps": 50},
    )


if __name__ == "__main__":
    main()
