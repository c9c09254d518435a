"""Refusals that stop a sparse run before a wrong result, each naming the cause: when the run is bound (FSDP1,
an optimizer that does not hold the masked weights, layers a pattern cannot hold, unknown ``keep_neurons``) and at
updates (a layer without gradients for RigL, non-finite weights, momentum or gradients)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_sparse.core import distributed
from lightning_sparse.core.distributed import ShardSpec
from lightning_sparse.core.layers import MaskedLayer, name_matches
from lightning_sparse.core.optimizer import check_momentum_optimizer
from lightning_sparse.functional.passes import has_nonfinite
from lightning_sparse.functional.patterns import Pattern, input_size
from lightning_sparse.methods.base import LayerState


def refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 flattens the weights: nothing can be masked."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "FSDP1 (`FullyShardedDataParallel`, Lightning's FSDPStrategy) flattens the weights, so they cannot be"
            " masked: use FSDP2 (`fully_shard`, Lightning's ModelParallelStrategy) or DDP"
        )


def optimized(optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
    """Whether ``optimizer`` updates ``param`` (the very tensor)."""
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], needs_momentum: bool) -> None:
    """Refuse an optimizer that does not update every trained masked weight, or (sparse momentum) keeps no
    momentum for them. Frozen masked weights (``requires_grad=False``, ``mask_frozen=True``) may be left out of
    the optimizer (the usual way to freeze: an optimizer over the trainable parameters only): no method reads
    their gradient, momentum or optimizer state."""
    optimized_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in optimized_ids and p.requires_grad]
    if missing:
        raise ValueError(
            f"the optimizer does not update the masked weight(s) {missing}: bind the Sparsifier to the model"
            " the optimizer was built for (after DDP/FSDP2 wrapping), or leave those layers dense with"
            " `dense_layers`"
        )
    trained = [p for p in params.values() if p.requires_grad]
    if needs_momentum and trained:
        check_momentum_optimizer(optimizer, trained)


def check_pattern_layers(params: Mapping[str, Tensor], layers: Mapping[str, MaskedLayer], pattern: Pattern) -> None:
    """Refuse, before anything is touched, layers a structured pattern cannot hold: N:M on an input dimension
    that is not a multiple of M, and transposed weights sharded by FSDP2 (their rows are input channels, so
    their units would span processes)."""
    if not pattern.structured:
        return
    specs = {name: distributed.shard_spec(p, name) for name, p in params.items()}
    sharded = [n for n in params if layers[n].transposed and specs[n].sharded]
    if sharded:
        raise ValueError(
            f"pattern={str(pattern)!r} under FSDP2: the transposed weight(s) {sharded} (transformers' Conv1D,"
            " stored [in, out]) are sharded by their input channels, so the pattern's units would span processes."
            f" Keep them dense with `dense_layers={sharded}`, or use pattern='unstructured'"
        )
    if pattern.kind == "nm":
        bad = {n: input_size(specs[n].shape, layers[n].transposed) for n in params}
        bad = {n: size for n, size in bad.items() if size % pattern.m}
        if bad:
            listed = ", ".join(f"{n} (input dimension {size})" for n, size in bad.items())
            raise ValueError(
                f"pattern={str(pattern)!r} groups every {pattern.m} consecutive weights along a layer's input"
                " dimension (in-channels x kernel for convolutions), which must be a multiple of"
                f" {pattern.m}; not for {listed}. Keep those layers dense with `dense_layers={list(bad)}`"
            )


def kept_neurons(
    globs: Sequence[str] | None, ablation: float | None, layers: Mapping[str, MaskedLayer]
) -> frozenset[str]:
    """The masked weights whose rows neuron ablation never empties: those ``globs`` names (weight or module
    names, or globs), or by default the last masked layer (usually the output layer, SRigL's default). A name
    that matches no masked weight is refused, naming the masked ones."""
    names = list(layers)
    if ablation is None or not names:
        return frozenset()
    if globs is None:
        return frozenset(names[-1:])
    kept = set()
    for glob in globs:
        matched = [n for n in names if name_matches(n, layers[n].module, glob)]
        if not matched:
            raise ValueError(
                f"`keep_neurons` entry {glob!r} matches no masked layer; the masked layers are: {', '.join(names)}"
            )
        kept.update(matched)
    return frozenset(kept)


def check_gradients(names: Sequence[str], weights: Sequence[Tensor]) -> None:
    """At the first step of a method that grows by gradient (RigL): every trained masked weight has a gradient,
    so a layer left out of the forward pass is named now rather than at the first update."""
    missing = [name for name, w in zip(names, weights) if w.grad is None and w.requires_grad]
    if missing:
        order = (
            " (no masked weight has one: call `sparsifier.step()` after `optimizer.step()` and before"
            " `optimizer.zero_grad()`)"
            if len(missing) == len(names)
            else ""
        )
        raise ValueError(
            f"gradient growth (RigL) reads the gradient of every masked weight, but {missing} got no"
            f" gradient in the first step{order}: use those layers in the forward pass, or leave them dense"
            f" with `dense_layers={missing}`"
        )


def check_finite(
    layers: Sequence[LayerState],
    reads: Mapping[str, Callable[[LayerState], Tensor]],
    step: int,
    specs: Sequence[ShardSpec],
    group: ProcessGroup | None,
) -> None:
    """Raise ``FloatingPointError`` naming the layers whose ``reads`` (what the update reads: weights, momentum,
    gradients) hold NaN or inf. One fused check: one host read (and one all-reduce under FSDP2)."""
    flags = torch.stack(
        [torch.stack([has_nonfinite(read(layer)) for read in reads.values()]) for layer in layers]
    ).to(torch.int64)
    flags = distributed.reduce_layer_sums(flags, specs, group).tolist()
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
