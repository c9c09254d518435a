"""Empty input/output channels and the density of every layer, from its mask: :func:`channel_stats`.

One path for every layout: each mask is a block of rows of its layer's full mask, described by a
:class:`~lightning_sparse.core.distributed.ShardSpec` (the whole mask on one process; FSDP2's ``Shard(0)`` row
blocks spread over a process group). Per-layer count vectors are computed from the local block, summed over the
group with one ``all_reduce`` when the masks are sharded, and read back to the host once. Pure tensor math
otherwise, no Lightning, no model.

Weights are laid out ``[out, in, *kernel]`` (``nn.Linear``, ``nn.Conv1d/2d/3d``), or ``[in, out]`` for the layers
named in ``transposed`` (``transformers``' ``Conv1D``); transposed convolutions, whose weights are
``[in, out, *kernel]``, are not supported.

Example (two linear layers ``10 -> 20 -> 5``, the second fed by the first):
    >>> import torch
    >>> names = ["0.weight", "2.weight"]
    >>> links = {"2.weight": ChainLink(source="0.weight")}
    >>> masks = [torch.ones(20, 10, dtype=torch.bool), torch.ones(5, 20, dtype=torch.bool)]
    >>> masks[0][10:] = False  # the last 10 neurons of the first layer are empty ...
    >>> channel_stats(names, masks, links)["2.weight"]  # ... so half of the second layer's inputs are idle
    LayerChannelStats(empty_in=0.5, empty_out=0.0, density=1.0)
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_sparse.core.distributed import ShardSpec
from lightning_sparse.cost.chains import ChainLink

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["LayerChannelStats", "block_layout", "channel_stats"]


@dataclass(frozen=True)
class LayerChannelStats:
    """Channel statistics of one layer, as exact fractions of counts.

    Attributes:
        empty_in: fraction of the input channels (conv) or input features (linear) that the layer can skip:
            all its weights on them are zero, or (with a chain link) they are fed by an empty output channel
            of the previous layer.
        empty_out: fraction of the output channels / neurons whose weights are all zero.
        density: fraction of the layer's weights that are active (non-zero).
    """

    empty_in: float
    empty_out: float
    density: float


def channel_stats(
    names: Sequence[str],
    masks: Sequence[Tensor],
    links: Mapping[str, ChainLink] | None = None,
    groups: Mapping[str, int] | None = None,
    *,
    specs: Mapping[str, ShardSpec] | None = None,
    group: ProcessGroup | None = None,
    transposed: Collection[str] = (),
) -> dict[str, LayerChannelStats]:
    """Empty input/output channels and density of every layer, from its mask.

    Args:
        names: layer names, aligned with ``masks``.
        masks: one mask per layer, shaped like the weight ``[out, in, *kernel]`` (at least 2-D); ``torch.bool``
            masks, or weights (a non-zero entry is active). Each stays on its device.
        links: chain links (:func:`~lightning_sparse.cost.chains.chain_links`), keyed by the fed layer: the input
            channels of a linked layer fed by an empty output channel of its source count as empty too.
            ``None``: no links.
        groups: number of groups of the grouped convolutions (:func:`~lightning_sparse.cost.model.conv_groups`);
            missing layers have 1. With ``groups=g`` the weight is ``[out, in / g, *kernel]`` and real input
            channel ``i`` of group ``k`` is empty when its weights in that group's output channels are all zero,
            so ``empty_in`` is a fraction of the ``in`` real input channels. Without it, the input index of a
            grouped conv's weight is read as one channel (empty in every group at once).
        specs: with ``group``: the :class:`~lightning_sparse.core.distributed.ShardSpec` of each sharded layer's
            local block (its full ``shape``, ``row_offset`` and ``rows``), as FSDP2's ``Shard(0)`` places it.
        group: a process group over which the masks are sharded by rows: each process passes the same names,
            in the same order, and for each layer its local row block ``[row_offset, row_offset + rows)`` of
            the full mask (``rows`` may be 0; the other dimensions are the full ones). A layer without a spec
            is held whole, the same, by every process (only the group's
            first process's copy is counted). The per-layer counts are summed with one ``all_reduce`` over
            ``group`` (no mask is gathered), and every process gets the statistics of the full masks, exactly
            as this function returns them for the full masks without ``group``. Arguments are checked before
            the ``all_reduce``, but only against the local block: blocks that overlap or leave rows out across
            the processes go unnoticed, and a check failing on some processes only leaves the others waiting
            in the collective. ``None``, or a group of one process: the masks are the full weights (their
            specs, where given, must say so).
        transposed: names of 2-D layers whose masks are stored ``[in, out]`` (``transformers``' ``Conv1D``):
            their columns are the output channels and their rows the input channels, and the statistics are
            those of the ``[out, in]`` layer. With ``group``, such a mask is still sharded by its stored rows
            (FSDP2's ``Shard(0)`` of the ``[in, out]`` weight: blocks of input channels), and its spec gives its
            stored rows (input channels).
            They have 1 group.

    Returns:
        :class:`LayerChannelStats` per name, in the order of ``names``. The counts are computed on each
        mask's device, moved to the first mask's device (with ``group``: it must suit ``group``'s backend) and
        read back to the host once, for all layers together.

    Note that the dense-conv product ``(1 - empty_in) · (1 - empty_out)`` is the remaining work exactly for
    ``groups == 1``; for grouped convolutions it assumes the emptied channels are spread over the groups
    (a depthwise conv whose group is all zero loses an input *and* an output channel, counted twice).
    """
    names = list(names)
    masks = list(masks)
    if len(names) != len(masks):
        raise ValueError(f"got {len(names)} names but {len(masks)} masks; they must be aligned")
    links = dict(links or {})
    groups = dict(groups or {})
    specs = dict(specs or {})
    if isinstance(transposed, str):
        raise ValueError(f"`transposed` must be a collection of layer names, got the string {transposed!r}")
    transposed = set(transposed)
    known = set(names)
    for what, keys in (
        ("links", list(links)),
        ("groups", list(groups)),
        ("specs", list(specs)),
        ("transposed", sorted(transposed)),
    ):
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"`{what}` names layers that are not in `names`: {unknown}; the layers are {names}")
    bad_sources = {k: link.source for k, link in links.items() if link.source not in known}
    if bad_sources:
        raise ValueError(f"`links` sources that are not in `names`: {bad_sources}; the layers are {names}")
    for name, mask in zip(names, masks):
        if name in transposed and (mask.dim() != 2 or groups.get(name, 1) != 1):
            raise ValueError(
                f"mask {name!r} is named in `transposed`: it must be a 2-D [in, out] mask of 1 group, got shape"
                f" {tuple(mask.shape)} and groups {groups.get(name, 1)!r}"
            )
    if not names:
        return {}
    # Every check comes before the collective: a process that raises must not leave the others waiting in it.
    if group is not None and torch.distributed.get_world_size(group) <= 1:
        group = None
    for name, mask in zip(names, masks):
        if group is None and (mask.dim() < 2 or mask.numel() == 0):
            raise ValueError(
                f"mask {name!r} must be a non-empty weight mask [out, in, *kernel], got shape {tuple(mask.shape)}"
            )
        if group is not None and (mask.dim() < 2 or math.prod(mask.shape[1:]) == 0):
            raise ValueError(
                f"mask {name!r} must be a row block of a non-empty weight mask [out, in, *kernel], got shape"
                f" {tuple(mask.shape)}"
            )
    layouts = {name: block_layout(name, mask, specs.get(name), group) for name, mask in zip(names, masks)}
    active = {name: (mask if mask.dtype == torch.bool else mask != 0)[: layouts[name].rows] for name, mask in zip(names, masks)}
    for name in names:
        g = groups.get(name, 1)
        n_out = layouts[name].shape[0]
        if not isinstance(g, int) or g < 1 or n_out % g:
            raise ValueError(
                f"groups[{name!r}] must be a positive integer dividing the {n_out} output channels, got {g!r}"
            )
    # (output channels, input channels) of each layer: stored (rows, columns), swapped for a transposed layer
    channels = {
        n: (s.shape[1], s.shape[0]) if n in transposed else (s.shape[0], s.shape[1] * groups.get(n, 1))
        for n, s in layouts.items()
    }
    for name, link in links.items():
        if not isinstance(link.repeat, int) or link.repeat < 1:
            raise ValueError(f"links[{name!r}].repeat must be a positive integer, got {link.repeat!r}")
        n_source = channels[link.source][0]
        n_in = channels[name][1]
        if n_source * link.repeat != n_in:
            raise ValueError(
                f"link {link.source!r} -> {name!r}: {n_source} output channels x repeat {link.repeat} ="
                f" {n_source * link.repeat} inputs, but {name!r} has {n_in} input channels (for a grouped conv,"
                " pass `groups`)"
            )
    return _counted_stats(names, active, layouts, links, groups, transposed, channels, group, masks[0].device)


def block_layout(name: str, mask: Tensor, spec: ShardSpec | None, group: ProcessGroup | None) -> ShardSpec:
    """What this process holds of layer ``name`` (``mask``): the row block that ``spec`` places, checked against
    the mask; without a spec, the whole mask, which every process of ``group`` holds the same and which is
    counted on the group's first process only (0 rows elsewhere). Without ``group`` every mask is whole."""
    rows = mask.shape[0] if mask.dim() else 0
    if spec is None:
        if rows == 0:
            raise ValueError(f"mask {name!r} is empty, and no spec names it as a row block")
        first = group is None or torch.distributed.get_rank(group) == 0
        return ShardSpec(tuple(mask.shape), 0, rows if first else 0, group)
    shape = tuple(spec.shape)
    if shape[1:] != tuple(mask.shape[1:]) or spec.rows != rows or spec.row_offset < 0 or spec.row_offset + rows > shape[0]:
        raise ValueError(
            f"mask {name!r} of shape {tuple(mask.shape)} is not the block of rows [{spec.row_offset},"
            f" {spec.row_offset + spec.rows}) of a weight of shape {shape} that its spec gives"
        )
    if group is None and shape[0] != rows:
        raise ValueError(
            f"mask {name!r}: without a process group of several processes each mask is the full weight, but its"
            f" spec gives rows [{spec.row_offset}, {spec.row_offset + rows}) of a weight of {shape[0]} rows"
        )
    return ShardSpec(shape, spec.row_offset, rows, group)


def _counted_stats(
    names: list[str],
    active: dict[str, Tensor],
    layouts: dict[str, ShardSpec],
    links: dict[str, ChainLink],
    groups: dict[str, int],
    transposed: set[str],
    channels: dict[str, tuple[int, int]],
    group: ProcessGroup | None,
    device: torch.device,
) -> dict[str, LayerChannelStats]:
    """Per layer, from its local block: ``[out]`` active inputs per stored row, ``[groups * in]`` active rows per
    (group, stored column), the active count; summed over ``group`` (one ``all_reduce``), then the statistics.
    For a ``transposed`` layer the stored columns are its output channels."""
    pieces: list[Tensor] = []
    sizes: list[int] = []
    for name in names:
        a, spec, g = active[name], layouts[name], groups.get(name, 1)
        n_out, n_in = spec.shape[0], spec.shape[1]
        uses_input = a.reshape(spec.rows, n_in, math.prod(a.shape[2:])).any(dim=2)  # [rows, in]: row r reads i
        row_counts = torch.zeros(n_out, dtype=torch.int64, device=a.device)
        row_counts[spec.row_offset : spec.row_offset + spec.rows] = uses_input.sum(dim=1)
        if g == 1:
            input_counts = uses_input.sum(dim=0)
        else:
            group_of = torch.arange(spec.row_offset, spec.row_offset + spec.rows, device=a.device) // (n_out // g)
            input_counts = torch.zeros(g, n_in, dtype=torch.int64, device=a.device)
            input_counts.index_add_(0, group_of, uses_input.to(torch.int64))
        pieces += [row_counts.to(device), input_counts.reshape(-1).to(device), a.sum().reshape(1).to(device)]
        sizes += [n_out, g * n_in, 1]
    totals = torch.cat(pieces)
    if group is not None:
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM, group=group)
    parts = totals.split(sizes)

    empty_out: dict[str, Tensor] = {}
    own_empty_in: dict[str, Tensor] = {}
    for i, name in enumerate(names):
        rows_empty, columns_empty = parts[3 * i] == 0, parts[3 * i + 1] == 0
        if name in transposed:  # stored [in, out]: the columns are the output channels
            rows_empty, columns_empty = columns_empty, rows_empty
        empty_out[name], own_empty_in[name] = rows_empty, columns_empty
    counts = []
    for i, name in enumerate(names):
        empty_in = own_empty_in[name]
        link = links.get(name)
        if link is not None:
            empty_in = empty_in | empty_out[link.source].repeat_interleave(link.repeat)
        counts.append(torch.stack([empty_in.sum(), empty_out[name].sum(), parts[3 * i + 2][0]]))
    values = torch.stack(counts).tolist()  # the one host synchronization

    return {
        name: LayerChannelStats(
            empty_in=n_empty_in / channels[name][1],
            empty_out=n_empty_out / channels[name][0],
            density=n_active / layouts[name].numel,
        )
        for name, (n_empty_in, n_empty_out, n_active) in zip(names, values)
    }
