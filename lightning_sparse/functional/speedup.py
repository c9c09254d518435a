"""How much faster a sparse network could run: the speedup estimates of the sparse momentum paper (section 4.1).

Pure torch, no Lightning. Two estimates, both of the form ``Σ c_l / Σ c_l · (fraction of layer l left)``, where
``c_l`` is the cost of masked layer ``l`` (its forward FLOPs from :func:`layer_flops` or its measured
forward+backward time from :func:`layer_times`):

* **dense convolution** (:func:`speedup_dense_conv`): an input channel whose weights are all zero (over every
  output channel and the kernel) and an output channel whose weights are all zero can be dropped from a dense
  kernel, so layer ``l`` keeps ``(1 - empty_in_l) · (1 - empty_out_l)`` of its work;
* **sparse convolution** (:func:`speedup_sparse_conv`): a sparse kernel does work in proportion to the
  layer's density ``d_l``.

:func:`channel_stats` reads ``empty_in``, ``empty_out`` and the density of every layer from its mask (or
weight) in one host synchronization. With the links of :func:`chain_links`, an output channel emptied in one
layer also idles the input channel(s) it feeds in the next layer of a plain chain (see :func:`chain_links`
for exactly what is and is not counted).

Conventions: layers are keyed by name, as the masks are: parameter names such as ``"features.0.weight"``
(module names such as ``"features.0"`` are accepted too); costs, fractions and densities are dicts keyed by
those names. Weights are laid out ``[out, in, *kernel]`` (``nn.Linear``, ``nn.Conv1d/2d/3d``; transposed
convolutions, whose weights are ``[in, out, *kernel]``, are not supported).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    >>> names = ["0.weight", "2.weight"]
    >>> x = torch.randn(1, 10)
    >>> costs = layer_flops(model, x, names)  # forward FLOPs of batch x: 2 * in * out per linear
    >>> costs
    {'0.weight': 400, '2.weight': 200}
    >>> links = chain_links(model, x, names)
    >>> links
    {'2.weight': ChainLink(source='0.weight', repeat=1)}
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
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ChainLink",
    "LayerChannelStats",
    "chain_links",
    "channel_stats",
    "conv_groups",
    "layer_flops",
    "layer_times",
    "speedup_dense_conv",
    "speedup_sparse_conv",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose weights ``[out, in, *kernel]`` the channel statistics and chain links understand."""


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
    """The single masked layer feeding a layer through channel-preserving ops (see :func:`chain_links`).

    Attributes:
        source: name of the feeding layer, as passed to :func:`chain_links`.
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
) -> dict[str, LayerChannelStats]:
    """Empty input/output channels and density of every layer, from its mask.

    Args:
        names: layer names, aligned with ``masks``.
        masks: one mask per layer, shaped like the weight ``[out, in, *kernel]`` (at least 2-D); ``torch.bool``
            masks, or weights (a non-zero entry is active). Each stays on its device.
        links: chain links from :func:`chain_links`, keyed by the fed layer: the input channels of a linked
            layer fed by an empty output channel of its source count as empty too. ``None``: no links.
        groups: number of groups of the grouped convolutions (:func:`conv_groups`); missing layers have 1.
            With ``groups=g`` the weight is ``[out, in / g, *kernel]`` and real input channel ``i`` of group
            ``k`` is empty when its weights in that group's output channels are all zero, so ``empty_in`` is
            a fraction of the ``in`` real input channels. Without it, the input index of a grouped conv's
            weight is read as one channel (empty in every group at once).

    Returns:
        :class:`LayerChannelStats` per name, in the order of ``names``. The counts are computed on each
        mask's device and read back to the host once, for all layers together.

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
    known = set(names)
    for what, keys in (("links", list(links)), ("groups", list(groups))):
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"`{what}` names layers that are not in `names`: {unknown}; the layers are {names}")
    bad_sources = {k: link.source for k, link in links.items() if link.source not in known}
    if bad_sources:
        raise ValueError(f"`links` sources that are not in `names`: {bad_sources}; the layers are {names}")
    if not names:
        return {}

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


