"""``compact``: a smaller **dense** copy of a sparse model, without the channels nothing downstream reads.

The channels are found and cut through `torch-pruning <https://github.com/VainF/Torch-Pruning>`_'s dependency
graph (:mod:`lightning_sparse.export._compact_plan`), so residual additions, flattens and BatchNorms are handled
for any architecture it can trace. The result computes the same function as the masked model (checked on the
example input and a random one).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
>>> with torch.no_grad():
...     model[2].weight[:, :2] = 0  # nothing reads hidden units 0 and 1 any more
>>> small = compact(model, torch.randn(1, 8))
>>> compaction_report(model, small)
{'0': (6, 4)}
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.layers import CONV_TYPES
from lightning_sparse.export._compact_plan import (
    BN_TYPES,
    add_to_bias,
    leaves,
    plan_group,
    record_inputs,
    removable,
    trace,
)
from lightning_sparse.export._copy import apply_masks
from lightning_sparse.export.sparse_linear import SparseLinear

log = logging.getLogger(__name__)

ExampleInput = Tensor | tuple[Tensor, ...] | list[Tensor]


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
    graph, output_nodes, calls = trace(net, inputs)
    plans = [p for g in graph.get_all_groups() if (p := plan_group(g, output_nodes, calls)) is not None]
    read_values = record_inputs(net, inputs, {r.module for p in plans if p.constant_roots for r in p.readers})
    cuts = [(plan, *removable(plan, read_values)) for plan in plans]
    for plan, roots, folds in cuts:  # fold every constant first, while all biases have their full length
        for fold in folds:
            if fold.root in roots:
                add_to_bias(fold.module, fold.contribution)
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
    params = apply_masks(net, masks)
    for p in params.values():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    return net


def _verify(net: nn.Module, inputs: list[tuple[Tensor, ...]], references: list[Any], atol: float, rtol: float) -> None:
    with torch.no_grad():
        for x, expected in zip(inputs, references):
            scale = max([1.0] + [float(t.detach().abs().max()) for t in leaves(expected) if t.numel()])
            try:
                torch.testing.assert_close(net(*x), expected, atol=atol * scale, rtol=rtol)
            except AssertionError as err:
                raise RuntimeError(
                    f"compact: the compacted model does not compute the masked model's function: {err}"
                    " (pass check=False to skip this check)"
                ) from err


def _widths(model: nn.Module) -> dict[str, int]:
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, CONV_TYPES):
            widths[name] = m.out_channels
        elif isinstance(m, (nn.Linear, SparseLinear)):
            widths[name] = m.out_features
        elif isinstance(m, BN_TYPES):
            widths[name] = m.num_features
    return widths


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
