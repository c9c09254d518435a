"""Export a sparse-trained model for inference: remove its empty channels, or store its Linear weights sparse.

* :func:`compact` returns a smaller **dense** model: the channels that nothing downstream reads are
  physically removed (with their filters, biases and BatchNorm entries), found and cut through
  `torch-pruning <https://github.com/VainF/Torch-Pruning>`_'s dependency graph, so residual additions,
  flattens and BatchNorms are handled for any architecture it can trace. The result computes the same
  function as the masked model (checked on the example input and a random one).
* :func:`to_sparse` returns a copy whose sparse ``nn.Linear`` layers hold their weight in CSR
  (:class:`SparseLinear`), for inference.
* :func:`to_condensed` returns a copy for CPU inference whose constant-fan-in ``nn.Linear`` (and 1x1
  ``nn.Conv2d``) layers, as trained with ``pattern="fan_in"``, hold only their ``k`` weights per output row
  (:class:`CondensedLinear`, :class:`CondensedConv2d`), multiplied by a C++ kernel.
* :func:`to_semi_structured` returns a copy for CUDA inference whose 2:4 ``nn.Linear`` weights
  (``pattern="2:4"``) are ``torch.sparse`` semi-structured tensors (sparse tensor cores, fp16/bf16).

The weights are the truth: sparse training zeroes the masked-out weights in place, so a zero weight is a
pruned one (pass ``masks=`` to :func:`compact` to zero them first).

>>> import torch
>>> from torch import nn
>>> from lightning_sparse.export import compact, compaction_report, to_condensed, to_sparse
>>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
>>> with torch.no_grad():
...     model[2].weight[:, :2] = 0  # nothing reads hidden units 0 and 1 any more
>>> small = compact(model, torch.randn(1, 8))
>>> compaction_report(model, small)
{'0': (6, 4)}
>>> fast = to_sparse(small, min_sparsity=0.0)  # every Linear weight in CSR
>>> type(fast[0]).__name__, fast[0].weight.layout
('SparseLinear', torch.sparse_csr)
>>> layer = nn.Linear(8, 4)
>>> with torch.no_grad():
...     layer.weight[:, 3:] = 0  # every output row reads inputs 0, 1 and 2 only: a constant fan-in of 3
>>> to_condensed(layer)
CondensedLinear(in_features=8, out_features=4, k=3, bias=True, indices=int32)
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse import kernels

log = logging.getLogger(__name__)


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

ExampleInput = Tensor | tuple[Tensor, ...] | list[Tensor]

__all__ = [
    "CondensedConv2d",
    "CondensedLinear",
    "SparseLinear",
    "compact",
    "compaction_report",
    "semi_structured_layers",
    "to_condensed",
    "to_semi_structured",
    "to_sparse",
]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

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


# ---------------------------------------------------------------------------------------------- compact
def compact(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    masks: Mapping[str, Tensor] | None = None,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> nn.Module:
    """A dense copy of ``model`` without the channels that do not change its output.

    ``model`` is not modified: a deep copy is put in eval mode (BatchNorm uses its running statistics),
    traced on ``example_input`` with torch-pruning's ``DependencyGraph``, and pruned. Each group of coupled
    channels (a layer's outputs, the BatchNorm after it, and every Conv/Linear reading them; across a
    residual network's additions, the whole residual stream) is examined index by index. An index is
    **removed** when every Conv/Linear reading it, in the whole group, satisfies one of:

    1. its weights reading that index are all zero (for a Linear after a flatten: the weights of all the
       features coming from that channel), so whatever the producers compute there is never used; or
    2. the index is a *constant channel* and the reader loses nothing: the group has exactly one producer
       (a Conv/Linear), whose filter for the index is all zero, followed only by BatchNorm, pointwise
       activations, max/adaptive pooling and flatten, so the reader sees a value that does not depend on the
       input (the producer's bias through BatchNorm and the activation). If that value is exactly zero the
       channel is dropped outright (e.g. no bias and a ReLU after); otherwise it is folded into the
       reader's bias, which is exact only when the reader does not zero-pad: a Linear, or a Conv with
       ``padding=0`` or a ``padding_mode`` other than ``"zeros"``. A zero-padding Conv reading a non-zero
       constant keeps the channel (its border outputs see zeros, not the constant). Residual streams have
       several producers, so this rule never applies to them; rule 1 does.

    Everything else is **kept**: channels a reader uses; constant channels read by a zero-padding Conv;
    the model's input channels and output features (a group reaching the output is never pruned); one
    channel of a group that would otherwise lose all of them; and every group touching an operation whose
    channel mapping is not known to be exact (concatenations, splits, depthwise/grouped or transposed
    convolutions, layer/group norms, unwrapped parameters, channel-reducing ops such as a mean over
    channels, broadcasting additions, a module called twice, an addition with an untraced operand such as
    the model input). Unusual reshapes are not analysed; the final check catches them.

    Args:
        model: the sparse model; its masked-out weights are zero.
        example_input: one input batch (a tensor, or a tuple of the ``forward`` arguments) for tracing.
        masks: optional ``torch.bool`` masks by parameter name (as in ``named_parameters()``), applied to
            the copy before compacting, for a model whose masked-out weights are not zeroed yet.
        check: compare the result with the masked model on ``example_input`` and on a random input of the
            same shape; raise ``RuntimeError`` on a mismatch.
        atol, rtol: tolerances of that check; ``atol`` is relative to the largest output magnitude
            (the comparison allows ``atol * max(1, max|output|)``), since folding a constant into a bias
            changes the order of a floating-point sum.

    Returns:
        The compacted model, in eval mode. Exact in eval mode; gradients are not needed to use it.
    """
    inputs = _as_tuple(example_input)
    net = _prepared_copy(model, masks)
    check_inputs = [inputs, tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs)]
    with torch.no_grad():
        references = [net(*x) for x in check_inputs] if check else []
    params_before = _num_params(net)
    graph, output_nodes, calls = _trace(net, inputs)
    plans = [p for g in graph.get_all_groups() if (p := _plan(g, output_nodes, calls)) is not None]
    read_values = _record_inputs(net, inputs, {r.module for p in plans if p.constant_roots for r in p.readers})
    cuts = [(plan, *_removable(plan, read_values)) for plan in plans]
    for plan, roots, folds in cuts:  # fold every constant first, while all biases have their full length
        for fold in folds:
            if fold.root in roots:
                _add_to_bias(fold.module, fold.contribution)
    for plan, roots, _ in cuts:
        if roots:
            graph.get_pruning_group(plan.root_module, plan.root_fn, sorted(roots)).prune()
    log.info(
        "compact: removed %d channels in %d groups; %d -> %d parameters",
        sum(len(r) for _, r, _ in cuts),
        sum(bool(r) for _, r, _ in cuts),
        params_before,
        _num_params(net),
    )
    if check:
        _verify(net, check_inputs, references, atol, rtol)
    return net


def compaction_report(original: nn.Module, compacted: nn.Module) -> dict[str, tuple[int, int]]:
    """Output channels (Conv), features (Linear) or BatchNorm features that changed: ``name -> (before, after)``."""
    before, after = _widths(original), _widths(compacted)
    return {name: (n, after[name]) for name, n in before.items() if name in after and after[name] != n}


@dataclass
class _Reader:
    """A Conv/Linear reading a group's channels: its input-channel indices and their group (root) indices."""

    module: nn.Module
    idxs: Tensor
    roots: Tensor


@dataclass
class _Plan:
    """One prunable group: its root layer, size, readers, and the indices that may be constant channels."""

    root_module: nn.Module
    root_fn: Any
    size: int
    readers: list[_Reader]
    constant_roots: list[int] = field(default_factory=list)


@dataclass
class _Fold:
    root: int
    module: nn.Module
    contribution: Tensor


def _as_tuple(example_input: ExampleInput) -> tuple[Tensor, ...]:
    inputs = (example_input,) if isinstance(example_input, Tensor) else example_input
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError(
            "`example_input` must be a tensor or a non-empty tuple of tensors (the forward arguments),"
            f" got {type(example_input).__name__}"
        )
    return tuple(inputs)


def _prepared_copy(model: nn.Module, masks: Mapping[str, Tensor] | None) -> nn.Module:
    """A deep copy in eval mode, with ``masks`` applied and every parameter traceable by autograd."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}")
    net = copy.deepcopy(model).eval()
    params = _apply_masks(net, masks)
    for p in params.values():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    return net


def _apply_masks(net: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, nn.Parameter]:
    """Zero ``net``'s weights outside ``masks`` (``torch.bool`` by parameter name), in place; its parameters."""
    params = dict(net.named_parameters())
    for name, mask in (masks or {}).items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model; its parameters are: {', '.join(params)}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} must be torch.bool of shape {tuple(params[name].shape)},"
                f" got {getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}"
            )
        with torch.no_grad():
            params[name].mul_(mask.to(params[name].device))
    return params


