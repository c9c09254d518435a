"""Attention heads left without a query, key or value projection (all the output channels of that part of the
head empty): :func:`empty_heads` of one module's mask(s), :func:`attention_empty_heads` of every attention module,
also from row shards of the masks spread over processes (FSDP2). Pure tensor math, no Lightning, no model."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_sparse.core.distributed import ShardSpec
from lightning_sparse.core.layers import AttentionHeads
from lightning_sparse.cost.channels import block_layout

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["AttentionHeads", "attention_empty_heads", "empty_heads"]


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
    specs: Mapping[str, ShardSpec] | None = None,
    group: ProcessGroup | None = None,
) -> dict[str, float]:
    """:func:`empty_heads` of every attention module, from the masks of its projections, also sharded.

    Args:
        attention: attention module name → :class:`AttentionHeads`; every layer it names must be in ``layers``.
        layers: layer name → mask (``torch.bool``, or a weight: non-zero is active), ``[out, in]``, or
            ``[in, out]`` for the names in ``transposed``.
        transposed, specs, group: as for
            :func:`~lightning_sparse.cost.channels.channel_stats`: with ``group``, a layer
            with a spec is this process's block of stored rows (output channels, or input channels of a
            ``transposed`` layer), and a layer without one is held whole by every process (counted from the
            group's first process only). The active weights of every output channel
            are counted locally and summed with one ``all_reduce`` over ``group`` (no mask is gathered), so every
            process gets the fractions of the full masks. Every process must pass the same modules and layer
            names, in the same order; arguments are checked before the collective.

    Returns:
        module name → fraction of its heads that are empty, in the order of ``attention``; one host
        synchronization.
    """
    attention = dict(attention)
    specs = dict(specs or {})
    if isinstance(transposed, str):
        raise ValueError(f"`transposed` must be a collection of layer names, got the string {transposed!r}")
    transposed = set(transposed)
    if not attention:
        return {}
    if group is not None and torch.distributed.get_world_size(group) <= 1:
        group = None
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
        layout = block_layout(name, active, specs.get(name), group)
        active = active[: layout.rows]  # a whole mask counts on the group's first process only
        if name in transposed:  # [in, out] block of input rows: per-column counts, summed over the blocks
            per_channel = active.sum(dim=0, dtype=torch.int64)
        else:
            per_channel = torch.zeros(layout.shape[0], dtype=torch.int64, device=active.device)
            per_channel[layout.row_offset : layout.row_offset + layout.rows] = active.flatten(1).sum(dim=1)
        counts[name] = per_channel.to(device)
    for module, spec in attention.items():
        _check_heads(f"attention[{module!r}]", sum(counts[n].numel() for n in spec.layers), spec.heads, spec.parts)
    sizes = [counts[n].numel() for n in names]
    totals = torch.cat([counts[n] for n in names])
    if group is not None:
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM, group=group)
    used = dict(zip(names, (totals > 0).split(sizes)))
    empty = torch.stack(
        [_empty_head_flags(torch.cat([used[n] for n in spec.layers]), spec.heads, spec.parts).sum()
         for spec in attention.values()]
    ).tolist()  # fmt: skip  # the one host synchronization
    return {module: n / spec.heads for (module, spec), n in zip(attention.items(), empty)}
