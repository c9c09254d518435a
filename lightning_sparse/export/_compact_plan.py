"""Which channels :func:`~lightning_sparse.export.compact` removes: torch-pruning's dependency graph, read group
by group (a layer's outputs, the BatchNorm after it and every Conv/Linear reading them), and the bias folds of
constant channels. The rules are documented in ``compact``."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.layers import CONV_TYPES

log = logging.getLogger(__name__)

BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _LazyTorchPruning:
    def __getattr__(self, name: str) -> Any:
        return getattr(_torch_pruning(), name)


tp = _LazyTorchPruning()


def _torch_pruning() -> Any:
    """torch-pruning, which :func:`compact` uses to remove channels (the ``[export]`` extra)."""
    try:
        import torch_pruning
    except ImportError as error:  # pragma: no cover - installed by the [export] and [test] extras
        raise ImportError(
            "lightning_sparse.export.compact needs torch-pruning: pip install 'lightning-sparse[export]'"
        ) from error
    return torch_pruning


# Operations (autograd names without "Backward<n>") that act on every channel separately. A constant
# channel stays the same constant through these (MaxPool pads with -inf; the adaptive pools and a spatial
# mean do not pad):
_CONSTANT_KEEPING_OPS = frozenset(
    {
        "Relu", "Hardtanh", "LeakyRelu", "Elu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid",
        "Clone", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D",
        "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "Mean",
    }
)  # fmt: skip
# ... and through these it stays channel-wise but not necessarily constant (zero-padded average pool) or
# is the sum of several coupled channels (a residual addition):
_CHANNELWISE_OPS = _CONSTANT_KEEPING_OPS | {"Add", "AvgPool2D", "AvgPool3D"}


@dataclass
class Reader:
    """A Conv/Linear reading a group's channels: its input-channel indices and their group (root) indices."""

    module: nn.Module
    idxs: Tensor
    roots: Tensor


@dataclass
class Plan:
    """One prunable group: its root layer, size, readers, and the indices that may be constant channels."""

    root_module: nn.Module
    root_fn: Any
    size: int
    readers: list[Reader]
    constant_roots: list[int] = field(default_factory=list)


@dataclass
class Fold:
    root: int
    module: nn.Module
    contribution: Tensor


def trace(net: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[tp.DependencyGraph, set[Any], Counter]:
    """torch-pruning's dependency graph, the nodes that produce model outputs, and each module's call count."""
    calls: Counter = Counter()
    outputs: list[Any] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.update([mod])) for m in net.modules()]
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                net,
                example_inputs=inputs,
                forward_fn=lambda m, x: m(*x),
                output_transform=lambda out: outputs.append(out) or out,
                verbose=False,
            )
    finally:
        for h in hooks:
            h.remove()
    output_fns = {t.grad_fn for t in leaves(outputs)}
    output_nodes = {
        n for n in graph.module2node.values() if n.grad_fn in output_fns or isinstance(n.module, tp.ops._OutputOp)
    }
    return graph, output_nodes, calls


def _op_name(module: Any) -> str | None:
    """The autograd op of one of torch-pruning's placeholder nodes ("Relu", "Add", ...), else None."""
    if isinstance(module, tp.ops._ElementWiseOp):
        return re.sub(r"Backward\d*$", "", str(module._grad_fn))
    return None


def _unsupported(node: Any, calls: Counter) -> str | None:
    """Why a graph node makes its group unsafe to prune, or None if its channel mapping is exact."""
    module = node.module
    if isinstance(module, nn.Module) and calls[module] > 1:
        return f"{node.name} is called {calls[module]} times"
    if isinstance(module, CONV_TYPES):
        return None if module.groups == 1 else f"grouped convolution {node.name}"
    if isinstance(module, (nn.Linear, *BN_TYPES, tp.ops._ReshapeOp)):
        return None
    name = _op_name(module)
    if name is None:
        return f"unsupported layer {node.name}"
    if any(f is None for f, _ in node.grad_fn.next_functions):
        return f"{name} reads a tensor outside the graph (e.g. the model input)"
    if name == "T" and not node.inputs:
        return None  # the transpose of a Linear's own weight
    if name == "Mean" and _mean_reduces_channels(node.grad_fn):
        return "a mean over the channel or batch dimension"
    return None if name in _CHANNELWISE_OPS else f"unsupported operation {name}"


def _mean_reduces_channels(grad_fn: Any) -> bool:
    dims = getattr(grad_fn, "_saved_dim", None)  # MeanBackward0 (a mean of everything) saves none
    if dims is None:
        return True
    ndim = len(grad_fn._saved_self_sym_sizes)
    dims = [d - 2**64 if d >= 2**63 else d for d in (dims if isinstance(dims, tuple) else (dims,))]
    return not dims or any(d % ndim in (0, 1) for d in dims)


