"""Run by tests/distributed/test_crash.py: for each algorithm, a short fit, the same fit killed (SIGKILL) at optimizer
step 18 (mid-epoch) in a forked child, and its resume from ModelCheckpoint's last.ckpt; saves the final masks,
weights and state of each finished fit, and what the killed one left.

    python tests/distributed/crash_run.py --out DIR --algorithms sparse_momentum set

Writes ``DIR/<algorithm>/full/result.pt``, ``DIR/<algorithm>/crash/result.pt`` (the resumed fit) and
``DIR/<algorithm>/killed.pt`` (the child's exit code, and whether it left last.ckpt and a result).
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

KILL_AT_STEP = 18  # epoch 1, step 6 of 12; the last checkpoint is at step 15


class Kill(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(out: Path, algorithm: str, kill_at_step: int | None = None, resume: bool = False) -> None:
    L.seed_everything(7)
    sparse = SparseTrainingCallback(density=0.2, algorithm=algorithm, update_interval=4, seed=11)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=5)
    callbacks = [sparse, checkpoint] + ([Kill(kill_at_step)] if kill_at_step else [])
    trainer = quiet_trainer(
        max_epochs=3, callbacks=callbacks, enable_checkpointing=True, deterministic=True, default_root_dir=out
    )
    model = DigitsMLP()
    trainer.fit(model, resumable_digits_loader(), ckpt_path="last" if resume else None)
    result = {
        "masks": {k: v.cpu() for k, v in sparse.masks.items()},
        "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "state": {k: v for k, v in sparse.state_dict().items() if k != "masks"},
    }
    torch.save(result, out / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--algorithms", nargs="+", default=["sparse_momentum"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # every fit alike, and no intra-op thread pool for the forked child to inherit
    for algorithm in args.algorithms:
        root = args.out / algorithm
        fit(root / "full", algorithm)
        child = os.fork()
        if child == 0:  # killed at KILL_AT_STEP: nothing after the kill runs, not even this `finally`
            try:
                fit(root / "crash", algorithm, kill_at_step=KILL_AT_STEP)
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        killed = {
            "exit_code": os.waitstatus_to_exitcode(status),
            "last_ckpt": (root / "crash" / "checkpoints" / "last.ckpt").exists(),
            "result": (root / "crash" / "result.pt").exists(),
        }
        torch.save(killed, root / "killed.pt")
        fit(root / "crash", algorithm, resume=True)


if __name__ == "__main__":
    main()
