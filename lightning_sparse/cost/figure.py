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
) -> Any:
    """Write a PNG of a run's recorded statistics (``history``: ``(step, stats)`` pairs; ``shapes``:
    layer shapes) and return the matplotlib figure (closed; loggers can still draw it).

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

    if not history:
        raise ValueError("nothing to plot: no statistics were recorded")
    steps = [step for step, _ in history]
    names = [n for n in history[-1][1] if masked is None or n in masked]
    sizes = dict(sizes or {n: math.prod(shapes.get(n, (1,))) for n in names})
    series = {n: [stats[n].density if n in stats else math.nan for _, stats in history] for n in names}
    fig, (ax_total, ax_layers, ax_empty) = plt.subplots(1, 3, figsize=(17, 5), width_ratios=(1, 1.3, 1.2))
    fig.suptitle(title or "sparse training")
    _overall_density(ax_total, steps, series, sizes, target)
    _layer_densities(fig, ax_layers, steps, series, max_lines)
    _empty_channels(ax_empty, steps[-1], history[-1][1], names)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return fig


def _overall_density(
    ax: Any, steps: list[int], series: dict[str, list[float]], sizes: Mapping[str, int], target: float | None
) -> None:
    """Panel 1: the density of all the masked weights (weighted by ``sizes``) as steps, and the target."""
    names = list(series)
    total = [
        sum(series[n][i] * sizes.get(n, 1) for n in names) / max(sum(sizes.get(n, 1) for n in names), 1)
        for i in range(len(steps))
    ]
    if target is not None:
        ax.axhline(target, linestyle="--", color="tab:red", linewidth=1.5, label=f"target {target:g}")
    ax.step(steps, total, where="post", marker=".", label="density of the masked weights")
    ax.set(xlabel="optimizer step", ylabel="density", title="overall density")
    ax.set_ylim(0, min(1.02, max(max(total), target or 0) * 1.25 + 1e-3))
    ax.legend(fontsize="small")


def _layer_densities(fig: Any, ax: Any, steps: list[int], series: dict[str, list[float]], max_lines: int) -> None:
    """Panel 2: one step line per layer (a log scale when they differ by more than 10x), a heat map beyond
    ``max_lines`` layers."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter

    names = list(series)
    finite = [v for values in series.values() for v in values if v > 0 and math.isfinite(v)]
    spread = max(finite) / min(finite) if finite else 1.0
    if len(names) <= max_lines:
        for name in names:
            ax.step(steps, series[name], where="post", label=name)
        if spread > 10:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set(xlabel="optimizer step", ylabel="density", title="density per layer")
        ax.legend(fontsize="x-small")
        return
    grid = [[max(v, 1e-4) if math.isfinite(v) else math.nan for v in series[n]] for n in names]
    image = ax.imshow(
        grid, aspect="auto", interpolation="nearest", cmap="viridis",
        norm=LogNorm(vmin=max(min(finite, default=1e-4), 1e-4), vmax=max(finite, default=1.0)),
    )  # fmt: skip
    every = max(1, len(names) // 25)
    ax.set_yticks(range(0, len(names), every), names[::every], fontsize="xx-small")
    ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize="x-small")
    ax.set(xlabel="optimizer step (recorded moments)", title=f"density per layer ({len(names)} layers)")
    fig.colorbar(image, ax=ax, label="density")


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
