"""What a DST ``SparseTrainingCallback`` does to the model before its ``Sparsifier`` binds, and takes back when the
fit is refused: DST's thresholds are parametrizations, attached before the optimizer and DDP exist (in ``setup``,
or right after ``configure_model`` for layers built there), shared with weight averaging's copies, and taken off
again if the fit fails before its first optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.nn.parallel import DistributedDataParallel

from lightning_sparse.core.layers import has_candidates
from lightning_sparse.lightning import trainer as trainer_support
from lightning_sparse.methods.dst_sparsifier import (
    attach_dst_thresholds,
    detach_dst_thresholds,
    prepare_model,
    thresholded_weights,
)
from lightning_sparse.options import SparseOptions


class DSTSetup:
    """The thresholds one fit of a DST callback attached (``options``: the callback's), so that a refused fit leaves
    the model as it was. Does nothing for the other methods."""

    def __init__(self, options: SparseOptions) -> None:
        self.options = options
        self.attached: set[tuple[str, str]] = set()  # (module, weight) pairs this fit gave thresholds
        self.trained = False  # whether this fit took an optimizer step
        self.before: Any = None  # the callback's Sparsifier before this fit, kept if it is refused
        self._undo_patch: Callable[[], None] | None = None  # takes the `configure_model` patch off

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, others: Sequence[SparseOptions], before: Any) -> None:
        """In the callback's ``setup``: thresholds on the layers that exist; for layers built in
        ``configure_model``, right after it, before DDP wraps the model (thresholds attached later would cut their
        weights off DDP's gradient averaging). ``others``: the options of the other sparse callbacks."""
        self.attached, self.trained, self.before = set(), False, before
        if not self.options.is_dst:
            return
        self._prepare(trainer, pl_module, others)
        if not self.attached and is_overridden("configure_model", pl_module):
            self._undo_patch = trainer_support.after_configure_model(
                pl_module, lambda: self._prepare(trainer, pl_module, others)
            )

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, others: Sequence[SparseOptions]) -> None:
        options = self.options
        if not has_candidates(pl_module, options.layer_types, options.include, options.mask_embeddings):
            return
        trainer_support.refuse_overlap(options, others, pl_module)  # before anything is attached
        self.attached |= prepare_model(pl_module, options)
        trainer_support.share_dst_thresholds(trainer, pl_module)

    def bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, make: Callable[[], Any]) -> Any:
        """``make()`` the Sparsifier, recording the thresholds it attached; a DDP model without them is refused
        first, naming ``attach_dst_thresholds``."""
        if not self.options.is_dst:
            return make()
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            attach_dst_thresholds(pl_module, self.options, attach=False, wrapper="DDP")  # refused if any is missing
        before = thresholded_weights(pl_module)
        sparsifier = make()
        self.attached |= thresholded_weights(pl_module) - before
        trainer_support.share_dst_thresholds(trainer, pl_module)
        return sparsifier

    def done(self) -> None:
        """The fit ended: what it attached stays."""
        self.attached, self.before = set(), None

    def refused(self, pl_module: pl.LightningModule) -> bool:
        """The fit failed: take off the thresholds it attached if it took no optimizer step. Returns whether it
        did (the callback then keeps its earlier Sparsifier, :attr:`before`)."""
        self.take_off_patch()
        undone = bool(self.attached) and not self.trained
        if undone:
            detach_dst_thresholds(pl_module, self.attached)
        self.attached = set()
        return undone

    def take_off_patch(self) -> None:
        """Take the ``configure_model`` patch off (``configure_model`` was not called)."""
        if self._undo_patch is not None:
            self._undo_patch()
            self._undo_patch = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "before": None, "_undo_patch": None}
