"""``Sparsifier``: sparse training of any ``nn.Module`` in any training loop. No Lightning here.

A :class:`Sparsifier` owns the masks, the seeded random generator, the algorithm's state, the schedule position
and the counters of one sparse run, bound by name to the tensors the optimizer updates (plain tensors, DDP
replicas or FSDP2 row shards). The loop calls it at three points::

    sparsifier = Sparsifier(model, optimizer, density=0.1, algorithm="rigl", total_steps=len(loader) * epochs)
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            sparsifier.before_optimizer_step()   # only DST does anything here
            optimizer.step()
            sparsifier.step()                    # re-apply the masks; step-level updates when due
            optimizer.zero_grad()                # after step(): RigL reads this step's gradients
        sparsifier.epoch_end()                   # epoch-level updates (the sparse momentum paper's setting)
    sparsifier.finish()                          # DST: fold its thresholds into the weights

``state_dict()`` / ``load_state_dict()`` hold plain tensors and numbers (``torch.load(weights_only=True)``).
``SparseTrainingCallback`` is this object driven by Lightning's hooks.
"""

from __future__ import annotations

import copy
import logging
import math
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.compute.condensed import CondensedCompute
from lightning_sparse.core import distributed
from lightning_sparse.core.checkpoint import STATE_VERSION, check_loaded_pattern, check_same_run, check_version
from lightning_sparse.core.guards import (
    check_finite,
    check_gradients,
    check_optimizer,
    check_pattern_layers,
    kept_neurons,
    refuse_fsdp1,
)
from lightning_sparse.core.initial_masks import init_counts, initial_masking
from lightning_sparse.core.layers import find_attention
from lightning_sparse.core.loop_checks import (
    ORDER,
    OptimizerSteps,
    check_owner,
    check_weights_finite,
    gradients_state,
    take_over,
)
from lightning_sparse.core.masking import Masking, ZeroedWeights
from lightning_sparse.core.optimizer import check_momentum_optimizer, optimizer_momentum
from lightning_sparse.core.report_inputs import report_inputs
from lightning_sparse.core.selection import select_layers
from lightning_sparse.functional.passes import nonzero_count
from lightning_sparse.functional.units import pattern_counts
from lightning_sparse.methods import LayerState, SparseAlgorithm, UpdateContext, UpdateResult
from lightning_sparse.methods.dst import DST
from lightning_sparse.methods.groups import update_groups
from lightning_sparse.methods.snip import FrozenScoring, snip_scores, top_scores_per_group, top_scores_per_unit
from lightning_sparse.options import SparseOptions
from lightning_sparse.schedule import check_total_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateReport:
    """What one mask update did, for logging.

    Attributes:
        step: the optimizer step of the update.
        rate: the pruning rate used.
        progress: progress through the update window.
        nonzero_before: per layer, the non-zero weights just before the update (the network as trained).
        result: the algorithm's :class:`~lightning_sparse.UpdateResult` (local masks and global counts).
    """

    step: int
    rate: float
    progress: float
    nonzero_before: dict[str, int]
    result: UpdateResult

    def __repr__(self) -> str:
        """One line: the step, rate and counts (not the masks)."""
        r = self.result
        return (f"UpdateReport(step={self.step}, rate={self.rate:.4g}, progress={self.progress:.3g},"
                f" {len(r.masks)} layers, active={sum(r.active)}, pruned={sum(r.pruned)}, grown={sum(r.grown)})")  # fmt: skip


@dataclass(frozen=True)
class Explored:
    """ITOP's in-time over-parameterization rate ``R_s`` (Liu et al., ICML 2021): the fraction of positions that
    have ever been active during the run, per masked layer (``layers``, by parameter name) and over all masked
    weights (``model``)."""

    layers: dict[str, float]
    model: float


