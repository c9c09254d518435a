"""DST (Liu et al. 2020) behind the :class:`~lightning_sparse.Sparsifier` interface: trainable per-neuron
thresholds attached to the masked layers (the math is in :mod:`lightning_sparse.methods.dst`), a learned density,
and what a model needs before its optimizer is built (:func:`prepare_model`)."""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sparse.core import distributed
from lightning_sparse.core.checkpoint import STATE_VERSION
from lightning_sparse.core.guards import optimized, refuse_fsdp1
from lightning_sparse.core.layers import has_candidates
from lightning_sparse.core.selection import select_layers
from lightning_sparse.core.sparsifier import Sparsifier, UpdateReport
from lightning_sparse.methods import dst as dst_math
from lightning_sparse.options import SparseOptions

log = logging.getLogger(__name__)


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

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        before = thresholded_weights(model) if isinstance(model, nn.Module) else set()
        groups = len(getattr(optimizer, "param_groups", ()))
        try:
            super().__init__(model, optimizer, **kwargs)
        except BaseException:  # a refusal leaves the model and the optimizer as they were
            if isinstance(model, nn.Module):
                detach_dst_thresholds(model, thresholded_weights(model) - before)
            if hasattr(optimizer, "param_groups"):
                del optimizer.param_groups[groups:]
            raise

    def _bind(self, state: Mapping[str, Any] | None) -> None:
        algorithm = self.options.algorithm
        assert isinstance(algorithm, dst_math.DST)
        self.dst = algorithm
        refuse_fsdp1(self.model)
        self._fsdp = any(distributed.is_dtensor(p) for p in self.model.parameters())
        self._final_masks: dict[str, Tensor] = {}
        self._finished = False
        self.collapses: dict[str, int] = {}  # thresholds reset (layer collapsed) per layer, this process's run
        wrapper = "DDP" if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        self.thresholds = attach_dst_thresholds(
            self.model,
            self.options,
            attach=not self._fsdp and wrapper is None,
            wrapper="FSDP2" if self._fsdp else wrapper,
        )
        missing = [t.threshold for t in self.thresholds.values() if not optimized(self.optimizer, t.threshold)]
        if missing:
            self.optimizer.add_param_group({"params": missing, "weight_decay": 0.0})
        found = select_layers(self.model, self.options, include_parametrized=dst_modules(self.model))
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
                f"LeNet size, <= {dst_math.LENET_MAX_WEIGHTS:,}"
                if self.alpha == dst_math.ALPHA_LENET
                else f"larger than a LeNet, > {dst_math.LENET_MAX_WEIGHTS:,}",
            )

    def _reset_explored(self) -> None:
        self._explored = [m.clone() for m in self.masks.values()]

    def _layout(self) -> tuple[list[Any], Any]:
        return self._specs, self._group

    def _raw(self, name: str) -> Tensor:
        return dst_math.raw_weight(self._modules[name], self.layers[name].attr)

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

    def active_counts(self) -> dict[str, int]:
        """Weights above their threshold per layer (the masks ``|W| > t``; one host read, all-reduced over
        FSDP2 shards)."""
        masks = self.masks
        if not masks:
            return {}
        local_counts = torch.stack([m.sum() for m in masks.values()]).to(torch.int64)
        counts = distributed.reduce_layer_sums(local_counts, self._specs, self._group).tolist()
        return {name: int(c) for name, c in zip(masks, counts)}

    def nonzero_counts(self) -> dict[str, int]:
        """The weights DST trains with are the raw ones times the masks: non-zero where active."""
        return self.active_counts()

    def densities(self) -> dict[str, float]:
        return {name: c / size for (name, c), size in zip(self.active_counts().items(), self.sizes)}

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
        return {"specs": {n: s for n, s in zip(self.names, self._specs) if s.sharded}, "group": self._group}

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
            dst_math.add_regularizer_grad_([distributed.local(t) for t in thresholds], self.alpha,
                                      grads=[distributed.local(t.grad) if t.grad is not None else None
                                             for t in thresholds])  # fmt: skip
            return
        dst_math.add_regularizer_grad_(thresholds, self.alpha)
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
        self._explore(self.masks.values())  # the masks the optimizer step just learned
        reset = dst_math.reset_collapsed_(self.thresholds, self.densities(), self.dst.collapse_density)
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
        check_dst_layers(state, self.thresholds)
        if not self._attached():
            self._reattach()
        with torch.no_grad():
            for name in self._modules:
                self.thresholds[name].threshold.copy_(saved["thresholds"][name])
                self._raw(name).copy_(saved["raw"][name])


def check_dst_layers(state: Mapping[str, Any], layers: Iterable[str]) -> None:
    """Refuse a DST checkpoint state whose thresholded layers are not ``layers`` (the run's masked weights)."""
    saved = state.get("dst")
    if saved and set(saved["thresholds"]) != set(layers):
        raise ValueError(
            f"the checkpoint's DST layers {sorted(saved['thresholds'])} do not match the model's {sorted(layers)}:"
            " resume with the checkpoint's `dense_layers` (and layers), or start a new run"
        )


def dst_layers(model: nn.Module, options: SparseOptions) -> list[str]:
    """The weights a DST run over ``model`` masks (those with thresholds included)."""
    return list(select_layers(model, options, include_parametrized=dst_modules(model)).masked)


