"""``ddp_spawn``: how rank zero's final masks and state reach the main process, which trains nothing itself.

The spawned processes work on pickled copies of the callback, so nothing they keep in memory reaches the caller:
rank zero writes its final state to a temporary file that the main process reads back.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


class SpawnHandoff:
    """Hands rank zero's final state back to the main process of a ``ddp_spawn`` run through a temporary file.

    :meth:`prepare` (when pickled) names the file, :meth:`hand_back` (rank zero, end of ``fit``) fills it,
    :meth:`read` (main process) loads it once and deletes it.
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self._received: dict | None = None

    def prepare(self) -> None:
        """Name the file, once; called when the callback is pickled for the spawned processes."""
        if self.path is None:
            fd, self.path = tempfile.mkstemp(prefix="lightning-sparse-", suffix=".pt")
            os.close(fd)

    def write(self, state: dict) -> None:
        """Save ``state`` to the prepared file (nothing when no file was prepared)."""
        if self.path is not None and os.path.exists(self.path):
            torch.save(state, self.path)

    def hand_back(self, trainer: pl.Trainer, state: dict) -> None:
        """On rank zero of a ``ddp_spawn`` run (Lightning's multiprocessing launcher): :meth:`write` ``state``."""
        if type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher" and trainer.is_global_zero:
            self.write(state)

    def read(self) -> dict | None:
        """The handed-back state (loaded from the file the first time), or ``None`` if there is none."""
        if self._received is None and self.path is not None and os.path.exists(self.path):
            if os.path.getsize(self.path) > 0:
                self._received = torch.load(self.path, weights_only=True)
                os.remove(self.path)
                self.path = None
        return self._received

    def masks(self) -> dict[str, Tensor]:
        """The handed-back masks; empty when nothing came back."""
        handed = self.read()
        return dict(handed["masks"]) if handed else {}

    def state(self) -> dict[str, Any]:
        """The handed-back ``state_dict`` of the callback; empty when nothing came back."""
        handed = self.read()
        return dict(handed["state"]) if handed else {}

