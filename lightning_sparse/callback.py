"""``SparseTrainingCallback``: train any LightningModule sparse from the first step to the last.

A thin layer over :mod:`lightning_sparse.masking` and :mod:`lightning_sparse.algorithms`; the hooks, in the
order Lightning calls them:

* ``setup``: find the masked weights, draw the initial masks, zero the masked-out weights (before the
  model is moved, wrapped for DDP, or given its optimizer);
* ``load_state_dict``: masks and schedule position from a checkpoint;
* ``on_fit_start``: check the optimizer, move the masks to the weights' devices;
* ``on_train_start``: read the length of training for the pruning-rate schedule;
* ``on_train_batch_end``: re-apply the masks after every optimizer step; step-level updates;
* ``on_train_epoch_end``: epoch-level updates (the sparse momentum paper's setting);
* ``on_fit_end``: a per-layer table.
"""

from __future__ import annotations

import logging
import math
import random
import types
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sparse.algorithms import LayerState, SparseAlgorithm, get_algorithm
from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES
from lightning_sparse.masking import Masking, maskable_parameters
from lightning_sparse.momentum import check_momentum_optimizer, optimizer_momentum

log = logging.getLogger(__name__)

STATE_VERSION = 1


class SparseTrainingCallback(Callback):
    """Keep a network sparse during the whole of training, updating which weights are active.

    Args:
        density: fraction of the masked weights that are active, in (0, 1].
        algorithm: ``"sparse_momentum"`` (Dettmers & Zettlemoyer, 2019), ``"static"`` (a random mask that
            never changes), or a :class:`~lightning_sparse.SparseAlgorithm`.
        prune_rate: initial pruning rate ``p``: the fraction of each layer's active weights removed (and
            regrown elsewhere) at an update, in [0, 1].
        prune_rate_schedule: how ``p`` decays over training: ``"cosine"`` (to zero at the end, the paper's
            choice), ``"linear"``, ``"constant"``, or a function of progress in [0, 1] returning the rate.
            Progress is ``trainer.global_step / trainer.estimated_stepping_batches`` (optimizer steps).
        init: sparse initialization: ``"uniform"`` (every layer at ``density``), ``"erk"`` or ``"er"``.
            ``None`` takes the algorithm's default (``"uniform"`` for sparse momentum).
        dense_layers: module or parameter names, or glob patterns (``"*.downsample.*"``), of layers to keep
            dense. Biases and normalization weights are never masked; the weights of Linear and
            Conv1d/2d/3d layers are masked unless named here.
        update_interval: ``None`` updates the masks at the end of every epoch but the last; an int updates
            every that many optimizer steps (never on the last step).
        seed: seed of the random initial masks (and of random growth); the same seed gives the same masks.
            ``None`` draws one on rank zero and shares it with every process.

    The masks are applied to the weights (not to the gradients) after every optimizer step, so gradients
    and momentum of missing weights stay dense. Sparse momentum reads the momentum from the optimizer:
    SGD with ``momentum > 0`` (its ``momentum_buffer``) or Adam/AdamW/NAdam/RAdam
    (``exp_avg / (sqrt(exp_avg_sq) + eps)``); other optimizers, plain SGD included, are refused at fit start.

    Example::

        trainer = Trainer(max_epochs=100, callbacks=[SparseTrainingCallback(density=0.05)])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        density: float,
        algorithm: str | SparseAlgorithm = "sparse_momentum",
        prune_rate: float = 0.5,
        prune_rate_schedule: str | Callable[[float], float] = "cosine",
        init: str | None = None,
        dense_layers: Sequence[str] = (),
        update_interval: int | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"`density` must be a number in (0, 1], got {density!r}")
        self._algorithm = get_algorithm(algorithm)
        if not 0.0 <= prune_rate <= 1.0:
            raise ValueError(f"`prune_rate` must be in [0, 1], got {prune_rate!r}")
        if not callable(prune_rate_schedule) and prune_rate_schedule not in PRUNE_RATE_SCHEDULES:
            raise ValueError(
                f"`prune_rate_schedule` can be {', '.join(PRUNE_RATE_SCHEDULES)} or a function of progress,"
                f" got {prune_rate_schedule!r}"
            )
        if init is not None and init not in INIT_METHODS:
            raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {init!r}")
        if isinstance(dense_layers, str):
            dense_layers = [dense_layers]
        if update_interval is not None and (isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1):
            raise ValueError(f"`update_interval` must be None (every epoch) or an int >= 1, got {update_interval!r}")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int or None, got {seed!r}")
        self.density = float(density)
        self.algorithm_name = algorithm if isinstance(algorithm, str) else "custom"
        self.prune_rate = float(prune_rate)
        self.prune_rate_schedule = prune_rate_schedule
        self.init = init or self._algorithm.init
        self.dense_layers = list(dense_layers)
        self.update_interval = update_interval
        self.seed = seed

        self._masking: Masking | None = None
        self._generator = torch.Generator()
        self._pending_state: dict[str, Any] | None = None
        self._total_steps: float = math.inf
        self._applied_step = -1
        self._last_update_step = -1
        self._num_updates = 0
        self._current_prune_rate = self.prune_rate

    # ------------------------------------------------------------------ public read-only state
    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name (as in ``pl_module.named_parameters()``) → ``torch.bool`` mask, True = active."""
        if self._masking is None:
            return types.MappingProxyType({})
        return types.MappingProxyType(dict(self._masking.items()))

    @property
    def current_prune_rate(self) -> float:
        """The pruning rate used at the last update (the initial rate before any update)."""
        return self._current_prune_rate

    def prune_rate_at(self, progress: float) -> float:
        """The pruning rate the schedule gives at ``progress`` in [0, 1]."""
        if callable(self.prune_rate_schedule):
            rate = float(self.prune_rate_schedule(progress))
        else:
            rate = PRUNE_RATE_SCHEDULES[self.prune_rate_schedule](progress, self.prune_rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"`prune_rate_schedule` returned {rate} at progress {progress}; rates must be in [0, 1]")
        return rate

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SparseTrainingCallback needs automatic optimization (the masks are applied after each"
                " optimizer step Lightning takes); set `automatic_optimization = True`"
            )
        params = maskable_parameters(pl_module, self.dense_layers)
        if self._masking is not None and self._masking.weights == list(params.values()):
            return  # a second `fit` of the same model keeps its masks
        seed = self.seed if self.seed is not None else trainer.strategy.broadcast(random.randrange(2**63))
        self._generator.manual_seed(seed)
        self._masking = Masking.random(params, self.density, self.init, self._generator)
        self._masking.apply_()
        if self._pending_state is not None:
            self._restore()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masking = self._require_masking()
        masking.to_devices()
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"SparseTrainingCallback supports exactly one optimizer, got {len(trainer.optimizers)}"
            )
        if self._algorithm.needs_momentum:
            check_momentum_optimizer(trainer.optimizers[0], masking.weights)
        masking.apply_()
        self._applied_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Read here, not in `on_fit_start`: asking earlier loads the train dataloader before the checkpoint's
        # loop state is restored, and Lightning then cannot resume a stateful dataloader mid-epoch.
        self._total_steps = float(trainer.estimated_stepping_batches)
        schedule = self.prune_rate_schedule
        if self._algorithm.dynamic and not callable(schedule) and schedule != "constant":
            if not 0 < self._total_steps < math.inf:
                raise ValueError(
                    f"the {schedule!r} prune-rate schedule needs the length of training: set `max_epochs` or"
                    " `max_steps` on the Trainer, or use prune_rate_schedule='constant'"
                )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._applied_step:
            return  # no optimizer step since the last call (gradient accumulation): weights unchanged
        self._applied_step = step
        self._require_masking().apply_()
        if self.update_interval is not None and step % self.update_interval == 0 and step < self._total_steps:
            self._update(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.update_interval is None and trainer.global_step < self._total_steps:
            self._update(trainer, pl_module, on_step=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._masking is not None:
            rank_zero_info(self.summary())

    # ------------------------------------------------------------------ the update
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        masking = self._require_masking()
        if not self._algorithm.dynamic:
            return
        step = trainer.global_step
        rate = self.prune_rate_at(step / self._total_steps)
        nonzero = masking.nonzero_counts()  # the network as trained, before the topology changes
        optimizer = trainer.optimizers[0]
        layers = [
            LayerState(name, weight, mask, partial(optimizer_momentum, optimizer, weight))
            for name, weight, mask in zip(masking.names, masking.weights, masking.masks)
        ]
        result = self._algorithm.update(layers, masking.active, rate, self._generator)
        masking.set_masks(result.masks, result.active)
        masking.apply_()
        self._current_prune_rate = rate
        self._last_update_step = step
        self._num_updates += 1
        metrics = {"sparse/density": sum(nonzero) / sum(masking.sizes), "sparse/prune_rate": rate}
        for name, n, size in zip(masking.names, nonzero, masking.sizes):
            metrics[f"sparse/density/{name}"] = n / size
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=True)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """A per-layer table: shape, active weights, density of the mask and of the weights."""
        masking = self._require_masking()
        nonzero = masking.nonzero_counts()
        rows = [("layer", "shape", "active", "total", "density")]
        for name, weight, active, nz in zip(masking.names, masking.weights, masking.active, nonzero):
            rows.append((name, "x".join(map(str, weight.shape)), str(active), str(weight.numel()), f"{nz / weight.numel():.4f}"))
        rows.append(("all", "", str(sum(masking.active)), str(sum(masking.sizes)), f"{sum(nonzero) / sum(masking.sizes):.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "SparseTrainingCallback: final masks\n" + "\n".join(lines)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        masking = self._require_masking()
        return {
            "version": STATE_VERSION,
            "masks": masking.state_dict(),
            "prune_rate": self._current_prune_rate,
            "last_update_step": self._last_update_step,
            "num_updates": self._num_updates,
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict
        if self._masking is not None:
            self._restore()

    def _restore(self) -> None:
        state, self._pending_state = self._pending_state, None
        assert state is not None and self._masking is not None
        if "masks" not in state:
            raise ValueError("the checkpoint's SparseTrainingCallback state holds no masks")
        self._masking.load_masks(state["masks"])
        self._masking.apply_()
        self._current_prune_rate = float(state.get("prune_rate", self.prune_rate))
        self._last_update_step = int(state.get("last_update_step", -1))
        self._num_updates = int(state.get("num_updates", 0))
        if "generator_state" in state:
            self._generator.set_state(state["generator_state"])

    def _require_masking(self) -> Masking:
        if self._masking is None:
            raise RuntimeError("SparseTrainingCallback has no masks yet: they are made in `setup` of `fit`")
        return self._masking
