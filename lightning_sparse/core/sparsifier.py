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
import fnmatch
import logging
import math
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sparse.core import distributed
from lightning_sparse.core.layers import FoundLayers, find_attention, find_layers, has_candidates, is_hf_conv1d
from lightning_sparse.core.masking import Masking, check_found
from lightning_sparse.core.optimizer import check_momentum_optimizer, optimizer_momentum
from lightning_sparse.functional.init import layer_active_counts
from lightning_sparse.functional.patterns import (
    input_size,
    pattern_counts,
    select_per_unit,
    unit_counts,
    unit_shape,
)
from lightning_sparse.functional.prune_grow import snip_masks
from lightning_sparse.methods import LayerState, SparseAlgorithm, UpdateContext, UpdateResult, dst
from lightning_sparse.options import SparseOptions, check_total_steps

log = logging.getLogger(__name__)

STATE_VERSION = 2
"""Version of :meth:`Sparsifier.state_dict`. 1: lightning-sparse 0.1 (same keys, masks always full)."""


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


class Sparsifier:
    """Keep a model sparse during training and update which weights are active.

    Args:
        model: the model; the weights of its Linear and Conv1d/2d/3d layers are masked (minus ``dense_layers``).
            Bound by name when the ``Sparsifier`` is made: make it after the model is wrapped or sharded
            (DDP, FSDP2's ``fully_shard``) and after the optimizer exists.
        optimizer: the one optimizer that updates the masked weights (sparse momentum reads its momentum; RigL
            resets its state at grown positions; DST adds its thresholds to it when they are not in it yet).
        density, algorithm, prune_rate, prune_rate_schedule, init, dense_layers, update_interval, stop_at, seed,
        mask_kernel, pattern, neuron_ablation, keep_neurons: as for :class:`~lightning_sparse.SparseTrainingCallback`.
        total_steps: number of optimizer steps of the whole run (for the schedules); ``None`` if unknown, which
            only the ``"constant"`` schedule and methods without a schedule accept. Can be set later with
            :attr:`total_steps`.
        options: already checked options (:class:`~lightning_sparse.options.SparseOptions`) instead of the
            keyword arguments.
        state: a :meth:`state_dict` to resume from: its masks are used instead of drawing new ones, so the
            model's (restored) weights are not touched by random masks first.

    ``Sparsifier(..., algorithm="dst")`` gives a :class:`DSTSparsifier`, which has the same methods.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Sparsifier:
        if cls is Sparsifier:
            options = kwargs.get("options")
            algorithm = options.algorithm if options is not None else kwargs.get("algorithm", "sparse_momentum")
            if isinstance(algorithm, dst.DST) or algorithm == "dst":
                return super().__new__(DSTSparsifier)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float | Mapping[str, float] | None = None,
        algorithm: str | SparseAlgorithm | dst.DST = "sparse_momentum",
        total_steps: int | float | None = None,
        prune_rate: float | None = None,
        prune_rate_schedule: str | Callable[[float], float] | None = None,
        init: str | None = None,
        dense_layers: Sequence[str] = (),
        update_interval: int | Literal["epoch"] | None = None,
        stop_at: float | None = None,
        seed: int | None = None,
        mask_kernel: Literal["auto", "cpp", "torch"] = "auto",
        mask_frozen: bool = False,
        layer_types: Sequence[type | str] | None = None,
        include: Sequence[str] = (),
        mask_embeddings: bool = False,
        pattern: str = "unstructured",
        neuron_ablation: float | None = None,
        keep_neurons: Sequence[str] | None = None,
        options: SparseOptions | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        if options is None:
            options = SparseOptions.resolve(
                density, algorithm, prune_rate, prune_rate_schedule, init, dense_layers, update_interval, stop_at,
                seed, mask_kernel, mask_frozen, layer_types, include, mask_embeddings, pattern=pattern,
                neuron_ablation=neuron_ablation, keep_neurons=keep_neurons,
            )  # fmt: skip
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(optimizer, "param_groups"):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.options = options
        self.pattern = options.parsed_pattern
        self.model = model
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
        self._gradients_checked = False
        if total_steps is not None:
            self.total_steps = total_steps
        if state is not None:
            self._check_same_run(state)  # before binding touches the model (DST attaches its thresholds)
        self._bind(state)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ binding
    def _bind(self, state: Mapping[str, Any] | None) -> None:
        algorithm = self.options.algorithm
        assert isinstance(algorithm, SparseAlgorithm)
        _refuse_fsdp1(self.model)
        found = select_layers(self.model, self.options)
        self.layers, self.left_dense, params = found.masked, found.dense, found.params
        self.layer_groups = [found.groups[name] for name in params]
        self.group_density = dict(self.options.groups)
        self.keep_neurons = self._keep_neurons(list(params))
        self._check_pattern_layers(params)
        self._check_optimizer(params, algorithm.needs_momentum)
        if state is not None:  # resuming: the checkpoint's masks, nothing drawn (`load_state_dict` applies them)
            if "masks" not in state:
                raise ValueError("the checkpoint's sparse training state holds no masks")
            self.masking = Masking(params, state["masks"], self.options.mask_kernel)
            return
        if algorithm.start == "random":
            shapes = [distributed.shard_spec(p, n).shape for n, p in params.items()]
            counts = self._init_counts(shapes)
            if self.pattern.structured:
                transposed = [self.layers[n].transposed for n in params]
                self.masking = Masking.random(params, pattern_counts(shapes, counts, self.pattern, transposed),
                                              self.options.init, self.generator, self.options.mask_kernel,
                                              pattern=self.pattern, transposed=transposed)  # fmt: skip
            else:
                by = self.group_density["*"] if list(self.group_density) == ["*"] else counts
                self.masking = Masking.random(params, by, self.options.init, self.generator, self.options.mask_kernel)
        else:  # dense until GMP prunes or SNIP picks its masks (contiguous, whatever the weight's memory format)
            local = [distributed.local(p) for p in params.values()]
            masks = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in local]
            self.masking = Masking(params, kernel=self.options.mask_kernel, local_masks=masks)
        self._needs_snip = algorithm.start == "snip"
        self.masking.apply_(kernel="torch")

    def _init_counts(self, shapes: Sequence[Sequence[int]]) -> list[int]:
        """Active weights per layer of the initialization (``init`` within each density group)."""
        counts = [0] * len(shapes)
        for pattern, indices in self._group_indices().items():
            group_counts = layer_active_counts([shapes[i] for i in indices], self.group_density[pattern],
                                               self.options.init)  # fmt: skip
            for i, n in zip(indices, group_counts):
                counts[i] = n
        return counts

    def _check_pattern_layers(self, params: Mapping[str, Tensor]) -> None:
        """Refuse, before anything is touched, layers a structured pattern cannot hold: N:M on an input dimension
        that is not a multiple of M, and transposed weights sharded by FSDP2 (their rows are input channels, so
        their units would span processes)."""
        pattern = self.pattern
        if not pattern.structured:
            return
        specs = {name: distributed.shard_spec(p, name) for name, p in params.items()}
        sharded = [n for n in params if self.layers[n].transposed and specs[n].sharded]
        if sharded:
            raise ValueError(
                f"pattern={str(pattern)!r} under FSDP2: the transposed weight(s) {sharded} (transformers' Conv1D,"
                " stored [in, out]) are sharded by their input channels, so the pattern's units would span processes."
                f" Keep them dense with `dense_layers={sharded}`, or use pattern='unstructured'"
            )
        if pattern.kind == "nm":
            bad = {n: input_size(specs[n].shape, self.layers[n].transposed) for n in params}
            bad = {n: size for n, size in bad.items() if size % pattern.m}
            if bad:
                listed = ", ".join(f"{n} (input dimension {size})" for n, size in bad.items())
                raise ValueError(
                    f"pattern={str(pattern)!r} groups every {pattern.m} consecutive weights along a layer's input"
                    " dimension (in-channels x kernel for convolutions), which must be a multiple of"
                    f" {pattern.m}; not for {listed}. Keep those layers dense with `dense_layers={list(bad)}`"
                )

    def _keep_neurons(self, names: Sequence[str]) -> frozenset[str]:
        """The masked weights whose rows neuron ablation never empties: those ``keep_neurons`` names (weight or
        module names, or globs), or by default the last masked layer (usually the output layer, SRigL's default).
        A name that matches no masked weight is refused, naming the masked ones."""
        if self.options.neuron_ablation is None or not names:
            return frozenset()
        globs = self.options.keep_neurons
        if globs is None:
            return frozenset(names[-1:])
        kept = set()
        for glob in globs:
            matched = [n for n in names if fnmatch.fnmatchcase(n, glob) or fnmatch.fnmatchcase(self.layers[n].module, glob)]
            if not matched:
                raise ValueError(
                    f"`keep_neurons` entry {glob!r} matches no masked layer; the masked layers are: {', '.join(names)}"
                )
            kept.update(matched)
        return frozenset(kept)

    def _group_indices(self) -> dict[str, list[int]]:
        """Layer indices (in mask order) by density group."""
        groups: dict[str, list[int]] = {}
        for i, pattern in enumerate(self.layer_groups):
            groups.setdefault(pattern, []).append(i)
        return groups

    def _check_optimizer(self, params: Mapping[str, Tensor], needs_momentum: bool) -> None:
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in params.items() if id(p) not in optimized]
        if missing:
            raise ValueError(
                f"the optimizer does not update the masked weight(s) {missing}: bind the Sparsifier to the model"
                " the optimizer was built for (after DDP/FSDP2 wrapping), or leave those layers dense with"
                " `dense_layers`"
            )
        if needs_momentum:
            check_momentum_optimizer(self.optimizer, list(params.values()))

    # ------------------------------------------------------------------ read-only state
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
        return isinstance(algorithm, SparseAlgorithm) and algorithm.count == "gmp"

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
        return isinstance(self.options.algorithm, SparseAlgorithm) and self.options.algorithm.grow == "gradient"

    @property
    def sharded(self) -> bool:
        """Whether any masked weight is an FSDP2 shard."""
        return any(s.sharded for s in self.masking.specs)

    def shard_layout(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`~lightning_sparse.cost.report.SparsityReport.measure` under FSDP2."""
        if not self.sharded:
            return {}
        return {
            "row_offsets": {n: s.row_offset for n, s in zip(self.masking.names, self.masking.specs)},
            "out_channels": {n: s.shape[0] for n, s in zip(self.masking.names, self.masking.specs)},
            "group": self.masking.group,
        }

    def report_layers(self, names: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What :meth:`~lightning_sparse.cost.report.SparsityReport.measure` takes: the (local) masks, plus the (local)
        weights of the other layers in ``names``, and the layout: the shard layout (FSDP2), ``transposed`` (the
        layers stored ``[in, out]``, ``transformers``' ``Conv1D``, whose columns are their output channels) and
        ``attention`` (:func:`~lightning_sparse.core.layers.find_attention`'s modules whose projections are all among
        the layers, for their empty heads). Under FSDP2 a layer that every process holds whole is counted from
        the first process only; a ``Conv1D`` weight is sharded by its stored rows (input channels), which the
        report's all-reduced counts handle (each process passes its row block as stored, not transposed)."""
        layers: dict[str, Tensor] = dict(self.masks)
        layout = self.shard_layout()
        params = dict(self.model.named_parameters())
        for name in names:
            if name in layers or name not in params:
                continue
            spec = distributed.shard_spec(params[name], name)
            value = distributed.local(params[name])
            if layout and not spec.sharded and distributed.rank(layout["group"]) != 0:
                value = value[:0]
            layers[name] = value
            if layout:
                layout["row_offsets"][name] = spec.row_offset
                layout["out_channels"][name] = spec.shape[0]
        transposed = [name for name in layers if self._transposed(name)]
        if transposed:
            layout["transposed"] = transposed
        if not hasattr(self, "_attention"):  # the model's modules do not change during a run
            self._attention = find_attention(self.model)
        attention = {m: a for m, a in self._attention.items() if all(n in layers for n in a.layers)}
        if attention:
            layout["attention"] = attention
        return layers, layout

    def _transposed(self, name: str) -> bool:
        """Whether the weight ``name`` is stored ``[in, out]`` (``transformers``' ``Conv1D``)."""
        layer = self.layers.get(name)
        if layer is not None:
            return layer.transposed
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            return False
        return attr == "weight" and is_hf_conv1d(module)

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

    # ------------------------------------------------------------------ the loop
    def before_optimizer_step(self) -> None:
        """Call after ``backward`` and before ``optimizer.step()`` (only DST adds a gradient here)."""

    def step(self, step: int | None = None) -> UpdateReport | None:
        """Call after every ``optimizer.step()`` and before ``optimizer.zero_grad()`` (RigL grows where this step's
        gradients are largest): re-applies the masks and runs a step-level update when one is due. ``step`` is the number of optimizer steps taken so far (counted here when ``None``). Returns the
        update's report, or ``None`` when no update ran."""
        self._check_started()
        if not self._gradients_checked:
            self._check_gradients()
        self.step_count = self.step_count + 1 if step is None else int(step)
        self.masking.apply_()
        if self.schedule.due(self.step_count, self.last_update_step, self._total_steps, False, self._to_target):
            return self.update()
        return None

    def epoch_end(self, step: int | None = None) -> UpdateReport | None:
        """Call at the end of every epoch: runs an epoch-level update when one is due (never after the last
        optimizer step). Returns the update's report, or ``None``."""
        if step is not None:
            self.step_count = int(step)
        if self.schedule.due(self.step_count, self.last_update_step, self._total_steps, True, self._to_target):
            return self.update()
        return None

    def finish(self) -> None:
        """Call after training: re-applies the masks (weight averaging may have replaced the weights; DST folds
        its thresholds into the weights instead)."""
        self.masking.apply_(kernel="torch")

    def update(self) -> UpdateReport:
        """One mask update now, whatever the schedule says (the schedule still gives the rate)."""
        self._check_started()
        algorithm = self.options.algorithm
        assert isinstance(algorithm, SparseAlgorithm)
        masking = self.masking
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
            )
            for name, weight, mask, spec in zip(masking.names, masking.weights, masking.masks, masking.specs)
        ]
        trained = [i for i, w in enumerate(masking.weights) if w.requires_grad]  # frozen layers keep their masks
        if algorithm.dynamic:
            self._check_finite([layers[i] for i in trained], algorithm, step, [masking.specs[i] for i in trained])
        groups = self._group_indices()
        trained_set = set(trained)
        result = None
        for pattern, indices in groups.items():  # each group keeps its own total; weights move only within it
            chosen = [i for i in indices if i in trained_set]
            if not chosen:
                continue
            state = self.algorithm_state if len(groups) == 1 else self.algorithm_state.setdefault(f"group {pattern}", {})
            context = UpdateContext(
                rate, progress, self.group_density[pattern], self.generator, state, self.pattern,
                self.options.neuron_ablation, self.keep_neurons,
            )  # fmt: skip
            if len(chosen) == len(layers):
                result = algorithm.update(layers, masking.active, context)
            else:
                part = algorithm.update([layers[i] for i in chosen], [masking.active[i] for i in chosen], context)
                base = result or _splice(None, [], masking.masks, masking.active)
                result = _splice(part, chosen, base.masks, base.active, base)
        if result is None:
            result = _splice(None, [], masking.masks, masking.active)
        before = list(masking.masks)  # what was active before: only positions new to a layer start afresh
        masking.set_masks(result.masks, result.active)
        if not self.sharded:
            distributed.ensure_masks_agree(masking.names, masking.masks)
        masking.apply_()
        if algorithm.dynamic:  # grown weights start at zero, their optimizer state as the method's reference
            algorithm.start_grown_(masking.weights, before, result, self.optimizer)
        self.current_prune_rate = rate
        self.last_update_step = step
        self.num_updates += 1
        self.last_update = UpdateReport(step, rate, progress, nonzero, result)
        return self.last_update

    def _check_gradients(self) -> None:
        """At the first step: gradient growth (RigL) reads the gradient of every masked weight, so a layer left
        out of the forward pass is named now rather than at the first update."""
        if self.uses_gradient_growth:
            missing = [
                name for name, w in zip(self.masking.names, self.masking.weights) if w.grad is None and w.requires_grad
            ]
            if missing:
                order = (
                    " (no masked weight has one: call `sparsifier.step()` after `optimizer.step()` and before"
                    " `optimizer.zero_grad()`)"
                    if len(missing) == len(self.masking.names)
                    else ""
                )
                raise ValueError(
                    f"gradient growth (RigL) reads the gradient of every masked weight, but {missing} got no"
                    f" gradient in the first step{order}: use those layers in the forward pass, or leave them dense"
                    f" with `dense_layers={missing}`"
                )
        self._gradients_checked = True

    def _check_finite(
        self, layers: Sequence[LayerState], algorithm: SparseAlgorithm, step: int, specs: Sequence[Any]
    ) -> None:
        """Raise ``FloatingPointError`` naming the layers whose weights, momentum or gradients (what the update
        reads) hold NaN or inf. One fused check: one host read (and one all-reduce under FSDP2)."""
        reads: dict[str, Callable[[LayerState], Tensor]] = {"weights": lambda layer: layer.weight}
        if algorithm.needs_momentum:
            reads["momentum"] = lambda layer: layer.momentum
        if algorithm.grow == "gradient":
            reads["gradients"] = lambda layer: layer.grad
        flags = torch.stack(
            [torch.stack([~torch.isfinite(read(layer)).all() for read in reads.values()]) for layer in layers]
        ).to(torch.int64)
        flags = distributed.reduce_layer_sums(flags, specs, self.masking.group).tolist()
        bad = [
            f"{kind} in layer(s) {[layer.name for layer, row in zip(layers, flags) if row[k]]}"
            for k, kind in enumerate(reads)
            if any(row[k] for row in flags)
        ]
        if bad:
            raise FloatingPointError(
                f"non-finite {' and '.join(bad)} at the mask update of step {step}: the loss diverged (lower the"
                " learning rate, or use gradient clipping)"
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

    def _check_started(self) -> None:
        if self._needs_snip:
            raise RuntimeError(
                "algorithm='snip' picks its masks from one batch: call `sparsifier.snip(loss)` with the loss of one"
                " training batch before the first optimizer step"
            )

    def snip(self, loss: Tensor) -> None:
        """SNIP: keep the global top ``density`` of ``|g ⊙ w|``, ``g`` the gradient of ``loss`` (one training
        batch, not yet backpropagated). The model's ``.grad`` are left as they were; under DDP the gradients are
        summed over processes first, under FSDP2 they come reduce-scattered from the backward pass. With density
        groups, each group keeps its own top share."""
        masking = self.masking
        if self.sharded:
            saved = {p: p.grad for p in self.model.parameters()}
            for p in saved:
                p.grad = None
            loss.backward()
            grads = [None if w.grad is None else distributed.local(w.grad) for w in masking.weights]
            for p, g in saved.items():
                p.grad = g
        else:
            grads = list(torch.autograd.grad(loss, masking.weights, allow_unused=True))
            if distributed.world_size() > 1:
                flat = [torch.zeros_like(w) if g is None else g for w, g in zip(masking.weights, grads)]
                for g in flat:
                    torch.distributed.all_reduce(g)
                grads = flat
        weights = masking.local_weights()
        scores = [(torch.zeros_like(w) if g is None else g * w).abs() for w, g in zip(weights, grads)]
        self._check_snip_scores(loss, scores)
        masks = list(masking.masks)
        if self.pattern.structured:  # the top scores of every unit: top N of each group of M, top k of each row
            transposed = [self.layers[n].transposed for n in masking.names]
            shapes = [spec.shape for spec in masking.specs]
            counts = pattern_counts(shapes, self._init_counts(shapes), self.pattern, transposed)
            for i, (score, shape, t, n) in enumerate(zip(scores, shapes, transposed, counts)):
                units = unit_shape(shape, self.pattern, t)[0]
                everywhere = torch.ones(score.shape, dtype=torch.bool, device=score.device)
                masks[i] = select_per_unit(score, everywhere, n // units if units else 0, self.pattern, t)
            self._set_snip_masks(masks)
            return
        for pattern, indices in self._group_indices().items():  # the top scores of each density group
            count = int(round(self.group_density[pattern] * sum(masking.sizes[i] for i in indices)))
            chosen = snip_masks(
                [scores[i] for i in indices],
                count,
                offsets=[masking.specs[i].offset for i in indices],
                group=masking.group,
                sharded=[masking.specs[i].sharded for i in indices],
            )
            for i, mask in zip(indices, chosen):
                masks[i] = mask
        self._set_snip_masks(masks)

    def _set_snip_masks(self, masks: list[Tensor]) -> None:
        masking = self.masking
        masking.set_masks(masks, [])
        masking.active = masking.count_active()
        if not self.sharded:
            distributed.ensure_masks_agree(masking.names, masking.masks)
        masking.apply_()
        self._needs_snip = False

    def _check_snip_scores(self, loss: Tensor, scores: Sequence[Tensor]) -> None:
        """Raise ``FloatingPointError`` if the scoring batch's loss or any layer's ``|g ⊙ w|`` is NaN or inf (one
        host read; under FSDP2 the flags are all-reduced over the sharding group, so every process raises)."""
        masking = self.masking
        bad = torch.stack([~torch.isfinite(s).all() for s in scores]).to(torch.int64)
        bad = distributed.reduce_layer_sums(bad, masking.specs, masking.group)
        bad_loss = (~torch.isfinite(loss.detach()).all()).to(torch.int64).reshape(1).to(bad.device)
        distributed.all_reduce_sum_(bad_loss, masking.group)
        flags = torch.cat([bad_loss, bad]).tolist()
        layers = [name for name, flag in zip(masking.names, flags[1:]) if flag]
        if flags[0]:
            also = f" (and so are the scores |g * w| of layer(s) {layers})" if layers else ""
            raise FloatingPointError(
                f"SNIP: the loss of the scoring batch is non-finite{also}: score a batch with a finite loss (check"
                " the inputs, the loss function and the model's initialization)"
            )
        if layers:
            raise FloatingPointError(
                f"SNIP: non-finite scores |g * w| in layer(s) {layers}: the weights or the scoring batch's gradients"
                " hold NaN or inf (check the model's initialization and the inputs)"
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
            "snip_pending": self._needs_snip,
            "density": self.options.density,
            "algorithm": self.options.algorithm_name,
            "pattern": self.options.pattern,
            "neuron_ablation": self.options.neuron_ablation,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (also a lightning-sparse 0.1 checkpoint). Masks that do not
        match the model (other names or shapes) raise ``ValueError``."""
        version = int(state.get("version", 1))
        if version > STATE_VERSION:
            raise ValueError(
                f"this checkpoint's sparse state has version {version}; this lightning-sparse reads up to"
                f" {STATE_VERSION}: upgrade lightning-sparse"
            )
        self._check_same_run(state)
        self._load_masks(state)
        self.current_prune_rate = float(state.get("prune_rate", self.schedule.prune_rate))
        self.last_update_step = int(state.get("last_update_step", -1))
        self.num_updates = int(state.get("num_updates", 0))
        self.step_count = int(state.get("step_count", max(self.last_update_step, 0)))
        self.algorithm_state = copy.deepcopy(dict(state.get("algorithm_state", {})))
        if "generator_state" in state:
            self.generator.set_state(state["generator_state"])

    def _check_same_run(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint trained with another algorithm, density or pattern (states without algorithm or
        density load as they are; a state without a pattern was trained unstructured)."""
        saved = str(state.get("pattern", "unstructured"))
        if saved != self.options.pattern:
            raise ValueError(
                f"the checkpoint was trained with pattern={saved!r}, this run asks for pattern={self.options.pattern!r}:"
                " resume with the checkpoint's pattern, or start a new run"
            )
        saved = state.get("neuron_ablation")
        if saved != self.options.neuron_ablation and (saved is not None or self.options.neuron_ablation is not None):
            raise ValueError(
                f"the checkpoint was trained with neuron_ablation={saved!r}, this run asks for"
                f" neuron_ablation={self.options.neuron_ablation!r}: resume with the checkpoint's, or start a new run"
            )
        saved = state.get("algorithm")
        if saved is not None and str(saved).lower() != self.options.algorithm_name.lower():
            raise ValueError(
                f"the checkpoint was trained with algorithm {saved!r}, this run asks for"
                f" {self.options.algorithm_name!r}: resume with the checkpoint's algorithm, or start a new run"
            )
        saved = state.get("density")
        wanted = self.options.density
        if saved is not None and wanted is not None and not _same_density(saved, wanted):
            what = "density groups" if isinstance(saved, Mapping) or isinstance(wanted, Mapping) else "density"
            saved = dict(saved) if isinstance(saved, Mapping) else float(saved)
            raise ValueError(
                f"the checkpoint was trained with {what} {saved}, this run asks for {wanted}: resume with"
                " the checkpoint's, or start a new run"
            )

    def _load_masks(self, state: Mapping[str, Any]) -> None:
        if "masks" not in state:
            raise ValueError("the checkpoint's sparse training state holds no masks")
        self.masking.load_masks(state["masks"])
        self._check_loaded_pattern(on_the_way=self._to_target or bool(state.get("snip_pending", False)))
        self.masking.apply_(kernel="torch")
        self._needs_snip = bool(state.get("snip_pending", False))

    def _check_loaded_pattern(self, on_the_way: bool) -> None:
        """Under a structured pattern, refuse loaded masks whose units do not all hold the same count, or, for
        N:M, not ``N`` (unless ``on_the_way``: GMP before the end of its window, SNIP not yet run). One host read;
        all-reduced under FSDP2."""
        if not self.pattern.structured:
            return
        masking = self.masking
        counts = [unit_counts(m, self.pattern, self.layers[n].transposed) for n, m in masking.items()]
        if self.options.neuron_ablation is not None:  # every row empty or at the layer's k = active / alive rows
            alive = torch.stack([(c > 0).sum() for c in counts]).to(torch.int64)
            alive = distributed.reduce_layer_sums(alive, masking.specs, masking.group).tolist()
            off = [((c != 0) & (c != (a // n if n else 0))).sum() for c, a, n in zip(counts, masking.active, alive)]
        else:
            expected = [  # every unit of a layer holds the layer's active count / its number of units
                self.pattern.n
                if self.pattern.kind == "nm" and not on_the_way
                else a // unit_shape(spec.shape, self.pattern, self.layers[n].transposed)[0]
                for n, a, spec in zip(masking.names, masking.active, masking.specs)
            ]
            off = [(c != e).sum() for c, e in zip(counts, expected)]
        bad = distributed.reduce_layer_sums(torch.stack(off).to(torch.int64), masking.specs, masking.group).tolist()
        wrong = [n for n, b in zip(masking.names, bad) if b]
        if wrong:
            raise ValueError(
                f"the checkpoint's masks of {wrong} do not hold pattern={self.options.pattern!r}: they were not"
                " trained with it"
            )


COLLAPSE_WARN_AFTER = 3
"""A DST layer that collapses this many times in a run gets a warning (see ``DSTSparsifier.collapses``)."""


class DSTSparsifier(Sparsifier):
    """Dynamic Sparse Training (Liu et al. 2020) behind the :class:`Sparsifier` protocol: trainable per-neuron
    thresholds attached to the masked layers (see :mod:`lightning_sparse.methods.dst`); the density is learned.

    Thresholds already attached by :func:`attach_dst_thresholds` are reused; others are attached now and added
    to the optimizer as a new parameter group without weight decay. Under DDP their gradients are averaged over
    processes before each optimizer step. :meth:`finish` folds the thresholds into the weights, so the model is
    a plain model again (a later :meth:`step` re-attaches them from :attr:`thresholds`).

    Under FSDP2 the thresholds must be attached before ``fully_shard`` (FSDP2 then shards each one like the rows
    of its weight): :func:`attach_dst_thresholds` in ``configure_model``, or the callback's ``setup`` for
    layers built in ``__init__``. FSDP2 reduces their gradients; masks and densities come from the local rows
    and all-reduced counts. :meth:`finish` then zeroes the raw weights outside the masks and keeps the
    parametrizations (FSDP2 manages them), so the model computes the same function with exactly sparse weights.
    """

    def _bind(self, state: Mapping[str, Any] | None) -> None:
        algorithm = self.options.algorithm
        assert isinstance(algorithm, dst.DST)
        self.dst = algorithm
        _refuse_fsdp1(self.model)
        self._fsdp = any(distributed.is_dtensor(p) for p in self.model.parameters())
        self._final_masks: dict[str, Tensor] = {}
        self._finished = False
        self.collapses: dict[str, int] = {}  # thresholds reset (layer collapsed) per layer, this process's run
        self.thresholds = attach_dst_thresholds(self.model, self.options, attach=not self._fsdp)
        missing = [t.threshold for t in self.thresholds.values() if not _optimized(self.optimizer, t.threshold)]
        if missing:
            self.optimizer.add_param_group({"params": missing, "weight_decay": 0.0})
        found = select_layers(self.model, self.options, include_parametrized=_dst_modules(self.model))
        self.layers, self.left_dense = found.masked, found.dense
        self._modules = {name: self.model.get_submodule(self.layers[name].module) for name in self.thresholds}
        self._specs = [distributed.shard_spec(self._raw(n), n) for n in self._modules]
        self._group = distributed.common_group(self._specs)
        self.alpha = algorithm.alpha_for(sum(self.sizes))  # DST.alpha, or the value chosen for the network
        if algorithm.alpha is None and distributed.rank() == 0:
            log.info(
                "DST: alpha = %g chosen for %d masked weights (%s; pass DST(alpha=...) to set it)",
                self.alpha,
                sum(self.sizes),
                f"LeNet size, <= {dst.LENET_MAX_WEIGHTS:,}"
                if self.alpha == dst.ALPHA_LENET
                else f"larger than a LeNet, > {dst.LENET_MAX_WEIGHTS:,}",
            )

    def _raw(self, name: str) -> Tensor:
        return dst.raw_weight(self._modules[name], self.layers[name].attr)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name (as before the parametrization) → ``|W| > t`` as ``torch.bool`` (after :meth:`finish`,
        the masks folded into the weights). Under FSDP2, this process's rows."""
        if self._finished or not self._attached():
            return types.MappingProxyType(dict(self._final_masks))
        return types.MappingProxyType({name: self._local_mask(name) for name in self._modules})

    def _local_mask(self, name: str) -> Tensor:
        weight = distributed.local(self._raw(name)).detach()
        threshold = self.thresholds[name]
        shape = [1] * weight.dim()
        shape[threshold.dim] = -1
        return weight.abs() > distributed.local(threshold.threshold).detach().view(shape)

    @property
    def names(self) -> list[str]:
        return list(self.thresholds)

    @property
    def sizes(self) -> list[int]:
        return [s.numel for s in self._specs]

    def densities(self) -> dict[str, float]:
        masks = self.masks
        if not masks:
            return {}
        local_counts = torch.stack([m.sum() for m in masks.values()]).to(torch.int64)
        counts = distributed.reduce_layer_sums(local_counts, self._specs, self._group).tolist()
        return {name: c / size for name, c, size in zip(masks, counts, self.sizes)}

    def nonzero_densities(self) -> dict[str, float]:
        return self.densities()

    @property
    def needs_dense_gradients(self) -> bool:
        return True

    @property
    def uses_gradient_growth(self) -> bool:
        return False

    @property
    def sharded(self) -> bool:
        return any(s.sharded for s in self._specs)

    def shard_layout(self) -> dict[str, Any]:
        if not self.sharded:
            return {}
        return {
            "row_offsets": {n: s.row_offset for n, s in zip(self.names, self._specs)},
            "out_channels": {n: s.shape[0] for n, s in zip(self.names, self._specs)},
            "group": self._group,
        }

    @property
    def learns_every_step(self) -> bool:
        return True

    def describe(self) -> str:
        densities = self.densities()
        active = sum(d * n for d, n in zip(densities.values(), self.sizes))
        return f"{round(active)} of {sum(self.sizes)} masked weights active (learned)"

    def _attached(self) -> bool:
        return all(parametrize.is_parametrized(m, self.layers[n].attr) for n, m in self._modules.items())

    def before_optimizer_step(self) -> None:
        thresholds = [t.threshold for t in self.thresholds.values()]
        if self._fsdp:  # FSDP2 has reduce-scattered the gradients: add the regularizer's to the local rows
            dst.add_regularizer_grad_([distributed.local(t) for t in thresholds], self.alpha,
                                      grads=[distributed.local(t.grad) if t.grad is not None else None
                                             for t in thresholds])  # fmt: skip
            return
        dst.add_regularizer_grad_(thresholds, self.alpha)
        if distributed.world_size() > 1:  # thresholds added after DDP wrapped the model are not reduced by it
            grads = [t.grad for t in thresholds]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= distributed.world_size()
            torch.nn.utils.vector_to_parameters(flat, grads)

    def step(self, step: int | None = None) -> UpdateReport | None:
        """Resets the thresholds of collapsed layers (density at or below ``collapse_density``)."""
        self.step_count = self.step_count + 1 if step is None else int(step)
        if not self._attached():
            self._reattach()
        self._finished = False
        reset = dst.reset_collapsed_(self.thresholds, self.densities(), self.dst.collapse_density)
        if reset:
            log.info("DST: thresholds of %s reset (density <= %s)", ", ".join(reset), self.dst.collapse_density)
            self._count_collapses(reset)
        return None

    def _count_collapses(self, reset: Sequence[str]) -> None:
        """Warns (once per layer, on rank 0) when a layer has collapsed ``COLLAPSE_WARN_AFTER`` times: its thresholds keep
        outgrowing its weights, and each reset throws its learned sparsity away."""
        repeated = []
        for name in reset:
            self.collapses[name] = self.collapses.get(name, 0) + 1
            if self.collapses[name] == COLLAPSE_WARN_AFTER:
                repeated.append(name)
        if repeated and distributed.rank() == 0:  # every process resets the same layers (all-reduced densities)
            warnings.warn(
                f"DST: the layer(s) {repeated} collapsed {COLLAPSE_WARN_AFTER} times by step {self.step_count} (density"
                f" <= collapse_density={self.dst.collapse_density}, thresholds reset to 0): the thresholds outgrow"
                f" the weights. The learning rate is likely too large for the thresholds (the DST reference trains"
                f" LeNets at lr 0.01, with alpha {self.alpha:g} here); lower it or `DST(alpha=...)`, or keep the"
                " layer dense with `dense_layers`",
                UserWarning,
                stacklevel=3,
            )

    def epoch_end(self, step: int | None = None) -> UpdateReport | None:
        if step is not None:
            self.step_count = int(step)
        return None

    def update(self) -> UpdateReport:
        raise RuntimeError("DST learns its masks at every step; it has no scheduled mask updates")

    def snip(self, loss: Tensor) -> None:
        raise RuntimeError("snip() is for algorithm='snip'")

    def finish(self) -> None:
        """Fold ``W ⊙ S(|W| − t)`` into the weights and remove the parametrizations: the model is a plain model
        again, its masked weights exactly zero. The thresholds are kept (:attr:`thresholds`). Under FSDP2 the
        parametrizations stay (FSDP2 manages them): the raw weights are zeroed outside the masks instead."""
        if self._finished or not self._attached():
            return
        with torch.no_grad():
            for name, module in self._modules.items():
                mask = self._local_mask(name)
                self._final_masks[name] = mask
                distributed.local(self._raw(name)).mul_(mask)
                if not self._fsdp:
                    parametrize.remove_parametrizations(module, self.layers[name].attr, leave_parametrized=False)
        self._finished = True

    def _reattach(self) -> None:
        self._final_masks = {}
        for name, module in self._modules.items():
            parametrize.register_parametrization(module, self.layers[name].attr, self.thresholds[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step_count": self.step_count,
            "num_updates": 0,
            "last_update_step": -1,
            "prune_rate": 0.0,
            "generator_state": self.generator.get_state(),
            "algorithm_state": {},
            "algorithm": self.options.algorithm_name,
            **({} if self._fsdp else {"dst": self._dst_state()}),
        }

    def _dst_state(self) -> dict[str, dict[str, Tensor]]:
        """The thresholds and raw weights by module name (CPU copies). The model's own ``state_dict`` holds only
        the masked weights (see :func:`lightning_sparse.methods.dst.attach_thresholds`), so these make a resume exact."""
        attached = self._attached()
        return {
            "thresholds": {n: t.threshold.detach().cpu().clone() for n, t in self.thresholds.items()},
            "raw": {
                n: (self._raw(n) if attached else getattr(m, self.layers[n].attr)).detach().cpu().clone()
                for n, m in self._modules.items()
            },
        }

    def _load_masks(self, state: Mapping[str, Any]) -> None:
        """Restores the thresholds and raw weights (under FSDP2 the model's own checkpoint holds them)."""
        saved = state.get("dst")
        if not saved:
            return
        if set(saved["thresholds"]) != set(self.thresholds):
            raise ValueError(
                f"the checkpoint's DST layers {sorted(saved['thresholds'])} do not match the model's"
                f" {sorted(self.thresholds)}"
            )
        if not self._attached():
            self._reattach()
        with torch.no_grad():
            for name in self._modules:
                self.thresholds[name].threshold.copy_(saved["thresholds"][name])
                self._raw(name).copy_(saved["raw"][name])


def _same_density(saved: Any, wanted: float | Mapping[str, float]) -> bool:
    if isinstance(saved, Mapping) != isinstance(wanted, Mapping):
        return False
    if isinstance(wanted, Mapping):
        return list(saved) == list(wanted) and all(
            math.isclose(float(saved[k]), float(wanted[k]), rel_tol=1e-6) for k in wanted
        )
    return math.isclose(float(saved), float(wanted), rel_tol=1e-6)


def _refuse_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "FSDP1 (`FullyShardedDataParallel`, Lightning's FSDPStrategy) flattens the weights, so they cannot be"
            " masked: use FSDP2 (`fully_shard`, Lightning's ModelParallelStrategy) or DDP"
        )


def _optimized(optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def select_layers(model: nn.Module, options: SparseOptions, include_parametrized: Sequence[str] = ()) -> FoundLayers:
    """The weights a run masks (:func:`~lightning_sparse.core.layers.find_layers` with the run's options), each in
    its density group (``found.groups``: first matching glob of ``density``), minus:

    * frozen weights (``requires_grad=False``: a frozen pretrained layer stays dense, logged), unless
      ``options.mask_frozen``;
    * weights that no density group matches (a mapping without ``"*"``), and groups of density 1.0.

    The others are listed in ``found.dense`` with the reason when they are large 2-D weights.
    """
    found = find_layers(
        model,
        dense_layers=options.dense_layers,
        layer_types=options.layer_types,
        include=options.include,
        mask_embeddings=options.mask_embeddings,
        include_parametrized=tuple(include_parametrized),
    )
    check_found(model, found, options.dense_layers)
    frozen = [name for name, p in found.params.items() if not p.requires_grad]
    if frozen and not options.mask_frozen:
        if len(frozen) == len(found.params):
            raise ValueError(
                f"every maskable weight of {type(model).__name__} is frozen (requires_grad=False): {frozen}. Frozen"
                " layers are left dense; unfreeze the layers to train sparse, or pass `mask_frozen=True` to mask"
                " them"
            )
        log.info("frozen (requires_grad=False) weights left dense: %s; `mask_frozen=True` masks them", ", ".join(frozen))
        found.drop(frozen, "frozen (requires_grad=False; mask_frozen=True masks it)")
    groups = options.groups
    if groups:
        unmatched, full = [], []
        for name, layer in found.masked.items():
            pattern = next(
                (g for g, _ in groups if fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(layer.module, g)), None
            )
            if pattern is None:
                unmatched.append(name)
            elif dict(groups)[pattern] >= 1.0:
                full.append(name)
            else:
                found.groups[name] = pattern
        found.drop(unmatched, "no `density` group matches it")
        found.drop(full, "its `density` group is 1.0")
        if not found.masked:
            raise ValueError(
                f"the `density` groups {dict(groups)} leave no layer to mask; the maskable layers are:"
                f" {', '.join(unmatched + full)}"
            )
    else:
        found.groups = {name: "*" for name in found.masked}
    return found


def select_parameters(
    model: nn.Module, options: SparseOptions, include_parametrized: Sequence[str] = ()
) -> dict[str, Tensor]:
    """The weights a run masks, by name (see :func:`select_layers`)."""
    return dict(select_layers(model, options, include_parametrized).params)


def _splice(
    result: UpdateResult | None,
    trained: list[int],
    masks: list[Tensor],
    active: list[int],
    into: UpdateResult | None = None,
) -> UpdateResult:
    """An update of the ``trained`` layers only, widened to every layer (the others keep ``masks``, or what
    ``into`` holds for them)."""
    if into is None:
        into = UpdateResult(list(masks), list(masks), list(active), [0] * len(masks), [0] * len(masks))
    full = UpdateResult(list(into.masks), list(into.pruned_masks), list(into.active), list(into.pruned), list(into.grown))
    if result is None:
        return full
    for j, i in enumerate(trained):
        full.masks[i], full.pruned_masks[i], full.active[i] = result.masks[j], result.pruned_masks[j], result.active[j]
        full.pruned[i], full.grown[i] = result.pruned[j], result.grown[j]
    return full


def _dst_modules(model: nn.Module) -> list[str]:
    """Names of the modules that carry DST thresholds already."""
    return [name for name, module in model.named_modules() if dst.thresholded(module)]


def attach_dst_thresholds(
    model: nn.Module, options: SparseOptions | Sequence[str] | None = None, *, attach: bool = True
) -> dict[str, dst.ThresholdMask]:
    """DST's thresholds on every weight the run masks (parameter name → :class:`~lightning_sparse.methods.dst.ThresholdMask`):
    the ones already attached are returned as they are, the others are attached now.

    ``options`` are the run's :class:`~lightning_sparse.SparseOptions` (or just its ``dense_layers``). For FSDP2,
    call it in ``configure_model`` on the layers you build there, before ``fully_shard``, so that FSDP2 shards
    each threshold like its weight. With ``attach=False`` nothing is attached: a layer without thresholds is an
    error that names it.
    """
    if not isinstance(options, SparseOptions):
        options = SparseOptions.resolve(algorithm="dst", dense_layers=tuple(options or ()))
    found = select_layers(model, options, include_parametrized=_dst_modules(model))
    existing: dict[str, dst.ThresholdMask] = {}
    plain: dict[str, nn.Module] = {}
    for name, layer in found.masked.items():
        module = model.get_submodule(layer.module)
        threshold = dst.threshold_mask(module, layer.attr)
        if threshold is not None:
            existing[name] = threshold
        else:
            plain[name] = module
    if plain and not attach:
        raise ValueError(
            f"algorithm='dst' on an FSDP2 (sharded) model: the layer(s) {sorted(plain)} have no DST thresholds."
            " FSDP2 must shard them with their weights: call `lightning_sparse.attach_dst_thresholds(module)` in"
            " `configure_model` before `fully_shard` (layers built in `__init__` get them in the callback's"
            " `setup`), or keep those layers dense with `dense_layers`"
        )
    existing.update(
        dst.attach_thresholds(
            plain,
            attrs={n: found.masked[n].attr for n in plain},
            dims={n: found.masked[n].out_dim for n in plain},
        )
    )
    return {name: existing[name] for name in found.masked}


def prepare_model(model: nn.Module, options: SparseOptions) -> None:
    """What a method must do to the model before the optimizer is built (``setup`` in Lightning): DST attaches
    its thresholds, so that ``configure_optimizers`` and DDP see them. Masks need nothing here."""
    if options.is_dst and has_candidates(model, options.layer_types, options.include, options.mask_embeddings):
        attach_dst_thresholds(model, options)  # else the layers are built later, in `configure_model`
