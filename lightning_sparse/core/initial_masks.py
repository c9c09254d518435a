"""The masks a run starts from: random masks at each layer's initial count (``init`` within each density group,
per unit under a structured pattern), or full masks for the methods that start dense (GMP) or pick their masks
from a batch (SNIP)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_sparse.core import distributed
from lightning_sparse.core.layers import MaskedLayer
from lightning_sparse.core.masking import Masking
from lightning_sparse.functional.init import layer_active_counts
from lightning_sparse.functional.units import pattern_counts
from lightning_sparse.options import SparseOptions


def init_counts(shapes: Sequence[Sequence[int]], groups: Mapping[str, Sequence[int]], options: SparseOptions) -> list[int]:
    """Active weights per layer of the initialization: ``options.init`` within each density group (``groups``:
    layer indices by group glob)."""
    density = _start_densities(options)
    counts = [0] * len(shapes)
    for group, indices in groups.items():
        for i, n in zip(indices, layer_active_counts([shapes[i] for i in indices], density[group], options.init)):
            counts[i] = n
    return counts


def initial_masking(
    params: Mapping[str, Tensor],
    layers: Mapping[str, MaskedLayer],
    options: SparseOptions,
    groups: Mapping[str, Sequence[int]],
    generator: torch.Generator,
) -> Masking:
    """The masks of ``params`` at the start of a run (see the module's docstring), not yet applied."""
    start = getattr(options.algorithm, "start_density", None)
    if options.algorithm.start != "random" or (start is not None and start >= 1.0):  # contiguous full masks
        local = [distributed.local(p) for p in params.values()]
        masks = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in local]
        return Masking(params, kernel=options.mask_kernel, local_masks=masks)
    shapes = [distributed.shard_spec(p, n).shape for n, p in params.items()]
    counts = init_counts(shapes, groups, options)
    pattern = options.parsed_pattern
    if pattern.structured:
        transposed = [layers[n].transposed for n in params]
        return Masking.random(params, pattern_counts(shapes, counts, pattern, transposed), options.init, generator,
                              options.mask_kernel, pattern=pattern, transposed=transposed)  # fmt: skip
    density = _start_densities(options)
    by = density["*"] if list(density) == ["*"] else counts
    return Masking.random(params, by, options.init, generator, options.mask_kernel)


def _start_densities(options: SparseOptions) -> dict[str, float]:
    """Each density group's starting density: the group's, or a method's higher start (GraNet's ``init_density``)."""
    start = getattr(options.algorithm, "start_density", None)
    return {g: (max(d, start) if start is not None else d) for g, d in dict(options.groups).items()}
