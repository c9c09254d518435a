"""The end-of-fit figure of a run (:func:`sparsity_figure`) and its dispatch to the loggers that take images
(:func:`send_figure`). matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sparse.cost.channels import LayerChannelStats

__all__ = ["send_figure", "sparsity_figure"]


def sparsity_figure(
    history: Sequence[tuple[int, Mapping[str, LayerChannelStats]]],
    shapes: Mapping[str, tuple[int, ...]],
    path: str | Path,
    *,
    title: str = "",
    masked: Collection[str] | None = None,
    target: float | None = None,
    sizes: Mapping[str, int] | None = None,
    max_lines: int = 12,
    updates: Sequence[tuple[int, float, float]] = (),
    explored: Sequence[tuple[int, float]] = (),
) -> Any:
    """Write a PNG of a run's recorded statistics (``history``: ``(step, stats)`` pairs, the last one of a step
    drawn; ``shapes``: layer shapes) and return the matplotlib figure (closed; loggers can still draw it).

    Three panels: (1) the mask updates: the prune rate each update was given and the fraction of the active
    weights it pruned (``updates``: ``(step, rate, fraction pruned)``), with the fraction of the positions ever
    active (``explored``: ``(step, R_s)``), or a note when there were none; (2) the
    mask density of every layer, with the overall density (weighted by ``sizes``) and the ``target``: step lines
    (a log scale with 1-2-5 ticks when densities differ by more than 10x) for up to ``max_lines`` layers, a heat
    map (layer x recorded step) beyond, on a log colour scale spanning at least a factor 10 around the target (or
    the values' geometric mean), so that densities equal up to rounding have one colour; (3) the final empty
    input/output channels of the layers that have any (the 20 with most when there are more), or a note saying
    there are none.

    Args:
        title: the figure's title (the callback names the network, method, density and masked layers).
        masked: the masked layers (others in the history, measured from their weights, are left out).
        target: the requested overall density.
        sizes: weights per layer (default: from the recorded shapes), to weight the overall density.
        updates: ``(step, prune rate, fraction of the active weights pruned)`` per mask update.
        explored: ``(step, R_s)``: ITOP's explored fraction of the masked positions (the last of a step drawn).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("nothing to plot: no statistics were recorded")
    last = {step: stats for step, stats in history}  # one column per step: the last record of it
    steps = sorted(last)
    names = [n for n in history[-1][1] if masked is None or n in masked]
    sizes = dict(sizes or {n: math.prod(shapes.get(n, (1,))) for n in names})
    series = {n: [last[s][n].density if n in last[s] else math.nan for s in steps] for n in names}
    fig, (ax_updates, ax_layers, ax_empty) = plt.subplots(1, 3, figsize=(17, 5), width_ratios=(1, 1.3, 1.2))
    fig.suptitle(title or "sparse training")
    _mask_updates(ax_updates, updates, explored)
    _layer_densities(fig, ax_layers, steps, series, sizes, target, max_lines)
    _empty_channels(ax_empty, steps[-1], last[steps[-1]], names)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return fig


def _mask_updates(ax: Any, updates: Sequence[tuple[int, float, float]], explored: Sequence[tuple[int, float]]) -> None:
    """Panel 1: per mask update, the prune rate given and the fraction of the active weights pruned, with the
    explored fraction of the positions (ITOP's ``R_s``) as a step line; a note when there was no update."""
    from matplotlib.ticker import MaxNLocator

    last = dict(explored)  # one value per step: the last recorded
    if not updates:
        ax.axis("off")
        said = f"\nexplored (R_s): {last[max(last)]:.4f}" if last else ""
        ax.text(0.5, 0.5, f"no mask updates\n(masks fixed, or learned at every step){said}", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
        return
    if last:
        steps = sorted(last)
        ax.step(steps, [last[s] for s in steps], where="post", color="tab:green", label="explored (R_s)")
    steps = [u[0] for u in updates]
    ax.plot(steps, [u[1] for u in updates], marker="o", linestyle="--", color="tab:gray", label="prune rate given")
    ax.plot(steps, [u[2] for u in updates], marker=".", linestyle="none", markersize=10, color="tab:red",
            label="fraction of active weights pruned")  # fmt: skip
    top = max(max(u[1] for u in updates), max(u[2] for u in updates), *last.values())
    ax.set_ylim(0, min(1.02, top * 1.2 + 1e-3))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="optimizer step", ylabel="fraction", title=f"mask updates ({len(updates)})")
    ax.legend(fontsize="small")


def _overall(series: Mapping[str, list[float]], sizes: Mapping[str, int], i: int) -> float:
    """The density of all the layers of ``series`` at column ``i``, weighted by ``sizes``."""
    known = [n for n in series if math.isfinite(series[n][i])]
    return sum(series[n][i] * sizes.get(n, 1) for n in known) / max(sum(sizes.get(n, 1) for n in known), 1)


def _log_ticks(axis: Any) -> None:
    """Readable ticks on a log axis: 1, 2, 5 times the powers of ten, written plainly (0.05, not 5e-2)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _layer_densities(fig: Any, ax: Any, steps: list[int], series: dict[str, list[float]], sizes: Mapping[str, int],
                     target: float | None, max_lines: int) -> None:  # fmt: skip
    """Panel 2: one step line per layer with the overall density and the target (a log scale when they differ by
    more than 10x), a heat map beyond ``max_lines`` layers."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    names = list(series)
    overall = [_overall(series, sizes, i) for i in range(len(steps))]
    finite = [v for values in series.values() for v in values if v > 0 and math.isfinite(v)]
    said = f"overall {overall[-1]:.4f}" + (f", target {target:g}" if target is not None else "")
    if len(names) <= max_lines:
        for name in names:
            ax.step(steps, series[name], where="post", label=name)
        ax.step(steps, overall, where="post", color="black", linewidth=2.5, alpha=0.6, label="all masked weights")
        if target is not None:
            ax.axhline(target, linestyle="--", color="tab:red", linewidth=1, label=f"target {target:g}")
        values = finite + [v for v in overall if v > 0] + ([target] if target else [])
        if values and max(values) / min(values) > 10:
            ax.set_yscale("log")
            _log_ticks(ax.yaxis)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="optimizer step", ylabel="mask density", title=f"mask density per layer ({said})")
        ax.legend(fontsize="x-small")
        return
    grid = [[max(v, 1e-4) if math.isfinite(v) else math.nan for v in series[n]] for n in names]
    center = target if target is not None else math.exp(sum(map(math.log, finite)) / len(finite)) if finite else 0.1
    low = min([center / 10**0.5, *finite])
    high = min(max([center * 10**0.5, *finite]), 1.0)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=LogNorm(vmin=max(low, 1e-4), vmax=max(high, low * 1.01)))  # fmt: skip
    every = max(1, len(names) // 25)
    ax.set_yticks(range(0, len(names), every), names[::every], fontsize="xx-small")
    ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / 8))))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize="x-small")
    ax.set(xlabel="optimizer step (recorded moments)", title=f"mask density, {len(names)} layers ({said})")
    bar = fig.colorbar(image, ax=ax, label="mask density")
    _log_ticks(bar.ax.yaxis)


