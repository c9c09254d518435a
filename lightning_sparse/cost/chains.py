"""How the layers feed each other: :func:`chain_links` traces a model with ``torch.fx`` and finds, for each layer,
the single layer feeding it through channel-preserving ops (:class:`ChainLink`), so that an output channel emptied
in one layer idles the input channel(s) it feeds in the next (see
:func:`~lightning_sparse.cost.channels.channel_stats`).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    >>> chain_links(model, torch.randn(1, 3, 8, 8), ["0.weight", "4.weight"])
    {'4.weight': ChainLink(source='0.weight', repeat=9)}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from lightning_sparse.core.layers import DEFAULT_LAYER_TYPES
from lightning_sparse.cost.costed import as_args, eval_mode, resolve

__all__ = ["ChainLink", "chain_links"]


@dataclass(frozen=True)
class ChainLink:
    """The single masked layer feeding a layer through channel-preserving ops (see :func:`chain_links`).

    Attributes:
        source: name of the feeding layer.
        repeat: number of consecutive inputs of the fed layer per output channel of ``source``: 1, or
            ``H * W`` (the spatial size) when a conv's output is flattened into a linear layer.
    """

    source: str
    repeat: int = 1


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
    resolved = resolve(model, names)
    layer_of: dict[str, str] = {}  # module name -> first layer name naming it
    for name, module_name in resolved.items():
        if isinstance(model.get_submodule(module_name), DEFAULT_LAYER_TYPES):
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
        with eval_mode(model), torch.no_grad():
            ShapeProp(graph_module).propagate(*as_args(example_input))
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
