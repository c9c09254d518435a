"""``SparseTrainingCallback``: train any LightningModule sparse from the first step to the last.

A thin shell of Lightning hooks over :class:`~lightning_sparse.Sparsifier` (the method); what it logs is in
:mod:`~lightning_sparse.lightning.loggers`, what it needs from the trainer in
:mod:`~lightning_sparse.lightning.trainer`, the ``ddp_spawn`` hand-off in :mod:`~lightning_sparse.lightning.spawn`.
The hooks, in the order Lightning calls them:

* ``setup``: what a method must do before the optimizer exists (DST attaches its thresholds);
* ``on_fit_start``: exactly one optimizer;
* ``on_load_checkpoint`` / ``load_state_dict``: a checkpoint's masks and schedule position, kept until binding;
* ``on_train_start``: bind a :class:`~lightning_sparse.Sparsifier` once the model is wrapped or sharded (DDP, FSDP2),
  restored, and the length of training known; SNIP's one-batch masks;
* ``on_train_batch_start`` / ``on_before_optimizer_step`` / ``on_train_batch_end`` / ``on_train_epoch_end``: the
  Sparsifier's loop calls and the logged rows;
* ``on_fit_end``: the Sparsifier's ``finish``, a per-layer table and the figure.
"""

from __future__ import annotations

import importlib.util
import types
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sparse.checks import refuse_sparsity
from lightning_sparse.core.checkpoint import check_same_run, check_version
from lightning_sparse.core.sparsifier import Sparsifier
from lightning_sparse.cost import TIMINGS, InputCapture, SparsityReport, Stopwatch, TrainFlops, send_figure
from lightning_sparse.lightning import trainer as trainer_support
from lightning_sparse.lightning.dst_setup import DSTSetup
from lightning_sparse.lightning.loggers import SparseMetrics
from lightning_sparse.lightning.spawn import SpawnHandoff
from lightning_sparse.methods import SparseAlgorithm, dst
from lightning_sparse.methods.dst_sparsifier import check_dst_layers, dst_layers
from lightning_sparse.options import SparseOptions


