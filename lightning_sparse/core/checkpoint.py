"""What a checkpoint of a sparse run must match to be resumed: the same algorithm, density, pattern and neuron
ablation, and masks that hold the pattern. The state itself is written by
:meth:`~lightning_sparse.Sparsifier.state_dict` (plain tensors and numbers)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_sparse.core import distributed
from lightning_sparse.core.masking import Masking
from lightning_sparse.functional.patterns import unit_counts, unit_shape
from lightning_sparse.options import SparseOptions

STATE_VERSION = 2
"""Version of :meth:`~lightning_sparse.Sparsifier.state_dict`. 1: lightning-sparse 0.1 (same keys, masks always
full)."""


def check_version(state: Mapping[str, Any]) -> None:
    """Refuse a state written by a newer lightning-sparse."""
    version = int(state.get("version", 1))
    if version > STATE_VERSION:
        raise ValueError(
            f"this checkpoint's sparse state has version {version}; this lightning-sparse reads up to"
            f" {STATE_VERSION}: upgrade lightning-sparse"
        )


def check_same_run(options: SparseOptions, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint trained with another algorithm, density or pattern (states without algorithm or
    density load as they are; a state without a pattern was trained unstructured)."""
    saved = str(state.get("pattern", "unstructured"))
    if saved != options.pattern:
        raise ValueError(
            f"the checkpoint was trained with pattern={saved!r}, this run asks for pattern={options.pattern!r}:"
            " resume with the checkpoint's pattern, or start a new run"
        )
    saved = state.get("neuron_ablation")
    if saved != options.neuron_ablation and (saved is not None or options.neuron_ablation is not None):
        raise ValueError(
            f"the checkpoint was trained with neuron_ablation={saved!r}, this run asks for"
            f" neuron_ablation={options.neuron_ablation!r}: resume with the checkpoint's, or start a new run"
        )
    saved = state.get("algorithm")
    if saved is not None and str(saved).lower() != options.algorithm_name.lower():
        raise ValueError(
            f"the checkpoint was trained with algorithm {saved!r}, this run asks for"
            f" {options.algorithm_name!r}: resume with the checkpoint's algorithm, or start a new run"
        )
    saved = state.get("density")
    wanted = options.density
    if saved is not None and wanted is not None and not same_density(saved, wanted):
        what = "density groups" if isinstance(saved, Mapping) or isinstance(wanted, Mapping) else "density"
        saved = dict(saved) if isinstance(saved, Mapping) else float(saved)
        raise ValueError(
            f"the checkpoint was trained with {what} {saved}, this run asks for {wanted}: resume with"
            " the checkpoint's, or start a new run"
        )


def same_density(saved: Any, wanted: float | Mapping[str, float]) -> bool:
    """Whether a checkpoint's density (or density groups) is the one asked for (up to float rounding)."""
    if isinstance(saved, Mapping) != isinstance(wanted, Mapping):
        return False
    if isinstance(wanted, Mapping):
        return list(saved) == list(wanted) and all(
            math.isclose(float(saved[k]), float(wanted[k]), rel_tol=1e-6) for k in wanted
        )
    return math.isclose(float(saved), float(wanted), rel_tol=1e-6)


def check_loaded_pattern(masking: Masking, options: SparseOptions, transposed: Sequence[bool], on_the_way: bool) -> None:
    """Under a structured pattern, refuse loaded masks whose units do not all hold the same count, or, for
    N:M, not ``N`` (unless ``on_the_way``: GMP before the end of its window, SNIP not yet run). ``transposed``:
    per masked weight, whether it is stored ``[in, out]``. One host read; all-reduced under FSDP2."""
    pattern = options.parsed_pattern
    if not pattern.structured:
        return
    counts = [unit_counts(m, pattern, t) for m, t in zip(masking.masks, transposed)]
    if options.neuron_ablation is not None:  # every row empty or at the layer's k = active / alive rows
        alive = torch.stack([(c > 0).sum() for c in counts]).to(torch.int64)
        alive = distributed.reduce_layer_sums(alive, masking.specs, masking.group).tolist()
        off = [((c != 0) & (c != (a // n if n else 0))).sum() for c, a, n in zip(counts, masking.active, alive)]
    else:
        expected = [  # every unit of a layer holds the layer's active count / its number of units
            pattern.n if pattern.kind == "nm" and not on_the_way else a // unit_shape(spec.shape, pattern, t)[0]
            for a, spec, t in zip(masking.active, masking.specs, transposed)
        ]
        off = [(c != e).sum() for c, e in zip(counts, expected)]
    bad = distributed.reduce_layer_sums(torch.stack(off).to(torch.int64), masking.specs, masking.group).tolist()
    wrong = [n for n, b in zip(masking.names, bad) if b]
    if wrong:
        raise ValueError(
            f"the checkpoint's masks of {wrong} do not hold pattern={options.pattern!r}: they were not"
            " trained with it"
        )
