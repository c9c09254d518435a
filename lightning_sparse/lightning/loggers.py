"""What :class:`~lightning_sparse.SparseTrainingCallback` logs and how: the ``sparse/...`` metric names
(``sparse/<i>/...`` with several sparse callbacks), the row of a mask update and of an epoch end, how each row
reaches Lightning's loggers, and the per-layer table and figure at the end of ``fit``.

The numbers come from the :class:`~lightning_sparse.Sparsifier` (densities, an update's rate) and from the
accounting objects of :mod:`lightning_sparse.cost` the callback hands in (channel statistics and speedups,
training FLOPs, its own time).

Logged at every mask update and epoch end, one row per step (an update and an epoch end at the same step share
it, the update's values first):

* ``sparse/density``: the **mask density**, active (masked-in) weights / masked weights, from the masks' exact
  counts: the number the end-of-fit table and the figure show. ``sparse/density/<param>`` per layer.
* ``sparse/nonzero_density``: non-zero masked weights / masked weights, of the weights as trained (at an update:
  just before it; weights grown at zero are not counted). ``sparse/nonzero_density/<param>`` per layer.
* ``sparse/prune_rate`` (update rows): the pruning rate of the update.
* ``sparse/empty_in/<param>``, ``sparse/empty_out/<param>``: fraction of input/output channels with no active
  weight; ``sparse/empty_heads/<attention module>``: fraction of its heads with an all-masked Q, K or V projection.
* ``sparse/speedup_dense_conv``, ``sparse/speedup_sparse_conv``: estimated speedups, logged only where they mean
  something: when a convolution is masked or some layer has empty channels (a plain MLP without empty channels
  logs neither; see :meth:`~lightning_sparse.cost.SparsityReport.speedups_apply`).
* ``sparse/train_flops_ratio``, ``sparse/overhead``.
* ``sparse/explored``: ITOP's ``R_s``, the fraction of the masked positions that have ever been active
  (:meth:`~lightning_sparse.Sparsifier.explored`); ``sparse/explored/<param>`` per layer.

``per_layer_metrics=False`` leaves out every per-layer and per-module metric (``.../<param>``, ``.../<module>``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
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
        self.log_dir: str | None = None  # where the figure goes: the trainer's log directory, None without logger
        self.per_layer = True  # per-layer and per-module metrics (`per_layer_metrics`)
        self._row: tuple[int, int, dict[str, float], dict[str, float]] | None = None  # step, epoch, epoch end, update

    def name(self, index: int, count: int) -> None:
        """Callback ``index`` of ``count`` sparse callbacks: with several, its metrics are ``sparse/<index>/...``."""
        self.index, self.prefix = index, "sparse" if count == 1 else f"sparse/{index}"

    def start(self, trainer: pl.Trainer, sparsifier: Sparsifier, capture: InputCapture) -> None:
        """Training starts: capture the first step's layer inputs and record the figure's starting point."""
        self.capture = capture
        self.measure(sparsifier, trainer.global_step)
        self.train_start = time.perf_counter()
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self.log_dir = (log_dir or trainer.default_root_dir) if trainer.loggers else None

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
        """The row of a mask update: the masks' density after it, the non-zero density of the weights as trained
        (just before it), its rate, the costs after it."""
        flops = self.report.cost_model.flops if self.report.cost_model is not None else None
        self.flops.mask_update(trainer.global_step, flops, sparsifier.densities(), sparsifier.needs_dense_gradients,
                               gradient_growth=sparsifier.uses_gradient_growth)  # fmt: skip
        result = update.result
        before = sum(result.active) - sum(result.grown) + sum(result.pruned)
        self.report.updates.append((trainer.global_step, float(update.rate), sum(result.pruned) / max(before, 1)))
        metrics = {
            **self.density_metrics(sparsifier, update.nonzero_before),
            "sparse/prune_rate": update.rate,
            **self.cost_metrics(trainer, sparsifier),
            **self.explored_metrics(trainer, sparsifier),
        }
        self.log(trainer, metrics, update=True)

    def log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsifier: Sparsifier) -> None:
        """The row of an epoch end, for every method: the masks' density, the non-zero density of the weights as
        trained, and the costs."""
        nonzero = sparsifier.nonzero_counts()
        metrics = {
            **self.density_metrics(sparsifier, nonzero),
            **self.cost_metrics(trainer, sparsifier),
            **self.explored_metrics(trainer, sparsifier),
        }
        self.log(trainer, metrics)

    def explored_metrics(self, trainer: pl.Trainer, sparsifier: Sparsifier) -> dict[str, float]:
        """``sparse/explored`` (ITOP's ``R_s`` over the masked weights) and, with :attr:`per_layer`,
        ``sparse/explored/<param>``."""
        explored = sparsifier.explored()
        self.report.explored.append((trainer.global_step, explored.model))
        metrics = {"sparse/explored": explored.model}
        if self.per_layer:
            metrics.update({f"sparse/explored/{n}": r for n, r in explored.layers.items()})
        return metrics

    def density_metrics(self, sparsifier: Sparsifier, nonzero: Mapping[str, int]) -> dict[str, float]:
        """``sparse/density`` (mask density: active / masked weights, from the masks' exact counts),
        ``sparse/nonzero_density`` (non-zero / masked weights, from ``nonzero``: layer name → non-zero count),
        and, with :attr:`per_layer`, both per layer (``sparse/density/<param>``, ``sparse/nonzero_density/<param>``)."""
        names, sizes, counts = sparsifier.names, sparsifier.sizes, sparsifier.active_counts()
        active = [counts[n] for n in names]
        total = max(sum(sizes), 1)
        metrics = {
            "sparse/density": sum(active) / total,
            "sparse/nonzero_density": sum(int(nonzero[n]) for n in names) / total,
        }
        if self.per_layer:
            metrics.update({f"sparse/density/{n}": a / s for n, a, s in zip(names, active, sizes)})
            metrics.update({f"sparse/nonzero_density/{n}": int(nonzero[n]) / s for n, s in zip(names, sizes)})
        return metrics

    def cost_metrics(self, trainer: pl.Trainer, sparsifier: Sparsifier) -> dict[str, float]:
        """Channel statistics, speedup estimates (where they apply), training FLOPs ratio and the callback's
        overhead."""
        stats = self.measure(sparsifier, trainer.global_step)
        metrics = dict(self.report.metrics(stats, per_layer=self.per_layer))
        self.flops.advance(trainer.global_step)
        if self.flops.ratio is not None:
            metrics["sparse/train_flops_ratio"] = self.flops.ratio
        elapsed = time.perf_counter() - self.train_start
        if elapsed > 0:
            metrics["sparse/overhead"] = self.stopwatch.total() / elapsed
        return metrics

    def log(self, trainer: pl.Trainer, metrics: Mapping[str, float], update: bool = False) -> None:
        """Keep ``metrics`` for the row of this step, on Lightning's step axis (the metrics of optimizer step
        ``s``, ``global_step`` ``s`` after it, are at step ``s - 1``, where Lightning writes its epoch metrics);
        they are in ``trainer.callback_metrics`` at once. The row is written to every logger by :meth:`flush`,
        once no other row can fall on its step: an update and an epoch end at the same step share one row, the
        update's (its non-zero density is of the weights as trained, its mask density and costs after it).
        With several sparse callbacks, callback ``i`` logs ``sparse/<i>/...``."""
        if self.prefix != "sparse":
            metrics = {self.prefix + k.removeprefix("sparse"): v for k, v in metrics.items()}
        values = {k: float(v) for k, v in metrics.items()}
        step = max(trainer.global_step - 1, 0)
        if self._row is not None and self._row[0] != step:
            self.flush(trainer)
        if self._row is None:
            self._row = (step, trainer.current_epoch, {}, {})
        self._row[3 if update else 2].update(values)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})

    def flush(self, trainer: pl.Trainer) -> None:
        """Write the row kept by :meth:`log` to every logger (rank zero), if there is one."""
        row, self._row = self._row, None
        if row is None or not trainer.is_global_zero:
            return
        step, epoch, at_epoch_end, at_update = row
        # an update measures everything an epoch end does, after it: its row replaces the epoch end's whole (a
        # merge would keep metrics the update no longer logs, e.g. speedups of channels it refilled)
        metrics = {**(at_update or at_epoch_end), "epoch": epoch}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ end of fit
    def summary(self, title: str, sparsifier: Sparsifier | None, masks: Mapping[str, Any],
                stats: Mapping[str, Any] | None = None) -> str:  # fmt: skip
        """A per-layer table under ``title`` (completed by the Sparsifier's description); ``stats`` defaults to
        the last recorded channel statistics, or those of ``masks``."""
        if stats is None:
            stats = self.report.history[-1][1] if self.report.history else self.report.measure(-1, dict(masks))
        if sparsifier is not None:
            title += f", {sparsifier.describe()}"
        explored = sparsifier.explored() if sparsifier is not None else None
        table = title + "\n" + self.report.table(stats, explored=explored)
        if sparsifier is not None and sparsifier.left_dense:
            table += "\nleft dense:\n" + "\n".join(f"  {n}: {why}" for n, why in sparsifier.left_dense.items())
        return table

    def figure(self, pl_module: pl.LightningModule, sparsifier: Sparsifier,
               options: SparseOptions) -> tuple[str, Any] | None:  # fmt: skip
        """Write the figure of the run (``sparsity.png``, ``sparsity_<index>.png`` with several sparse callbacks)
        to the log directory of the trainer's loggers; returns its path and the figure, or ``None`` when the
        trainer has no logger (nothing is written)."""
        if self.log_dir is None:
            return None
        name = "sparsity.png" if self.prefix == "sparse" else f"sparsity_{self.index}.png"
        path = os.path.join(self.log_dir, name)
        density = options.density
        groups = isinstance(density, Mapping)
        asked = "learned" if density is None else "groups" if groups else f"{density:g}"
        title = (f"{network_name(pl_module, sparsifier.names)}: {options.algorithm_name}, density {asked},"
                 f" {len(sparsifier.names)} masked layers")  # fmt: skip
        fig = self.report.figure(path, title=title, masked=sparsifier.names,
                                 target=density if isinstance(density, float) else None,
                                 sizes=dict(zip(sparsifier.names, sparsifier.sizes)))  # fmt: skip
        return path, fig


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def network_name(pl_module: torch.nn.Module, masked: Sequence[str]) -> str:
    """The name a user knows the trained network by: the class of the LightningModule's submodule that holds every
    masked layer (``ResNet`` for a LightningModule with ``self.model = resnet50()``, through ``torch.compile``'s
    wrapper; a subclass of ``nn.Sequential`` such as ``class LeNet5(nn.Sequential)`` counts), or the LightningModule's
    class when the layers are its own or in a plain container (exactly ``nn.Sequential``, ``nn.ModuleList`` or
    ``nn.ModuleDict``)."""
    own = type(pl_module).__name__
    heads = {n.split(".", 1)[0] for n in masked if "." in n}
    if len(heads) != 1 or len(heads) != len({n.split(".", 1)[0] for n in masked}):
        return own
    child = getattr(pl_module, heads.pop(), None)
    child = getattr(child, "_orig_mod", child)  # torch.compile
    if not isinstance(child, torch.nn.Module) or type(child) in _CONTAINERS:
        return own
    return type(child).__name__
