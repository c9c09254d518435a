"""``SparseTrainingCallback``: train any LightningModule sparse from the first step to the last.

A thin shell over :class:`~lightning_sparse.Sparsifier` (the method), :mod:`lightning_sparse.cost.report` and
:mod:`lightning_sparse.cost.profiling` (what it costs). The hooks, in the order Lightning calls them:

* ``setup``: what a method must do before the optimizer exists (DST attaches its thresholds);
* ``on_fit_start``: bind a :class:`~lightning_sparse.Sparsifier`, by name, to the weights the optimizer updates,
  after ``configure_model`` and after the strategy has wrapped or sharded the model (DDP, FSDP2);
* ``load_state_dict``: a checkpoint's masks and schedule position (before or after binding: FSDP2 restores after
  ``on_fit_start``);
* ``on_train_start``: the length of training; SNIP's one-batch masks;
* ``on_before_optimizer_step`` / ``on_train_batch_end`` / ``on_train_epoch_end``: the Sparsifier's loop calls;
* ``on_fit_end``: the Sparsifier's ``finish``, a per-layer table and the figure.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (
    Callback,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sparse.core import distributed
from lightning_sparse.core.sparsifier import Sparsifier, UpdateReport
from lightning_sparse.cost import TIMINGS, InputCapture, SparsityReport, Stopwatch, TrainFlops, send_figure
from lightning_sparse.lightning import trainer as trainer_support
from lightning_sparse.methods import SparseAlgorithm, dst
from lightning_sparse.methods.dst_sparsifier import prepare_model
from lightning_sparse.options import SparseOptions

log = logging.getLogger(__name__)


class SparseTrainingCallback(Callback):
    """Keep a network sparse during the whole of training, updating which weights are active.

    Args:
        density: fraction of the masked weights that are active, in (0, 1]. Required, except for
            ``algorithm="dst"``, whose density is learned (DST refuses ``density``, ``prune_rate``,
            ``prune_rate_schedule``, ``init``, ``update_interval`` and ``stop_at``). Numbers (here and for
            ``prune_rate``, ``stop_at``) may be Python, numpy or one-element tensors; they are stored as ``float``.
            A mapping ``{name glob: density}`` gives density groups, first match wins (``{"*.attn.*": 0.5,
            "*": 0.1}``): each group's total is kept exactly, weights move only within a group, ERK/ER distribute
            within each group; layers no glob matches (no ``"*"``), and groups of density 1.0, stay dense.
        algorithm: ``"sparse_momentum"`` (Dettmers & Zettlemoyer 2019), ``"rigl"`` (Evci et al. 2020),
            ``"set"``, ``"dsr"``, ``"static"``, ``"snip"``, ``"gmp"``, ``"dst"`` (Liu et al. 2020), a
            :class:`~lightning_sparse.SparseAlgorithm` or a :class:`~lightning_sparse.DST`.
        prune_rate: initial pruning rate ``p`` (RigL's drop fraction ``α``, SET's ``ζ``, DSR's target
            fraction pruned), in [0, 1]; ``None`` takes the algorithm's default (0.5 sparse momentum, 0.3 RigL and
            SET, 0.1 DSR).
        prune_rate_schedule: ``"cosine"`` (to zero at the end of the update window), ``"linear"``, ``"constant"``,
            or a function of progress in [0, 1] returning the rate (checked at 0, 0.5 and 1 when the callback
            is made); ``None`` takes the algorithm's default.
            Progress is ``trainer.global_step / (stop_at * trainer.estimated_stepping_batches)``.
        init: ``"uniform"`` (every layer at ``density``), ``"erk"`` or ``"er"``; ``None``: the algorithm's default.
        dense_layers: module or parameter names, or glob patterns (``"*.downsample.*"``), of layers kept dense.
        update_interval: ``"epoch"`` (end of every epoch but the last), an int (every that many optimizer steps;
            numpy or one-element integer tensors too, not floats), or ``None`` for the algorithm's default.
        stop_at: end of the update window as a fraction of training, in (0, 1]; ``None``: the algorithm's default.
        seed: seed of the initial masks and of random growth, an int in [0, 2**63); ``None`` draws one on rank
            zero and shares it.
        speedup_timing: layer costs of the speedup estimates: ``"flops"`` or ``"measure"`` (timed once).
        figure: write ``sparsity.png`` to the trainer's log directory at the end of ``fit`` (and to TensorBoard).
        mask_kernel: ``"auto"``, ``"cpp"`` or ``"torch"``: how masks are applied to CPU weights
            (:mod:`lightning_sparse.kernels`).
        mask_frozen: also mask frozen weights (``requires_grad=False``), with masks that never move; by default
            they stay dense.
        layer_types: module types (or class names) whose ``weight`` is masked, instead of Linear and
            Conv1d/2d/3d; ``MultiheadAttention``'s input projections and ``transformers``' ``Conv1D`` are always
            recognized (:mod:`lightning_sparse.core.layers`).
        include: parameter-name globs of further weights to mask (any parameter of 2 or more dimensions).
        mask_embeddings: mask embedding tables (and the output layers tied to them) too.
        pattern: ``"unstructured"`` (default), ``"N:M"`` (``"2:4"``, ``"1:4"``, ``"4:8"``; ``1 <= N < M``: every
            group of ``M`` consecutive weights along a layer's input dimension has exactly ``N`` active, so every
            layer is at ``N/M`` and ``density`` must be ``N/M`` or unset; layers whose input dimension is not a
            multiple of ``M`` are refused by name unless kept dense) or ``"fan_in"`` (every output neuron has the
            same number of active inputs, ``round(density_l * fan_in)`` per layer). Every method but DST keeps
            the pattern at every update (README, "Structured patterns").
        neuron_ablation: with ``pattern="fan_in"``, SRigL's neuron ablation (Lasby et al. 2024): at every update, an
            output neuron with fewer salient weights (kept by ``|W|`` or wanted by the growth score) than this
            fraction ``gamma_sal`` of its layer's fan-in ``k`` is emptied, and its weights go to the layer's other
            neurons (``k`` grows). A number in (0, 1] (the reference uses 0.3) or ``None`` (no ablation); needs a
            method that grows by a score (RigL, sparse momentum). Rows then hold ``k_l`` weights or none
            (:meth:`~lightning_sparse.SparseAlgorithm.update_structured`).
        keep_neurons: names or globs of the layers whose neurons are never ablated; ``None``: the last masked
            layer (the output layer, whose neurons are the classes).

    Works with one device, DDP (``"ddp"``, ``"ddp_spawn"``), and FSDP2 (``ModelParallelStrategy``, masks sharded
    like their weights). Logged at every mask update and epoch end: ``sparse/density``,
    ``sparse/density/<param>``, ``sparse/prune_rate``, ``sparse/empty_in|out/<param>``,
    ``sparse/empty_heads/<attention module>`` (fraction of its heads with an all-masked Q, K or V projection),
    ``sparse/speedup_dense_conv``, ``sparse/speedup_sparse_conv``, ``sparse/train_flops_ratio``,
    ``sparse/overhead``.

    Example::

        trainer = Trainer(max_epochs=100, callbacks=[SparseTrainingCallback(density=0.05)])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        density: float | Mapping[str, float] | None = None,
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
        mask_frozen: bool = False,
        layer_types: Sequence[type | str] | None = None,
        include: Sequence[str] = (),
        mask_embeddings: bool = False,
        pattern: str = "unstructured",
        neuron_ablation: float | None = None,
        keep_neurons: Sequence[str] | None = None,
    ) -> None:
        self.options = SparseOptions.resolve(
            density, algorithm, prune_rate, prune_rate_schedule, init, dense_layers, update_interval, stop_at, seed,
            mask_kernel, mask_frozen, layer_types, include, mask_embeddings, pattern=pattern,
            neuron_ablation=neuron_ablation, keep_neurons=keep_neurons,
        )  # fmt: skip
        if not isinstance(speedup_timing, str) or speedup_timing not in TIMINGS:
            raise ValueError(f"`speedup_timing` can be {', '.join(TIMINGS)}, got {speedup_timing!r}")
        if not isinstance(figure, bool):
            raise ValueError(f"`figure` must be True or False, got {figure!r} ({type(figure).__name__})")
        self.speedup_timing = speedup_timing
        self.figure = figure
        self.sparsifier: Sparsifier | None = None
        self._pending_state: dict[str, Any] | None = None
        self._index, self._prefix = 0, "sparse"  # with several sparse callbacks: metrics under sparse/<index>/
        self._handoff = distributed.SpawnHandoff()  # ddp_spawn: rank zero's final state for the main process
        self._reset_accounting()

    def _reset_accounting(self) -> None:
        self._report = SparsityReport()
        self._flops = TrainFlops()
        self._stopwatch = Stopwatch()
        self._capture: InputCapture | None = None
        self._applied_step = -1
        self._pending_epoch_end: int | None = None
        self._train_start = 0.0
        self._log_dir = "."

    # ------------------------------------------------------------------ options, read-only state
    density = property(lambda self: self.options.density)
    algorithm_name = property(lambda self: self.options.algorithm_name)
    prune_rate = property(lambda self: self.options.schedule.prune_rate)
    prune_rate_schedule = property(lambda self: self.options.schedule.rate_schedule)
    init = property(lambda self: self.options.init)
    dense_layers = property(lambda self: list(self.options.dense_layers))
    update_interval = property(lambda self: self.options.schedule.interval)
    stop_at = property(lambda self: self.options.schedule.stop_at)
    seed = property(lambda self: self.options.seed)
    mask_kernel = property(lambda self: self.options.mask_kernel)
    mask_frozen = property(lambda self: self.options.mask_frozen)
    pattern = property(lambda self: self.options.pattern)
    neuron_ablation = property(lambda self: self.options.neuron_ablation)
    keep_neurons = property(lambda self: self.options.keep_neurons)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name (as in ``pl_module.named_parameters()``) → ``torch.bool`` mask, True = active. Under
        FSDP2, this process's rows. After a ``ddp_spawn`` fit, in the main process: rank zero's final masks."""
        if self.sparsifier is not None:
            return self.sparsifier.masks
        handed = self._handoff.read()
        return types.MappingProxyType(dict(handed["masks"]) if handed else {})

    @property
    def current_prune_rate(self) -> float:
        """The pruning rate used at the last update (the initial rate before any update)."""
        if self.sparsifier is not None:
            return self.sparsifier.current_prune_rate
        handed = self._handoff.read()
        return float(handed["state"]["prune_rate"]) if handed else self.prune_rate

    @property
    def state_key(self) -> str:
        """``"SparseTrainingCallback"`` followed by the options that choose the layers (density groups,
        ``dense_layers``, ``include``, ``layer_types``), as Lightning's ``EarlyStopping`` does: several callbacks
        over disjoint layers checkpoint separately."""
        options = self.options
        types_ = None if options.layer_types is None else [getattr(t, "__name__", t) for t in options.layer_types]
        return self._generate_state_key(
            density=options.density, dense_layers=list(options.dense_layers), include=list(options.include),
            layer_types=types_,
        )  # fmt: skip

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written under another key (0.1's "SparseTrainingCallback", or another density: refused with
        # both values when the state is loaded) is this callback's when it is the only sparse one on both sides.
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return
        ours = [k for k in states if isinstance(k, str) and k.startswith("SparseTrainingCallback")]
        mine = [c for c in trainer.callbacks if isinstance(c, SparseTrainingCallback)]
        if len(ours) == 1 and len(mine) == 1:
            states[self.state_key] = states[ours[0]]
        elif ours:
            raise ValueError(
                f"the checkpoint holds the sparse states {ours}, none of them for this callback ({self.state_key}):"
                " resume with the callbacks' original options"
            )

    def prune_rate_at(self, progress: float) -> float:
        """The pruning rate the schedule gives at ``progress`` in [0, 1]."""
        return self.options.schedule.rate_at(progress)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SparseTrainingCallback needs automatic optimization (the masks are applied after each"
                " optimizer step Lightning takes); set `automatic_optimization = True`"
            )
        prepare_model(pl_module, self.options)
        if self.figure and importlib.util.find_spec("matplotlib") is None:
            rank_zero_warn("SparseTrainingCallback(figure=True) needs matplotlib, which is not installed: no figure"
                           " will be written (pip install 'lightning-sparse[plot]', or pass figure=False)")  # fmt: skip

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparseTrainingCallback supports exactly one optimizer, got {len(trainer.optimizers)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict  # used when the Sparsifier is bound, in `on_train_start`

    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is None:
            handed = self._handoff.read()
            return dict(handed["state"]) if handed else {}
        return {
            **self.sparsifier.state_dict(),
            "train_flops": self._flops.state_dict(),
            "pending_epoch_end": self._pending_epoch_end,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Bound here, after `configure_model`, wrapping/sharding and every checkpoint restore (FSDP2 restores after
        # `on_fit_start`), and only once the length of training is known: every check that can fail runs before
        # a weight changes. The length is read here, not earlier: asking loads the train dataloader, and before
        # the loop state is restored Lightning then cannot resume a stateful dataloader mid-epoch.
        siblings = [c for c in trainer.callbacks if isinstance(c, SparseTrainingCallback)]
        trainer_support.refuse_overlap(self.options, [c.options for c in siblings if c is not self], pl_module)
        self._index = siblings.index(self)
        self._prefix = "sparse" if len(siblings) == 1 else f"sparse/{self._index}"
        total = trainer_support.total_steps(trainer)
        optimizer = trainer.optimizers[0]
        previous, state, self._pending_state = self.sparsifier, self._pending_state, None
        if previous is not None and previous.model is pl_module and state is None and not previous.learns_every_step:
            previous.optimizer = optimizer  # a second `fit` of the same model keeps its masks
            previous.total_steps = total
        else:
            self._reset_accounting()
            self.sparsifier = Sparsifier(pl_module, optimizer, options=self.options, state=state, total_steps=total)
            if state is not None:
                self._flops.load_state_dict(state.get("train_flops", {}))
                self._pending_epoch_end = state.get("pending_epoch_end")
        sparsifier = self.sparsifier
        if sparsifier.needs_snip:
            trainer_support.snip_on_first_batch(trainer, pl_module, sparsifier)
        trainer_support.mask_weight_averages(trainer, sparsifier)
        self._capture = InputCapture(pl_module, [sparsifier.layers[n].module for n in sparsifier.names])
        self._measure(trainer.global_step)  # the starting point of the figure
        self._train_start = time.perf_counter()
        self._log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        self._applied_step = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # The epoch-end update, deferred to the first step of the next epoch (momentum and gradients are the same):
        # the weights validated and checkpointed at the end of an epoch are the weights trained in it, and a run
        # that ends (max_epochs, max_steps, EarlyStopping, max_time) gets no update after its last step.
        if self._pending_epoch_end is None:
            return
        step, self._pending_epoch_end = self._pending_epoch_end, None
        sparsifier = self._require_sparsifier()
        with self._stopwatch(pl_module.device):
            update = sparsifier.epoch_end(step)
        if update is not None:
            self._log_update(trainer, pl_module, update, on_step=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._require_sparsifier().before_optimizer_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        sparsifier = self._require_sparsifier()
        if self._capture is not None:
            cost_model = self._capture.cost_model(self.speedup_timing == "measure", sparsifier.sharded)
            if cost_model is None:
                log.warning("SparseTrainingCallback: no module holding every masked layer was called in the first"
                            " training step; speedup estimates and training FLOPs are not logged")  # fmt: skip
            self._report.cost_model, self._capture = cost_model, None
            self._set_step_flops()
        step = trainer.global_step
        if step == self._applied_step:
            return  # no optimizer step since the last call (gradient accumulation): weights unchanged
        self._applied_step = step
        with self._stopwatch(pl_module.device):
            self._flops.advance(step)
            update = sparsifier.step(step)
        if update is not None:
            self._log_update(trainer, pl_module, update, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsifier = self._require_sparsifier()
        self._flops.advance(trainer.global_step)
        self._pending_epoch_end = trainer.global_step  # run at the next epoch's first step, if there is one
        if sparsifier.learns_every_step:
            self._set_step_flops()
        self._log_epoch(trainer, pl_module)  # every method, every epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsifier = self._require_sparsifier()
        stats = self._measure(trainer.global_step)
        final = {"masks": {k: v.detach().cpu().clone() for k, v in sparsifier.masks.items()}}
        sparsifier.finish()
        self._pending_epoch_end = None  # the run is over: no update after its last step
        rank_zero_info(self.summary(stats))
        if self.figure and trainer.is_global_zero and importlib.util.find_spec("matplotlib") is not None:
            path = os.path.join(self._log_dir, "sparsity.png" if self._prefix == "sparse" else f"sparsity_{self._index}.png")
            density = self.options.density
            target = density if isinstance(density, float) else None
            title = (f"{self.algorithm_name}, density {density if density is not None else 'learned'},"
                     f" {type(pl_module).__name__}, {len(sparsifier.names)} masked layers")  # fmt: skip
            fig = self._report.figure(path, title=title, masked=sparsifier.names, target=target,
                                      sizes=dict(zip(sparsifier.names, sparsifier.sizes)))  # fmt: skip
            sent = send_figure(trainer.loggers, fig, path, trainer.global_step, f"{self._prefix}/summary")
            rank_zero_info(f"SparseTrainingCallback: figure written to {path}" + (f", sent to {', '.join(sent)}" if sent else ""))
        if type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher" and trainer.is_global_zero:
            self._handoff.write({**final, "state": self.state_dict()})

    # ------------------------------------------------------------------ logging
    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, update: UpdateReport, on_step: bool) -> None:
        """One row for a mask update: densities measured just before it, its rate, the costs after it."""
        sparsifier = self._require_sparsifier()
        if sparsifier.uses_gradient_growth:  # this step's weight gradients were dense (RigL)
            self._flops.add_dense_weight_gradients()
        self._set_step_flops()
        sizes = dict(zip(sparsifier.names, sparsifier.sizes))
        density = self._density_metrics({n: c / sizes[n] for n, c in update.nonzero_before.items()})
        self._log(pl_module, {**density, "sparse/prune_rate": update.rate, **self._cost_metrics(trainer)}, on_step)

    def _log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One row per epoch end, for every method: densities of the weights as trained, and the costs."""
        density = self._density_metrics(self._require_sparsifier().nonzero_densities())
        self._log(pl_module, {**density, **self._cost_metrics(trainer)}, on_step=False)

    def _density_metrics(self, densities: Mapping[str, float]) -> dict[str, float]:
        sizes = dict(zip(self._require_sparsifier().names, self._require_sparsifier().sizes))
        total = sum(d * sizes[n] for n, d in densities.items()) / max(sum(sizes[n] for n in densities), 1)
        return {"sparse/density": total, **{f"sparse/density/{name}": d for name, d in densities.items()}}

    def _cost_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """Channel statistics, speedup estimates, training FLOPs ratio and the callback's overhead."""
        metrics = dict(self._report.metrics(self._measure(trainer.global_step)))
        self._flops.advance(trainer.global_step)
        if self._flops.ratio is not None:
            metrics["sparse/train_flops_ratio"] = self._flops.ratio
        elapsed = time.perf_counter() - self._train_start
        if elapsed > 0:
            metrics["sparse/overhead"] = self._stopwatch.total() / elapsed
        return metrics

    def _log(self, pl_module: pl.LightningModule, metrics: Mapping[str, float], on_step: bool) -> None:
        """Epoch metrics through ``pl_module.log`` (reduced over processes, written at the epoch's last step).
        Metrics of a mask update (``on_step``) go to every logger at the step of the update itself (on Lightning's
        step axis, with the optimizer step that triggered it), whatever ``log_every_n_steps`` says, and to
        ``trainer.callback_metrics``. With several sparse callbacks,
        callback ``i`` logs ``sparse/<i>/...``."""
        if self._prefix != "sparse":
            metrics = {self._prefix + k.removeprefix("sparse"): v for k, v in metrics.items()}
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

    def _set_step_flops(self) -> None:
        sparsifier = self._require_sparsifier()
        flops = self._report.cost_model.flops if self._report.cost_model is not None else None
        self._flops.set_step_flops(flops, sparsifier.densities(), sparsifier.needs_dense_gradients)

    def _measure(self, step: int) -> dict[str, Any]:
        """Channel statistics of every layer the report counts (masks, or the weights of unmasked layers;
        all-reduced counts on FSDP2 shards) and the empty heads of the attention modules."""
        names = self._report.cost_model.flops if self._report.cost_model is not None else ()
        layers, layout = self._require_sparsifier().report_layers(names)
        return self._report.measure(step, layers, **layout)

    def summary(self, stats: Mapping[str, Any] | None = None) -> str:
        """A per-layer table: shape, density, empty input/output channels, share of the FLOPs, and the estimated
        speedups. ``stats`` defaults to the last recorded channel statistics."""
        if stats is None:
            stats = self._report.history[-1][1] if self._report.history else self._report.measure(-1, dict(self.masks))
        title = f"SparseTrainingCallback ({self.algorithm_name}): final masks"
        if self.sparsifier is not None:
            title += f", {self.sparsifier.describe()}"
        table = title + "\n" + self._report.table(stats)
        if self.sparsifier is not None and self.sparsifier.left_dense:
            table += "\nleft dense:\n" + "\n".join(f"  {n}: {why}" for n, why in self.sparsifier.left_dense.items())
        return table

    # ------------------------------------------------------------------ checkpoints and processes
    def _require_sparsifier(self) -> Sparsifier:
        if self.sparsifier is None:
            raise RuntimeError("SparseTrainingCallback has no masks yet: they are made in `on_fit_start` of `fit`")
        return self.sparsifier

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for ``ddp_spawn``: the bound Sparsifier (model, optimizer, generator) stays behind, and rank
        zero hands its final state back through a file (:class:`~lightning_sparse.core.distributed.SpawnHandoff`)."""
        self._handoff.prepare()
        return {**self.__dict__, "sparsifier": None}