def _trace(net: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[tp.DependencyGraph, set[Any], Counter]:
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
    output_fns = {t.grad_fn for t in _leaves(outputs)}
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
    if isinstance(module, _CONV_TYPES):
        return None if module.groups == 1 else f"grouped convolution {node.name}"
    if isinstance(module, (nn.Linear, *_BN_TYPES, tp.ops._ReshapeOp)):
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


def _plan(group: Any, output_nodes: set[Any], calls: Counter) -> _Plan | None:
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
        _Reader(it.dep.target.module, torch.tensor(it.idxs, dtype=torch.long), torch.tensor(it.root_idxs))
        for it in group.items
        if _is_reader(it)
    ]
    plan = _Plan(root.module, group[0].dep.handler, len(group[0].idxs), readers)
    plan.constant_roots = _zero_filter_roots(group)
    return plan


def _covers_all_channels(item: Any) -> bool:
    """Whether a layer's item in a full group indexes each of its channels once (not so under a broadcast)."""
    module = item.dep.target.module
    if _is_reader(item):
        count = module.in_channels if isinstance(module, _CONV_TYPES) else module.in_features
    elif _is_producer(item):
        count = module.out_channels if isinstance(module, _CONV_TYPES) else module.out_features
    elif isinstance(module, _BN_TYPES):
        count = module.num_features
    else:
        return True
    return sorted(item.idxs) == list(range(count))


def _zero_filter_roots(group: Any) -> list[int]:
    """Indices whose value the readers see is input-independent: one producer, zero filter, constant path."""
    producers = [it for it in group.items if _is_producer(it)]
    between = [it.dep.target.module for it in group.items if not _is_reader(it) and not _is_producer(it)]
    if len(producers) != 1 or not all(
        isinstance(m, (*_BN_TYPES, tp.ops._ReshapeOp)) or _op_name(m) in _CONSTANT_KEEPING_OPS | {"T"}
        for m in between
    ):
        return []
    (item,) = producers
    live = item.dep.target.module.weight.detach().flatten(1).ne(0).any(1)
    return [int(r) for i, r in zip(item.idxs, item.root_idxs) if not live[i]]