def dst_modules(model: nn.Module) -> list[str]:
    """Names of the modules that carry DST thresholds already."""
    return [name for name, module in model.named_modules() if dst_math.thresholded(module)]


def attach_dst_thresholds(
    model: nn.Module,
    options: SparseOptions | Sequence[str] | None = None,
    *,
    attach: bool = True,
    wrapper: str | None = "FSDP2",
) -> dict[str, dst_math.ThresholdMask]:
    """DST's thresholds on every weight the run masks (parameter name → :class:`~lightning_sparse.methods.dst.ThresholdMask`):
    the ones already attached are returned as they are, the others are attached now.

    ``options`` are the run's :class:`~lightning_sparse.SparseOptions` (or just its ``dense_layers``). For FSDP2,
    call it in ``configure_model`` on the layers you build there, before ``fully_shard``, so that FSDP2 shards
    each threshold like its weight. With ``attach=False`` nothing is attached: a layer without thresholds is an
    error that names it and ``wrapper`` (``"FSDP2"`` or ``"DDP"``: what has wrapped the model already).
    """
    if not isinstance(options, SparseOptions):
        options = SparseOptions.resolve(algorithm="dst", dense_layers=tuple(options or ()))
    found = select_layers(model, options, include_parametrized=dst_modules(model))
    existing: dict[str, dst_math.ThresholdMask] = {}
    plain: dict[str, nn.Module] = {}
    for name, layer in found.masked.items():
        module = model.get_submodule(layer.module)
        threshold = dst_math.threshold_mask(module, layer.attr)
        if threshold is not None:
            existing[name] = threshold
        else:
            plain[name] = module
    if plain and not attach and wrapper == "DDP":
        raise ValueError(
            f"algorithm='dst' on a model that DDP has wrapped already: the layer(s) {sorted(plain)} have no DST"
            " thresholds, and attaching them now would cut those weights off DDP's gradient averaging (DDP"
            " tracks the weights it wrapped). Attach them before DDP wraps the model:"
            " `lightning_sparse.attach_dst_thresholds(model)` before `DistributedDataParallel(model)`, or at the"
            " end of the LightningModule's `configure_model` (layers built in `__init__` get them in the"
            " callback's `setup`); or keep those layers dense with `dense_layers`"
        )
    if plain and not attach:
        raise ValueError(
            f"algorithm='dst' on an FSDP2 (sharded) model: the layer(s) {sorted(plain)} have no DST thresholds."
            " FSDP2 must shard them with their weights: call `lightning_sparse.attach_dst_thresholds(module)` in"
            " `configure_model` before `fully_shard` (layers built in `__init__` get them in the callback's"
            " `setup`), or keep those layers dense with `dense_layers`"
        )
    existing.update(
        dst_math.attach_thresholds(
            plain,
            attrs={n: found.masked[n].attr for n in plain},
            dims={n: found.masked[n].out_dim for n in plain},
        )
    )
    return {name: existing[name] for name in found.masked}


def prepare_model(model: nn.Module, options: SparseOptions) -> set[tuple[str, str]]:
    """What a method must do to the model before the optimizer is built (``setup`` in Lightning): DST attaches
    its thresholds, so that ``configure_optimizers`` and DDP see them. Masks need nothing here. Returns the
    weights given thresholds now (``(module name, attribute)``; :func:`detach_dst_thresholds` undoes it)."""
    if options.is_dst and has_candidates(model, options.layer_types, options.include, options.mask_embeddings):
        before = thresholded_weights(model)
        attach_dst_thresholds(model, options)  # else the layers are built later, in `configure_model`
        return thresholded_weights(model) - before
    return set()


def thresholded_weights(model: nn.Module) -> set[tuple[str, str]]:
    """``(module name, attribute)`` of every weight of ``model`` that carries DST thresholds."""
    return {(name, attr) for name, module in model.named_modules() for attr in dst_math.thresholded(module)}


def detach_dst_thresholds(model: nn.Module, weights: Iterable[tuple[str, str]] | None = None) -> None:
    """Remove the DST thresholds of ``weights`` (``(module name, attribute)``, as :func:`thresholded_weights`
    gives; all by default), leaving each raw weight as the module's plain parameter (the same tensor). For a
    refused run, whose thresholds have not trained: the model computes as before they were attached."""
    for name, attr in sorted(thresholded_weights(model) if weights is None else weights):
        module = model.get_submodule(name)
        if dst_math.threshold_mask(module, attr) is not None:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


def copy_dst_thresholds(copy: nn.Module, model: nn.Module) -> list[str]:
    """Attach to ``copy`` (a copy of ``model`` made before DST attached its thresholds, such as a weight
    averaging callback's average) the thresholds ``model`` has and ``copy`` lacks, with the same values and in
    the same order, so that both list the same parameters (averaging pairs them in order). Modules ``copy``
    does not have are skipped. Returns the names of the weights given thresholds."""
    given = []
    for name, module in model.named_modules():
        for attr, threshold in dst_math.thresholded(module).items():
            try:
                twin = copy.get_submodule(name)
            except AttributeError:
                continue
            if parametrize.is_parametrized(twin, attr) or not isinstance(getattr(twin, attr, None), nn.Parameter):
                continue
            attached = dst_math.attach_thresholds({name: twin}, attrs={name: attr}, dims={name: threshold.dim})[name]
            with torch.no_grad():
                attached.threshold.copy_(threshold.threshold)
            given.append(f"{name}.{attr}" if name else attr)
    return given
