"""Export a sparse-trained model for inference: remove its empty channels, or store its Linear weights sparse.

* :func:`compact` returns a smaller **dense** model: the channels that nothing downstream reads are
  physically removed (with their filters, biases and BatchNorm entries), found and cut through
  `torch-pruning <https://github.com/VainF/Torch-Pruning>`_'s dependency graph, so residual additions,
  flattens and BatchNorms are handled for any architecture it can trace. The result computes the same
  function as the masked model (checked on the example input and a random one).
* :func:`to_sparse` returns a copy whose sparse ``nn.Linear`` layers hold their weight in CSR
  (:class:`SparseLinear`), for inference.

The weights are the truth: sparse training zeroes the masked-out weights in place, so a zero weight is a
pruned one (pass ``masks=`` to :func:`compact` to zero them first).

>>> import torch
>>> from torch import nn
>>> from lightning_sparse.export import compact, compaction_report, to_sparse
>>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
>>> with torch.no_grad():
...     model[2].weight[:, :2] = 0  # nothing reads hidden units 0 and 1 any more
>>> small = compact(model, torch.randn(1, 8))
>>> compaction_report(model, small)
{'0': (6, 4)}
>>> fast = to_sparse(small, min_sparsity=0.0)  # every Linear weight in CSR
>>> type(fast[0]).__name__, fast[0].weight.layout
('SparseLinear', torch.sparse_csr)
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

__all__ = ["SparseLinear", "compact", "compaction_report", "to_sparse"]

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
    params = dict(net.named_parameters())
    for name, mask in (masks or {}).items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model; its parameters are: {', '.join(params)}")
        if mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} must be torch.bool of shape {tuple(params[name].shape)},"
                f" got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        with torch.no_grad():
            params[name].mul_(mask.to(params[name].device))
    for p in params.values():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    return net


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