def conv_groups(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """``groups`` of each named layer (1 for linear layers), for :func:`channel_stats`."""
    resolved = _resolve(model, names)
    return {name: int(getattr(model.get_submodule(m), "groups", 1)) for name, m in resolved.items()}


# ----------------------------------------------------------------------------- speedup estimates


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


# ----------------------------------------------------------------------------- layer costs


def layer_flops(model: nn.Module, example_input: Any, names: Sequence[str], backward: bool = False) -> dict[str, int]:
    """FLOPs of each named layer for one pass on ``example_input``, counted by ``FlopCounterMode``.

    Args:
        model: the model; run once in eval mode (so batch norm statistics are not updated) and restored.
        example_input: a tensor, or a tuple/list of positional arguments of ``model``.
        names: layer names: parameter names (``"net.0.weight"``) or module names (``"net.0"``).
        backward: also count the backward pass (gradients of every parameter that requires grad, computed
            with ``torch.autograd.grad``, so no ``.grad`` is touched). By default, the forward pass only.

    Returns:
        FLOPs per name, in the order of ``names``: the sum over every call of the module during the pass (0 if
        it is not called). PyTorch's formulas: ``2 · batch · out · in`` for a linear layer and
        ``2 · batch · out · (in / groups) · prod(kernel) · prod(output spatial)`` for a convolution; biases are
        not counted. In the backward pass, a layer whose input needs no gradient (the first layer) only computes
        its weight gradient (1x its forward FLOPs), the others also their input gradient (2x).
    """
    resolved = _resolve(model, names)
    args = _as_args(example_input)
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), counter:
        if backward:
            with torch.enable_grad():
                _gradients(model(*args), [p for p in model.parameters() if p.requires_grad])
        else:
            with torch.no_grad():
                model(*args)
    counts = counter.get_flop_counts()
    # FlopCounterMode names a module "<class of the root>.<path>" (the root alone: its class name); a module
    # reachable under several paths is counted under one of them.
    root = type(model).__name__
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    flops = {}
    for name, module_name in resolved.items():
        module = model.get_submodule(module_name)
        keys = {f"{root}.{p}" if p else root for p in paths[id(module)]}
        flops[name] = int(sum(sum(counts.get(key, {}).values()) for key in keys))
    return flops


def layer_times(
    model: nn.Module, example_input: Any, names: Sequence[str], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Measured forward+backward time of each named layer, in isolation, in seconds.

    One forward pass of ``model`` on ``example_input`` (in eval mode, restored afterwards) captures the real
    inputs of each named module (forward pre-hooks). Each module is then run on copies of its inputs, forward
    and backward (gradients of its parameters, and of its inputs where they required a gradient in the real
    pass, through ``torch.autograd.grad``: no ``.grad`` is written), ``warmup`` times untimed, then ``repeats``
    times timed with ``time.perf_counter`` (synchronizing accelerators). A module called several times in the
    pass is timed over all its calls. Times of tiny layers on a busy CPU are dominated by the intra-op thread
    pool's scheduling; prefer :func:`layer_flops` there.

    Args:
        model: the model.
        example_input: a tensor, or a tuple/list of positional arguments of ``model``.
        names: layer names: parameter names (``"net.0.weight"``) or module names (``"net.0"``).
        repeats: number of timed runs, at least 1; the median is returned.
        warmup: number of untimed runs before, at least 0.

    Returns:
        median seconds per name, in the order of ``names``; 0.0 for a module the forward pass never calls.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`warmup` must be an integer >= 0, got {warmup!r}")
    resolved = _resolve(model, names)
    args = _as_args(example_input)
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {name: [] for name in resolved}

    def capture(name: str):
        def hook(module: nn.Module, hook_args: tuple[Any, ...], hook_kwargs: dict[str, Any]) -> None:
            calls[name].append(_detached_copy((hook_args, hook_kwargs)))

        return hook

    handles = [
        model.get_submodule(m).register_forward_pre_hook(capture(name), with_kwargs=True)
        for name, m in resolved.items()
    ]
    try:
        with _eval_mode(model), torch.enable_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    with _eval_mode(model):
        return {
            name: _time_calls(model.get_submodule(m), calls[name], repeats, warmup) for name, m in resolved.items()
        }


def _time_calls(
    module: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], repeats: int, warmup: int
) -> float:
    if not calls:
        return 0.0
    params = [p for p in module.parameters() if p.requires_grad]
    device = next((t.device for t in _tensors((params, calls))), torch.device("cpu"))
    prepared = []
    with torch.enable_grad():
        for call_args, call_kwargs in calls:
            inputs = params + [t for t in _tensors((call_args, call_kwargs)) if t.requires_grad]
            outputs = [t for t in _tensors(module(*call_args, **call_kwargs)) if t.requires_grad]
            prepared.append((call_args, call_kwargs, inputs, [torch.ones_like(t) for t in outputs]))

    def run() -> None:
        with torch.enable_grad():
            for call_args, call_kwargs, inputs, grad_outputs in prepared:
                out = module(*call_args, **call_kwargs)
                if inputs and grad_outputs:
                    outputs = [t for t in _tensors(out) if t.requires_grad]
                    torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)

    for _ in range(warmup):
        run()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- chain links

