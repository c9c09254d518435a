"""What a sparse network costs, measured over training: :class:`SparsityReport` keeps the channel statistics of
every mask update, turns them into speedup estimates and logger metrics, and writes the end-of-fit table (and
figure, :mod:`~lightning_sparse.cost.figure`). No Lightning here: it works on any model and masks.

What is counted (see :mod:`~lightning_sparse.cost.channels`, :mod:`~lightning_sparse.cost.speedup` and
:mod:`~lightning_sparse.cost.model`): every ``nn.Linear`` / ``nn.Conv1d/2d/3d``, ``transformers``' ``Conv1D`` and
``nn.MultiheadAttention`` input projection of the model, masked or not (an unmasked layer counts with its non-zero
weights), with its forward FLOPs for the real input shapes, or its measured forward+backward time. An attention
head's rows (its Q, K and V output channels) count as channels of the projections: all-masked rows are empty
output channels of the projection. The empty heads of each attention module
(:func:`~lightning_sparse.cost.heads.empty_heads`) are reported, but do not reduce the cost further (the other
parts of an empty head, the attention core and the output projection's columns of that head are still counted).
Output channels emptied in one layer idle the next layer's input channels only along plain chains (conv → BN →
ReLU → pool → conv, conv → flatten → linear); residual additions and concatenations break the chain, which
underestimates the speedup. On a sharded (FSDP2) model the cost model is built from the layers' input shapes
(:meth:`~lightning_sparse.cost.model.CostModel.from_calls`): FLOPs only, and no chain idling. Normalization,
activations and pooling cost nothing in these estimates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_sparse.core.distributed import ShardSpec
from lightning_sparse.core.layers import AttentionHeads
from lightning_sparse.cost.channels import LayerChannelStats, channel_stats
from lightning_sparse.cost.figure import sparsity_figure
from lightning_sparse.cost.heads import attention_empty_heads
from lightning_sparse.cost.model import CostModel
from lightning_sparse.cost.speedup import speedup_dense_conv, speedup_sparse_conv

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from lightning_sparse.core.sparsifier import Explored

__all__ = ["MeasuredStats", "SparsityReport"]


class MeasuredStats(dict):
    """What :meth:`SparsityReport.measure` returns: a dict of layer name → :class:`LayerChannelStats`, and
    :attr:`empty_heads`, attention module name → fraction of its heads that are empty
    (:func:`~lightning_sparse.cost.heads.empty_heads`)."""

    def __init__(self, stats: Mapping[str, LayerChannelStats] = (), empty_heads: Mapping[str, float] | None = None):
        super().__init__(stats)
        self.empty_heads: dict[str, float] = dict(empty_heads or {})


@dataclass
class SparsityReport:
    """Channel statistics of a model over training, and what they mean for its speed.

    Usage: ``report.cost_model = CostModel.build(...)`` once, then ``stats = report.measure(step, layers)``
    at every mask update, ``report.metrics(stats)`` for logging, ``report.table(stats)`` and
    ``report.figure(path)`` at the end; :attr:`updates` gets ``(step, rate, fraction pruned)`` of every mask update
    for the figure.
    """

    cost_model: CostModel | None = None
    history: list[tuple[int, dict[str, LayerChannelStats]]] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)
    """Attention module name → its number of heads, for the modules measured so far."""
    updates: list[tuple[int, float, float]] = field(default_factory=list)
    """``(step, prune rate, fraction pruned)`` of every mask update (the figure's first panel): the rate the method
    was given and the fraction of the active weights it pruned (regrown elsewhere by the growing methods)."""

    explored: list[tuple[int, float]] = field(default_factory=list)
    """``(step, R_s)`` at every logged row: ITOP's fraction of the masked positions that have ever been active
    (:meth:`~lightning_sparse.Sparsifier.explored`), drawn in the figure's first panel."""

    def __repr__(self) -> str:
        return (f"SparsityReport({len(self.shapes)} layers, {len(self.history)} measurements,"
                f" {len(self.updates)} updates, cost model {'set' if self.cost_model is not None else 'unset'})")  # fmt: skip

    def measure(
        self,
        step: int,
        layers: Mapping[str, Tensor],
        *,
        specs: Mapping[str, ShardSpec] | None = None,
        group: ProcessGroup | None = None,
        transposed: Collection[str] = (),
        attention: Mapping[str, AttentionHeads] | None = None,
    ) -> MeasuredStats:
        """Channel statistics of ``layers`` (name → bool mask, or weight for an unmasked layer), recorded
        at ``step``, and the empty heads of the ``attention`` modules. One host synchronization (two with
        ``attention``).

        ``transposed`` names the layers stored ``[in, out]`` (``transformers``' ``Conv1D``, see
        :func:`~lightning_sparse.cost.channels.channel_stats`). ``attention`` maps attention module names
        to their :class:`~lightning_sparse.cost.heads.AttentionHeads`
        (:func:`~lightning_sparse.core.layers.find_attention`); modules whose projections are not all in ``layers``
        are left out.

        With ``group``, ``layers`` are the local row blocks of masks sharded over its processes (FSDP2's
        ``Shard(0)``), placed by their ``specs``, and the statistics are those of the full
        masks, with one ``all_reduce`` (see :func:`~lightning_sparse.cost.channels.channel_stats`); every
        process of ``group`` must call this with the same layer names in the same order. The recorded
        shapes are the full ones (the specs' shapes).
        """
        names = list(layers)
        links = {}
        groups = {}
        if self.cost_model is not None:
            links = {n: link for n, link in self.cost_model.links.items() if n in layers and link.source in layers}
            groups = {n: g for n, g in self.cost_model.groups.items() if n in layers}
        stats = channel_stats(
            names,
            [layers[n] for n in names],
            links,
            groups,
            specs=specs,
            group=group,
            transposed=transposed,
        )
        modules = {m: a for m, a in (attention or {}).items() if all(n in layers for n in a.layers)}
        empty_heads = attention_empty_heads(
            modules, layers, transposed=transposed, specs=specs, group=group
        )
        self.heads.update({m: a.heads for m, a in modules.items()})
        measured = MeasuredStats(stats, empty_heads)
        specs = dict(specs or {})
        self.shapes.update({n: tuple(specs[n].shape) if n in specs else tuple(t.shape) for n, t in layers.items()})
        self.history.append((step, measured))
        return measured

    def speedups(self, stats: Mapping[str, LayerChannelStats]) -> dict[str, float]:
        """The dense-convolution and sparse-convolution speedup estimates (empty without a cost model)."""
        if self.cost_model is None:
            return {}
        costs = {n: c for n, c in self.cost_model.costs.items() if n in stats}
        return {
            "speedup_dense_conv": speedup_dense_conv(
                costs, {n: s.empty_in for n, s in stats.items()}, {n: s.empty_out for n, s in stats.items()}
            ),
            "speedup_sparse_conv": speedup_sparse_conv(costs, {n: s.density for n, s in stats.items()}),
        }

    def speedups_apply(self, stats: Mapping[str, LayerChannelStats]) -> bool:
        """Whether the speedup estimates say something beyond the density: there is a cost model, and a
        convolution among the layers of ``stats`` or a layer with empty input or output channels (for a network of
        linear layers without empty channels, the dense estimate is 1 and the sparse one the inverse density)."""
        if self.cost_model is None:
            return False
        conv = any(len(self.shapes.get(n, ())) > 2 for n in stats if n in self.cost_model.costs)
        return conv or any(s.empty_in > 0 or s.empty_out > 0 for s in stats.values())

    def metrics(self, stats: Mapping[str, LayerChannelStats], per_layer: bool = True) -> dict[str, float]:
        """``sparse/empty_in/<name>``, ``sparse/empty_out/<name>``, ``sparse/empty_heads/<attention module>``
        (for :class:`MeasuredStats`; only with ``per_layer``) and the speedups where they apply
        (:meth:`speedups_apply`), for a logger."""
        out: dict[str, float] = {}
        if self.speedups_apply(stats):
            out.update({f"sparse/{k}": v for k, v in self.speedups(stats).items()})
        if not per_layer:
            return out
        for name, s in stats.items():
            out[f"sparse/empty_in/{name}"] = s.empty_in
            out[f"sparse/empty_out/{name}"] = s.empty_out
        for module, fraction in getattr(stats, "empty_heads", {}).items():
            out[f"sparse/empty_heads/{module}"] = fraction
        return out

    def table(self, stats: Mapping[str, LayerChannelStats], explored: Explored | None = None) -> str:
        """Per layer: shape, density, empty input/output channels, share of the dense FLOPs, and with ``explored``
        (:meth:`~lightning_sparse.Sparsifier.explored`) the fraction of its positions ever active (ITOP's
        ``R_s``; ``-`` for layers it does not cover) and a line with the model's; then the empty heads of each
        attention module (for :class:`MeasuredStats`)."""
        flops = self.cost_model.flops if self.cost_model is not None else {}
        total = sum(flops.values()) or 1
        rows = [("layer", "shape", "density", "empty in", "empty out", "FLOPs share")]
        if explored is not None:
            rows[0] += ("explored",)
        for name, s in stats.items():
            share = f"{flops[name] / total:.3f}" if name in flops else "-"
            shape = "x".join(map(str, self.shapes.get(name, ())))
            row = (name, shape, f"{s.density:.4f}", f"{s.empty_in:.3f}", f"{s.empty_out:.3f}", share)
            if explored is not None:
                row += (f"{explored.layers[name]:.4f}" if name in explored.layers else "-",)
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if explored is not None:
            lines.append(f"explored (R_s): {explored.model:.4f} of the masked positions have been active")
        empty_heads = getattr(stats, "empty_heads", {})
        if empty_heads:
            width = max(len(m) for m in empty_heads)
            lines.append("empty attention heads:")
            lines += [
                f"  {m.ljust(width)}  {round(f * self.heads[m]) if m in self.heads else '?'} of"
                f" {self.heads.get(m, '?')} ({f:.3f})"
                for m, f in empty_heads.items()
            ]
        speedups = self.speedups(stats) if self.speedups_apply(stats) else {}
        if speedups:
            lines.append(
                f"estimated speedup: {speedups['speedup_dense_conv']:.3f}x dense convolution (empty channels"
                f" removed), {speedups['speedup_sparse_conv']:.3f}x ideal sparse convolution"
            )
        return "\n".join(lines)

    def figure(
        self,
        path: str | Path,
        *,
        title: str = "",
        masked: Collection[str] | None = None,
        target: float | None = None,
        sizes: Mapping[str, int] | None = None,
        max_lines: int = 12,
    ) -> Any:
        """Write a PNG of the run and return the matplotlib figure (closed; loggers can still draw it): see
        :func:`~lightning_sparse.cost.figure.sparsity_figure`, which draws :attr:`history` and :attr:`shapes`."""
        return sparsity_figure(
            self.history, self.shapes, path, title=title, masked=masked, target=target, sizes=sizes,
            max_lines=max_lines, updates=self.updates, explored=self.explored,
        )  # fmt: skip
