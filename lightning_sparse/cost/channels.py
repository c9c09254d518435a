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

__all__ = ["LayerChannelStats", "channel_stats"]


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
    row_offsets: Mapping[str, int] | None = None,
    out_channels: Mapping[str, int] | None = None,
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
        row_offsets: with ``group``: the global index of the first row (output channel) of each layer's local
            block, as FSDP2's ``Shard(0)`` places it.
        out_channels: with ``group``: the number of rows (output channels) of each layer's full weight.
        group: a process group over which the masks are sharded by rows: each process passes the same names,
            in the same order, and for each layer its local row block ``[row_offset, row_offset + rows)`` of
            the full mask (``rows`` may be 0; the other dimensions are the full ones). A layer named in neither
            ``row_offsets`` nor ``out_channels`` is held whole, the same, by every process (only the group's
            first process's copy is counted). The per-layer counts are summed with one ``all_reduce`` over
            ``group`` (no mask is gathered), and every process gets the statistics of the full masks, exactly
            as this function returns them for the full masks without ``group``. Arguments are checked before
            the ``all_reduce``, but only against the local block: blocks that overlap or leave rows out across
            the processes go unnoticed, and a check failing on some processes only leaves the others waiting
            in the collective. ``None``, or a group of one process: the masks are the full weights
            (``row_offsets`` must then be 0 and ``out_channels`` the masks' rows, where given).
        transposed: names of 2-D layers whose masks are stored ``[in, out]`` (``transformers``' ``Conv1D``):
            their columns are the output channels and their rows the input channels, and the statistics are
            those of the ``[out, in]`` layer. With ``group``, such a mask is still sharded by its stored rows
            (FSDP2's ``Shard(0)`` of the ``[in, out]`` weight: blocks of input channels), and ``row_offsets`` /
            ``out_channels`` give its stored rows (``out_channels`` is then its number of *input* channels).
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
    row_offsets = dict(row_offsets or {})
    out_channels = dict(out_channels or {})
    if isinstance(transposed, str):
        raise ValueError(f"`transposed` must be a collection of layer names, got the string {transposed!r}")
    transposed = set(transposed)
    known = set(names)
    for what, keys in (
        ("links", list(links)),
        ("groups", list(groups)),
        ("row_offsets", list(row_offsets)),
        ("out_channels", list(out_channels)),
        ("transposed", sorted(transposed)),
    ):
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"`{what}` names layers that are not in `names`: {unknown}; the layers are {names}")
    bad_sources = {k: link.source for k, link in links.items() if link.source not in known}
    if bad_sources:
        raise ValueError(f"`links` sources that are not in `names`: {bad_sources}; the layers are {names}")
    unpaired = sorted(set(row_offsets) ^ set(out_channels))
    if unpaired:
        raise ValueError(f"`row_offsets` and `out_channels` must name the same layers; only one names {unpaired}")
    for name, mask in zip(names, masks):
        if name in transposed and (mask.dim() != 2 or groups.get(name, 1) != 1):
            raise ValueError(
                f"mask {name!r} is named in `transposed`: it must be a 2-D [in, out] mask of 1 group, got shape"
                f" {tuple(mask.shape)} and groups {groups.get(name, 1)!r}"
            )
    if not names:
        return {}
    # Every check comes before the collective: a process that raises must not leave the others waiting in it.
    if group is not None and torch.distributed.get_world_size(group) > 1:
        rank = torch.distributed.get_rank(group)
        specs = [_row_block(name, mask, row_offsets, out_channels, rank, group) for name, mask in zip(names, masks)]
    else:
        group = None
        specs = _whole_masks(names, masks, row_offsets, out_channels)
    active = {
        name: (mask if mask.dtype == torch.bool else mask != 0)[: spec.rows]
        for name, mask, spec in zip(names, masks, specs)
    }
    layouts = dict(zip(names, specs))
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


def _whole_masks(
    names: list[str], masks: list[Tensor], row_offsets: dict[str, int], out_channels: dict[str, int]
) -> list[ShardSpec]:
    """The layouts of full masks (no process group of several processes), checked against ``row_offsets`` and
    ``out_channels`` where they name a layer."""
    for name, mask in zip(names, masks):
        if name in out_channels and (row_offsets[name] != 0 or out_channels[name] != mask.shape[0]):
            raise ValueError(
                f"mask {name!r}: without a process group of several processes each mask is the full weight, but"
                f" `row_offsets` gives {row_offsets[name]!r} and `out_channels` {out_channels[name]!r} for a mask"
                f" of {mask.shape[0] if mask.dim() else 0} rows"
            )
    for name, mask in zip(names, masks):
        if mask.dim() < 2 or mask.numel() == 0:
            raise ValueError(
                f"mask {name!r} must be a non-empty weight mask [out, in, *kernel], got shape {tuple(mask.shape)}"
            )
    return [ShardSpec(tuple(mask.shape), 0, mask.shape[0]) for mask in masks]


def _row_block(
    name: str,
    mask: Tensor,
    row_offsets: dict[str, int],
    out_channels: dict[str, int],
    rank: int,
    group: ProcessGroup,
) -> ShardSpec:
    """The layout of this process's row block of a sharded mask; a mask held whole by every process counts on
    the group's first process only (0 rows elsewhere)."""
    if mask.dim() < 2 or math.prod(mask.shape[1:]) == 0:
        raise ValueError(
            f"mask {name!r} must be a row block of a non-empty weight mask [out, in, *kernel], got shape"
            f" {tuple(mask.shape)}"
        )
    if name not in out_channels:  # held whole by every process: counted once
        if mask.shape[0] == 0:
            raise ValueError(f"mask {name!r} is empty, and `out_channels` does not name it as a row block")
        return ShardSpec(tuple(mask.shape), 0, mask.shape[0] if rank == 0 else 0, group)
    n_out, offset = out_channels[name], row_offsets[name]
    if not isinstance(n_out, int) or not isinstance(offset, int) or n_out < 1 or offset < 0:
        raise ValueError(
            f"`out_channels[{name!r}]` must be a positive integer and `row_offsets[{name!r}]` a"
            f" non-negative one, got {n_out!r} and {offset!r}"
        )
    if offset + mask.shape[0] > n_out:
        raise ValueError(f"mask {name!r}: rows [{offset}, {offset + mask.shape[0]}) of a weight of {n_out} rows")
    return ShardSpec((n_out, *mask.shape[1:]), offset, mask.shape[0], group)


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