_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten,
)  # fmt: skip
_CHANNEL_FUNCTIONS: frozenset[Any] = frozenset(
    [torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.flatten, torch.reshape]
    + [
        getattr(F, name)
        for name in (
            "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu", "silu",
            "mish", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid",
            "tanhshrink", "sigmoid", "tanh",
            "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
            "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        )
        if hasattr(F, name)
    ]
)  # fmt: skip
_CHANNEL_METHODS = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "flatten", "view", "reshape"}
)
_FLATTEN_FUNCTIONS = frozenset({torch.flatten, torch.reshape})
_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})


def chain_links(model: nn.Module, example_input: Any, names: Sequence[str]) -> dict[str, ChainLink]:
    """For each named layer fed by a single named layer through channel-preserving ops, that feeding layer.

    The model is traced with ``torch.fx.symbolic_trace`` and run once on ``example_input`` (in eval mode,
    without gradients, restored afterwards) to know every tensor's shape. From the input of each call of a
    named ``nn.Linear`` / ``nn.Conv1d/2d/3d``, the graph is walked back through single-input ops to a named
    layer of those types. The link is made when every op on the way is one of

    * batch norm, an element-wise activation (ReLU, GELU, sigmoid, ...), dropout, identity, pooling
      (max/avg/adaptive, which keep the channels), as modules, functions or tensor methods;
    * a flatten (``nn.Flatten``, ``torch.flatten``, ``.view``/``.reshape``) of a conv's ``[N, C, *spatial]``
      output into ``[N, C · prod(spatial)]`` features for a linear layer: channel ``c`` feeds the
      ``prod(spatial)`` consecutive features from ``c · prod(spatial)`` on (``repeat = prod(spatial)``);

    and the shapes agree: the channel dimension is kept, conv outputs are batched, and a linear layer's
    features are a 2-D ``[N, F]``. Other users of the intermediate tensors do not matter (a branch that
    also feeds another layer still leaves the link valid).

    What is counted: plain chains, e.g. ``nn.Sequential`` LeNet/VGG models: conv -> BN -> ReLU -> pool -> conv,
    conv -> flatten -> linear, linear -> ReLU -> dropout -> linear.

    What is not counted (no link, which underestimates the speedup): inputs that come from a merge (residual
    additions, concatenations, any op with a second tensor input), from unnamed or unsupported layers (dense
    layers, functional ``F.conv2d``, layers inside traced-as-leaf ``torch.nn`` modules), through ops outside the
    list above (layer/group norm, softmax, attention, permutes), a layer whose calls have different feeders,
    and the reverse direction (an output channel that the next layer ignores). An empty output channel still
    emits a constant (its bias, shifted by batch norm); counting its consumer's input channel as idle assumes
    that constant is folded into the consumer's bias (exact without padding, approximate at zero-padded borders).

    Args:
        model: the model.
        example_input: a tensor, or a tuple/list of positional arguments of ``model``.
        names: layer names: parameter names (``"net.0.weight"``) or module names (``"net.0"``).

    Returns:
        ``{fed layer name: ChainLink(source name, repeat)}``, in the order of ``names``. When the model cannot
        be traced (e.g. data-dependent control flow) or run by the tracer, a warning is issued and ``{}`` is
        returned: no links.
    """
    resolved = _resolve(model, names)
    layer_of: dict[str, str] = {}  # module name -> first layer name naming it
    for name, module_name in resolved.items():
        if isinstance(model.get_submodule(module_name), LAYER_TYPES):
            layer_of.setdefault(module_name, name)
    if not layer_of:
        return {}
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "no links"
        warnings.warn(
            f"chain_links: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc});"
            " no chain links are counted",
            stacklevel=2,
        )
        return {}
    try:
        with _eval_mode(model), torch.no_grad():
            ShapeProp(graph_module).propagate(*_as_args(example_input))
    except Exception as exc:  # noqa: BLE001
        warnings.warn(
            f"chain_links: the traced {type(model).__name__} fails on the example input"
            f" ({type(exc).__name__}: {exc}); no chain links are counted",
            stacklevel=2,
        )
        return {}

    found: dict[str, list[ChainLink | None]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in layer_of:
            found.setdefault(layer_of[node.target], []).append(_link(node, graph_module, layer_of))
    links = {}
    for name in resolved:
        candidates = found.get(name, [])
        if candidates and candidates[0] is not None and all(c == candidates[0] for c in candidates):
            links[name] = candidates[0]
    return links


def _link(node: fx.Node, graph_module: fx.GraphModule, layer_of: Mapping[str, str]) -> ChainLink | None:
    """The link feeding one call of a layer, or ``None``."""
    path = []  # channel-preserving nodes, from the fed layer back to the source
    current = node.args[0] if node.args else None
    while True:
        if not isinstance(current, fx.Node):
            return None
        if current.op == "call_module" and current.target in layer_of:
            break
        if not _is_channel_op(current, graph_module):
            return None
        path.append(current)
        current = current.args[0]
    source = graph_module.get_submodule(current.target)
    shape = _shape(current)
    if shape is None:
        return None
    if isinstance(source, nn.Linear):
        features, n_source = True, source.out_features  # features on the last dim of a 2-D [N, F]
        if len(shape) != 2:
            return None
    else:
        features, n_source = False, source.out_channels  # channels on dim 1 of a batched [N, C, *spatial]
        if len(shape) != source.weight.dim():
            return None
    repeat = 1
    for op in reversed(path):
        before, after = _shape(op.args[0]), _shape(op)
        if before is None or after is None:
            return None
        if after == before:
            continue
        flatten = _is_flatten_op(op, graph_module)
        if features:
            return None
        if flatten and len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
            features, repeat = True, math.prod(before[2:])
        elif not flatten and len(after) == len(before) and after[:2] == before[:2]:
            continue  # pooling: same batch and channels
        else:
            return None
    fed = graph_module.get_submodule(node.target)
    shape_in = _shape(node.args[0])
    if shape_in is None:
        return None
    if isinstance(fed, nn.Linear):
        ok = features and len(shape_in) == 2 and shape_in[1] == fed.in_features == n_source * repeat
    else:
        ok = not features and len(shape_in) == fed.weight.dim() and shape_in[1] == fed.in_channels == n_source
    return ChainLink(layer_of[current.target], repeat) if ok else None


def _is_channel_op(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """A single-tensor-input op on the allowed list (its other arguments are not tensors)."""
    if node.op == "call_module":
        allowed = isinstance(graph_module.get_submodule(node.target), _CHANNEL_MODULES)
    elif node.op == "call_function":
        allowed = node.target in _CHANNEL_FUNCTIONS
    elif node.op == "call_method":
        allowed = node.target in _CHANNEL_METHODS
    else:
        allowed = False
    if not allowed or not node.args:
        return False
    others: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), others.append)
    return all("tensor_meta" not in other.meta for other in others)


