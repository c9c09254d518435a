"""What a sparse network costs: channel statistics, speedup estimates, training FLOPs, and the end-of-fit
table and figure. No Lightning here: :class:`SparsityReport` works on any model and masks.

What is counted (see :mod:`lightning_sparse.cost.speedup` and :mod:`lightning_sparse.cost.profiling`): every
``nn.Linear`` / ``nn.Conv1d/2d/3d``, ``transformers``' ``Conv1D`` and ``nn.MultiheadAttention`` input projection
of the model, masked or not (an unmasked layer counts with its non-zero weights), with its forward FLOPs for the
real input shapes, or its measured forward+backward time. An attention head's rows (its Q, K and V output
channels) count as channels of the projections: all-masked rows are empty output channels of the projection.
The empty heads of each attention module (:func:`~lightning_sparse.cost.speedup.empty_heads`) are
reported, but do not reduce the cost further (the other parts of an empty head, the attention core and the
output projection's columns of that head are still counted). Output
channels emptied in one layer idle the next layer's input channels only along plain chains (conv → BN → ReLU →
pool → conv, conv → flatten → linear); residual additions and concatenations break the chain, which
underestimates the speedup. On a sharded (FSDP2) model the cost model is built from the layers' input shapes
(:meth:`~lightning_sparse.cost.profiling.CostModel.from_calls`): FLOPs only, and no chain idling.
Normalization, activations and pooling cost nothing in these estimates.

:class:`Stopwatch` and :class:`TrainFlops` keep the time spent on the masks and the training FLOPs so far.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_sparse.cost.profiling import CostModel
from lightning_sparse.cost.speedup import (
    AttentionHeads,
    LayerChannelStats,
    attention_empty_heads,
    channel_stats,
    speedup_dense_conv,
    speedup_sparse_conv,
    training_step_flops,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["TIMINGS", "CostModel", "MeasuredStats", "SparsityReport", "Stopwatch", "TrainFlops"]

log = logging.getLogger(__name__)

TIMINGS = ("flops", "measure")


class MeasuredStats(dict):
    """What :meth:`SparsityReport.measure` returns: a dict of layer name → :class:`LayerChannelStats`, and
    :attr:`empty_heads`, attention module name → fraction of its heads that are empty
    (:func:`~lightning_sparse.cost.speedup.empty_heads`)."""

    def __init__(self, stats: Mapping[str, LayerChannelStats] = (), empty_heads: Mapping[str, float] | None = None):
        super().__init__(stats)
        self.empty_heads: dict[str, float] = dict(empty_heads or {})


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
    heads: dict[str, int] = field(default_factory=dict)
    """Attention module name → its number of heads, for the modules measured so far."""

    def measure(
        self,
        step: int,
        layers: Mapping[str, Tensor],
        *,
        row_offsets: Mapping[str, int] | None = None,
        out_channels: Mapping[str, int] | None = None,
        group: ProcessGroup | None = None,
        transposed: Collection[str] = (),
        attention: Mapping[str, AttentionHeads] | None = None,
    ) -> MeasuredStats:
        """Channel statistics of ``layers`` (name → bool mask, or weight for an unmasked layer), recorded
        at ``step``, and the empty heads of the ``attention`` modules. One host synchronization (two with
        ``attention``).

        ``transposed`` names the layers stored ``[in, out]`` (``transformers``' ``Conv1D``, see
        :func:`~lightning_sparse.cost.speedup.channel_stats`). ``attention`` maps attention module names
        to their :class:`~lightning_sparse.cost.speedup.AttentionHeads`
        (:func:`~lightning_sparse.core.layers.find_attention`); modules whose projections are not all in ``layers``
        are left out.

        With ``group``, ``layers`` are the local row blocks of masks sharded over its processes (FSDP2's
        ``Shard(0)``), placed by ``row_offsets`` and ``out_channels``, and the statistics are those of the full
        masks, with one ``all_reduce`` (see :func:`~lightning_sparse.cost.speedup.channel_stats`); every
        process of ``group`` must call this with the same layer names in the same order. The recorded
        shapes are the full ones, ``(out_channels, *local.shape[1:])``.
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
            row_offsets=row_offsets,
            out_channels=out_channels,
            group=group,
            transposed=transposed,
        )
        modules = {m: a for m, a in (attention or {}).items() if all(n in layers for n in a.layers)}
        empty_heads = attention_empty_heads(
            modules, layers, transposed=transposed, row_offsets=row_offsets, out_channels=out_channels, group=group
        )
        self.heads.update({m: a.heads for m, a in modules.items()})
        measured = MeasuredStats(stats, empty_heads)
        rows = dict(out_channels or {})
        self.shapes.update({n: (rows[n], *t.shape[1:]) if n in rows else tuple(t.shape) for n, t in layers.items()})
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

    def metrics(self, stats: Mapping[str, LayerChannelStats]) -> dict[str, float]:
        """``sparse/empty_in/<name>``, ``sparse/empty_out/<name>``, ``sparse/empty_heads/<attention module>``
        (for :class:`MeasuredStats`) and the speedups, for a logger."""
        out: dict[str, float] = {}
        for name, s in stats.items():
            out[f"sparse/empty_in/{name}"] = s.empty_in
            out[f"sparse/empty_out/{name}"] = s.empty_out
        for module, fraction in getattr(stats, "empty_heads", {}).items():
            out[f"sparse/empty_heads/{module}"] = fraction
        out.update({f"sparse/{k}": v for k, v in self.speedups(stats).items()})
        return out

    def table(self, stats: Mapping[str, LayerChannelStats]) -> str:
        """Per layer: shape, density, empty input/output channels, share of the dense FLOPs; then the empty heads
        of each attention module (for :class:`MeasuredStats`)."""
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
        empty_heads = getattr(stats, "empty_heads", {})
        if empty_heads:
            width = max(len(m) for m in empty_heads)
            lines.append("empty attention heads:")
            lines += [
                f"  {m.ljust(width)}  {round(f * self.heads[m]) if m in self.heads else '?'} of"
                f" {self.heads.get(m, '?')} ({f:.3f})"
                for m, f in empty_heads.items()
            ]
        speedups = self.speedups(stats)
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
        """Write a PNG of the run and return the matplotlib figure (closed; loggers can still draw it).

        Three panels: (1) the overall density of the masked weights over training, as steps at the recorded
        moments, with the ``target`` as a dashed line; (2) the density of every layer: step lines (a log scale
        when densities differ by more than 10x) for up to ``max_lines`` layers, a heat map (layer x time, log
        colour scale) beyond; (3) the final empty input/output channels of the layers that have any (the 20
        with most when there are more), or a note saying there are none.

        Args:
            title: the figure's title (the callback names the method, density and model).
            masked: the masked layers (others in the history, measured from their weights, are left out).
            target: the requested overall density.
            sizes: weights per layer (default: from the recorded shapes), to weight the overall density.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
        from matplotlib.ticker import FuncFormatter

        if not self.history:
            raise ValueError("nothing to plot: no statistics were recorded")
        steps = [step for step, _ in self.history]
        names = [n for n in self.history[-1][1] if masked is None or n in masked]
        sizes = dict(sizes or {n: math.prod(self.shapes.get(n, (1,))) for n in names})
        series = {n: [stats[n].density if n in stats else math.nan for _, stats in self.history] for n in names}
        fig, (ax_total, ax_layers, ax_empty) = plt.subplots(1, 3, figsize=(17, 5), width_ratios=(1, 1.3, 1.2))
        fig.suptitle(title or "sparse training")

        total = [
            sum(series[n][i] * sizes.get(n, 1) for n in names) / max(sum(sizes.get(n, 1) for n in names), 1)
            for i in range(len(steps))
        ]
        if target is not None:
            ax_total.axhline(target, linestyle="--", color="tab:red", linewidth=1.5, label=f"target {target:g}")
        ax_total.step(steps, total, where="post", marker=".", label="density of the masked weights")
        ax_total.set(xlabel="optimizer step", ylabel="density", title="overall density")
        ax_total.set_ylim(0, min(1.02, max(max(total), target or 0) * 1.25 + 1e-3))
        ax_total.legend(fontsize="small")

        finite = [v for values in series.values() for v in values if v > 0 and math.isfinite(v)]
        spread = max(finite) / min(finite) if finite else 1.0
        if len(names) <= max_lines:
            for name in names:
                ax_layers.step(steps, series[name], where="post", label=name)
            if spread > 10:
                ax_layers.set_yscale("log")
                plain = FuncFormatter(lambda value, _: f"{value:g}")
                ax_layers.yaxis.set_major_formatter(plain)
                ax_layers.yaxis.set_minor_formatter(plain)
            ax_layers.set(xlabel="optimizer step", ylabel="density", title="density per layer")
            ax_layers.legend(fontsize="x-small")
        else:
            grid = [[max(v, 1e-4) if math.isfinite(v) else math.nan for v in series[n]] for n in names]
            image = ax_layers.imshow(
                grid, aspect="auto", interpolation="nearest", cmap="viridis",
                norm=LogNorm(vmin=max(min(finite, default=1e-4), 1e-4), vmax=max(finite, default=1.0)),
            )  # fmt: skip
            every = max(1, len(names) // 25)
            ax_layers.set_yticks(range(0, len(names), every), names[::every], fontsize="xx-small")
            ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
            ax_layers.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize="x-small")
            ax_layers.set(xlabel="optimizer step (recorded moments)", title=f"density per layer ({len(names)} layers)")
            fig.colorbar(image, ax=ax_layers, label="density")

        final = self.history[-1][1]
        emptied = sorted(
            (n for n in names if final[n].empty_in > 0 or final[n].empty_out > 0),
            key=lambda n: -(final[n].empty_in + final[n].empty_out),
        )[:20]
        if emptied:
            x = range(len(emptied))
            ax_empty.barh([i - 0.2 for i in x], [final[n].empty_in for n in emptied], height=0.4, label="empty in")
            ax_empty.barh([i + 0.2 for i in x], [final[n].empty_out for n in emptied], height=0.4, label="empty out")
            ax_empty.set_yticks(list(x), emptied, fontsize="x-small")
            ax_empty.set_ylim(max(len(emptied), 6) - 0.5, -0.5)  # top to bottom; no giant bars for one layer
            ax_empty.set(xlabel="fraction of channels", xlim=(0, 1.02))
            ax_empty.legend(fontsize="small")
            shown = f"{len(emptied)} of {len(names)} layers" if len(emptied) < len(names) else "every layer"
            ax_empty.set_title(f"empty channels at step {steps[-1]} ({shown})")
        else:
            ax_empty.axis("off")
            ax_empty.text(0.5, 0.5, f"no empty input or output channels\nin {len(names)} masked layers at step"
                          f" {steps[-1]}", ha="center", va="center", transform=ax_empty.transAxes)  # fmt: skip
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        return fig


def send_figure(loggers: Iterable[Any], figure: Any, path: str, step: int, key: str = "sparse/summary") -> list[str]:
    """Send ``figure`` (also written at ``path``) to every logger that takes images: TensorBoard
    (``add_figure``), Weights & Biases (``log_image``), MLflow (``log_figure``), Comet (``log_figure``).
    Returns the names of the loggers that took it."""
    sent = []
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        kind = type(logger).__name__
        if hasattr(experiment, "add_figure"):  # TensorBoard
            experiment.add_figure(key, figure, global_step=step)
        elif hasattr(logger, "log_image"):  # Weights & Biases
            logger.log_image(key=key, images=[path], step=step)
        elif kind.startswith("MLFlow") and hasattr(experiment, "log_figure"):
            experiment.log_figure(logger.run_id, figure, f"{key.replace('/', '_')}_{step}.png")
        elif hasattr(experiment, "log_figure"):  # Comet
            experiment.log_figure(figure_name=key, figure=figure, step=step)
        else:
            continue
        sent.append(kind)
    return sent


class Stopwatch:
    """Adds up the time spent in blocks: wall time on the CPU, CUDA events (no synchronization) on a GPU.

    Example:
        >>> watch = Stopwatch()
        >>> with watch(torch.device("cpu")):
        ...     _ = sum(range(1000))
        >>> watch.total() > 0
        True
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        """Time the block, for work on ``device`` (CUDA: between two events recorded on its current stream)."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - began

    def total(self) -> float:
        """Seconds so far (waits for the recorded GPU events)."""
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._seconds


class TrainFlops:
    """Training FLOPs so far of the sparse network and of the dense one, as the RigL paper counts them.

    Every optimizer step costs :attr:`step_flops` (``(sparse, dense)`` from
    :func:`~lightning_sparse.cost.speedup.training_step_flops` at the densities of the last
    :meth:`set_step_flops`); :meth:`advance` adds the steps taken since its last call; an update step that
    computed dense weight gradients (RigL's growth) adds their extra cost with :meth:`add_dense_weight_gradients`.

    Example:
        >>> flops = TrainFlops()
        >>> flops.set_step_flops({"a": 100.0, "b": 50.0}, {"a": 0.5, "b": 1.0}, dense_weight_gradients=False)
        (300.0, 450.0)
        >>> flops.advance(10)  # steps 0 .. 9 at these densities
        >>> flops.ratio
        0.6666666666666666
        >>> flops.state_dict()
        {'sparse': 3000.0, 'dense': 4500.0, 'step': 10}
    """

    def __init__(self) -> None:
        self.sparse = 0.0
        """Training FLOPs of the sparse network so far."""
        self.dense = 0.0
        """Training FLOPs of the dense network over the same steps."""
        self.step = 0
        """The step up to which FLOPs are counted (the ``step`` of the last :meth:`advance`)."""
        self.step_flops: tuple[float, float] = (0.0, 0.0)
        """``(sparse, dense)`` FLOPs of one training step at the current densities."""

    def set_step_flops(
        self, flops: Mapping[str, float] | None, densities: Mapping[str, float], dense_weight_gradients: bool
    ) -> tuple[float, float]:
        """Set the FLOPs of one training step from now on, and return them.

        Args:
            flops: forward FLOPs per layer (:attr:`CostModel.flops`); ``None`` (no cost model): steps cost 0.
            densities: density of each layer; layers of ``flops`` missing here count as dense (1.0).
            dense_weight_gradients: the weight gradients are computed dense (sparse momentum, DST).
        """
        if flops is None:
            self.step_flops = (0.0, 0.0)
        else:
            full = {n: densities.get(n, 1.0) for n in flops}
            self.step_flops = training_step_flops(flops, full, dense_weight_gradients)
        return self.step_flops

    def advance(self, step: int) -> None:
        """Count the steps from the last ``advance`` up to ``step`` at the current :attr:`step_flops`.

        A ``step`` at or before the last one counts nothing, and only moves the position back to it."""
        steps = step - self.step
        if steps > 0:
            self.sparse += steps * self.step_flops[0]
            self.dense += steps * self.step_flops[1]
        self.step = step

    def add_dense_weight_gradients(self) -> None:
        """Count the extra cost of one step whose weight gradients were dense, at the current
        :attr:`step_flops`: ``(dense - sparse) / 3`` (RigL's gradient-based growth at an update step). Call it
        before :meth:`set_step_flops` gives the new masks' costs."""
        sparse, dense = self.step_flops
        self.sparse += (dense - sparse) / 3.0

    @property
    def ratio(self) -> float | None:
        """Sparse over dense training FLOPs so far; ``None`` while nothing is counted."""
        return self.sparse / self.dense if self.dense > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """``{"sparse": float, "dense": float, "step": int}``: plain numbers, for a checkpoint."""
        return {"sparse": float(self.sparse), "dense": float(self.dense), "step": int(self.step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (:attr:`step_flops` is not part of it: set it again)."""
        self.sparse = float(state["sparse"])
        self.dense = float(state["dense"])
        self.step = int(state["step"])
