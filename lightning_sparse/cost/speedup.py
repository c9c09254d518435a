"""How much faster a sparse network could run: the speedup estimates of the sparse momentum paper (section 4.1).

Pure tensor math, no Lightning, no model: the per-layer costs, chain links and conv groups come from
:mod:`lightning_sparse.cost.profiling` (or by hand). Two estimates, both of the form
``Σ c_l / Σ c_l · (fraction of layer l left)``, where ``c_l`` is the cost of masked layer ``l`` (its forward
FLOPs from :func:`~lightning_sparse.cost.profiling.layer_flops` or its measured forward+backward time from
:func:`~lightning_sparse.cost.profiling.layer_times`):

* **dense convolution** (:func:`speedup_dense_conv`): an input channel whose weights are all zero (over every
  output channel and the kernel) and an output channel whose weights are all zero can be dropped from a dense
  kernel, so layer ``l`` keeps ``(1 - empty_in_l) · (1 - empty_out_l)`` of its work;
* **sparse convolution** (:func:`speedup_sparse_conv`): a sparse kernel does work in proportion to the
  layer's density ``d_l``.

:func:`channel_stats` reads ``empty_in``, ``empty_out`` and the density of every layer from its mask (or
weight) in one host synchronization, also from row shards of the masks spread over processes (FSDP2). With
chain links (:class:`ChainLink`, found by :func:`~lightning_sparse.cost.profiling.chain_links`), an output channel
emptied in one layer also idles the input channel(s) it feeds in the next layer of a plain chain.

:func:`empty_heads` and :func:`attention_empty_heads` count the attention heads left without a query, key or
value projection (all its output channels empty).

Conventions: layers are keyed by name, as the masks are: parameter names such as ``"features.0.weight"``;
costs, fractions and densities are dicts keyed by those names. Weights are laid out ``[out, in, *kernel]``
(``nn.Linear``, ``nn.Conv1d/2d/3d``), or ``[in, out]`` for the layers named in ``transposed`` (``transformers``'
``Conv1D``); transposed convolutions, whose weights are ``[in, out, *kernel]``, are not supported.

Example (two linear layers ``10 -> 20 -> 5``, the second fed by the first):
    >>> import torch
    >>> names = ["0.weight", "2.weight"]
    >>> costs = {"0.weight": 400, "2.weight": 200}  # forward FLOPs of one sample: 2 * in * out
    >>> links = {"2.weight": ChainLink(source="0.weight")}
    >>> masks = [torch.ones(20, 10, dtype=torch.bool), torch.ones(5, 20, dtype=torch.bool)]
    >>> masks[0][10:] = False  # the last 10 neurons of the first layer are empty ...
    >>> stats = channel_stats(names, masks, links)
    >>> stats["2.weight"]  # ... so half of the second layer's inputs are idle
    LayerChannelStats(empty_in=0.5, empty_out=0.0, density=1.0)
    >>> speedup_dense_conv(costs, {n: s.empty_in for n, s in stats.items()}, {n: s.empty_out for n, s in stats.items()})
    2.0
    >>> speedup_sparse_conv(costs, {n: s.density for n, s in stats.items()})
    1.5
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "AttentionHeads",
    "ChainLink",
    "LayerChannelStats",
    "attention_empty_heads",
    "channel_stats",
    "empty_heads",
    "speedup_dense_conv",
    "speedup_sparse_conv",
    "training_step_flops",
]


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


@dataclass(frozen=True)
class ChainLink:
    """The single masked layer feeding a layer through channel-preserving ops (see
    :func:`~lightning_sparse.cost.profiling.chain_links`).

    Attributes:
        source: name of the feeding layer.
        repeat: number of consecutive inputs of the fed layer per output channel of ``source``: 1, or
            ``H * W`` (the spatial size) when a conv's output is flattened into a linear layer.
    """

    source: str
    repeat: int = 1


# ----------------------------------------------------------------------------- channel statistics


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
        links: chain links (:func:`~lightning_sparse.cost.profiling.chain_links`), keyed by the fed layer: the input
            channels of a linked layer fed by an empty output channel of its source count as empty too.
            ``None``: no links.
        groups: number of groups of the grouped convolutions (:func:`~lightning_sparse.cost.profiling.conv_groups`);
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
        mask's device (with ``group``: moved to the first mask's device, which must suit ``group``'s backend)
        and read back to the host once, for all layers together.

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
    if group is not None and torch.distributed.get_world_size(group) > 1:
        return _sharded_stats(names, masks, links, groups, row_offsets, out_channels, group, transposed)
    for name, mask in zip(names, masks):
        if name in out_channels and (row_offsets[name] != 0 or out_channels[name] != mask.shape[0]):
            raise ValueError(
                f"mask {name!r}: without a process group of several processes each mask is the full weight, but"
                f" `row_offsets` gives {row_offsets[name]!r} and `out_channels` {out_channels[name]!r} for a mask"
                f" of {mask.shape[0] if mask.dim() else 0} rows"
            )
    return _local_stats(names, [m.t() if n in transposed else m for n, m in zip(names, masks)], links, groups)


def _local_stats(
    names: list[str], masks: list[Tensor], links: dict[str, ChainLink], groups: dict[str, int]
) -> dict[str, LayerChannelStats]:
    """:func:`channel_stats` of full masks."""
    active: dict[str, Tensor] = {}
    empty_out: dict[str, Tensor] = {}
    for name, mask in zip(names, masks):
        if mask.dim() < 2 or mask.numel() == 0:
            raise ValueError(
                f"mask {name!r} must be a non-empty weight mask [out, in, *kernel], got shape {tuple(mask.shape)}"
            )
        active[name] = mask if mask.dtype == torch.bool else mask != 0
        empty_out[name] = ~active[name].flatten(1).any(dim=1)

    device = masks[0].device
    counts = []
    for name in names:
        a = active[name]
        n_out, n_in = a.shape[0], a.shape[1]
        g = groups.get(name, 1)
        if not isinstance(g, int) or g < 1 or n_out % g:
            raise ValueError(
                f"groups[{name!r}] must be a positive integer dividing the {n_out} output channels, got {g!r}"
            )
        # [groups, out per group, in per group, kernel] -> real input channel (group, i) is empty
        empty_in = ~a.reshape(g, n_out // g, n_in, -1).any(dim=3).any(dim=1).reshape(-1)
        link = links.get(name)
        if link is not None:
            if not isinstance(link.repeat, int) or link.repeat < 1:
                raise ValueError(f"links[{name!r}].repeat must be a positive integer, got {link.repeat!r}")
            idle = empty_out[link.source].to(empty_in.device).repeat_interleave(link.repeat)
            if idle.numel() != empty_in.numel():
                raise ValueError(
                    f"link {link.source!r} -> {name!r}: {empty_out[link.source].numel()} output channels x"
                    f" repeat {link.repeat} = {idle.numel()} inputs, but {name!r} has {empty_in.numel()} input"
                    " channels (for a grouped conv, pass `groups`)"
                )
            empty_in = empty_in | idle
        counts.append(torch.stack([empty_in.sum(), empty_out[name].sum(), a.sum()]).to(device))
    values = torch.stack(counts).tolist()  # the one host synchronization

    stats = {}
    for name, (n_empty_in, n_empty_out, n_active) in zip(names, values):
        a = active[name]
        n_in = a.shape[1] * groups.get(name, 1)
        stats[name] = LayerChannelStats(
            empty_in=n_empty_in / n_in, empty_out=n_empty_out / a.shape[0], density=n_active / a.numel()
        )
    return stats


def _sharded_stats(
    names: list[str],
    masks: list[Tensor],
    links: dict[str, ChainLink],
    groups: dict[str, int],
    row_offsets: dict[str, int],
    out_channels: dict[str, int],
    group: ProcessGroup,
    transposed: set[str],
) -> dict[str, LayerChannelStats]:
    """:func:`channel_stats` of row blocks of the masks: per-layer count vectors, one ``all_reduce``. The counts
    are those of the stored rows and columns; for a ``transposed`` layer the columns are its output channels."""
    rank = torch.distributed.get_rank(group)
    # Every check comes before the collective: a process that raises must not leave the others waiting in it.
    blocks: dict[str, tuple[Tensor, int, int, int]] = {}  # name -> (local active block, row offset, rows, groups)
    for name, mask in zip(names, masks):
        if mask.dim() < 2 or math.prod(mask.shape[1:]) == 0:
            raise ValueError(
                f"mask {name!r} must be a row block of a non-empty weight mask [out, in, *kernel], got shape"
                f" {tuple(mask.shape)}"
            )
        if name in out_channels:
            n_out, offset = out_channels[name], row_offsets[name]
            if not isinstance(n_out, int) or not isinstance(offset, int) or n_out < 1 or offset < 0:
                raise ValueError(
                    f"`out_channels[{name!r}]` must be a positive integer and `row_offsets[{name!r}]` a"
                    f" non-negative one, got {n_out!r} and {offset!r}"
                )
            if offset + mask.shape[0] > n_out:
                raise ValueError(
                    f"mask {name!r}: rows [{offset}, {offset + mask.shape[0]}) of a weight of {n_out} rows"
                )
        else:  # held whole by every process: counted once
            n_out, offset = mask.shape[0], 0
            if n_out == 0:
                raise ValueError(f"mask {name!r} is empty, and `out_channels` does not name it as a row block")
            if rank != 0:
                mask = mask[:0]
        g = groups.get(name, 1)
        if not isinstance(g, int) or g < 1 or n_out % g:
            raise ValueError(
                f"groups[{name!r}] must be a positive integer dividing the {n_out} output channels, got {g!r}"
            )
        blocks[name] = (mask if mask.dtype == torch.bool else mask != 0, offset, n_out, g)
    # (output channels, input channels) of each layer: stored (rows, columns), swapped for a transposed layer
    channels = {
        n: (b[0].shape[1], b[2]) if n in transposed else (b[2], b[0].shape[1] * b[3]) for n, b in blocks.items()
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

    # Per layer: [out] active weights per row, [groups * in] active rows per (group, input), the active count.
    device = masks[0].device
    pieces: list[Tensor] = []
    sizes: list[int] = []
    for name in names:
        a, offset, n_out, g = blocks[name]
        rows, n_in = a.shape[0], a.shape[1]
        flat = a.reshape(rows, n_in, math.prod(a.shape[2:]))
        uses_input = flat.any(dim=2)  # [rows, in]: row r reads input i
        row_counts = torch.zeros(n_out, dtype=torch.int64, device=a.device)
        row_counts[offset : offset + rows] = uses_input.sum(dim=1)
        group_of = torch.arange(offset, offset + rows, device=a.device) // (n_out // g)
        input_counts = torch.zeros(g, n_in, dtype=torch.int64, device=a.device)
        input_counts.index_add_(0, group_of, uses_input.to(torch.int64))
        pieces += [row_counts.to(device), input_counts.reshape(-1).to(device), a.sum().reshape(1).to(device)]
        sizes += [n_out, g * n_in, 1]
    totals = torch.cat(pieces)
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

    stats = {}
    for name, (n_empty_in, n_empty_out, n_active) in zip(names, values):
        a, _, n_rows, _ = blocks[name]
        n_out, n_in = channels[name]
        stats[name] = LayerChannelStats(
            empty_in=n_empty_in / n_in,
            empty_out=n_empty_out / n_out,
            density=n_active / (n_rows * math.prod(a.shape[1:])),
        )
    return stats


# ----------------------------------------------------------------------------- attention heads


@dataclass(frozen=True)
class AttentionHeads:
    """Where the heads of one attention module lie along the output channels of its projection weight(s).

    Attributes:
        layers: names of the projection weight(s) whose output channels, concatenated in this order, are the
            ``parts`` stacked projections (Q | K | V), each ``heads`` consecutive blocks of ``head_dim`` channels:
            one packed weight (``nn.MultiheadAttention``'s ``in_proj_weight``, timm's ``qkv``, GPT-2's
            ``c_attn``), or one per part (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``).
        heads: number of heads.
        parts: number of stacked projections over all ``layers`` (3: Q, K and V).

    Found in a model by :func:`lightning_sparse.core.layers.find_attention`.
    """

    layers: tuple[str, ...]
    heads: int
    parts: int = 3


def empty_heads(mask: Tensor | Sequence[Tensor], heads: int, parts: int = 3, out_dim: int = 0) -> float:
    """Fraction of the attention heads that have a part (Q, K or V projection) whose output channels are all
    masked out: such a head's attention is constant (empty Q or K) or zero (empty V), it contributes nothing
    learned.

    Args:
        mask: the mask (``torch.bool``, or a weight: non-zero is active) of the projection(s), its output channels
            along ``out_dim`` being ``parts`` stacked projections, each ``heads`` consecutive blocks of
            ``head_dim`` channels; or a sequence of such masks whose output channels are concatenated (separate
            ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``, which may differ in their input widths).
        heads: number of heads.
        parts: number of stacked projections in all (3: Q, K, V; 1 for a single projection).
        out_dim: the dimension of the mask that indexes output channels: 0 for ``[out, in]`` weights
            (``nn.Linear``, ``nn.MultiheadAttention``), 1 for ``[in, out]`` ones (``transformers``' ``Conv1D``,
            GPT-2's ``c_attn``).

    Example (``nn.MultiheadAttention(4, num_heads=2)``: ``in_proj_weight`` is ``[12, 4]``, rows Q | K | V of 4
    rows each, a head is 2 rows of each):
        >>> import torch
        >>> mask = torch.ones(12, 4, dtype=torch.bool)
        >>> mask[4:6] = False  # the K rows of head 0
        >>> empty_heads(mask, heads=2)
        0.5
        >>> mask[6] = False  # one of the two K rows of head 1: it still has a key
        >>> empty_heads(mask, heads=2)
        0.5
        >>> empty_heads(mask.t(), heads=2, out_dim=1)  # stored [in, out], as GPT-2's c_attn
        0.5
        >>> empty_heads([mask[:4], mask[4:8], mask[8:]], heads=2)  # separate Q, K, V projections
        0.5
    """
    masks = [mask] if isinstance(mask, Tensor) else list(mask)
    if not masks:
        raise ValueError("`mask` must be a tensor or a non-empty sequence of tensors")
    used = []
    for m in masks:
        if not isinstance(m, Tensor) or m.dim() < 2 or not -m.dim() <= out_dim < m.dim():
            raise ValueError(
                f"each mask must be a tensor of at least 2 dimensions with output channels along `out_dim`"
                f" ({out_dim!r}), got {tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}"
            )
        active = m if m.dtype == torch.bool else m != 0
        used.append(active.movedim(out_dim, 0).flatten(1).any(dim=1).to(masks[0].device))
    return int(_empty_head_flags(torch.cat(used), heads, parts).sum()) / heads


def _check_heads(what: str, channels: int, heads: object, parts: object) -> None:
    if not isinstance(heads, int) or not isinstance(parts, int) or heads < 1 or parts < 1:
        raise ValueError(f"{what}: `heads` and `parts` must be positive integers, got {heads!r} and {parts!r}")
    if channels == 0 or channels % (heads * parts):
        raise ValueError(f"{what}: {channels} output channels are not {parts} part(s) x {heads} heads x a head size")


def _empty_head_flags(used: Tensor, heads: int, parts: int) -> Tensor:
    """``[heads]`` bools from ``[parts * heads * head_dim]`` "output channel has an active weight" bools."""
    _check_heads("empty_heads", used.numel(), heads, parts)
    part_used = used.reshape(parts, heads, -1).any(dim=2)  # [parts, heads]
    return ~part_used.all(dim=0)


def attention_empty_heads(
    attention: Mapping[str, AttentionHeads],
    layers: Mapping[str, Tensor],
    *,
    transposed: Collection[str] = (),
    row_offsets: Mapping[str, int] | None = None,
    out_channels: Mapping[str, int] | None = None,
    group: ProcessGroup | None = None,
) -> dict[str, float]:
    """:func:`empty_heads` of every attention module, from the masks of its projections, also sharded.

    Args:
        attention: attention module name → :class:`AttentionHeads`; every layer it names must be in ``layers``.
        layers: layer name → mask (``torch.bool``, or a weight: non-zero is active), ``[out, in]``, or
            ``[in, out]`` for the names in ``transposed``.
        transposed, row_offsets, out_channels, group: as for :func:`channel_stats`: with ``group``, a layer
            named in ``row_offsets``/``out_channels`` is this process's block of stored rows (output channels, or
            input channels of a ``transposed`` layer), and a layer named in neither is held whole by every
            process (counted from the group's first process only). The active weights of every output channel
            are counted locally and summed with one ``all_reduce`` over ``group`` (no mask is gathered), so every
            process gets the fractions of the full masks. Every process must pass the same modules and layer
            names, in the same order; arguments are checked before the collective.

    Returns:
        module name → fraction of its heads that are empty, in the order of ``attention``; one host
        synchronization.
    """
    attention = dict(attention)
    row_offsets = dict(row_offsets or {})
    out_channels = dict(out_channels or {})
    if isinstance(transposed, str):
        raise ValueError(f"`transposed` must be a collection of layer names, got the string {transposed!r}")
    transposed = set(transposed)
    if not attention:
        return {}
    sharded = group is not None and torch.distributed.get_world_size(group) > 1
    first = not sharded or torch.distributed.get_rank(group) == 0
    names: list[str] = []
    for module, spec in attention.items():
        if not isinstance(spec, AttentionHeads) or not spec.layers:
            raise ValueError(f"attention[{module!r}] must be an AttentionHeads naming its layers, got {spec!r}")
        missing = [n for n in spec.layers if n not in layers]
        if missing:
            raise ValueError(f"attention[{module!r}] names layers that are not in `layers`: {missing}")
        names += [n for n in spec.layers if n not in names]
    # Per layer: active weights of every output channel (full length), this process's contribution.
    counts: dict[str, Tensor] = {}
    device = layers[names[0]].device
    for name in names:
        mask = layers[name]
        if mask.dim() < 2 or (name in transposed and mask.dim() != 2):
            raise ValueError(f"mask {name!r} must be a 2-D (or [out, in, *kernel]) mask, got shape {tuple(mask.shape)}")
        active = mask if mask.dtype == torch.bool else mask != 0
        if name in out_channels or name in row_offsets:
            if name not in out_channels or name not in row_offsets:
                raise ValueError(f"`row_offsets` and `out_channels` must both name {name!r}, or neither")
            n_rows, offset = out_channels[name], row_offsets[name]
            if not sharded and (offset != 0 or n_rows != active.shape[0]):
                raise ValueError(
                    f"mask {name!r}: without a process group of several processes each mask is the full weight,"
                    f" but `row_offsets` gives {offset!r} and `out_channels` {n_rows!r} for {active.shape[0]} rows"
                )
            if offset < 0 or offset + active.shape[0] > n_rows:
                raise ValueError(f"mask {name!r}: rows [{offset}, {offset + active.shape[0]}) of a weight of {n_rows}")
            held_whole = False
        else:
            n_rows, offset, held_whole = active.shape[0], 0, True
        if name in transposed:  # [in, out] block of input rows: per-column counts, summed over the blocks
            per_channel = active.sum(dim=0, dtype=torch.int64)
        else:
            per_channel = torch.zeros(n_rows, dtype=torch.int64, device=active.device)
            per_channel[offset : offset + active.shape[0]] = active.flatten(1).sum(dim=1)
        if held_whole and not first:
            per_channel = torch.zeros_like(per_channel)
        counts[name] = per_channel.to(device)
    for module, spec in attention.items():
        _check_heads(f"attention[{module!r}]", sum(counts[n].numel() for n in spec.layers), spec.heads, spec.parts)
    sizes = [counts[n].numel() for n in names]
    totals = torch.cat([counts[n] for n in names])
    if sharded:
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM, group=group)
    used = dict(zip(names, (totals > 0).split(sizes)))
    empty = torch.stack(
        [_empty_head_flags(torch.cat([used[n] for n in spec.layers]), spec.heads, spec.parts).sum()
         for spec in attention.values()]
    ).tolist()  # fmt: skip  # the one host synchronization
    return {module: n / spec.heads for (module, spec), n in zip(attention.items(), empty)}


def speedup_dense_conv(
    costs: Mapping[str, float], empty_in: Mapping[str, float], empty_out: Mapping[str, float]
) -> float:
    """Dense-convolution speedup: ``Σ c_l / Σ c_l · (1 - empty_in_l) · (1 - empty_out_l)``.

    Args:
        costs: cost of every layer counted (FLOPs or seconds, non-negative), keyed by layer name. Only these
            layers are summed: put unmasked layers in with zero empty fractions to count them at full cost.
        empty_in: fraction of skippable input channels per layer (:attr:`LayerChannelStats.empty_in`).
        empty_out: fraction of empty output channels per layer (:attr:`LayerChannelStats.empty_out`).

    Returns:
        the speedup, ``>= 1``. ``1.0`` when the costs sum to zero (no work, nothing to gain); ``inf`` when
        every layer with a cost is entirely removed.
    """
    _check_costs(costs)
    _check_fractions("empty_in", empty_in, costs)
    _check_fractions("empty_out", empty_out, costs)
    total = sum(costs.values())
    remaining = sum(c * (1.0 - empty_in[n]) * (1.0 - empty_out[n]) for n, c in costs.items())
    return _ratio(total, remaining)


def speedup_sparse_conv(costs: Mapping[str, float], densities: Mapping[str, float]) -> float:
    """Sparse-convolution speedup: ``Σ c_l / Σ c_l · d_l``, with ``d_l`` the density of layer ``l``.

    ``costs`` as in :func:`speedup_dense_conv`; ``densities`` keyed by the same names, each in [0, 1].
    ``1.0`` when the costs sum to zero, ``inf`` when every layer with a cost has density 0.
    """
    _check_costs(costs)
    _check_fractions("densities", densities, costs)
    total = sum(costs.values())
    remaining = sum(c * densities[n] for n, c in costs.items())
    return _ratio(total, remaining)


def training_step_flops(
    flops: Mapping[str, float], densities: Mapping[str, float], dense_weight_gradients: bool = False
) -> tuple[float, float]:
    """FLOPs of one training step of the sparse network and of the dense one, as the RigL paper counts them.

    A step is a forward pass ``f``, and a backward pass of ``2 f`` (gradients of the inputs and of the
    weights). The sparse network does each at its layers' densities, ``f_S = Σ f_l · d_l``, except the
    weight gradients when ``dense_weight_gradients`` (sparse momentum keeps the momentum of missing weights,
    DST trains every weight): those cost ``f_D = Σ f_l``. The dense run costs ``3 f_D``.

    Returns:
        ``(sparse, dense)``: ``2 f_S + f_S`` (or ``2 f_S + f_D``), and ``3 f_D``.
    """
    _check_costs(flops)
    _check_fractions("densities", densities, flops)
    f_dense = float(sum(flops.values()))
    f_sparse = float(sum(f * densities[n] for n, f in flops.items()))
    return 2.0 * f_sparse + (f_dense if dense_weight_gradients else f_sparse), 3.0 * f_dense


def _check_costs(costs: Mapping[str, float]) -> None:
    bad = {n: c for n, c in costs.items() if not (math.isfinite(c) and c >= 0)}
    if bad:
        raise ValueError(f"`costs` must be finite and non-negative (FLOPs or seconds), got {bad}")


def _check_fractions(what: str, values: Mapping[str, float], costs: Mapping[str, float]) -> None:
    missing = [n for n in costs if n not in values]
    if missing:
        raise ValueError(f"`{what}` has no value for layers {missing}; it needs one for every layer in `costs`")
    bad = {n: values[n] for n in costs if not 0.0 <= values[n] <= 1.0}
    if bad:
        raise ValueError(f"`{what}` must be fractions in [0, 1], got {bad}")


def _ratio(total: float, remaining: float) -> float:
    if total == 0:
        return 1.0
    if remaining == 0:
        return math.inf
    return total / remaining
