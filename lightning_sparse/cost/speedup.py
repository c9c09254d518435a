"""How much faster a sparse network could run: the speedup estimates of the sparse momentum paper (section 4.1),
and the training FLOPs of one step as the RigL paper counts them. Pure arithmetic on per-layer numbers.

Two estimates, both of the form ``Σ c_l / Σ c_l · (fraction of layer l left)``, where ``c_l`` is the cost of
layer ``l`` (its forward FLOPs from :func:`~lightning_sparse.cost.flops.layer_flops` or its measured
forward+backward time from :func:`~lightning_sparse.cost.timing.layer_times`):

* **dense convolution** (:func:`speedup_dense_conv`): an input channel whose weights are all zero (over every
  output channel and the kernel) and an output channel whose weights are all zero can be dropped from a dense
  kernel, so layer ``l`` keeps ``(1 - empty_in_l) · (1 - empty_out_l)`` of its work;
* **sparse convolution** (:func:`speedup_sparse_conv`): a sparse kernel does work in proportion to the
  layer's density ``d_l``.

The fractions come from :func:`~lightning_sparse.cost.channels.channel_stats`. Layers are keyed by name, as the
masks are (parameter names such as ``"features.0.weight"``).

Example (two linear layers ``10 -> 20 -> 5``; half of the second layer's inputs idle):
    >>> costs = {"0.weight": 400, "2.weight": 200}  # forward FLOPs of one sample: 2 * in * out
    >>> speedup_dense_conv(costs, {"0.weight": 0.0, "2.weight": 0.5}, {"0.weight": 0.5, "2.weight": 0.0})
    2.0
    >>> speedup_sparse_conv(costs, {"0.weight": 0.5, "2.weight": 1.0})
    1.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["speedup_dense_conv", "speedup_sparse_conv", "training_step_flops"]


def speedup_dense_conv(
    costs: Mapping[str, float], empty_in: Mapping[str, float], empty_out: Mapping[str, float]
) -> float:
    """Dense-convolution speedup: ``Σ c_l / Σ c_l · (1 - empty_in_l) · (1 - empty_out_l)``.

    Args:
        costs: cost of every layer counted (FLOPs or seconds, non-negative), keyed by layer name. Only these
            layers are summed: put unmasked layers in with zero empty fractions to count them at full cost.
        empty_in: fraction of skippable input channels per layer (:attr:`~lightning_sparse.cost.channels.LayerChannelStats.empty_in`).
        empty_out: fraction of empty output channels per layer (:attr:`~lightning_sparse.cost.channels.LayerChannelStats.empty_out`).

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
