"""Which weights a run masks: the maskable layers (:func:`~lightning_sparse.core.layers.find_layers`) narrowed by
the run's options (dense layers, frozen weights, density groups). The one place that selects layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_sparse.core.layers import FoundLayers, find_layers, name_matches
from lightning_sparse.options import SparseOptions

log = logging.getLogger(__name__)


def maskable_parameters(
    model: nn.Module,
    dense_layers: Sequence[str] = (),
    module_types: Sequence[type[nn.Module] | str] | None = None,
    include_parametrized: Sequence[str] = (),
    *,
    include: Sequence[str] = (),
    mask_embeddings: bool = False,
) -> dict[str, Tensor]:
    """The weights that get masks, by the name ``named_parameters()`` gives them (see
    :func:`lightning_sparse.core.layers.find_layers`): the ``weight`` of every Linear and Conv1d/2d/3d (or of
    ``module_types``), ``MultiheadAttention``'s input projections and ``transformers``' ``Conv1D``, minus
    ``dense_layers``.

    Biases and normalization weights are never masked. ``dense_layers`` holds module names, parameter names
    or ``fnmatch`` glob patterns of either (``"features.0"``, ``"*.downsample.*"``, ``"fc.weight"``); a
    pattern that matches no maskable weight raises ``ValueError`` listing the names it could match.
    A weight shared by several modules is masked once. A parametrized weight is refused, unless its module is
    named in ``include_parametrized`` (DST's thresholds): then its raw weight is returned.
    """
    found = find_layers(
        model,
        dense_layers=dense_layers,
        layer_types=module_types,
        include=include,
        mask_embeddings=mask_embeddings,
        include_parametrized=include_parametrized,
    )
    check_found(model, found, dense_layers)
    return dict(found.params)


def check_found(model: nn.Module, found: FoundLayers, dense_layers: Sequence[str]) -> None:
    """Refuse a model in which nothing is left to mask."""
    if found.masked:
        return
    if dense_layers:
        raise ValueError(f"`dense_layers` {list(dense_layers)} leaves no layer to mask")
    raise ValueError(
        f"{type(model).__name__} has no maskable weights: sparse training masks the weights of Linear, Conv1d,"
        " Conv2d, Conv3d, MultiheadAttention and transformers' Conv1D layers (see `layer_types`, `include`)"
    )


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
        unmatched, full, chosen = [], [], {}
        for name, layer in found.masked.items():
            pattern = next((g for g, _ in groups if name_matches(name, layer.module, g)), None)
            chosen[name] = pattern
            if pattern is None:
                unmatched.append(name)
            elif dict(groups)[pattern] >= 1.0:
                full.append(name)
            else:
                found.groups[name] = pattern
        _refuse_dead_groups(groups, found, chosen)
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


def _refuse_dead_groups(groups: Sequence[tuple[str, float]], found: FoundLayers, chosen: dict[str, str | None]) -> None:
    """Refuse a ``density`` glob that no maskable layer falls into (first match wins): one that matches none, or
    one whose every layer an earlier glob takes. Such a group would be ignored without a word."""
    used = set(chosen.values())
    for glob, _ in groups:
        if glob in used:
            continue
        matched = [n for n, layer in found.masked.items() if name_matches(n, layer.module, glob)]
        if not matched:
            raise ValueError(
                f"the `density` group {glob!r} matches no maskable layer; the maskable layers are:"
                f" {', '.join(found.masked) or 'none'}"
            )
        earlier = sorted({chosen[n] for n in matched}, key=[g for g, _ in groups].index)
        raise ValueError(
            f"the `density` group {glob!r} is shadowed: every layer it matches ({', '.join(matched)}) falls into the"
            f" earlier group(s) {earlier} (the first matching glob wins); put {glob!r} first, or remove it"
        )
