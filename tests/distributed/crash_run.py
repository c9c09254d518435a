"""Run by tests/lightning/test_training.py: a short fit that can be killed (SIGKILL) at a given optimizer step and
resumed from ModelCheckpoint's last.ckpt; saves the final masks and weights.

    python tests/distributed/crash_run.py --out DIR [--kill-at-step N] [--resume] [--algorithm set]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_sparse import SparseTrainingCallback  # noqa: E402
from tests.helpers import DigitsMLP, resumable_digits_loader  # noqa: E402
from tests.helpers import trainer as quiet_trainer


class Kill(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--algorithm", default="sparse_momentum")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    L.seed_everything(7)
    sparse = SparseTrainingCallback(density=0.2, algorithm=args.algorithm, update_interval=4, seed=11)
    checkpoint = ModelCheckpoint(dirpath=args.out / "checkpoints", save_last=True, every_n_train_steps=5)
    callbacks = [sparse, checkpoint] + ([Kill(args.kill_at_step)] if args.kill_at_step else [])
    trainer = quiet_trainer(
        max_epochs=3, callbacks=callbacks, enable_checkpointing=True, deterministic=True, default_root_dir=args.out
    )
    model = DigitsMLP()
    trainer.fit(model, resumable_digits_loader(), ckpt_path="last" if args.resume else None)
    result = {
        "masks": {k: v.cpu() for k, v in sparse.masks.items()},
        "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "state": {k: v for k, v in sparse.state_dict().items() if k != "masks"},
    }
    torch.save(result, args.out / "result.pt")


if __name__ == "__main__":
    main()