def _empty_channels(ax: Any, step: int, final: Mapping[str, LayerChannelStats], names: list[str]) -> None:
    """Panel 3: the final empty input/output channels of the (up to 20) layers with most, or a note."""
    emptied = sorted(
        (n for n in names if final[n].empty_in > 0 or final[n].empty_out > 0),
        key=lambda n: -(final[n].empty_in + final[n].empty_out),
    )[:20]
    if not emptied:
        ax.axis("off")
        ax.text(0.5, 0.5, f"no empty input or output channels\nin {len(names)} masked layers at step {step}",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        return
    x = range(len(emptied))
    ax.barh([i - 0.2 for i in x], [final[n].empty_in for n in emptied], height=0.4, label="empty in")
    ax.barh([i + 0.2 for i in x], [final[n].empty_out for n in emptied], height=0.4, label="empty out")
    ax.set_yticks(list(x), emptied, fontsize="x-small")
    ax.set_ylim(max(len(emptied), 6) - 0.5, -0.5)  # top to bottom; no giant bars for one layer
    ax.set(xlabel="fraction of channels", xlim=(0, 1.02))
    ax.legend(fontsize="small")
    shown = f"{len(emptied)} of {len(names)} layers" if len(emptied) < len(names) else "every layer"
    ax.set_title(f"empty channels at step {step} ({shown})")


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