def _record_inputs(net: nn.Module, inputs: tuple[Tensor, ...], modules: set[nn.Module]) -> dict[nn.Module, Tensor]:
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


def _removable(plan: _Plan, read_values: Mapping[nn.Module, Tensor]) -> tuple[set[int], list[_Fold]]:
    """The group indices to remove (rules 1 and 2 of :func:`compact`) and the bias folds they need."""
    if not plan.readers:
        return set(), []
    read = torch.zeros(plan.size, dtype=torch.bool)
    for reader in plan.readers:
        used = _live_inputs(reader.module)[reader.idxs].cpu()
        read |= torch.zeros(plan.size).index_add_(0, reader.roots, used.float()) > 0
    roots = {int(r) for r in torch.nonzero(~read).flatten()}
    folds: list[_Fold] = []
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


def _constant_folds(plan: _Plan, root: int, read_values: Mapping[nn.Module, Tensor]) -> list[_Fold] | None:
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
            folds.append(_Fold(root, reader.module, contribution))
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
def _add_to_bias(module: nn.Module, contribution: Tensor) -> None:
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(contribution))
    module.bias.add_(contribution)


def _verify(net: nn.Module, inputs: list[tuple[Tensor, ...]], references: list[Any], atol: float, rtol: float) -> None:
    with torch.no_grad():
        for x, expected in zip(inputs, references):
            scale = max([1.0] + [float(t.detach().abs().max()) for t in _leaves(expected) if t.numel()])
            try:
                torch.testing.assert_close(net(*x), expected, atol=atol * scale, rtol=rtol)
            except AssertionError as err:
                raise RuntimeError(
                    f"compact: the compacted model does not compute the masked model's function: {err}"
                    " (pass check=False to skip this check)"
                ) from err


def _leaves(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)


def _widths(model: nn.Module) -> dict[str, int]:
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, _CONV_TYPES):
            widths[name] = m.out_channels
        elif isinstance(m, (nn.Linear, SparseLinear)):
            widths[name] = m.out_features
        elif isinstance(m, _BN_TYPES):
            widths[name] = m.num_features
    return widths


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- to_sparse
class SparseLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is stored in CSR.

    The CSR parts (``crow_indices``, ``col_indices``, ``values``) and the dense ``bias`` are buffers, so the
    module moves with ``.to()``, deep-copies and round-trips through ``state_dict``; :attr:`weight` rebuilds
    the ``torch.sparse_csr`` tensor (no copy). The product runs through ``torch.addmm``/``torch.sparse.mm``,
    which accept a CSR matrix on the CPU (also under ``torch.inference_mode``). No gradients.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # torch warns once that CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """The sparse counterpart of ``linear`` (same weight and bias)."""
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor of shape ``(out_features, in_features)``."""
        return torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            size=(self.out_features, self.in_features),
            check_invariants=False,  # built by to_sparse_csr, valid by construction
        )

    def forward(self, x: Tensor) -> Tensor:
        columns = x.reshape(-1, self.in_features).T.contiguous()
        if self.bias is None:
            out = torch.sparse.mm(self.weight, columns)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, columns)
        return out.T.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()},"
            f" bias={self.bias is not None}"
        )


def to_sparse(model: nn.Module, min_sparsity: float = 0.5) -> nn.Module:
    """A copy of ``model`` in which every sparse enough ``nn.Linear`` is a :class:`SparseLinear` (CSR weight).

    Only plain ``nn.Linear`` modules are replaced (subclasses such as attention's output projection are read
    as dense tensors by their owners), when their fraction of zero weights is at least ``min_sparsity``.
    Convolutions and everything else stay dense. ``model`` is not modified. For inference only: the sparse
    weights are buffers, not parameters, and get no gradients.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1], got {min_sparsity}")
    sparse = copy.deepcopy(model)
    replaced: dict[int, SparseLinear] = {}
    for name, module in list(sparse.named_modules(remove_duplicate=False)):
        if type(module) is not nn.Linear or _sparsity(module.weight) < min_sparsity:
            continue
        if id(module) not in replaced:  # a Linear shared under several names is converted once
            replaced[id(module)] = SparseLinear.from_linear(module)
        if not name:
            return replaced[id(module)]
        parent, _, attr = name.rpartition(".")
        setattr(sparse.get_submodule(parent), attr, replaced[id(module)])
    log.info("to_sparse: %d Linear layers stored in CSR", len(replaced))
    return sparse


def _sparsity(weight: Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)


