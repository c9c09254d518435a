"""What :class:`~lightning_sparse.SparseTrainingCallback` logs and how: the ``sparse/...`` metric names
(``sparse/<i>/...`` with several sparse callbacks), the row of a mask update and of an epoch end, how each row
reaches Lightning's loggers, and the per-layer table and figure at the end of ``fit``.

The numbers come from the :class:`~lightning_sparse.Sparsifier` (densities, an update's rate) and from the
accounting objects of :mod:`lightning_sparse.cost` the callback hands in (channel statistics and speedups,
training FLOPs, its own time).

Logged at every mask update and epoch end: ``sparse/density``, ``sparse/density/<param>``, ``sparse/prune_rate``
(updates), ``sparse/empty_in|out/<param>``, ``sparse/empty_heads/<attention module>`` (fraction of its heads with an
all-masked Q, K or V projection), ``sparse/speedup_dense_conv``, ``sparse/speedup_sparse_conv``,
``sparse/train_flops_ratio``, ``sparse/overhead``, ``sparse/explored`` and ``sparse/explored/<param>`` (ITOP's
``R_s``: the fraction of positions ever active, :meth:`~lightning_sparse.Sparsifier.explored`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lightning_sparse.core.sparsifier import Sparsifier, UpdateReport

if TYPE_CHECKING:
    from lightning_sparse.cost import InputCapture, SparsityReport, Stopwatch, TrainFlops
    from lightning_sparse.options import SparseOptions

log = logging.getLogger(__name__)


class SparseMetrics:
    """The accounting of one sparse ``fit`` and the metrics logged from it.

    Args:
        report: channel statistics, speedup estimates, the table and the figure.
        flops: training FLOPs of the sparse and the dense network (checkpointed by the callback).
        stopwatch: the time the callback spends in its own work (``sparse/overhead``).
    """

    def __init__(self, report: SparsityReport, flops: TrainFlops, stopwatch: Stopwatch) -> None:
        self.report = report
        self.flops = flops
        self.stopwatch = stopwatch
        self.capture: InputCapture | None = None  # the first training step's layer inputs, for the cost model
        self.prefix = "sparse"
        self.index = 0
        self.train_start = 0.0
        self.log_dir = "."

    def name(self, index: int, count: int) -> None:
        """Callback ``index`` of ``count`` sparse callbacks: with several, its metrics are ``sparse/<index>/...``."""
        self.index, self.prefix = index, "sparse" if count == 1 else f"sparse/{index}"

    def start(self, trainer: pl.Trainer, sparsifier: Sparsifier, capture: InputCapture) -> None:
        """Training starts: capture the first step's layer inputs and record the figure's starting point."""
        self.capture = capture
        self.measure(sparsifier, trainer.global_step)
        self.train_start = time.perf_counter()
        self.log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks

    def after_first_step(self, sparsifier: Sparsifier, measure_time: bool) -> None:
        """After the first training step: the cost model from the captured inputs (once)."""
        if self.capture is None:
            return
        cost_model = self.capture.cost_model(measure_time, sparsifier.sharded)
        if cost_model is None:
            log.warning("SparseTrainingCallback: no module holding every masked layer was called in the first"
                        " training step; speedup estimates and training FLOPs are not logged")  # fmt: skip
        self.report.cost_model, self.capture = cost_model, None
        self.set_step_flops(sparsifier)

    def set_step_flops(self, sparsifier: Sparsifier) -> None:
        """The FLOPs of one training step from now on, at the current densities."""
        flops = self.report.cost_model.flops if self.report.cost_model is not None else None
        self.flops.set_step_flops(flops, sparsifier.densities(), sparsifier.needs_dense_gradients)

    def measure(self, sparsifier: Sparsifier, step: int) -> dict[str, Any]:
        """Channel statistics of every layer the report counts (masks, or the weights of unmasked layers;
        all-reduced counts on FSDP2 shards) and the empty heads of the attention modules."""
        names = self.report.cost_model.flops if self.report.cost_model is not None else ()
        layers, layout = sparsifier.report_layers(names)
        return self.report.measure(step, layers, **layout)

    # ------------------------------------------------------------------ rows
    def log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsifier: Sparsifier,
                   update: UpdateReport) -> None:  # fmt: skip
        """One row for a mask update: densities measured just before it, its rate, the costs after it."""
        flops = self.report.cost_model.flops if self.report.cost_model is not None else None
        self.flops.mask_update(trainer.global_step, flops, sparsifier.densities(), sparsifier.needs_dense_gradients,
                               gradient_growth=sparsifier.uses_gradient_growth)  # fmt: skip
        sizes = dict(zip(sparsifier.names, sparsifier.sizes))
        density = self.density_metrics(sparsifier, {n: c / sizes[n] for n, c in update.nonzero_before.items()})
        costs = self.cost_metrics(trainer, sparsifier)
        explored = self.explored_metrics(sparsifier)
        self.log(pl_module, {**density, "sparse/prune_rate": update.rate, **costs, **explored}, on_step=True)

    def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsifier: Sparsifier) -> None:
        """One row per epoch end, for every method: densities of the weights as trained, and the costs."""
        density = self.density_metrics(sparsifier, sparsifier.nonzero_densities())
        explored = self.explored_metrics(sparsifier)
        self.log(pl_module, {**density, **self.cost_metrics(trainer, sparsifier), **explored}, on_step=False)

    def explored_metrics(self, sparsifier: Sparsifier) -> dict[str, float]:
        """``sparse/explored`` (ITOP's ``R_s`` over the masked weights) and ``sparse/explored/<param>``."""
        explored = sparsifier.explored()
        return {"sparse/explored": explored.model, **{f"sparse/explored/{n}": r for n, r in explored.layers.items()}}

    def density_metrics(self, sparsifier: Sparsifier, densities: Mapping[str, float]) -> dict[str, float]:
        """``sparse/density`` (over the layers given) and ``sparse/density/<param>``."""
        sizes = dict(zip(sparsifier.names, sparsifier.sizes))
        total = sum(d * sizes[n] for n, d in densities.items()) / max(sum(sizes[n] for n in densities), 1)
        return {"sparse/density": total, **{f"sparse/density/{name}": d for name, d in densities.items()}}

    def cost_metrics(self, trainer: pl.Trainer, sparsifier: Sparsifier) -> dict[str, float]:
        """Channel statistics, speedup estimates, training FLOPs ratio and the callback's overhead."""
        metrics = dict(self.report.metrics(self.measure(sparsifier, trainer.global_step)))
        self.flops.advance(trainer.global_step)
        if self.flops.ratio is not None:
            metrics["sparse/train_flops_ratio"] = self.flops.ratio
        elapsed = time.perf_counter() - self.train_start
        if elapsed > 0:
            metrics["sparse/overhead"] = self.stopwatch.total() / elapsed
        return metrics

    def log(self, pl_module: pl.LightningModule, metrics: Mapping[str, float], on_step: bool) -> None:
        """Epoch metrics through ``pl_module.log`` (reduced over processes, written at the epoch's last step).
        Metrics of a mask update (``on_step``) go to every logger at the step of the update itself (on Lightning's
        step axis, with the optimizer step that triggered it), whatever ``log_every_n_steps`` says, and to
        ``trainer.callback_metrics``. With several sparse callbacks, callback ``i`` logs ``sparse/<i>/...``."""
        if self.prefix != "sparse":
            metrics = {self.prefix + k.removeprefix("sparse"): v for k, v in metrics.items()}
        if not on_step:
            pl_module.log_dict(dict(metrics), on_step=False, on_epoch=True, sync_dist=True)
            return
        trainer = pl_module.trainer
        values = {k: float(v) for k, v in metrics.items()}
        if trainer.is_global_zero:
            # Lightning's step axis: the metrics of optimizer step s (global_step s after it) are at step s - 1
            row = {**values, "epoch": trainer.current_epoch}
            for logger in trainer.loggers:
                logger.log_metrics(row, step=max(trainer.global_step - 1, 0))
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})

    # ------------------------------------------------------------------ end of fit
    def summary(self, title: str, sparsifier: Sparsifier | None, masks: Mapping[str, Any],
                stats: Mapping[str, Any] | None = None) -> str:  # fmt: skip
        """A per-layer table under ``title`` (completed by the Sparsifier's description); ``stats`` defaults to
        the last recorded channel statistics, or those of ``masks``."""
        if stats is None:
            stats = self.report.history[-1][1] if self.report.history else self.report.measure(-1, dict(masks))
        if sparsifier is not None:
            title += f", {sparsifier.describe()}"
        table = title + "\n" + self.report.table(stats)
        if sparsifier is not None and sparsifier.left_dense:
            table += "\nleft dense:\n" + "\n".join(f"  {n}: {why}" for n, why in sparsifier.left_dense.items())
        return table

    def figure(self, pl_module: pl.LightningModule, sparsifier: Sparsifier, options: SparseOptions) -> tuple[str, Any]:
        """Write the figure of the run (``sparsity.png``, ``sparsity_<index>.png`` with several sparse callbacks)
        to the log directory; returns its path and the figure."""
        name = "sparsity.png" if self.prefix == "sparse" else f"sparsity_{self.index}.png"
        path = os.path.join(self.log_dir, name)
        density = options.density
        title = (f"{options.algorithm_name}, density {density if density is not None else 'learned'},"
                 f" {type(pl_module).__name__}, {len(sparsifier.names)} masked layers")  # fmt: skip
        fig = self.report.figure(path, title=title, masked=sparsifier.names,
                                 target=density if isinstance(density, float) else None,
                                 sizes=dict(zip(sparsifier.names, sparsifier.sizes)))  # fmt: skip
        return path, fig