def _is_reader(item: Any) -> bool:
    return item.dep.handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def _is_producer(item: Any) -> bool:
    return item.dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def plan_group(group: Any, output_nodes: set[Any], calls: Counter) -> Plan | None:
    """The plan of one group, or None (logged) if the group must be kept whole."""
    root = group[0].dep.target
    for item in group.items:
        node = item.dep.target
        reaches_output = node in output_nodes and not _is_reader(item)  # a reader's outputs are not the group's
        reason = "it reaches the model output" if reaches_output else _unsupported(node, calls)
        if reason is not None:
            log.debug("compact: keeping the channels of %s: %s", root.name, reason)
            return None
    if not all(_covers_all_channels(item) for item in group.items):
        log.debug("compact: keeping the channels of %s: channel counts differ (a broadcast?)", root.name)
        return None
    readers = [
        Reader(it.dep.target.module, torch.tensor(it.idxs, dtype=torch.long), torch.tensor(it.root_idxs))
        for it in group.items
        if _is_reader(it)
    ]
    plan = Plan(root.module, group[0].dep.handler, len(group[0].idxs), readers)
    plan.constant_roots = _zero_filter_roots(group)
    return plan


def _covers_all_channels(item: Any) -> bool:
    """Whether a layer's item in a full group indexes each of its channels once (not so under a broadcast)."""
    module = item.dep.target.module
    if _is_reader(item):
        count = module.in_channels if isinstance(module, CONV_TYPES) else module.in_features
    elif _is_producer(item):
        count = module.out_channels if isinstance(module, CONV_TYPES) else module.out_features
    elif isinstance(module, BN_TYPES):
        count = module.num_features
    else:
        return True
    return sorted(item.idxs) == list(range(count))


def _zero_filter_roots(group: Any) -> list[int]:
    """Indices whose value the readers see is input-independent: one producer, zero filter, constant path."""
    producers = [it for it in group.items if _is_producer(it)]
    between = [it.dep.target.module for it in group.items if not _is_reader(it) and not _is_producer(it)]
    if len(producers) != 1 or not all(
        isinstance(m, (*BN_TYPES, tp.ops._ReshapeOp)) or _op_name(m) in _CONSTANT_KEEPING_OPS | {"T"}
        for m in between
    ):
        return []
    (item,) = producers
    live = item.dep.target.module.weight.detach().flatten(1).ne(0).any(1)
    return [int(r) for i, r in zip(item.idxs, item.root_idxs) if not live[i]]


def record_inputs(net: nn.Module, inputs: tuple[Tensor, ...], modules: set[nn.Module]) -> dict[nn.Module, Tensor]:
    """The input each of ``modules`` receives in one forward pass on ``inputs``."""
    if not modules:
        return {}
    seen: dict[nn.Module, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args[0].detach())) for m in modules]
    try:
        with torch.no_grad():
            net(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def removable(plan: Plan, read_values: Mapping[nn.Module, Tensor]) -> tuple[set[int], list[Fold]]:
    """The group indices to remove (rules 1 and 2 of :func:`compact`) and the bias folds they need."""
    if not plan.readers:
        return set(), []
    read = torch.zeros(plan.size, dtype=torch.bool)
    for reader in plan.readers:
        used = _live_inputs(reader.module)[reader.idxs].cpu()
        read |= torch.zeros(plan.size).index_add_(0, reader.roots, used.float()) > 0
    roots = {int(r) for r in torch.nonzero(~read).flatten()}
    folds: list[Fold] = []
    for root in plan.constant_roots:
        if root not in roots:
            root_folds = _constant_folds(plan, root, read_values)
            if root_folds is not None:
                roots.add(root)
                folds += root_folds
    if len(roots) == plan.size:
        roots.discard(min(roots))  # keep one channel: no layer is left empty
    return roots, folds


def _live_inputs(module: nn.Module) -> Tensor:
    """For each input channel/feature of a Conv/Linear, whether any weight reads it."""
    return module.weight.detach().ne(0).transpose(0, 1).flatten(1).any(1)


def _constant_folds(plan: Plan, root: int, read_values: Mapping[nn.Module, Tensor]) -> list[Fold] | None:
    """The bias folds that make a constant channel removable, or None if a reader cannot absorb it."""
    folds = []
    for reader in plan.readers:
        idxs = reader.idxs[reader.roots == root]
        if idxs.numel() == 0 or not _live_inputs(reader.module)[idxs].any():
            continue
        contribution = _constant_contribution(reader.module, idxs, read_values[reader.module])
        if contribution is None:
            return None
        if contribution.ne(0).any():
            folds.append(Fold(root, reader.module, contribution))
    return folds


def _constant_contribution(module: nn.Module, idxs: Tensor, x: Tensor) -> Tensor | None:
    """What inputs ``idxs`` of ``module`` add to its output when they hold input-independent values ``x``.

    None when the values are not the same for every sample (and, for a Conv, every position), or when a
    zero-padding Conv reads a non-zero constant.
    """
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        values = x.reshape(-1, x.shape[-1])[:, idxs]
        if not (values == values[:1]).all():
            return None
        return weight[:, idxs] @ values[0]
    values = x[:, idxs]
    constant = values.flatten()[0]
    if not (values == constant).all():
        return None
    if constant == 0:
        return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if _zero_pads(module):
        return None
    return constant * weight[:, idxs].flatten(1).sum(1)


def _zero_pads(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


@torch.no_grad()
def add_to_bias(module: nn.Module, contribution: Tensor) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(contribution))
    module.bias.add_(contribution)


def leaves(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
