"""``SparseTrainingCallback``: train any LightningModule sparse from the first step to the last.

A thin layer over :mod:`lightning_sparse.masking`, :mod:`lightning_sparse.algorithms` and
:mod:`lightning_sparse.dst`; the hooks, in the order Lightning calls them:

* ``setup``: find the masked weights, draw the initial masks and zero the masked-out weights, or attach
  DST's thresholds (before the model is moved, wrapped for DDP, or given its optimizer);
* ``load_state_dict``: masks, schedule position and random state from a checkpoint;
* ``on_fit_start``: check the optimizer, move the masks to the weights' devices;
* ``on_train_start``: read the length of training; SNIP's one-batch masks;
* ``on_before_optimizer_step``: DST's regularizer gradient;
* ``on_train_batch_end``: re-apply the masks after every optimizer step; step-level updates;
* ``on_train_epoch_end``: epoch-level updates (the sparse momentum paper's setting);
* ``on_fit_end``: a per-layer table.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import types
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sparse import dst
from lightning_sparse.algorithms import (
    LayerState,
    SparseAlgorithm,
    UpdateContext,
    get_algorithm,
    window_progress,
)
from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.prune_grow import snip_masks
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES
from lightning_sparse.functional.speedup import training_step_flops
from lightning_sparse.kernels import check_mask_kernel
from lightning_sparse.masking import Masking, maskable_parameters
from lightning_sparse.momentum import check_momentum_optimizer, optimizer_momentum, reset_optimizer_state
from lightning_sparse.report import TIMINGS, CostModel, SparsityReport

log = logging.getLogger(__name__)

STATE_VERSION = 1


class SparseTrainingCallback(Callback):
    """Keep a network sparse during the whole of training, updating which weights are active.

    Args:
        density: fraction of the masked weights that are active, in (0, 1]. Required, except for
            ``algorithm="dst"``, whose density is learned.
        algorithm: ``"sparse_momentum"`` (Dettmers & Zettlemoyer 2019), ``"rigl"`` (Evci et al. 2020),
            ``"set"``, ``"dsr"``, ``"static"``, ``"snip"``, ``"gmp"``, ``"dst"`` (Liu et al. 2020), a
            :class:`~lightning_sparse.SparseAlgorithm` or a :class:`~lightning_sparse.DST`.
        prune_rate: initial pruning rate ``p`` (RigL's drop fraction ``α``, SET's ``ζ``, DSR's target
            fraction pruned): the fraction of each layer's active weights moved at an update, in [0, 1].
            ``None`` takes the algorithm's default (0.5 sparse momentum, 0.3 RigL and SET, 0.1 DSR).
        prune_rate_schedule: how ``p`` changes over training: ``"cosine"`` (to zero at the end of the
            update window), ``"linear"``, ``"constant"``, or a function of progress in [0, 1] returning the
            rate; ``None`` takes the algorithm's default. Progress is
            ``trainer.global_step / (stop_at * trainer.estimated_stepping_batches)`` (optimizer steps).
        init: sparse initialization: ``"uniform"`` (every layer at ``density``), ``"erk"`` or ``"er"``;
            ``None`` takes the algorithm's default (``"uniform"``; ``"erk"`` for RigL, ``"er"`` for SET).
        dense_layers: module or parameter names, or glob patterns (``"*.downsample.*"``), of layers to keep
            dense. Biases and normalization weights are never masked; the weights of Linear and
            Conv1d/2d/3d layers are masked unless named here.
        update_interval: ``"epoch"`` updates the masks at the end of every epoch but the last; an int
            updates every that many optimizer steps (never on the last step); ``None`` takes the
            algorithm's default (every epoch; every 100 steps for RigL and GMP, 200 for DSR).
        stop_at: end of the update window as a fraction of training, in (0, 1]; the first update at or
            after it is the last. ``None`` takes the algorithm's default (1.0; 0.75 for RigL and GMP).
        seed: seed of the random initial masks and of random growth; the same seed gives the same masks.
            ``None`` draws one on rank zero and shares it with every process.
        speedup_timing: cost of each layer in the speedup estimates: ``"flops"`` (forward FLOPs for the
            input shapes of the first training batch) or ``"measure"`` (each layer's forward+backward timed
            once on that batch, as the paper did).
        figure: write ``sparsity.png`` (per-layer density over training, empty channels per layer) to the
            trainer's log directory at the end of ``fit`` (and log it to a TensorBoard logger).
        mask_kernel: how the masks are applied to CPU weights after each optimizer step: ``"auto"`` (a
            fused C++ kernel, compiled once on first use, when it builds; otherwise torch's
            ``_foreach_mul_`` with a warning), ``"cpp"`` (the C++ kernel, or an error if it cannot be built)
            or ``"torch"`` (torch's ops, nothing compiled). CUDA weights always use torch's ops, which are
            already fused there. See :mod:`lightning_sparse.kernels`.

    Logged at every mask update (and every epoch end): ``sparse/density``, ``sparse/density/<param>``,
    ``sparse/prune_rate``, ``sparse/empty_in/<param>``, ``sparse/empty_out/<param>``,
    ``sparse/speedup_dense_conv``, ``sparse/speedup_sparse_conv``, ``sparse/train_flops_ratio`` (training
    FLOPs so far relative to a dense run of the same length, counted as in the RigL paper) and
    ``sparse/overhead`` (fraction of the training time spent applying and updating masks).

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
        density: float | None = None,
        algorithm: str | SparseAlgorithm | dst.DST = "sparse_momentum",
        prune_rate: float | None = None,
        prune_rate_schedule: str | Callable[[float], float] | None = None,
        init: str | None = None,
        dense_layers: Sequence[str] = (),
        update_interval: int | Literal["epoch"] | None = None,
        stop_at: float | None = None,
        seed: int | None = None,
        speedup_timing: Literal["flops", "measure"] = "flops",
        figure: bool = True,
        mask_kernel: Literal["auto", "cpp", "torch"] = "auto",
    ) -> None:
        self._algorithm = get_algorithm(algorithm)
        self._dst = self._algorithm if isinstance(self._algorithm, dst.DST) else None
        if density is None and self._dst is None:
            raise ValueError(f"`density` is required for algorithm {algorithm!r} (only 'dst' learns its density)")
        if density is not None and (
            isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0
        ):
            raise ValueError(f"`density` must be a number in (0, 1], got {density!r}")
        defaults = self._algorithm if isinstance(self._algorithm, SparseAlgorithm) else SparseAlgorithm()
        prune_rate = defaults.prune_rate if prune_rate is None else prune_rate
        if not 0.0 <= prune_rate <= 1.0:
            raise ValueError(f"`prune_rate` must be in [0, 1], got {prune_rate!r}")
        schedule = defaults.schedule if prune_rate_schedule is None else prune_rate_schedule
        if not callable(schedule) and schedule not in PRUNE_RATE_SCHEDULES:
            raise ValueError(
                f"`prune_rate_schedule` can be {', '.join(PRUNE_RATE_SCHEDULES)} or a function of progress,"
                f" got {schedule!r}"
            )
        if init is not None and init not in INIT_METHODS:
            raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {init!r}")
        if update_interval is None:
            update_interval = defaults.update_interval
        elif update_interval == "epoch":
            update_interval = None
        elif isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ValueError(f"`update_interval` must be 'epoch', an int >= 1, or None, got {update_interval!r}")
        stop_at = defaults.stop_at if stop_at is None else stop_at
        if not 0.0 < stop_at <= 1.0:
            raise ValueError(f"`stop_at` must be in (0, 1], got {stop_at!r}")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int or None, got {seed!r}")
        if speedup_timing not in TIMINGS:
            raise ValueError(f"`speedup_timing` can be {', '.join(TIMINGS)}, got {speedup_timing!r}")
        check_mask_kernel(mask_kernel)
        if isinstance(dense_layers, str):
            dense_layers = [dense_layers]
        self.density = None if density is None else float(density)
        self.algorithm_name = algorithm if isinstance(algorithm, str) else type(algorithm).__name__
        self.prune_rate = float(prune_rate)
        self.prune_rate_schedule = schedule
        self.init = init or defaults.init
        self.dense_layers = list(dense_layers)
        self.update_interval: int | None = update_interval
        self.stop_at = float(stop_at)
        self.seed = seed
        self.speedup_timing = speedup_timing
        self.figure = figure
        self.mask_kernel = mask_kernel

        self._masking: Masking | None = None
        self._dst_modules: dict[str, nn.Module] = {}
        self._thresholds: dict[str, dst.ThresholdMask] = {}
        self._generator = torch.Generator()
        self._algorithm_state: dict[str, Any] = {}
        self._pending_state: dict[str, Any] | None = None
        self._restored = False
        self._total_steps: float = math.inf
        self._applied_step = -1
        self._last_update_step = -1
        self._num_updates = 0
        self._current_prune_rate = self.prune_rate
        self._optimizer: torch.optim.Optimizer | None = None
        self._report = SparsityReport()
        self._capture: _RootInputCapture | None = None
        self._stopwatch = _Stopwatch()
        self._train_start_time = 0.0
        self._log_dir = "."
        self._step_flops = (0.0, 0.0)  # (sparse, dense) FLOPs of one training step with the current masks
        self._train_flops = {"sparse": 0.0, "dense": 0.0, "step": 0}

    # ------------------------------------------------------------------ public read-only state
    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name (as in ``pl_module.named_parameters()`` before DST's parametrization) →
        ``torch.bool`` mask, True = active."""
        if self._dst is not None:
            return types.MappingProxyType(
                {
                    f"{name}.weight": self._thresholds[name].mask(dst.raw_weight(module))
                    for name, module in self._dst_modules.items()
                }
            )
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
        if self._dst is not None:
            if not self._thresholds:
                params = maskable_parameters(pl_module, self.dense_layers)
                names = [name.rsplit(".", 1)[0] for name in params]
                self._dst_modules = {name: pl_module.get_submodule(name) for name in names}
                self._thresholds = dst.attach_thresholds(self._dst_modules)
            return
        params = maskable_parameters(pl_module, self.dense_layers)
        if self._masking is not None and self._masking.weights == list(params.values()):
            return  # a second `fit` of the same model keeps its masks
        seed = self.seed if self.seed is not None else trainer.strategy.broadcast(random.randrange(2**63))
        self._generator.manual_seed(seed)
        assert self.density is not None and isinstance(self._algorithm, SparseAlgorithm)
        if self._algorithm.start == "random":
            self._masking = Masking.random(params, self.density, self.init, self._generator, self.mask_kernel)
        else:  # dense until GMP prunes or SNIP picks its masks
            masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
            self._masking = Masking(params, masks, self.mask_kernel)
        # torch's ops for this one-off: the model may still be on the CPU on its way to a GPU, and nothing
        # should be compiled for it; `on_fit_start` applies the masks again on the training device
        self._masking.apply_(kernel="torch")
        if self._pending_state is not None:
            self._restore()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparseTrainingCallback supports exactly one optimizer, got {len(trainer.optimizers)}")
        self._optimizer = trainer.optimizers[0]
        if self._dst is not None:
            thresholds = [m.threshold for m in self._thresholds.values()]
            optimized = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
            if not all(id(t) in optimized for t in thresholds):
                raise ValueError(
                    "DST's thresholds are not optimized: `configure_optimizers` must pass `self.parameters()`"
                    " (the callback adds the thresholds in `setup`, before `configure_optimizers` runs)"
                )
            return
        masking = self._require_masking()
        masking.to_devices()
        assert isinstance(self._algorithm, SparseAlgorithm)
        if self._algorithm.needs_momentum:
            check_momentum_optimizer(self._optimizer, masking.weights)
        masking.apply_()
        self._applied_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Read here, not in `on_fit_start`: asking earlier loads the train dataloader before the checkpoint's
        # loop state is restored, and Lightning then cannot resume a stateful dataloader mid-epoch.
        self._total_steps = float(trainer.estimated_stepping_batches)
        schedule = self.prune_rate_schedule
        if self._is_dynamic and not callable(schedule) and schedule != "constant":
            if not 0 < self._total_steps < math.inf:
                raise ValueError(
                    f"the {schedule!r} prune-rate schedule needs the length of training: set `max_epochs` or"
                    " `max_steps` on the Trainer, or use prune_rate_schedule='constant'"
                )
        if isinstance(self._algorithm, SparseAlgorithm) and self._algorithm.start == "snip" and not self._restored:
            self._snip(trainer, pl_module)
        self._capture = _RootInputCapture(pl_module, [name.removesuffix(".weight") for name in self.masks])
        self._report.measure(trainer.global_step, self._layers(pl_module))  # the starting point of the figure
        self._train_start_time = time.perf_counter()
        self._log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._dst is not None:
            dst.add_regularizer_grad_([m.threshold for m in self._thresholds.values()], self._dst.alpha)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture is not None:
            self._build_cost_model(self._capture)
            self._capture = None
        step = trainer.global_step
        if step == self._applied_step:
            return  # no optimizer step since the last call (gradient accumulation): weights unchanged
        self._applied_step = step
        if self._dst is not None:
            self._dst_step()
            return
        with self._stopwatch(self._require_masking().weights[0].device):
            self._masking.apply_()
        if self.update_interval is not None and step % self.update_interval == 0 and self._update_due(step):
            self._update(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.update_interval is None and self._update_due(trainer.global_step):
            self._update(trainer, pl_module, on_step=False)
        else:
            if self._dst is not None:
                self._log_density(pl_module, self._layer_densities(), on_step=False)
            self._log_costs(trainer, pl_module, on_step=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._masking is None and not self._thresholds:
            return
        stats = self._report.measure(trainer.global_step, self._layers(pl_module))
        rank_zero_info(self.summary(stats))
        if self.figure and trainer.is_global_zero:
            path = os.path.join(self._log_dir, "sparsity.png")
            fig = self._report.figure(path)
            rank_zero_info(f"SparseTrainingCallback: figure written to {path}")
            for logger in trainer.loggers:
                if hasattr(getattr(logger, "experiment", None), "add_figure"):  # TensorBoard
                    logger.experiment.add_figure("sparse/summary", fig, global_step=trainer.global_step)

    # ------------------------------------------------------------------ mask updates
    @property
    def _is_dynamic(self) -> bool:
        return isinstance(self._algorithm, SparseAlgorithm) and self._algorithm.dynamic

    def _update_due(self, step: int) -> bool:
        """Updates run until the end of training, and stop after the first one at or past the window's end."""
        if not self._is_dynamic or step >= self._total_steps:
            return False
        return window_progress(self._last_update_step, self._total_steps, self.stop_at) < 1.0

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        masking = self._require_masking()
        with self._stopwatch(masking.weights[0].device):
            self._update_masks(trainer, pl_module, on_step)
        self._log_costs(trainer, pl_module, on_step)

    def _update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        masking = self._require_masking()
        assert isinstance(self._algorithm, SparseAlgorithm)
        step = trainer.global_step
        self._account_flops(step)
        progress = window_progress(step, self._total_steps, self.stop_at)
        rate = self.prune_rate_at(progress)
        nonzero = masking.nonzero_counts()  # the network as trained, before the topology changes
        layers = [
            LayerState(name, weight, mask, partial(self._momentum, weight), partial(getattr, weight, "grad"))
            for name, weight, mask in zip(masking.names, masking.weights, masking.masks)
        ]
        context = UpdateContext(rate, progress, self.density or 1.0, self._generator, self._algorithm_state)
        result = self._algorithm.update(layers, masking.active, context)
        masking.set_masks(result.masks, result.active)
        self._ensure_masks_agree(trainer)
        masking.apply_()
        if self._algorithm.reset_grown:
            self._reset_grown(masking, result.masks, result.pruned_masks)
        if self._algorithm.grow == "gradient":  # this step's weight gradients were dense (RigL)
            sparse, dense = self._step_flops
            self._train_flops["sparse"] += (dense - sparse) / 3.0
        self._step_flops = self._training_step_flops()
        self._current_prune_rate = rate
        self._last_update_step = step
        self._num_updates += 1
        sizes = masking.sizes
        self._log_density(pl_module, dict(zip(masking.names, (n / s for n, s in zip(nonzero, sizes)))), on_step)
        pl_module.log("sparse/prune_rate", rate, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    def _momentum(self, weight: Tensor) -> Tensor:
        assert self._optimizer is not None
        check_momentum_optimizer(self._optimizer, [weight])
        return optimizer_momentum(self._optimizer, weight)

    @torch.no_grad()
    def _reset_grown(self, masking: Masking, masks: list[Tensor], pruned_masks: list[Tensor]) -> None:
        """Grown weights start at zero, and so does their optimizer state (RigL)."""
        assert self._optimizer is not None
        for weight, mask, pruned in zip(masking.weights, masks, pruned_masks):
            grown = mask & ~pruned
            weight.masked_fill_(grown, 0.0)
            reset_optimizer_state(self._optimizer, weight, grown)

    def _snip(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """SNIP: score ``|g ⊙ w|`` on one training batch, keep the global top ``density`` fraction."""
        masking = self._require_masking()
        assert self.density is not None
        batch = trainer.strategy.batch_to_device(next(iter(trainer.train_dataloader)))
        buffers = {name: b.clone() for name, b in pl_module.named_buffers()}
        with _logging_disabled(pl_module):
            output = pl_module.training_step(batch, 0)
        loss = output["loss"] if isinstance(output, Mapping) else output
        grads = torch.autograd.grad(loss, masking.weights, allow_unused=True)
        scores = []
        for weight, grad in zip(masking.weights, grads):
            grad = torch.zeros_like(weight) if grad is None else grad
            scores.append((trainer.strategy.reduce(grad, reduce_op="sum") * weight).abs())
        with torch.no_grad():
            for name, b in pl_module.named_buffers():
                b.copy_(buffers[name])
        count = int(round(self.density * sum(masking.sizes)))
        masking.load_masks(dict(zip(masking.names, snip_masks(scores, count))))
        self._ensure_masks_agree(trainer)
        masking.apply_()

    def _ensure_masks_agree(self, trainer: pl.Trainer) -> None:
        """Every process computes the update from the same synchronized weights, momentum, gradients and
        random state, so the masks agree; this checks it with one small all-gather of per-layer checksums
        and, should they ever differ (e.g. a non-deterministic kernel breaking a tie differently), makes
        every process take rank zero's masks."""
        if trainer.world_size <= 1:
            return
        masking = self._require_masking()
        checksums = torch.stack([_mask_checksum(m) for m in masking.masks])
        gathered = trainer.strategy.all_gather(checksums)
        if torch.equal(gathered.amin(dim=0), gathered.amax(dim=0)):
            return
        differing = [n for n, same in zip(masking.names, (gathered == gathered[0]).all(dim=0).tolist()) if not same]
        log.warning("SparseTrainingCallback: masks of %s differ across processes; taking rank zero's", differing)
        for mask in masking.masks:
            torch.distributed.broadcast(mask.view(torch.uint8), src=0)
        masking.load_masks(dict(masking.items()))

    # ------------------------------------------------------------------ costs and speedups
    def _build_cost_model(self, capture: _RootInputCapture) -> None:
        found = capture.finish()
        if found is None:
            log.warning(
                "SparseTrainingCallback: no module containing every masked layer was called in the first"
                " training step; speedup estimates and training FLOPs are not logged"
            )
            return
        prefix, root, example_input = found
        self._report.cost_model = CostModel.build(root, prefix, example_input, self.speedup_timing == "measure")
        self._step_flops = self._training_step_flops()

    def _layers(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Every linear/conv layer the report counts: masks of masked layers, weights of the others."""
        layers = dict(self.masks)
        if self._report.cost_model is not None:
            for name in self._report.cost_model.flops:
                if name not in layers:
                    layers[name] = pl_module.get_submodule(name.removesuffix(".weight")).weight.detach()
        return layers

    def _densities(self) -> dict[str, float]:
        if self._masking is not None:
            return {n: a / s for n, a, s in zip(self._masking.names, self._masking.active, self._masking.sizes)}
        return self._layer_densities()

    def _training_step_flops(self) -> tuple[float, float]:
        cost_model = self._report.cost_model
        if cost_model is None:
            return (0.0, 0.0)
        densities = self._densities()
        dense_gradients = self._dst is not None or (
            isinstance(self._algorithm, SparseAlgorithm) and self._algorithm.needs_momentum
        )
        densities = {n: densities.get(n, 1.0) for n in cost_model.flops}
        return training_step_flops(cost_model.flops, densities, dense_gradients)

    def _account_flops(self, step: int) -> None:
        """Add the training FLOPs of the steps since the last call, at the current densities."""
        steps = step - self._train_flops["step"]
        if steps > 0:
            self._train_flops["sparse"] += steps * self._step_flops[0]
            self._train_flops["dense"] += steps * self._step_flops[1]
        self._train_flops["step"] = step

    def _log_costs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        """Channel statistics, speedup estimates, training FLOPs ratio and the callback's overhead."""
        if self._masking is None and not self._thresholds:
            return
        stats = self._report.measure(trainer.global_step, self._layers(pl_module))
        metrics = self._report.metrics(stats)
        if self._dst is not None:  # DST's density changes every step: count them at the current one
            self._step_flops = self._training_step_flops()
        self._account_flops(trainer.global_step)
        if self._train_flops["dense"] > 0:
            metrics["sparse/train_flops_ratio"] = self._train_flops["sparse"] / self._train_flops["dense"]
        elapsed = time.perf_counter() - self._train_start_time
        if elapsed > 0:
            metrics["sparse/overhead"] = self._stopwatch.total() / elapsed
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    # ------------------------------------------------------------------ DST
    def _layer_densities(self) -> dict[str, float]:
        masks = self.masks
        fractions = torch.stack([m.float().mean() for m in masks.values()]).tolist()
        return dict(zip(masks, fractions))

    def _dst_step(self) -> None:
        assert self._dst is not None
        densities = self._layer_densities()
        by_module = {name.rsplit(".", 1)[0]: d for name, d in densities.items()}
        reset = dst.reset_collapsed_(self._thresholds, by_module, self._dst.collapse_density)
        if reset:
            log.info("DST: thresholds of %s reset (density <= %s)", ", ".join(reset), self._dst.collapse_density)

    # ------------------------------------------------------------------ logging and reporting
    def _log_density(self, pl_module: pl.LightningModule, densities: Mapping[str, float], on_step: bool) -> None:
        sizes = [m.numel() for m in self.masks.values()] if self._dst is not None else self._require_masking().sizes
        total = sum(d * s for d, s in zip(densities.values(), sizes)) / sum(sizes)
        metrics = {"sparse/density": total, **{f"sparse/density/{name}": d for name, d in densities.items()}}
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    def summary(self, stats: Mapping[str, Any] | None = None) -> str:
        """A per-layer table: shape, density, empty input/output channels, share of the FLOPs, and the
        estimated speedups. ``stats`` defaults to the last recorded channel statistics."""
        if stats is None:
            stats = self._report.history[-1][1] if self._report.history else self._report.measure(-1, dict(self.masks))
        title = f"SparseTrainingCallback ({self.algorithm_name}): final masks"
        if self._masking is not None:
            title += f", {sum(self._masking.active)} of {sum(self._masking.sizes)} masked weights active"
        return title + "\n" + self._report.table(stats)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "prune_rate": self._current_prune_rate,
            "last_update_step": self._last_update_step,
            "num_updates": self._num_updates,
            "generator_state": self._generator.get_state(),
            "algorithm_state": dict(self._algorithm_state),
            "train_flops": dict(self._train_flops),
        }
        if self._masking is not None:
            state["masks"] = self._masking.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict
        if self._masking is not None or self._dst is not None:
            self._restore()

    def _restore(self) -> None:
        state, self._pending_state = self._pending_state, None
        assert state is not None
        if self._masking is not None:
            if "masks" not in state:
                raise ValueError("the checkpoint's SparseTrainingCallback state holds no masks")
            self._masking.load_masks(state["masks"])
            self._masking.apply_(kernel="torch")  # often before the model moves to its device; see `setup`
        self._current_prune_rate = float(state.get("prune_rate", self.prune_rate))
        self._last_update_step = int(state.get("last_update_step", -1))
        self._num_updates = int(state.get("num_updates", 0))
        self._algorithm_state = dict(state.get("algorithm_state", {}))
        self._train_flops = dict(state.get("train_flops", self._train_flops))
        if "generator_state" in state:
            self._generator.set_state(state["generator_state"])
        self._restored = True

    def _require_masking(self) -> Masking:
        if self._masking is None:
            raise RuntimeError("SparseTrainingCallback has no masks yet: they are made in `setup` of `fit`")
        return self._masking


@contextmanager
def _logging_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run a ``training_step`` outside Lightning's loop: its ``self.log`` calls are dropped."""
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log
        del pl_module.log_dict


def _mask_checksum(mask: Tensor) -> Tensor:
    """Count, sum and sum of squares of the active positions (int64, wrapping), as one tensor on the device."""
    flat = mask.reshape(-1).to(torch.int64)
    idx = torch.arange(flat.numel(), device=mask.device)
    return torch.stack([flat.sum(), (idx * flat).sum(), (idx * idx * flat).sum()])


class _Stopwatch:
    """Adds up the time spent in a block: wall time on the CPU, CUDA events (no synchronization) on a GPU."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - began

    def total(self) -> float:
        """Seconds so far (waits for the recorded GPU events)."""
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._seconds


class _RootInputCapture:
    """Records the inputs, in one training step, of each module that contains every given layer (the
    LightningModule, ``self.net``, ...), to count the layers' FLOPs for the real input shapes."""

    def __init__(self, pl_module: nn.Module, layer_modules: Sequence[str]) -> None:
        self._calls: dict[str, list[tuple[Tensor, ...]]] = {}
        self._modules: dict[str, nn.Module] = {}
        self._handles = []
        for name, module in pl_module.named_modules():
            if layer_modules and all(not name or m == name or m.startswith(f"{name}.") for m in layer_modules):
                self._modules[name] = module
                self._handles.append(module.register_forward_pre_hook(partial(self._hook, name)))

    def _hook(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        # Only calls on tensors: strategies such as DDP call the LightningModule with (batch, batch_idx) to
        # reach `training_step`, which then calls the network on the real input.
        if args and all(isinstance(a, Tensor) for a in args):
            self._calls.setdefault(name, []).append(tuple(a.detach() for a in args))

    def finish(self) -> tuple[str, nn.Module, tuple[Tensor, ...]] | None:
        """Remove the hooks; the outermost called module containing every layer, its name and first input."""
        for handle in self._handles:
            handle.remove()
        called = sorted(self._calls, key=lambda n: (n.count(".") + bool(n), n))
        if not called:
            return None
        name = called[0]
        return name, self._modules[name], self._calls[name][0]