class _RefusesSparsity(type):
    """``SparseTrainingCallback(sparsity=...)`` gets a message pointing to ``density``, not Python's TypeError
    (here, not in ``__new__``, so that LightningCLI still reads the options from ``__init__``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        refuse_sparsity(kwargs)
        return super().__call__(*args, **kwargs)


class SparseTrainingCallback(Callback, metaclass=_RefusesSparsity):
    """Keep a network sparse during the whole of training, updating which weights are active.

    Every argument but ``speedup_timing``, ``figure``, ``table`` and ``per_layer_metrics`` is an option of :class:`~lightning_sparse.SparseOptions`,
    which describes each in full; the lines below are the short forms that LightningCLI's ``--help`` shows.

    Args:
        density: fraction of the masked weights that are active, in (0, 1], or density groups ``{name glob:
            density}`` (first match wins; layers no glob matches stay dense). Required except for ``"dst"``, which
            learns it and refuses it (and the schedule options). Numbers may be Python, numpy or one-element tensors.
        algorithm: ``"sparse_momentum"``, ``"rigl"``, ``"set"``, ``"dsr"``, ``"static"``, ``"snip"``, ``"gmp"``,
            ``"dst"``, a :class:`~lightning_sparse.SparseAlgorithm` or a :class:`~lightning_sparse.DST`.
        prune_rate: initial pruning rate in [0, 1] (RigL's ``α``, SET's ``ζ``); ``None``: the algorithm's default.
        prune_rate_schedule: ``"cosine"``, ``"linear"``, ``"constant"`` or a function of progress in [0, 1],
            ``trainer.global_step / (stop_at * trainer.estimated_stepping_batches)``; ``None``: the algorithm's.
        init: ``"uniform"``, ``"erk"`` or ``"er"``; ``None``: the algorithm's default.
        dense_layers: module or parameter names, or glob patterns (``"*.downsample.*"``), of layers kept dense.
        update_interval: ``"epoch"`` (end of every epoch but the last), an int (every that many optimizer steps),
            or ``None`` for the algorithm's default.
        stop_at: end of the update window as a fraction of training, in (0, 1]; ``None``: the algorithm's default.
        seed: seed of the initial masks and of random growth, in [0, 2**63); ``None`` draws one on rank zero.
        speedup_timing: layer costs of the speedup estimates: ``"flops"`` or ``"measure"`` (timed once).
        figure: write ``sparsity.png`` to the log directory of the trainer's loggers at the end of ``fit`` (and send
            it to the loggers that take images); nothing is written without a logger (``logger=False``).
        mask_kernel: ``"auto"``, ``"cpp"`` or ``"torch"``: how masks are applied to CPU weights, and how mask
            updates select on the CPU (the same masks on every path).
        mask_frozen: also mask frozen weights (``requires_grad=False``): their masks stay fixed, except under GMP
            (pruned on its schedule), SNIP (scored like the others) and DST (its thresholds learn them).
        layer_types: module types (or class names) whose ``weight`` is masked, instead of Linear and Conv1d/2d/3d.
        include: parameter-name globs of further weights to mask (any parameter of 2 or more dimensions).
        mask_embeddings: mask embedding tables (and the output layers tied to them) too.
        pattern: ``"unstructured"``, ``"N:M"`` (``"2:4"``: ``N`` active in every ``M`` consecutive inputs) or
            ``"fan_in"`` (the same number of active inputs in every output neuron of a layer).
        neuron_ablation: with ``pattern="fan_in"``, SRigL's ``gamma_sal`` in (0, 1] (``None``: no ablation).
        keep_neurons: names or globs of the layers whose neurons are never ablated; ``None``: the last masked layer.
        compute: ``"dense"`` or ``"condensed"`` (with ``pattern="fan_in"``: masked ``nn.Linear`` and 1x1 ``nn.Conv2d``
            layers train from their condensed form; see :class:`~lightning_sparse.SparseOptions`).
        table: print the per-layer table (:meth:`summary`) at the end of ``fit``.
        per_layer_metrics: also log the per-layer and per-module metrics (``sparse/density/<param>``,
            ``sparse/nonzero_density/<param>``, ``sparse/empty_in|out/<param>``, ``sparse/empty_heads/<module>``);
            ``False`` logs only the whole-network ones.

    Works with one device, DDP (``"ddp"``, ``"ddp_spawn"``) and FSDP2 (``ModelParallelStrategy``, masks sharded
    like their weights). The metrics it logs are listed in :mod:`~lightning_sparse.lightning.loggers`.

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
        compute: Literal["dense", "condensed"] = "dense",
        table: bool = True,
        per_layer_metrics: bool = True,
    ) -> None:
        self.options = SparseOptions(
            density, algorithm, prune_rate, prune_rate_schedule, init, dense_layers, update_interval, stop_at, seed,
            mask_kernel, mask_frozen, layer_types, include, mask_embeddings, pattern, neuron_ablation, keep_neurons,
            compute=compute,
        )  # fmt: skip
        if not isinstance(speedup_timing, str) or speedup_timing not in TIMINGS:
            raise ValueError(f"`speedup_timing` can be {', '.join(TIMINGS)}, got {speedup_timing!r}")
        for name, flag in (("figure", figure), ("table", table), ("per_layer_metrics", per_layer_metrics)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be True or False, got {flag!r} ({type(flag).__name__})")
        self.speedup_timing = speedup_timing
        self.figure = figure
        self.table = table
        self.per_layer_metrics = per_layer_metrics
        self.sparsifier: Sparsifier | None = None
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's state, loaded when the Sparsifier binds
        self._pending_epoch_end: int | None = None  # the step of an epoch-end update not run yet
        self._applied_step = -1  # the optimizer step the Sparsifier last saw
        self._handoff = SpawnHandoff()  # ddp_spawn: rank zero's final state for the main process
        self._metrics = SparseMetrics(SparsityReport(), TrainFlops(), Stopwatch())
        self._dst = DSTSetup(self.options)  # DST's thresholds, attached before the optimizer and taken off if refused

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
    compute = property(lambda self: self.options.compute)
    _report = property(lambda self: self._metrics.report)  # the channel statistics and the cost model

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name (as in ``pl_module.named_parameters()``) → ``torch.bool`` mask, True = active. Under
        FSDP2, this process's rows. After a ``ddp_spawn`` fit, in the main process: rank zero's final masks."""
        if self.sparsifier is not None:
            return self.sparsifier.masks
        return types.MappingProxyType(self._handoff.masks())

    @property
    def current_prune_rate(self) -> float:
        """The pruning rate used at the last update (the initial rate before any update)."""
        if self.sparsifier is not None:
            return self.sparsifier.current_prune_rate
        handed = self._handoff.state()
        return float(handed["prune_rate"]) if handed else self.prune_rate

    def prune_rate_at(self, progress: float) -> float:
        """The pruning rate the schedule gives at ``progress`` in [0, 1]."""
        return self.options.schedule.rate_at(progress)

    def summary(self, stats: Mapping[str, Any] | None = None) -> str:
        """A per-layer table: shape, density, empty input/output channels, share of the FLOPs, and the estimated
        speedups. ``stats`` defaults to the last recorded channel statistics."""
        title = f"SparseTrainingCallback ({self.algorithm_name}): final masks"
        return self._metrics.summary(title, self.sparsifier, self.masks, stats)

    # ------------------------------------------------------------------ checkpoints
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
        siblings = [c for c in trainer.callbacks if isinstance(c, SparseTrainingCallback)]
        trainer_support.claim_checkpoint_state(checkpoint.get("callbacks", {}), self.state_key, len(siblings))
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state:  # checked before Lightning restores the optimizer, whose groups differ by method and layers
            check_version(state)
            check_same_run(self.options, state)
            if self.options.is_dst and "dst" in state:
                check_dst_layers(state, dst_layers(pl_module, self.options))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:  # checked now: Lightning restores the optimizer (whose groups differ by method) next
            check_version(state_dict)
            check_same_run(self.options, state_dict)
        self._pending_state = state_dict  # used when the Sparsifier is bound, in `on_train_start`

    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is None:
            return self._handoff.state()
        return {
            **self.sparsifier.state_dict(),
            "train_flops": self._metrics.flops.state_dict(),
            "pending_epoch_end": self._pending_epoch_end,
        }

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SparseTrainingCallback needs automatic optimization (the masks are applied after each"
                " optimizer step Lightning takes); set `automatic_optimization = True`"
            )
        others = [c.options for c in trainer.callbacks if isinstance(c, SparseTrainingCallback) and c is not self]
        self._dst.setup(trainer, pl_module, others, self.sparsifier)
        if self.figure and importlib.util.find_spec("matplotlib") is None:
            rank_zero_warn("SparseTrainingCallback(figure=True) needs matplotlib, which is not installed: no figure"
                           " will be written (pip install 'lightning-sparse[plot]', or pass figure=False)")  # fmt: skip

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparseTrainingCallback supports exactly one optimizer, got {len(trainer.optimizers)}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Bound here, after `configure_model`, wrapping/sharding and every checkpoint restore (FSDP2 restores after
        # `on_fit_start`), and only once the length of training is known: every check that can fail runs before
        # a weight changes. The length is read here, not earlier: asking loads the train dataloader, and before
        # the loop state is restored Lightning then cannot resume a stateful dataloader mid-epoch.
        siblings = [c for c in trainer.callbacks if isinstance(c, SparseTrainingCallback)]
        trainer_support.refuse_overlap(self.options, [c.options for c in siblings if c is not self], pl_module)
        total = trainer_support.total_steps(trainer)
        bind = partial(self._bind, pl_module, trainer.optimizers[0], total, trainer.global_step)
        sparsifier = self._dst.bind(trainer, pl_module, bind)
        if sparsifier.needs_snip:
            trainer_support.snip_on_first_batch(trainer, pl_module, sparsifier)
        trainer_support.mask_weight_averages(trainer, sparsifier)
        self._metrics.name(siblings.index(self), len(siblings))
        self._metrics.per_layer = self.per_layer_metrics
        capture = InputCapture(pl_module, [sparsifier.layers[n].module for n in sparsifier.names])
        self._metrics.start(trainer, sparsifier, capture)
        self._applied_step = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # The epoch-end update, deferred to the first step of the next epoch (momentum and gradients are the same):
        # the weights validated and checkpointed at the end of an epoch are the weights trained in it, and a run
        # that ends (max_epochs, max_steps, EarlyStopping, max_time) gets no update after its last step.
        if self._pending_epoch_end is None:
            self._metrics.flush(trainer)  # the last step's row (no other row can fall on its step now)
            return
        step, self._pending_epoch_end = self._pending_epoch_end, None
        sparsifier = self._require_sparsifier()
        with self._metrics.stopwatch(pl_module.device):
            update = sparsifier.epoch_end(step)
        if update is not None:
            self._metrics.log_update(trainer, pl_module, sparsifier, update)
        self._metrics.flush(trainer)  # the last epoch's row, with its update if it had one

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._require_sparsifier().before_optimizer_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        sparsifier = self._require_sparsifier()
        self._metrics.after_first_step(sparsifier, measure_time=self.speedup_timing == "measure")
        step = trainer.global_step
        if step == self._applied_step:
            return  # no optimizer step since the last call (gradient accumulation): weights unchanged
        self._applied_step = step
        self._dst.trained = True
        with self._metrics.stopwatch(pl_module.device):
            self._metrics.flops.advance(step)
            update = sparsifier.step(step)
        if update is not None:
            self._metrics.log_update(trainer, pl_module, sparsifier, update)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sparsifier = self._require_sparsifier()
        self._metrics.flops.advance(trainer.global_step)
        self._pending_epoch_end = trainer.global_step  # run at the next epoch's first step, if there is one
        if sparsifier.learns_every_step:
            self._metrics.set_step_flops(sparsifier)
        self._metrics.log_epoch(trainer, pl_module, sparsifier)  # every method, every epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics.flush(trainer)  # before Lightning finalizes the loggers

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparsifier is None and trainer.fit_loop.done:
            # `fit(ckpt_path=...)` of a run that had already reached its end: Lightning trains nothing and skips
            # `on_train_start`, where the masks are bound; the restored weights are the masked ones as saved
            rank_zero_warn(
                "SparseTrainingCallback: nothing was trained, the checkpoint's run had already reached its end"
                f" (step {trainer.global_step}, epoch {trainer.current_epoch}): its weights are as saved, sparse."
                " Raise max_epochs or max_steps to train on."
            )
            self._dst.done()
            return
        sparsifier = self._require_sparsifier()
        stats = self._metrics.measure(sparsifier, trainer.global_step)
        masks = {k: v.detach().cpu().clone() for k, v in sparsifier.masks.items()}
        sparsifier.finish()
        self._pending_epoch_end = None  # the run is over: no update after its last step
        if self.table:
            rank_zero_info(self.summary(stats))
        drawn = None
        if self.figure and trainer.is_global_zero and importlib.util.find_spec("matplotlib") is not None:
            drawn = self._metrics.figure(pl_module, sparsifier, self.options)
        if drawn is not None:
            path, fig = drawn
            sent = send_figure(trainer.loggers, fig, path, trainer.global_step, f"{self._metrics.prefix}/summary")
            sent_to = f", sent to {', '.join(sent)}" if sent else ""
            rank_zero_info(f"SparseTrainingCallback: figure written to {path}{sent_to}")
        self._handoff.hand_back(trainer, {"masks": masks, "state": self.state_dict()})
        self._dst.done()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A run refused (or failed) before its first optimizer step leaves the model as it was: the DST
        # thresholds this fit attached are taken off, and the Sparsifier of an earlier fit is kept.
        self._metrics.flush(trainer)  # the row kept for the last step, before Lightning finalizes the loggers
        if self._dst.refused(pl_module):
            self.sparsifier = self._dst.before
        self._dst.done()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._dst.take_off_patch()  # `configure_model` was not called

    # ------------------------------------------------------------------ the Sparsifier
    def _bind(self, pl_module: pl.LightningModule, optimizer: Any, total: float, step: int) -> Sparsifier:
        """A new Sparsifier (from a loaded checkpoint state, if any) with fresh accounting; a second ``fit`` of the
        same model keeps its Sparsifier and masks, its schedule restarted when the step count (``step``) did."""
        previous, state, self._pending_state = self.sparsifier, self._pending_state, None
        if previous is not None and previous.model is pl_module and state is None and not previous.learns_every_step:
            if step < previous.step_count:  # a new Trainer counts from 0: this fit schedules its own length
                previous.restart(step)
                self._pending_epoch_end = None  # the last fit's final epoch end is no update of this one
            previous.optimizer, previous.total_steps = optimizer, total
            previous.attach_compute()  # compute="condensed": detached by the last fit's finish()
            return previous
        self._metrics = SparseMetrics(SparsityReport(), TrainFlops(), Stopwatch())
        self.sparsifier = Sparsifier(pl_module, optimizer, options=self.options, state=state, total_steps=total)
        self._pending_epoch_end = None
        if state is not None:
            self._metrics.flops.load_state_dict(state.get("train_flops", {}))
            self._pending_epoch_end = state.get("pending_epoch_end")
        return self.sparsifier

    def _require_sparsifier(self) -> Sparsifier:
        if self.sparsifier is None:
            raise RuntimeError("SparseTrainingCallback has no masks yet: they are made in `on_fit_start` of `fit`")
        return self.sparsifier

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for ``ddp_spawn``: the bound Sparsifier (model, optimizer, generator) stays behind, and rank
        zero hands its final state back through a file (:class:`~lightning_sparse.lightning.spawn.SpawnHandoff`)."""
        self._handoff.prepare()
        return {**self.__dict__, "sparsifier": None}