class Sparsifier:
    """Keep a model sparse during training and update which weights are active.

    Args:
        model: the model; the weights of its Linear and Conv1d/2d/3d layers are masked (minus ``dense_layers``).
            Bound by name when the ``Sparsifier`` is made: make it after the model is wrapped or sharded
            (DDP, FSDP2's ``fully_shard``) and after the optimizer exists.
        optimizer: the one optimizer that updates the masked weights (sparse momentum reads its momentum; RigL
            resets its state at grown positions; DST adds its thresholds to it when they are not in it yet).
        total_steps: number of optimizer steps of the whole run (for the schedules); ``None`` if unknown, which
            only the ``"constant"`` schedule with ``stop_at=1.0`` and methods without a schedule (static, SNIP,
            DST) accept: the others are refused here, naming ``total_steps``. It can be changed later with
            :attr:`total_steps`.
        options: the run's :class:`~lightning_sparse.SparseOptions`, or instead:
        **kwargs: the options as keyword arguments (``density=0.1, algorithm="rigl"``, ...): every field of
            :class:`~lightning_sparse.SparseOptions`, where each is described.
        state: a :meth:`state_dict` to resume from: its masks are used instead of drawing new ones, so the
            model's (restored) weights are not touched by random masks first.

    ``Sparsifier(..., algorithm="dst")`` gives a :class:`DSTSparsifier`, which has the same methods.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Sparsifier:
        if cls is Sparsifier:
            options = kwargs.get("options")
            algorithm = options.algorithm if options is not None else kwargs.get("algorithm", "sparse_momentum")
            if isinstance(algorithm, DST) or (isinstance(algorithm, str) and algorithm.lower() == "dst"):
                from lightning_sparse.methods.dst_sparsifier import DSTSparsifier

                return super().__new__(DSTSparsifier)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int | float | None = None,
        options: SparseOptions | None = None,
        state: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if options is None:
            options = SparseOptions(**kwargs)
        elif kwargs:
            raise ValueError(
                f"give either `options` or the options as keyword arguments, not both (got {sorted(kwargs)})"
            )
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(optimizer, "param_groups"):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.options = options
        self.pattern = options.parsed_pattern
        self.model = model
        self._optimizer_steps = OptimizerSteps()  # tells a step AMP's GradScaler skipped from a misplaced call
        self.optimizer = optimizer
        self.schedule = options.schedule
        self._total_steps = math.inf
        self.generator = torch.Generator()
        self.generator.manual_seed(distributed.shared_seed(options.seed))
        self.algorithm_state: dict[str, Any] = {}
        self.step_count = 0
        self.last_update_step = -1
        self.num_updates = 0
        self.current_prune_rate = self.schedule.prune_rate
        self.last_update: UpdateReport | None = None
        self._needs_snip = False
        self._frozen_scoring: FrozenScoring | None = None
        self._gradients_checked = False
        self._zeroed: ZeroedWeights | None = None  # what the first masks zeroed, until the run has started
        self._update_waiting = False  # an update due at a step the GradScaler skipped: at the next real step
        self._last_step_skipped = False
        self.total_steps = total_steps  # refused when unknown (None) and the schedule needs it
        if state is not None:
            check_same_run(self.options, state)  # before binding touches the model (DST attaches its thresholds)
        self._compute: CondensedCompute | None = None  # compute="condensed": the attached layers
        self._bind(state)
        self._explored: list[Tensor] | None = None  # per layer, the positions ever active (local rows under FSDP2)
        self._reset_explored()
        if state is not None:
            self.load_state_dict(state)
        self.attach_compute()
        masking = getattr(self, "masking", None)
        take_over(masking.weights if masking is not None else [], self)

    # ------------------------------------------------------------------ binding
    def _bind(self, state: Mapping[str, Any] | None) -> None:
        algorithm = self.options.algorithm
        assert isinstance(algorithm, SparseAlgorithm)
        refuse_fsdp1(self.model)
        found = select_layers(self.model, self.options)
        self.layers, self.left_dense, params = found.masked, found.dense, found.params
        self.layer_groups = [found.groups[name] for name in params]
        self.group_density = dict(self.options.groups)
        self.keep_neurons = kept_neurons(self.options.keep_neurons, self.options.neuron_ablation, self.layers)
        check_pattern_layers(params, self.layers, self.pattern)
        check_optimizer(self.optimizer, params, algorithm.needs_momentum)
        if state is not None:  # resuming: the checkpoint's masks, nothing drawn (`load_state_dict` applies them)
            if "masks" not in state:
                raise ValueError("the checkpoint's sparse training state holds no masks")
            self.masking = Masking(params, state["masks"], self.options.mask_kernel)
            return
        self.masking = initial_masking(params, self.layers, self.options, self._group_indices(), self.generator)
        self._wait_for_snip(algorithm.start == "snip")
        self._zeroed = self.masking.apply_recording_()  # undone if a checkpoint's masks replace these first

    # ------------------------------------------------------------------ compute="condensed"
    def attach_compute(self) -> list[str]:
        """With ``compute="condensed"``, compute every masked ``nn.Linear`` and 1x1 ``nn.Conv2d`` from the condensed
        form of its mask (:mod:`lightning_sparse.compute.condensed`); called when the ``Sparsifier`` is made (or
        once SNIP has picked its masks) and again by a second ``fit``, after :meth:`finish`. Returns the weights
        computed that way. Raises ``ValueError`` for FSDP2-sharded weights."""
        if self.options.compute != "condensed" or self._needs_snip:
            return []
        if self.sharded:
            raise ValueError(
                "compute='condensed' does not support FSDP2-sharded weights (each process holds rows of the masks,"
                " while the forward multiplies the whole weight): use compute='dense' with FSDP2"
            )
        if self._compute is None:
            self._compute = CondensedCompute()
        modules = {}
        for name, layer in self.layers.items():
            if layer.attr == "weight" and not layer.transposed and layer.kind in ("linear", "conv"):
                modules[name] = self.model.get_submodule(layer.module)
        attached = self._compute.attach(modules, self.masks)
        if not self._compute.names:
            warnings.warn(
                "compute='condensed': no masked layer is a plain nn.Linear or 1x1 nn.Conv2d, so every layer computes"
                " densely",
                UserWarning,
                stacklevel=2,
            )
        self._compute.dense_gradients = self._next_step_reads_gradients()
        log.info("compute='condensed': %d layers condensed: %s", len(attached), ", ".join(attached))
        return attached

    @property
    def condensed_layers(self) -> list[str]:
        """The weights that compute from their condensed form now (``compute="condensed"``)."""
        return [] if self._compute is None else self._compute.names

    def _next_step_reads_gradients(self) -> bool:
        """Whether the update after the next optimizer step reads its dense gradients (RigL): that step's
        backward then computes the weights' dense gradients."""
        if not self.uses_gradient_growth:
            return False
        return self._update_waiting or self.schedule.due(
            self.step_count + 1, self.last_update_step, self._total_steps, False, self._to_target
        )

    def _refresh_compute(self) -> None:
        if self._compute is not None and self._compute.names:
            self._compute.refresh(self.masks)

    def _check_compute_gradients(self) -> None:
        compute = self._compute
        if compute is not None and compute.names and self.uses_gradient_growth and not compute.last_backward_dense:
            raise RuntimeError(
                f"algorithm {self.options.algorithm_name!r} grows by the dense gradient, which compute='condensed'"
                f" computes only in the backward of a step the schedule updates at; step {self.step_count} was not"
                " one (an update called by hand?). Call `update()` only where the schedule does, or use"
                " compute='dense'"
            )

    def _group_indices(self) -> dict[str, list[int]]:
        """Layer indices (in mask order) by density group."""
        groups: dict[str, list[int]] = {}
        for i, pattern in enumerate(self.layer_groups):
            groups.setdefault(pattern, []).append(i)
        return groups

    # ------------------------------------------------------------------ read-only state
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that updates the masked weights (its steps are counted, to check the call order)."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self._optimizer_steps.watch(optimizer)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name → ``torch.bool`` mask (True = active), on the weight's device. Under FSDP2, this
        process's rows of the mask, shaped like the weight's local shard."""
        return types.MappingProxyType(dict(self.masking.items()))

    @property
    def names(self) -> list[str]:
        return list(self.masking.names)

    @property
    def sizes(self) -> list[int]:
        """Entries of each masked weight (full shapes)."""
        return self.masking.sizes

    @property
    def total_steps(self) -> float:
        """Optimizer steps of the whole run (``inf`` when unknown)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | float | None) -> None:
        self._total_steps = check_total_steps(self.schedule, value, self._to_target)
        self._warn_if_no_updates()

    @property
    def _to_target(self) -> bool:
        """GMP prunes towards its target density: the end of its window is always an update."""
        algorithm = self.options.algorithm
        return isinstance(algorithm, SparseAlgorithm) and algorithm.reaches_target

    def _warn_if_no_updates(self) -> None:
        updates = self.schedule.count_updates(self._total_steps)
        if updates == 0 and not self._to_target:
            warnings.warn(
                f"algorithm {self.options.algorithm_name!r} updates its masks every {self.schedule.interval} steps"
                f" until step {self.schedule.window_end(self._total_steps)} of {int(self._total_steps)}: this run gets"
                " no mask update (static masks). Give a smaller `update_interval`",
                UserWarning,
                stacklevel=3,
            )

    def densities(self) -> dict[str, float]:
        """Fraction of active weights per layer, from the masks' exact counts (no device read)."""
        return {n: a / s for n, a, s in zip(self.masking.names, self.masking.active, self.masking.sizes)}

    def active_counts(self) -> dict[str, int]:
        """Active (masked-in) weights per layer, the masks' exact counts over the whole weight (no device read)."""
        return dict(zip(self.masking.names, self.masking.active))

    def nonzero_counts(self) -> dict[str, int]:
        """Non-zero weights per layer over the whole weight, measured from the weights (one device read)."""
        return dict(zip(self.masking.names, self.masking.nonzero_counts()))

    def nonzero_densities(self) -> dict[str, float]:
        """Fraction of non-zero weights per layer, measured from the weights (one device read)."""
        counts = self.masking.nonzero_counts()
        return {n: c / s for n, c, s in zip(self.masking.names, counts, self.masking.sizes)}

    @property
    def needs_dense_gradients(self) -> bool:
        """Whether the method reads gradients or momentum of missing weights at every step."""
        algorithm = self.options.algorithm
        return isinstance(algorithm, SparseAlgorithm) and algorithm.needs_momentum

    @property
    def uses_gradient_growth(self) -> bool:
        """Whether updates read this step's dense gradients (RigL)."""
        return isinstance(self.options.algorithm, SparseAlgorithm) and self.options.algorithm.needs_gradient

    @property
    def sharded(self) -> bool:
        """Whether any masked weight is an FSDP2 shard."""
        return any(s.sharded for s in self.masking.specs)

    def shard_layout(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`~lightning_sparse.cost.report.SparsityReport.measure` under FSDP2."""
        if not self.sharded:
            return {}
        specs = {n: s for n, s in zip(self.masking.names, self.masking.specs) if s.sharded}  # whole: counted once
        return {"specs": specs, "group": self.masking.group}

    def report_layers(self, names: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What :meth:`~lightning_sparse.cost.report.SparsityReport.measure` takes (see
        :func:`~lightning_sparse.core.report_inputs.report_inputs`)."""
        if not hasattr(self, "_attention"):  # the model's modules do not change during a run
            self._attention = find_attention(self.model)
        return report_inputs(self.model, self.masks, self.layers, self.shard_layout(), self._attention, names)

    @property
    def learns_every_step(self) -> bool:
        """Whether the masks change at every step (DST) rather than at scheduled updates."""
        return False

    def describe(self) -> str:
        """One line on the current masks, for tables and logs."""
        line = f"{sum(self.masking.active)} of {sum(self.masking.sizes)} masked weights active"
        line += f", pattern {self.pattern}" if self.pattern.structured else ""
        ablation = self.options.neuron_ablation
        return line + (f", neuron ablation {ablation:g}" if ablation is not None else "")

    # ------------------------------------------------------------------ exploration (ITOP's R_s)
    def _reset_explored(self) -> None:
        """Start the record of explored positions from the current masks (copies: one byte per weight)."""
        masking = getattr(self, "masking", None)
        self._explored = None if masking is None else [m.clone() for m in masking.masks]

    def _explore(self, masks: Iterable[Tensor]) -> None:
        """Add ``masks`` (local, like the current ones) to the positions ever active."""
        if self._explored is not None:
            for explored, mask in zip(self._explored, masks):
                explored |= mask

    def _layout(self) -> tuple[list[Any], Any]:
        """The masked weights' shard specs and their common process group (for sums over FSDP2 shards)."""
        return self.masking.specs, self.masking.group

    def explored(self) -> Explored:
        """ITOP's ``R_s``: the fraction of each masked layer's positions, and of all masked positions, that have
        been active at some point of the run (since the masks were drawn, or since the checkpoint's run began).
        Methods that start dense (GMP, GraNet from 1.0) have explored everything. One host read (all-reduced
        over FSDP2 shards; under DDP the masks, hence the record, agree on every process)."""
        if not self._explored:
            return Explored({}, 0.0)
        specs, group = self._layout()
        local_counts = torch.stack([nonzero_count(e) for e in self._explored])
        counts = distributed.reduce_layer_sums(local_counts, specs, group).tolist()
        sizes = self.sizes
        return Explored({n: c / s for n, c, s in zip(self.names, counts, sizes)}, sum(counts) / max(sum(sizes), 1))

    # ------------------------------------------------------------------ the loop
    def before_optimizer_step(self) -> None:
        """Call after ``backward`` and before ``optimizer.step()``: DST adds its regularizer's gradient; RigL checks
        at the first step that every masked layer got a gradient, before the optimizer changes a weight."""
        self._check_first_gradients(restore_all=False)

    def _check_first_gradients(self, restore_all: bool) -> None:
        """Gradient growth (RigL): refuse a masked layer without gradient at the first step, with the weights the
        first masks zeroed put back (``restore_all``: also where the optimizer has written since)."""
        if self._gradients_checked:
            return
        if self.uses_gradient_growth:
            try:
                check_gradients(self.masking.names, self.masking.weights)
            except ValueError:
                if self._zeroed is not None:
                    self.masking.restore(self._zeroed, force=restore_all)
                raise
        self._gradients_checked = True

    def step(self, step: int | None = None) -> UpdateReport | None:
        """Call after every ``optimizer.step()`` and before ``optimizer.zero_grad()`` (RigL grows where this step's
        gradients are largest): re-applies the masks and runs a step-level update when one is due. ``step`` is
        the number of optimizer steps taken so far (counted here when ``None``). Returns the update's report, or
        ``None`` when no update ran.

        A step that AMP's ``GradScaler`` skipped (non-finite gradients, no optimizer step) changes no weight: an
        update due then runs at the next step the optimizer takes. A call with no optimizer step before it and
        finite gradients, or after several optimizer steps, raises ``RuntimeError`` naming the call order."""
        self._check_started()
        self._check_first_gradients(restore_all=True)
        skipped = self._check_call_order()
        self.step_count = self.step_count + 1 if step is None else int(step)
        self._zeroed = None  # the run has started: the first masks are kept
        self._last_step_skipped = skipped
        due = self.schedule.due(self.step_count, self.last_update_step, self._total_steps, False, self._to_target)
        if skipped:
            self._update_waiting = self._update_waiting or due
            self._dense_gradients_next()
            return None
        self.masking.apply_()
        report = None
        if due or self._update_waiting:
            self._update_waiting = False
            report = self.update()
        self._dense_gradients_next()
        return report

    def _dense_gradients_next(self) -> None:
        if self._compute is not None:
            self._compute.dense_gradients = self._next_step_reads_gradients()

    def _check_call_order(self) -> bool:
        """Whether the optimizer step before this ``step()`` was skipped by AMP's ``GradScaler``; a call in the
        wrong place raises. Free unless the optimizer took no step (then one read of the gradients' state)."""
        taken = self._optimizer_steps.since_last()
        if taken is None or taken == 1:
            return False
        if taken == 0:
            masking = self.masking
            if gradients_state(masking.weights, masking.specs, masking.group) == "non-finite":
                check_weights_finite(masking.names, masking.weights, masking.specs, masking.group)  # diverged?
                return True  # the GradScaler found inf/NaN gradients and skipped optimizer.step()
            raise RuntimeError(
                "`sparsifier.step()` was called with no `optimizer.step()` since its last call (or since it was"
                " made), and the gradients are finite, so no GradScaler skipped one: the masks would be applied"
                f" before the weights change, and the schedule would run too fast. {ORDER[0].upper()}{ORDER[1:]}"
            )
        raise RuntimeError(
            f"the optimizer took {taken} steps since the last `sparsifier.step()`: the masks were not applied"
            f" after {taken - 1} of them, so masked weights trained. {ORDER[0].upper()}{ORDER[1:]}"
        )

    def epoch_end(self, step: int | None = None) -> UpdateReport | None:
        """Call at the end of every epoch: runs an epoch-level update when one is due (never after the last
        optimizer step; after a step the GradScaler skipped, at the next real step). Returns the update's
        report, or ``None``."""
        if step is not None:
            self.step_count = int(step)
        if self.schedule.due(self.step_count, self.last_update_step, self._total_steps, True, self._to_target):
            if self._last_step_skipped:  # non-finite gradients: the update reads the next step's
                self._update_waiting = True
                return None
            return self.update()
        return None

    def finish(self) -> None:
        """Call after training: re-applies the masks (weight averaging may have replaced the weights; DST folds
        its thresholds into the weights instead). With ``compute="condensed"``, the layers compute densely again
        (:meth:`attach_compute` for another run)."""
        self.masking.apply_(kernel="torch")
        if self._compute is not None:
            self._compute.detach()

    def restart(self, step: int = 0) -> None:
        """Start the schedule over at optimizer step ``step``, for a new run over the same masks (a second ``fit``
        whose step count starts again): the update window and the rate follow the new :attr:`total_steps` from
        there. The masks, the random state and :attr:`num_updates` carry on."""
        self.step_count, self.last_update_step = int(step), -1
        self.current_prune_rate = self.schedule.prune_rate
        self._dense_gradients_next()

    def update(self) -> UpdateReport:
        """One mask update now, whatever the schedule says (the schedule still gives the rate).

        Frozen masked layers (``mask_frozen=True``) keep their masks, except under GMP, which prunes them too.
        Raises ``RuntimeError`` when the method's rules produce other counts than they were asked for (a custom
        prune or growth rule that grows ``n // 2``), naming the layers, the counts and the rule: the masks, the
        weights, the random state and the algorithm's state are then left as they were."""
        self._check_started()
        self._check_update_gradients()
        self._check_compute_gradients()
        algorithm = self.options.algorithm
        assert isinstance(algorithm, SparseAlgorithm)
        masking = self.masking
        if not self.sharded:  # processes that drifted apart plan from rank zero's masks (and their counts)
            self._masks_agree()
        step = self.step_count
        progress = self.schedule.progress(step, self._total_steps)
        rate = self.schedule.rate_at(progress)
        nonzero = dict(zip(masking.names, masking.nonzero_counts()))  # the network as trained
        layers = [
            LayerState(
                name,
                distributed.local(weight),
                mask,
                partial(self._momentum, weight),
                partial(self._grad, weight),
                spec,
                transposed=self.layers[name].transposed,
                kernel=self.options.mask_kernel,
            )
            for name, weight, mask, spec in zip(masking.names, masking.weights, masking.masks, masking.specs)
        ]
        # frozen layers (mask_frozen=True) keep their masks, except under GMP, which prunes them by |W| on the
        # schedule like the others (it reads no gradient), so the run reaches the asked density
        trained = [i for i, w in enumerate(masking.weights) if w.requires_grad or algorithm.prunes_to_schedule]
        if algorithm.dynamic:
            reads: dict[str, Callable[[LayerState], Tensor]] = {"weights": lambda layer: layer.weight}
            if algorithm.needs_momentum:
                reads["momentum"] = lambda layer: layer.momentum
            if self.uses_gradient_growth:
                reads["gradients"] = lambda layer: layer.grad
            check_finite([layers[i] for i in trained], reads, step, [masking.specs[i] for i in trained], masking.group)
        groups = self._group_indices()

        def context(group: str) -> UpdateContext:
            state = self.algorithm_state if len(groups) == 1 else self.algorithm_state.setdefault(f"group {group}", {})
            return UpdateContext(
                rate, progress, self.group_density[group], self.generator, state, self.pattern,
                self.options.neuron_ablation, self.keep_neurons,
            )  # fmt: skip

        generator_state, algorithm_state = self.generator.get_state(), copy.deepcopy(self.algorithm_state)
        try:  # the new masks' counts are checked here (methods.targets): a refused update changes nothing
            result = update_groups(algorithm, layers, masking.active, masking.masks, groups, trained, context)
        except BaseException:
            self.generator.set_state(generator_state)
            self.algorithm_state = algorithm_state
            raise
        before = list(masking.masks)  # what was active before: only positions new to a layer start afresh
        masking.set_masks(result.masks, result.active)
        if not self.sharded:
            self._masks_agree()
        self._explore(masking.masks)
        masking.apply_()
        self._refresh_compute()
        if algorithm.dynamic:  # grown weights start at zero, their optimizer state as the method's reference
            algorithm.start_grown_(masking.weights, before, result, self.optimizer)
        self.current_prune_rate = rate
        self.last_update_step = step
        self.num_updates += 1
        self.last_update = UpdateReport(step, rate, progress, nonzero, result)
        return self.last_update

    def _masks_agree(self) -> None:
        """Under DDP: every process takes rank zero's masks should they differ (and counts them again)."""
        if distributed.ensure_masks_agree(self.masking.names, self.masking.masks):
            self.masking.active = self.masking.count_active()

    def _check_update_gradients(self) -> None:
        """Gradient growth reads this step's gradients: refuse an update after ``optimizer.zero_grad()``."""
        if not self.uses_gradient_growth:
            return
        state = gradients_state(self.masking.weights, self.masking.specs, self.masking.group)
        if state in ("none", "zero"):
            what = "no gradient" if state == "none" else "all-zero gradients"
            raise RuntimeError(
                f"algorithm {self.options.algorithm_name!r} grows where this step's gradients are largest, but the"
                f" masked weights have {what} at the update of step {self.step_count} (was `optimizer.zero_grad()`"
                f" called before `sparsifier.step()`?): {ORDER}"
            )

    def _momentum(self, weight: Tensor) -> Tensor:
        check_momentum_optimizer(self.optimizer, [weight])
        return distributed.local(optimizer_momentum(self.optimizer, weight))

    @staticmethod
    def _grad(weight: Tensor) -> Tensor | None:
        return None if weight.grad is None else distributed.local(weight.grad)

    # ------------------------------------------------------------------ SNIP
    @property
    def needs_snip(self) -> bool:
        """Whether :meth:`snip` must be called before training (``algorithm="snip"``, not yet done)."""
        return self._needs_snip

    def _wait_for_snip(self, pending: bool) -> None:
        """Whether SNIP still waits for its batch. Meanwhile the frozen masked weights (``mask_frozen=True``)
        require gradients, so that the scoring batch records them and they are scored by ``|g * w|`` like the
        others; once the masks are picked (or a checkpoint says they were), they are frozen again."""
        if self._frozen_scoring is not None:
            self._frozen_scoring.restore()
        self._frozen_scoring = FrozenScoring(self.masking.weights) if pending else None
        self._needs_snip = pending

    def _check_started(self) -> None:
        if hasattr(self, "masking"):
            check_owner(self.masking.names, self.masking.weights, self)
        if self._needs_snip:
            raise RuntimeError(
                "algorithm='snip' picks its masks from one batch: call `sparsifier.snip(loss)` with the loss of one"
                " training batch before the first optimizer step"
            )

    def snip(self, loss: Tensor) -> None:
        """SNIP: keep the global top ``density`` of ``|g ⊙ w|``, ``g`` the gradient of ``loss`` (one training
        batch, not yet backpropagated). The model's ``.grad`` are left as they were; under DDP the gradients are
        summed over processes first, under FSDP2 they come reduce-scattered from the backward pass. With density
        groups, each group keeps its own top share. Frozen masked layers (``mask_frozen=True``) are scored too:
        they require gradients from the ``Sparsifier``'s construction until this call picks the masks, then are
        frozen again (``requires_grad=False``), so compute ``loss`` after making the ``Sparsifier``."""
        scores = snip_scores(self.model, self.masking, loss)
        if self.pattern.structured:  # the top scores of every unit: top N of each group of M, top k of each row
            transposed = [self.layers[n].transposed for n in self.masking.names]
            shapes = [spec.shape for spec in self.masking.specs]
            counts = pattern_counts(shapes, init_counts(shapes, self._group_indices(), self.options), self.pattern,
                                    transposed)  # fmt: skip
            masks = top_scores_per_unit(scores, self.masking, counts, self.pattern, transposed)
        else:  # the top scores of each density group
            masks = top_scores_per_group(scores, self.masking, self._group_indices(), self.group_density)
        self._set_snip_masks(masks)

    def _set_snip_masks(self, masks: list[Tensor]) -> None:
        masking = self.masking
        masking.set_masks(masks, [])
        masking.active = masking.count_active()
        if not self.sharded:
            self._masks_agree()
        self._reset_explored()  # SNIP's full masks while it waited for its batch were never trained
        masking.apply_()
        self._wait_for_snip(False)
        self.attach_compute()
        empty = [name for name, n in zip(masking.names, masking.active) if n == 0]
        if empty:
            warnings.warn(
                f"SNIP leaves 0 active weights in {', '.join(empty)}: none of their scores |g * w| made the top"
                f" {self.options.density} (all zero, or too low for this density); they will output only their bias."
                " Raise `density`, score another batch, or keep them dense with `dense_layers`",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks (full, ``torch.bool`` on the CPU), schedule position, counters and random state: plain tensors
        and numbers. Under FSDP2 the masks are gathered from every process: call it on every process."""
        return {
            "version": STATE_VERSION,
            "prune_rate": self.current_prune_rate,
            "last_update_step": self.last_update_step,
            "num_updates": self.num_updates,
            "step_count": self.step_count,
            "generator_state": self.generator.get_state(),
            "algorithm_state": copy.deepcopy(self.algorithm_state),  # not the live dicts (neuron ablation's budgets)
            "masks": self.masking.state_dict(),
            "explored": self._explored_state(),
            "snip_pending": self._needs_snip,
            "density": self.options.density,
            "algorithm": self.options.algorithm_name,
            "pattern": self.options.pattern,
            "neuron_ablation": self.options.neuron_ablation,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (also a lightning-sparse 0.1 checkpoint). Masks that do not
        match the model (other names or shapes) raise ``ValueError``."""
        check_version(state)
        check_same_run(self.options, state)
        if self._zeroed is not None:  # the model's weights were loaded before this Sparsifier drew its masks
            self.masking.restore(self._zeroed)
            self._zeroed = None
        self._load_masks(state)
        self.current_prune_rate = float(state.get("prune_rate", self.schedule.prune_rate))
        self.last_update_step = int(state.get("last_update_step", -1))
        self.num_updates = int(state.get("num_updates", 0))
        self.step_count = int(state.get("step_count", max(self.last_update_step, 0)))
        self.algorithm_state = copy.deepcopy(dict(state.get("algorithm_state", {})))
        if "generator_state" in state:
            self.generator.set_state(state["generator_state"])
        self._refresh_compute()
        self._dense_gradients_next()

    def _explored_state(self) -> dict[str, Tensor]:
        """The positions ever active, full ``torch.bool`` CPU tensors by name (gathered over FSDP2 shards)."""
        masking = self.masking
        return {
            name: distributed.gather_rows(explored, spec).to("cpu", copy=True)
            for name, explored, spec in zip(masking.names, self._explored or [], masking.specs)
        }

    def _load_explored(self, saved: Mapping[str, Tensor] | None) -> None:
        """Restore the record of explored positions (a checkpoint without one starts it from its masks); it always
        holds the current masks."""
        self._reset_explored()
        if not saved:
            return
        masking = self.masking
        if set(saved) != set(masking.names):
            raise ValueError(
                f"the checkpoint's explored positions are for {sorted(saved)}, the masked weights are"
                f" {sorted(masking.names)}: resume with the checkpoint's layers, or start a new run"
            )
        for name, spec, weight, explored in zip(masking.names, masking.specs, masking.weights, self._explored or []):
            full = saved[name]
            if full.dtype != torch.bool or tuple(full.shape) != spec.shape:
                raise ValueError(f"the checkpoint's explored positions of {name!r} must be torch.bool of shape {spec.shape}")
            explored |= distributed.local_rows(full, spec).to(weight.device).reshape(explored.shape)

    def _load_masks(self, state: Mapping[str, Any]) -> None:
        if "masks" not in state:
            raise ValueError("the checkpoint's sparse training state holds no masks")
        self.masking.load_masks(state["masks"])
        self._load_explored(state.get("explored"))
        transposed = [self.layers[n].transposed for n in self.masking.names]
        on_the_way = self._to_target or bool(state.get("snip_pending", False))
        check_loaded_pattern(self.masking, self.options, transposed, on_the_way)
        self.masking.apply_(kernel="torch")
        self._wait_for_snip(bool(state.get("snip_pending", False)))