def _is_flatten_op(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), nn.Flatten)
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCTIONS
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


# ----------------------------------------------------------------------------- helpers


def _resolve(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """``{name: module name}``: a module name stays, ``"<module>.weight"`` (or ``"weight"``) names its module."""
    if isinstance(names, str):
        raise ValueError(f"`names` must be a sequence of layer names, got the string {names!r}")
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if name in modules:
            resolved[name] = name
        elif name == "weight" or (name.endswith(".weight") and name[: -len(".weight")] in modules):
            resolved[name] = name[: -len(".weight")] if name != "weight" else ""
        else:
            layers = [f"{m}.weight" if m else "weight" for m, mod in modules.items() if isinstance(mod, LAYER_TYPES)]
            raise ValueError(
                f"{name!r} is neither a module name nor a '<module>.weight' parameter name of"
                f" {type(model).__name__}; its linear/conv layers are: {layers}"
            )
    return resolved


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, each one's own flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _detached_copy(obj: Any) -> Any:
    """Nested tuples/lists/dicts with every tensor replaced by a detached copy that keeps ``requires_grad``."""
    if isinstance(obj, Tensor):
        copy = obj.detach().clone()
        return copy.requires_grad_(obj.requires_grad and (copy.is_floating_point() or copy.is_complex()))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return type(obj)(*(_detached_copy(item) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached_copy(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _detached_copy(item) for key, item in obj.items()}
    return obj


def _gradients(output: Any, inputs: list[Tensor]) -> None:
    # Through a sum, not `grad_outputs`: FlopCounterMode attributes a module's backward to it when the gradient
    # of the module's output is *computed*, which it is not for a root given its gradient.
    outputs = [t for t in _tensors(output) if t.requires_grad]
    if outputs and inputs:
        torch.autograd.grad(sum(t.sum() for t in outputs), inputs, allow_unused=True)


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)