# ------------------------------------------------------------------------------------------- to_condensed
class CondensedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose output rows all read the same number ``k`` of inputs.

    Holds ``values [out, k]`` (the non-zero weights of each row), ``indices [out, k]`` (their input positions,
    ``int32`` or ``int64``, increasing along each row) and ``bias [out]`` (or ``None``), all buffers, and
    computes ``y[..., o] = sum_j values[o, j] * x[..., indices[o, j]] + bias[o]`` for inputs of any leading
    shape: the function of the dense layer, with ``k / in_features`` of its multiply-adds and bytes.

    Rows without any weight (neurons emptied by ``neuron_ablation``) are not computed: with ``rows`` (the
    increasing indices of the rows that hold weights, a buffer), ``values`` and ``indices`` hold only those rows,
    ``out_features`` gives the full width, and the other outputs are the bias (or zero).

    float32 on the CPU runs the C++ kernel of ``csrc/condensed_linear.cpp`` (a gather-dot per output row below
    6 samples, an axpy over the batch above; rows split over ``torch.get_num_threads()`` threads). Other dtypes
    (float64, ...) and devices, and ``kernel="torch"``, use torch's ``embedding_bag`` with per-sample weights
    (the same sum, as ``[out, batch]``). ``kernel`` is ``"auto"`` (C++ if it builds, else a warning and torch),
    ``"cpp"`` (raise if it cannot be built) or ``"torch"``.

    **No autograd**: the buffers are not parameters, and an input that requires grad while grad mode is on
    raises ``RuntimeError`` (instead of silently cutting the graph); run it under ``torch.no_grad()`` or
    ``torch.inference_mode()``. :func:`to_condensed` returns models whose parameters need no grad, so plain
    calls work there.
    """

    def __init__(
        self,
        in_features: int,
        values: Tensor,
        indices: Tensor,
        bias: Tensor | None = None,
        *,
        rows: Tensor | None = None,
        out_features: int | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.kernel = kernels.check_condensed_kernel(kernel)
        self.in_features = int(in_features)
        if (rows is None) != (out_features is None):
            raise ValueError(f"{type(self).__name__}: give `rows` and `out_features` together (or neither)")
        self.out_features = int(values.shape[0] if out_features is None else out_features)
        if rows is not None:
            rows = rows.detach().to(torch.int64).contiguous()
        _check_condensed(self.in_features, values, indices, bias, type(self).__name__, rows, self.out_features)
        self.k = values.shape[1]
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("indices", indices.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.register_buffer("rows", rows)
        self.register_load_state_dict_post_hook(_check_loaded_condensed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mask: Tensor | None = None,
        *,
        index_dtype: torch.dtype = torch.int32,
        kernel: str = "auto",
    ) -> CondensedLinear:
        """The condensed counterpart of ``linear``: each row's non-zero weights (or, with ``mask``, the weights
        where the mask is True, zero or not); rows without any are left out (see ``rows``). Raises ``ValueError``
        if the other rows differ in count."""
        values, indices, rows = _condense(linear.weight.detach(), mask, index_dtype)
        out = None if rows is None else linear.out_features
        return cls(linear.in_features, values, indices, linear.bias, rows=rows, out_features=out, kernel=kernel)

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight ``[out_features, in_features]`` (zeros where no index points)."""
        held = self.values.new_zeros(self.values.shape[0], self.in_features).scatter_(1, self.indices.long(), self.values)
        if self.rows is None:
            return held
        return self.values.new_zeros(self.out_features, self.in_features).index_copy_(0, self.rows, held)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, x.shape[-1] if x.dim() else None)
        if x.dim() == 2:
            return self._rows(x)
        return self._rows(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    # the two layouts of the product, both [.., in] -> [.., out] or [n, in, L] -> [n, out, L]
    def _rows(self, x: Tensor) -> Tensor:
        """``x [batch, in]`` -> ``[batch, out]``."""
        buffers = self._buffers
        cpp = self._cpp(x)
        if cpp is not None:  # the kernel writes the held rows in place and the bias elsewhere
            op, values, indices = cpp
            return op(x.contiguous(), values, indices, buffers["bias"], self.out_features, False, buffers["rows"])
        held, bias = buffers["values"].shape[0], self._held_bias()
        with torch.no_grad():
            if self.k == 0 or held == 0:
                y = x.new_zeros(x.shape[0], held)
            else:
                columns = x.t().contiguous()  # [in, batch]: output row o sums k of its rows, weighted
                y = nn.functional.embedding_bag(
                    buffers["indices"], columns, per_sample_weights=buffers["values"], mode="sum"
                ).t()
            y = y if bias is None else y + bias
        return y if buffers["rows"] is None else self._scatter_rows(y, 1, x.shape[0])

    def _columns(self, x: Tensor) -> Tensor:
        """``x [n, in, L]`` -> ``[n, out, L]`` (an NCHW activation with ``L = H*W``)."""
        buffers = self._buffers
        cpp = self._cpp(x)
        if cpp is not None:
            op, values, indices = cpp
            return op(x.contiguous(), values, indices, buffers["bias"], self.out_features, True, buffers["rows"])
        held, bias = buffers["values"].shape[0], self._held_bias()
        n, _, length = x.shape
        columns = x.transpose(0, 1).reshape(self.in_features, n * length)  # [in, n*L]
        with torch.no_grad():
            if self.k == 0 or held == 0:
                y = x.new_zeros(held, n * length)
            else:
                y = nn.functional.embedding_bag(
                    buffers["indices"], columns, per_sample_weights=buffers["values"], mode="sum"
                )
            y = y.view(held, n, length).transpose(0, 1)
            y = y if bias is None else y + bias[:, None]
        return y if buffers["rows"] is None else self._scatter_rows(y, 1, n, length)

    def _held_bias(self) -> Tensor | None:
        """The bias of the computed rows (all of it without ``rows``), for the torch path."""
        bias, rows = self._buffers["bias"], self._buffers["rows"]
        return bias if bias is None or rows is None else bias.index_select(0, rows)

    def _scatter_rows(self, y: Tensor, dim: int, *leading: int) -> Tensor:
        """The full output from the computed rows ``y``: the other rows are the bias (or zero)."""
        buffers = self._buffers
        bias = buffers["bias"]
        shape = (leading[0], self.out_features, *leading[1:])
        if bias is None:
            full = y.new_zeros(shape)
        else:  # a new tensor: expand().contiguous() would be the bias itself for one sample
            full = y.new_empty(shape).copy_(bias if len(shape) == 2 else bias[:, None])
        return full.index_copy_(dim, buffers["rows"], y)

    def _cpp(self, x: Tensor) -> tuple[Any, Tensor, Tensor] | None:
        """``(C++ op, packed values, packed indices)`` when the kernel applies to ``x`` (float32, CPU, kernel
        "auto"/"cpp" and built), else None. On the per-call path: buffers are read from ``_buffers`` directly
        (``nn.Module.__getattr__`` costs about as much as a small layer's product at batch 1)."""
        buffers = self._buffers
        values, indices = buffers["values"], buffers["indices"]
        if x.dtype != torch.float32 or x.device.type != "cpu" or values.device.type != "cpu":
            return None
        op = kernels.cpu_condensed_linear(self.kernel)
        return None if op is None else (op, *self._packed(values, indices))

    def _packed(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``values`` and ``indices`` in the kernel's layout, ``[ceil(out / 16), k, 16]``: entry ``(o, j)`` at
        ``[o // 16, j, o % 16]`` (the last block padded with zero values at index 0). Built on first use and
        again whenever the buffers change (replaced, moved or modified in place)."""
        cached = self.__dict__.get("_packed_cache")
        if (
            cached is not None
            and cached[0] is values
            and cached[1] is indices
            and cached[2] == (values.data_ptr(), _version(values), indices.data_ptr(), _version(indices))
        ):
            return cached[3]
        packed = (_pack_blocks(values), _pack_blocks(indices))
        key = (values.data_ptr(), _version(values), indices.data_ptr(), _version(indices))
        self.__dict__["_packed_cache"] = (values, indices, key, packed)
        return packed

    def _check_input(self, x: Tensor, features: int | None) -> None:
        name = type(self).__name__
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"{name} is for inference only (no autograd), but its input requires grad: run the model under"
                " torch.no_grad() or torch.inference_mode(), or detach the input"
            )
        if features != self.in_features:
            raise ValueError(f"{name} expects {self.in_features} input features, got input of shape {tuple(x.shape)}")
        dtype = self._buffers["values"].dtype
        if x.dtype != dtype:
            raise RuntimeError(f"{name}: input dtype {x.dtype} differs from the layer's {dtype}")

    def extra_repr(self) -> str:
        rows = "" if self.rows is None else f", rows={self.rows.numel()} with weights"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}{rows},"
            f" bias={self.bias is not None}, indices={str(self.indices.dtype).removeprefix('torch.')}"
        )


class CondensedConv2d(CondensedLinear):
    """A 1x1 ``nn.Conv2d`` (``groups=1``, no padding, any stride) as a :class:`CondensedLinear` over the
    channel dimension: ``y[n, o, h, w] = sum_j values[o, j] * x[n, indices[o, j], h*s, w*s] + bias[o]``.

    NCHW inputs are multiplied in place as ``[n, C, H*W]`` columns (the kernel's axpy order, no transposition);
    channels_last inputs as ``[n*H*W, C]`` rows, returning a channels_last output, as the convolution does.
    Unbatched ``[C, H, W]`` inputs work too. Inference only, like :class:`CondensedLinear`.
    """

    def __init__(
        self,
        in_channels: int,
        values: Tensor,
        indices: Tensor,
        bias: Tensor | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        rows: Tensor | None = None,
        out_features: int | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__(in_channels, values, indices, bias, rows=rows, out_features=out_features, kernel=kernel)
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)

    @property
    def in_channels(self) -> int:
        return self.in_features

    @property
    def out_channels(self) -> int:
        return self.out_features

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        mask: Tensor | None = None,
        *,
        index_dtype: torch.dtype = torch.int32,
        kernel: str = "auto",
    ) -> CondensedConv2d:
        """The condensed counterpart of a 1x1 ``conv`` (see :func:`to_condensed` for which convolutions)."""
        reason = _pointwise_conv_problem(conv)
        if reason is not None:
            raise ValueError(f"CondensedConv2d needs a 1x1 Conv2d with groups=1 and no padding: {reason}")
        weight = conv.weight.detach().flatten(1)
        values, indices, rows = _condense(weight, None if mask is None else mask.flatten(1), index_dtype)
        out = None if rows is None else conv.out_channels
        return cls(conv.in_channels, values, indices, conv.bias, stride=conv.stride, rows=rows, out_features=out,
                   kernel=kernel)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched [C, H, W]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise ValueError(f"CondensedConv2d expects a [N, C, H, W] or [C, H, W] input, got shape {tuple(x.shape)}")
        self._check_input(x, x.shape[1])
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        n, _, h, w = x.shape
        if channels_last or h * w < 16:  # rows: [n*H*W, C] (too few columns per sample for the axpy order)
            rows = self._rows(x.permute(0, 2, 3, 1).reshape(-1, self.in_features))
            y = rows.view(n, h, w, self.out_features).permute(0, 3, 1, 2)
            return y if channels_last else y.contiguous()
        return self._columns(x.reshape(n, self.in_features, h * w)).view(n, self.out_features, h, w)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}"


def _version(t: Tensor) -> int:
    """``t``'s in-place modification counter (-1 for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _pack_blocks(t: Tensor, block: int = 16) -> Tensor:
    """``[out, k]`` -> ``[ceil(out / block), k, block]``, rows padded with zeros (see ``CondensedLinear._packed``)."""
    out, k = t.shape
    blocks = -(-out // block)
    padded = torch.cat([t, t.new_zeros(blocks * block - out, k)]) if blocks * block != out else t
    return padded.reshape(blocks, block, k).transpose(1, 2).contiguous()


def _check_condensed(
    in_features: int,
    values: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    name: str,
    rows: Tensor | None = None,
    out_features: int | None = None,
) -> None:
    """Raise ``ValueError`` unless the parts form a valid condensed layer (indices increasing, in range; ``rows``
    increasing, in ``[0, out_features)``, one per row of ``values``)."""
    out = values.shape[0] if out_features is None else out_features
    if rows is not None and values.dim() == 2:
        if rows.dim() != 1 or rows.numel() != values.shape[0]:
            raise ValueError(f"{name}: rows must be 1-D with one entry per row of values ({values.shape[0]}), got"
                             f" shape {tuple(rows.shape)}")  # fmt: skip
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out or not bool((rows[1:] > rows[:-1]).all())):
            raise ValueError(f"{name}: rows must increase strictly and lie in [0, {out})")
    if values.dim() != 2 or not values.is_floating_point():
        raise ValueError(
            f"{name}: values must be a 2-D floating-point tensor [out, k], got {tuple(values.shape)} {values.dtype}"
        )
    if indices.shape != values.shape or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: indices must be int32 or int64 of the shape of values {tuple(values.shape)}, got"
            f" {indices.dtype} of shape {tuple(indices.shape)}"
        )
    if indices.dtype == torch.int32 and in_features > torch.iinfo(torch.int32).max:
        raise ValueError(f"{name}: {in_features} input features need int64 indices")
    if values.shape[1] > in_features:
        raise ValueError(f"{name}: k = {values.shape[1]} entries per row, more than the {in_features} inputs")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= in_features:
            raise ValueError(
                f"{name}: indices must lie in [0, {in_features}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        if values.shape[1] > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all()):
            raise ValueError(f"{name}: indices must increase strictly along each row (sorted, no repeats)")
    if bias is not None and (bias.shape != (out,) or bias.dtype != values.dtype):
        raise ValueError(f"{name}: bias must be {values.dtype} of shape ({out},), got {bias.dtype} {tuple(bias.shape)}")


def _check_loaded_condensed(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the loaded indices are read by the kernel unchecked, so check them here."""
    if module.rows is None:
        module.out_features = module.values.shape[0]
    module.k = module.values.shape[1]
    _check_condensed(module.in_features, module.values, module.indices, module.bias, type(module).__name__,
                     module.rows, module.out_features)  # fmt: skip


def _condense(weight: Tensor, mask: Tensor | None, index_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(values, indices, rows)`` of a 2-D weight whose rows all hold the same number of non-zeros (or mask
    entries) or none: ``rows`` lists the rows that hold some (``None`` when all do), and only they are kept."""
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`index_dtype` must be torch.int32 or torch.int64, got {index_dtype}")
    kept = weight != 0 if mask is None else mask.to(weight.device, torch.bool)
    counts = kept.sum(1)
    low, high = _fan_in_range(counts)
    if low != high:
        what = "non-zero weights" if mask is None else "mask entries"
        raise ValueError(f"the rows hold {low} to {high} {what}: not a constant fan-in")
    rows = None
    if high and bool((counts == 0).any()):  # rows emptied by neuron ablation: not computed (their output is the bias)
        rows = (counts > 0).nonzero().view(-1)
        weight, kept = weight[rows], kept[rows]
    indices = kept.nonzero()[:, 1].view(weight.shape[0], high)  # row-major: increasing along each row
    return weight.gather(1, indices).contiguous(), indices.to(index_dtype).contiguous(), rows


def _fan_in_range(counts: Tensor) -> tuple[int, int]:
    """The fewest and most entries of the non-empty rows (``(0, 0)`` when every row is empty): a constant fan-in
    when they are equal (empty rows, as neuron ablation leaves them, are allowed)."""
    nonempty = counts[counts > 0]
    if nonempty.numel() == 0:
        return 0, 0
    return int(nonempty.min()), int(nonempty.max())


def _pointwise_conv_problem(conv: nn.Module) -> str | None:
    """Why a Conv2d is not a channel-wise Linear (1x1, groups 1, no padding), or None."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"kernel {tuple(conv.kernel_size)}"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    padding = conv.padding
    if not (padding in ("valid", "same") or tuple(padding) == (0, 0)):
        return f"padding={padding}"
    return None


def _condensable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and _pointwise_conv_problem(module) is None)


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, new)


def _freeze(net: nn.Module) -> nn.Module:
    """``net`` in eval mode with every parameter ``requires_grad=False`` (an inference copy)."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def to_condensed(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    skip_unstructured: bool = False,
    index_dtype: torch.dtype = torch.int32,
    kernel: str = "auto",
) -> nn.Module:
    """A copy of ``model`` for CPU inference in which every constant-fan-in ``nn.Linear`` is a
    :class:`CondensedLinear`, and every constant-fan-in 1x1 ``nn.Conv2d`` (``groups=1``, no padding, any
    stride) a :class:`CondensedConv2d`.

    A layer has a constant fan-in when every output row holds the same number ``k`` of non-zero weights, as
    after training with ``pattern="fan_in"``, or none (a neuron emptied by ``neuron_ablation``: not computed, its
    output is its bias; see ``CondensedLinear``'s ``rows``). The rows are read from the weights, or from ``masks``
    (``torch.bool`` by parameter name, as in ``named_parameters()``; the copy's weights are zeroed outside
    them first). Pass the masks for a model just after a mask update: RigL, SET and sparse momentum grow their
    new weights at zero, so its weights alone show fewer non-zeros in the rows that just grew (a kept weight
    that is zero is stored as a zero value; the result is the same function). Only plain ``nn.Linear`` and
    ``nn.Conv2d`` modules are looked at (as in :func:`to_sparse`); layers without any zero weight (or with an
    all-True mask: ``dense_layers``) are left as they are, since there is nothing to condense, and so is every
    other module. A module shared under several names is converted once.

    Args:
        model: the trained sparse model; not modified.
        masks: optional masks by parameter name.
        skip_unstructured: leave sparse layers whose fan-in is not constant as they are (a ``UserWarning``
            names them) instead of raising.
        index_dtype: ``torch.int32`` (default: half the index bytes of int64, faster at batch 1) or
            ``torch.int64``.
        kernel: ``"auto"``, ``"cpp"`` or ``"torch"``, see :class:`CondensedLinear`.

    Returns:
        The copy, in eval mode, every parameter ``requires_grad=False`` (it is for inference; see
        :class:`CondensedLinear` on autograd).

    Raises:
        ValueError: a sparse layer's rows hold different numbers of non-zero weights (or mask entries), naming
            the layers, unless ``skip_unstructured``; bad ``masks``, ``index_dtype`` or ``kernel``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}")
    kernels.check_condensed_kernel(kernel)
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`index_dtype` must be torch.int32 or torch.int64, got {index_dtype}")
    net = copy.deepcopy(model)
    _apply_masks(net, masks)
    masks = masks or {}
    plans: dict[int, tuple[nn.Module, Tensor | None]] = {}
    names: dict[int, list[str]] = {}  # every name of each module (a shared module is looked at once)
    unstructured: dict[str, str] = {}
    for name, module in net.named_modules(remove_duplicate=False):
        if not _condensable(module):
            continue
        first = id(module) not in names
        names.setdefault(id(module), []).append(name)
        if not first:
            continue
        mask = masks.get(f"{name}.weight" if name else "weight")
        kept = (module.weight.detach() != 0 if mask is None else mask.to(torch.bool)).flatten(1)
        counts = kept.sum(1)
        if counts.numel() == 0 or bool((counts == kept.shape[1]).all()):
            log.debug("to_condensed: %s is dense, left as it is", name or type(module).__name__)
            continue
        low, high = _fan_in_range(counts)
        if low != high:
            what = "non-zero weights" if mask is None else "mask entries"
            unstructured[name or type(module).__name__] = f"rows with {low} to {high} {what}"
            continue
        plans[id(module)] = (module, mask)
    if unstructured and not skip_unstructured:
        listed = "; ".join(f"{n!r} ({why})" for n, why in unstructured.items())
        raise ValueError(
            f"to_condensed: these layers do not have a constant fan-in (the same number of non-zero weights in"
            f" every output row): {listed}. Train them with pattern='fan_in' (a mask update grows weights at zero:"
            " pass masks=sparsifier.masks or callback.masks to count the masks' entries instead), or pass"
            " skip_unstructured=True to leave them as they are"
        )
    if unstructured:
        warnings.warn(
            f"to_condensed: left {len(unstructured)} layer(s) without a constant fan-in as they are: "
            + "; ".join(f"{n!r} ({why})" for n, why in unstructured.items()),
            UserWarning,
            stacklevel=2,
        )
    for key, (module, mask) in plans.items():
        if isinstance(module, nn.Linear):
            new: nn.Module = CondensedLinear.from_linear(module, mask, index_dtype=index_dtype, kernel=kernel)
        else:
            new = CondensedConv2d.from_conv(module, mask, index_dtype=index_dtype, kernel=kernel)
        for name in names[key]:
            if not name:
                return _freeze(new)
            _replace(net, name, new)
    log.info("to_condensed: %d layers condensed, %d left unstructured", len(plans), len(unstructured))
    return _freeze(net)


# ------------------------------------------------------------------------------------- to_semi_structured
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_backend() -> type:
    """The ``SparseSemiStructuredTensor`` subclass ``to_sparse_semi_structured`` would use, with CUTLASS
    instead of cuSPARSELt when this torch has no cuSPARSELt."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def semi_structured_layers(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    skip_unsupported: bool = False,
) -> list[str]:
    """The names of the ``nn.Linear`` layers :func:`to_semi_structured` converts: those whose weight is 2:4
    (at most 2 non-zero weights in every group of 4 consecutive inputs; with a mask, exactly 2 of every 4 mask
    entries, :func:`~lightning_sparse.functional.patterns.check_pattern`) and whose shape the semi-structured
    backend takes for ``dtype`` (default: the weight's). Runs on any device (nothing is converted).

    Layers without any zero weight (or with an all-True mask) are dense on purpose and not listed. Other
    sparse layers raise ``ValueError`` naming them and why (not 2:4, shape, dtype), unless
    ``skip_unsupported``: then they are left out with a ``UserWarning`` naming them.
    """
    from lightning_sparse.functional.patterns import check_pattern, nm_groups_view

    masks = masks or {}
    backend = _semi_structured_backend()
    chosen: list[str] = []
    refused: dict[str, str] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in seen:
            continue
        seen.add(id(module))
        weight = module.weight.detach()
        mask = masks.get(f"{name}.weight" if name else "weight")
        kept = weight != 0 if mask is None else mask.to(weight.device, torch.bool)
        if bool(kept.all()):
            continue
        label = name or "Linear"
        if module.in_features % 4:
            refused[label] = f"not 2:4: {module.in_features} inputs, not a multiple of 4"
            continue
        if mask is not None:
            is_24 = check_pattern(kept, "2:4")
        else:
            is_24 = bool((nm_groups_view(kept, 4).sum(1) <= 2).all())
        if not is_24:
            what = "non-zero weights" if mask is None else "mask entries (or fewer)"
            refused[label] = f"not 2:4: a group of 4 inputs holds more than 2 {what}"
            continue
        target = dtype or weight.dtype
        if target not in _SEMI_STRUCTURED_DTYPES:
            refused[label] = f"{target} weights: semi-structured inference here takes float16 or bfloat16 (pass dtype=)"
            continue
        config = backend._DTYPE_SHAPE_CONSTRAINTS[target]
        rows, cols = weight.shape
        if rows % config.sparse_min_rows or cols % config.sparse_min_cols:
            refused[label] = (
                f"shape {tuple(weight.shape)}: {backend.__name__} needs the rows a multiple of {config.sparse_min_rows}"
                f" and the inputs a multiple of {config.sparse_min_cols} for {target}"
            )
            continue
        chosen.append(name)
    if refused and not skip_unsupported:
        raise ValueError(
            "to_semi_structured: these sparse Linear layers cannot be made 2:4 semi-structured: "
            + "; ".join(f"{n!r} ({why})" for n, why in refused.items())
            + ". Train them with pattern='2:4', keep them dense, or pass skip_unsupported=True to leave them as they are"
        )
    if refused:
        warnings.warn(
            f"to_semi_structured: left {len(refused)} sparse Linear layer(s) dense: "
            + "; ".join(f"{n!r} ({why})" for n, why in refused.items()),
            UserWarning,
            stacklevel=2,
        )
    return chosen


def to_semi_structured(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    skip_unsupported: bool = False,
) -> nn.Module:
    """A copy of ``model`` for CUDA inference in which every 2:4 ``nn.Linear`` weight is a
    ``torch.sparse`` semi-structured tensor (sparse tensor cores: Ampere, compute capability 8.0, or newer).

    Follows torch's documented usage: ``linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight))``
    on a CUDA fp16/bf16 model; ``F.linear`` then runs the 2:4 kernel (cuSPARSELt, or CUTLASS where torch has no
    cuSPARSELt or ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set). Which layers: see
    :func:`semi_structured_layers` (the same ``masks``, ``dtype`` and ``skip_unsupported``). Inputs must have the
    model's dtype.

    Args:
        model: the trained 2:4 model, on a CUDA device; not modified.
        masks: optional ``torch.bool`` masks by parameter name, applied to the copy first.
        dtype: ``torch.float16`` or ``torch.bfloat16`` to cast the copy to; default: keep the model's dtype,
            which must then be one of them for the converted layers.
        skip_unsupported: leave sparse layers that are not 2:4 (or whose shape or dtype the backend does not
            take) dense, with a warning, instead of raising.

    Returns:
        The copy, in eval mode, every parameter ``requires_grad=False``.

    Raises:
        RuntimeError: the model's Linear weights are not on a CUDA device (e.g. on the CPU: use
            :func:`to_condensed` there), or the GPU is older than compute capability 8.0.
        ValueError: sparse layers that are not 2:4 (named), unless ``skip_unsupported``; a bad ``dtype``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in _SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"`dtype` must be torch.float16 or torch.bfloat16, got {dtype}")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    off_gpu = {name or "Linear": m.weight.device for name, m in linears.items() if m.weight.device.type != "cuda"}
    if off_gpu:
        listed = ", ".join(map(repr, list(off_gpu)[:5])) + (" ..." if len(off_gpu) > 5 else "")
        where = ", ".join(sorted({str(d) for d in off_gpu.values()}))
        raise RuntimeError(
            "to_semi_structured: 2:4 semi-structured weights run on CUDA GPUs only (sparse tensor cores), but"
            f" Linear layer(s) {listed} are on {where}. Move the model first (model.cuda().half()); on the CPU"
            " use to_condensed() for fan_in models, or to_sparse()"
        )
    devices = {m.weight.device for m in linears.values()}
    for device in devices:
        if torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            raise RuntimeError(
                f"to_semi_structured: {device} has compute capability {major}.{minor}; 2:4 semi-structured"
                " sparsity needs 8.0 or newer (Ampere)"
            )
    net = copy.deepcopy(model)
    _apply_masks(net, masks)
    if dtype is not None:
        net = net.to(dtype)
    names = semi_structured_layers(net, masks, dtype=dtype, skip_unsupported=skip_unsupported)
    backend = _semi_structured_backend()
    for name in names:
        module = net.get_submodule(name)
        weight = module.weight.detach().contiguous()
        if backend is torch.sparse.SparseSemiStructuredTensorCUSPARSELT:
            sparse = torch.sparse.to_sparse_semi_structured(weight)
        else:
            sparse = backend.from_dense(weight)
        module.weight = nn.Parameter(sparse, requires_grad=False)
    log.info("to_semi_structured: %d Linear layers 2:4 semi-structured", len(names))
    return _freeze(net)
