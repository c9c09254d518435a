"""What a sparse network costs: channel statistics, speedup estimates, training FLOPs, and the end-of-fit
table and figure. No Lightning here: :class:`SparsityReport` works on any model and masks.

What is counted (see :mod:`lightning_sparse.functional.speedup`): every ``nn.Linear`` / ``nn.Conv1d/2d/3d``
of the model, masked or not (an unmasked layer counts with its non-zero weights), with its forward FLOPs for
the real input shapes, or its measured forward+backward time. Output channels emptied in one layer idle the
next layer's input channels only along plain chains (conv → BN → ReLU → pool → conv, conv → flatten →
linear); residual additions and concatenations break the chain, which underestimates the speedup.
Normalization, activations and pooling cost nothing in these estimates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_sparse.functional.speedup import (
    LAYER_TYPES,
    ChainLink,
    LayerChannelStats,
    chain_links,
    channel_stats,
    conv_groups,
    layer_flops,
    layer_times,
    speedup_dense_conv,
    speedup_sparse_conv,
)

log = logging.getLogger(__name__)

TIMINGS = ("flops", "measure")


@dataclass
class CostModel:
    """The cost of every linear/conv layer of a model for one batch, keyed by parameter name.

    Attributes:
        flops: forward FLOPs per layer (``torch.utils.flop_counter``), for the captured input shapes.
        times: measured forward+backward seconds per layer, or ``None`` when only FLOPs were counted.
        links: plain-chain links (see :func:`~lightning_sparse.functional.speedup.chain_links`).
        groups: ``groups`` of each conv (1 for linear layers).
    """

    flops: dict[str, int]
    times: dict[str, float] | None
    links: dict[str, ChainLink]
    groups: dict[str, int]

    @classmethod
    def build(cls, root: nn.Module, prefix: str, example_input: Any, measure_time: bool = False) -> CostModel:
        """Count the layers under ``root`` (named ``prefix`` in the full model) on ``example_input``."""
        local = [f"{name}.weight" if name else "weight" for name, m in root.named_modules() if isinstance(m, LAYER_TYPES)]
        full = {name: f"{prefix}.{name}" if prefix else name for name in local}
        flops = layer_flops(root, example_input, local)
        times = layer_times(root, example_input, local) if measure_time else None
        links = chain_links(root, example_input, local)
        groups = conv_groups(root, local)
        return cls(
            flops={full[n]: v for n, v in flops.items()},
            times=None if times is None else {full[n]: v for n, v in times.items()},
            links={full[n]: ChainLink(full[link.source], link.repeat) for n, link in links.items()},
            groups={full[n]: v for n, v in groups.items()},
        )

    @property
    def costs(self) -> dict[str, float]:
        """Measured times when available, else FLOPs."""
        return dict(self.times) if self.times is not None else {n: float(f) for n, f in self.flops.items()}


@dataclass
class SparsityReport:
    """Channel statistics of a model over training, and what they mean for its speed.

    Usage: ``report.cost_model = CostModel.build(...)`` once, then ``stats = report.measure(step, layers)``
    at every mask update, ``report.metrics(stats)`` for logging, ``report.table(stats)`` and
    ``report.figure(path)`` at the end.
    """

    cost_model: CostModel | None = None
    history: list[tuple[int, dict[str, LayerChannelStats]]] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def measure(self, step: int, layers: Mapping[str, Tensor]) -> dict[str, LayerChannelStats]:
        """Channel statistics of ``layers`` (name → bool mask, or weight for an unmasked layer), recorded
        at ``step``. One host synchronization."""
        names = list(layers)
        links = {}
        groups = {}
        if self.cost_model is not None:
            links = {n: link for n, link in self.cost_model.links.items() if n in layers and link.source in layers}
            groups = {n: g for n, g in self.cost_model.groups.items() if n in layers}
        stats = channel_stats(names, [layers[n] for n in names], links, groups)
        self.shapes.update({n: tuple(t.shape) for n, t in layers.items()})
        self.history.append((step, stats))
        return stats

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

    def metrics(self, stats: Mapping[str, LayerChannelStats]) -> dict[str, float]:
        """``sparse/empty_in/<name>``, ``sparse/empty_out/<name>`` and the speedups, for a logger."""
        out: dict[str, float] = {}
        for name, s in stats.items():
            out[f"sparse/empty_in/{name}"] = s.empty_in
            out[f"sparse/empty_out/{name}"] = s.empty_out
        out.update({f"sparse/{k}": v for k, v in self.speedups(stats).items()})
        return out

    def table(self, stats: Mapping[str, LayerChannelStats]) -> str:
        """Per layer: shape, density, empty input/output channels, share of the dense FLOPs."""
        flops = self.cost_model.flops if self.cost_model is not None else {}
        total = sum(flops.values()) or 1
        rows = [("layer", "shape", "density", "empty in", "empty out", "FLOPs share")]
        for name, s in stats.items():
            share = f"{flops[name] / total:.3f}" if name in flops else "-"
            shape = "x".join(map(str, self.shapes.get(name, ())))
            rows.append((name, shape, f"{s.density:.4f}", f"{s.empty_in:.3f}", f"{s.empty_out:.3f}", share))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        speedups = self.speedups(stats)
        if speedups:
            lines.append(
                f"estimated speedup: {speedups['speedup_dense_conv']:.3f}x dense convolution (empty channels"
                f" removed), {speedups['speedup_sparse_conv']:.3f}x ideal sparse convolution"
            )
        return "\n".join(lines)

    def figure(self, path: str | Path) -> Any:
        """Write a PNG: per-layer density over training, and the final empty channels per layer.

        Returns the matplotlib figure (closed after writing; loggers such as TensorBoard can still draw it).
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if not self.history:
            raise ValueError("nothing to plot: no statistics were recorded")
        fig, (ax_density, ax_empty) = plt.subplots(1, 2, figsize=(13, 4.5))
        steps = [step for step, _ in self.history]
        names = list(self.history[-1][1])
        for name in names:
            points = [(step, stats[name].density) for step, stats in self.history if name in stats]
            ax_density.plot([p[0] for p in points], [p[1] for p in points], label=name)
        ax_density.set(xlabel="optimizer step", ylabel="density", title="density per layer", ylim=(0, 1.02))
        if len(names) <= 20:
            ax_density.legend(fontsize="x-small")
        final = self.history[-1][1]
        x = range(len(names))
        ax_empty.bar([i - 0.2 for i in x], [final[n].empty_in for n in names], width=0.4, label="empty in")
        ax_empty.bar([i + 0.2 for i in x], [final[n].empty_out for n in names], width=0.4, label="empty out")
        ax_empty.set_xticks(list(x), names, rotation=90, fontsize="x-small")
        ax_empty.set(ylabel="fraction of channels", title=f"empty channels at step {steps[-1]}", ylim=(0, 1.02))
        ax_empty.legend(fontsize="small")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        return fig
