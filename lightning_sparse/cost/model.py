"""What each costed layer of a model costs for one batch, and how the layers feed each other: :class:`CostModel`
puts FLOPs (:mod:`~lightning_sparse.cost.flops`), times (:mod:`~lightning_sparse.cost.timing`), chain links
(:mod:`~lightning_sparse.cost.chains`) and conv groups of every layer together. No Lightning here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    >>> cost = CostModel.build(model, "net", torch.randn(1, 10))
    >>> cost.flops  # forward FLOPs of the batch: 2 * in * out per linear
    {'net.0.weight': 400, 'net.2.weight': 200}
    >>> cost.links
    {'net.2.weight': ChainLink(source='net.0.weight', repeat=1)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_sparse.cost.calls import layer_calls
from lightning_sparse.cost.chains import ChainLink, chain_links
from lightning_sparse.cost.costed import attention_module, costed_weights, resolve
from lightning_sparse.cost.flops import LayerCall, flops_from_calls, layer_flops
from lightning_sparse.cost.timing import attention_times, layer_times

__all__ = ["TIMINGS", "CostModel", "conv_groups"]

TIMINGS = ("flops", "measure")
"""The costs a speedup estimate can weigh layers by: forward FLOPs, or measured forward+backward time."""


@dataclass
class CostModel:
    """The cost of every linear/conv layer (and ``Conv1D``, and ``nn.MultiheadAttention`` projection) of a model
    for one batch, keyed by parameter name.

    Attributes:
        flops: forward FLOPs per layer (``torch.utils.flop_counter``'s formulas), for the captured input shapes.
        times: measured forward+backward seconds per layer, or ``None`` when only FLOPs were counted.
        links: plain-chain links (see :func:`~lightning_sparse.cost.chains.chain_links`); empty when built from
            shapes (:meth:`from_calls`).
        groups: ``groups`` of each conv (1 for linear layers).
    """

    flops: dict[str, int]
    times: dict[str, float] | None
    links: dict[str, ChainLink]
    groups: dict[str, int]

    @classmethod
    def build(cls, root: nn.Module, prefix: str, example_input: Any, measure_time: bool = False) -> CostModel:
        """Count the layers under ``root`` (named ``prefix`` in the full model) on ``example_input``.

        Runs ``root`` under ``FlopCounterMode`` (:func:`~lightning_sparse.cost.flops.layer_flops`), times each
        layer when ``measure_time`` (:func:`~lightning_sparse.cost.timing.layer_times`) and traces ``root`` with
        ``torch.fx`` (:func:`~lightning_sparse.cost.chains.chain_links`): ``root`` must be an ordinary module
        whose layers can be called on their own (not FSDP2 shards: see :meth:`from_calls`).

        The projections of an ``nn.MultiheadAttention`` (and its ``out_proj``) get their FLOPs from the shapes of
        the module's calls (:func:`~lightning_sparse.cost.calls.layer_calls`,
        :func:`~lightning_sparse.cost.flops.call_flops`); their times are the module's measured time split in
        proportion to the FLOPs of its projections and of its attention core (not counted).
        """
        local = list(costed_weights(root))
        full = {name: f"{prefix}.{name}" if prefix else name for name in local}
        by_attention = {n: m for n in local if (m := attention_module(root, n)) is not None}
        plain = [n for n in local if n not in by_attention]
        flops = layer_flops(root, example_input, plain)
        if by_attention:
            flops.update(flops_from_calls(root, layer_calls(root, example_input, list(by_attention))))
        flops = {n: flops[n] for n in local}
        times = None
        if measure_time:
            times = layer_times(root, example_input, plain)
            times.update(attention_times(root, example_input, by_attention))
            times = {n: times[n] for n in local}
        links = chain_links(root, example_input, plain)
        groups = conv_groups(root, local)
        return cls(
            flops={full[n]: v for n, v in flops.items()},
            times=None if times is None else {full[n]: v for n, v in times.items()},
            links={full[n]: ChainLink(full[link.source], link.repeat) for n, link in links.items()},
            groups={full[n]: v for n, v in groups.items()},
        )

    @classmethod
    def from_calls(cls, root: nn.Module, prefix: str, calls: Mapping[str, Sequence[LayerCall]]) -> CostModel:
        """The FLOPs of the layers under ``root`` (named ``prefix`` in the full model) from recorded shapes.

        Args:
            root: the module holding the layers; nothing is run. Its layers' weights may be DTensor shards
                (FSDP2): only ``weight.shape``, the global shape, is read.
            prefix: the name of ``root`` in the full model, prepended to the layer names.
            calls: the calls of each layer in one forward pass of ``root``
                (:func:`~lightning_sparse.cost.calls.layer_calls`,
                :class:`~lightning_sparse.cost.capture.InputCapture`), keyed by its name under ``root``
                (``"0.weight"``); a layer of ``root`` missing here was not called (0 FLOPs).

        Returns:
            A cost model with the same FLOPs as :meth:`build` on that pass, no times, and no links: chain
            idling (an empty output channel idling the next layer's input channel) is not counted.
        """
        local = list(costed_weights(root))
        unknown = [n for n in calls if n not in local]
        if unknown:
            raise ValueError(
                f"`calls` names {unknown}, which are not linear/conv layers (or Conv1D, attention projections) of"
                f" root: {local}"
            )
        full = {name: f"{prefix}.{name}" if prefix else name for name in local}
        flops = flops_from_calls(root, {name: calls.get(name, ()) for name in local})
        return cls(
            flops={full[n]: v for n, v in flops.items()},
            times=None,
            links={},
            groups={full[n]: v for n, v in conv_groups(root, local).items()},
        )

    @property
    def costs(self) -> dict[str, float]:
        """Measured times when available, else FLOPs."""
        return dict(self.times) if self.times is not None else {n: float(f) for n, f in self.flops.items()}


def conv_groups(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """``groups`` of each named layer (1 for linear layers), for
    :func:`~lightning_sparse.cost.channels.channel_stats`."""
    resolved = resolve(model, names)
    return {name: int(getattr(model.get_submodule(m), "groups", 1)) for name, m in resolved.items()}

