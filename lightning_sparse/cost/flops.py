"""Forward FLOPs of each layer: counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real pass
(:func:`layer_flops`), or computed from recorded input/output shapes with torch's own formulas
(:func:`call_flops`, :func:`flops_from_calls`), which works where the model cannot be run again piece by piece
(FSDP2 shards).

An ``nn.MultiheadAttention`` runs its projections itself, so their FLOPs come from the shapes of its calls:
``2 · tokens · E · E`` for each of Q, K and V on the query, key and value tokens (``2 · tokens · 3E · E`` for
self-attention), and ``2 · query tokens · E · E`` for its ``out_proj`` (a Linear the module never calls); the
attention core (``Q K^T`` and the weighted sum of ``V``) is no layer's cost.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_sparse.cost.calls import layer_calls
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    >>> x, names = torch.randn(1, 10), ["0.weight", "2.weight"]
    >>> layer_flops(model, x, names)  # forward FLOPs of batch x: 2 * in * out per linear
    {'0.weight': 400, '2.weight': 200}
    >>> flops_from_calls(model, layer_calls(model, x, names))  # the same, from the shapes
    {'0.weight': 400, '2.weight': 200}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, mm_flop

from lightning_sparse.core.layers import DEFAULT_LAYER_TYPES, is_hf_conv1d
from lightning_sparse.cost.costed import as_args, attention_projections, eval_mode, resolve, tensors, weight_attr

__all__ = ["LayerCall", "attention_flops", "call_flops", "flops_from_calls", "layer_flops"]


class LayerCall(NamedTuple):
    """The input and output shapes of one call of a linear/conv layer; for an ``nn.MultiheadAttention``, the
    query's and the attention output's shapes, and ``other_input_shapes`` = the key's and the value's."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    other_input_shapes: tuple[tuple[int, ...], ...] = ()


def call_flops(module: nn.Module, call: LayerCall, attr: str = "weight") -> int:
    """Forward FLOPs of one call of a layer, from its shapes and the shape of its weight ``attr``.

    The formulas of ``torch.utils.flop_counter`` (``mm_flop``, ``conv_flop_count``), applied as
    ``FlopCounterMode`` applies them to the ops the layer runs: a linear layer (or ``transformers``' ``Conv1D``,
    weight ``[in, out]``) on an input ``[*batch, in]`` is one ``[prod(batch), in] @ [in, out]`` product,
    ``2 · prod(batch) · in · out``; a convolution counts
    ``2 · batch · out · (in / groups) · prod(kernel) · prod(output spatial)`` (an unbatched input is a batch of
    one). An ``nn.MultiheadAttention`` call counts, for ``attr`` ``"in_proj_weight"``, its three ``E x E``
    products on the query, key and value tokens (``2 · tokens · 3E · E`` for self-attention), for
    ``"q_proj_weight"`` / ``"k_proj_weight"`` / ``"v_proj_weight"`` the one of that part (``E x kdim`` for K, ``E x
    vdim`` for V); its ``out_proj`` Linear, given the attention module's calls, counts ``2 · query tokens · E · E``.
    Biases are not counted. The weight may be a DTensor: its ``.shape`` is the global shape.
    """
    if isinstance(module, nn.MultiheadAttention):
        flops = attention_flops(module, call)
        if attr not in attention_projections(module):
            raise ValueError(
                f"call_flops of an nn.MultiheadAttention counts one of its projections"
                f" {attention_projections(module)}, got attr={attr!r}"
            )
        return flops[attr]
    weight_shape = tuple(module.weight.shape)
    if is_hf_conv1d(module):
        n_in, n_out = weight_shape
        return int(mm_flop((math.prod(call.input_shape[:-1]), n_in), (n_in, n_out)))
    if isinstance(module, nn.Linear):
        n_out, n_in = weight_shape
        return int(mm_flop((math.prod(call.input_shape[:-1]), n_in), (n_in, n_out)))
    if isinstance(module, DEFAULT_LAYER_TYPES):  # the convolutions
        x_shape, out_shape = list(call.input_shape), list(call.output_shape)
        if len(x_shape) == len(weight_shape) - 1:  # unbatched
            x_shape, out_shape = [1, *x_shape], [1, *out_shape]
        return int(conv_flop_count(x_shape, list(weight_shape), out_shape, transposed=False))
    raise TypeError(
        f"call_flops counts {', '.join(t.__name__ for t in DEFAULT_LAYER_TYPES)}, Conv1D and MultiheadAttention,"
        f" got {type(module).__name__}"
    )


def attention_flops(module: nn.MultiheadAttention, call: LayerCall) -> dict[str, int]:
    """FLOPs of one ``nn.MultiheadAttention`` call: per input projection attribute, ``"out_proj.weight"``, and
    ``"attention"`` (its core: ``Q K^T`` and the weighted sum of ``V``, over all heads)."""
    e = module.embed_dim
    query = call.input_shape
    key, value = call.other_input_shapes if len(call.other_input_shapes) == 2 else (query, query)
    tokens = [math.prod(shape[:-1]) for shape in (query, key, value)]
    q = int(mm_flop((tokens[0], e), (e, e)))
    k = int(mm_flop((tokens[1], module.kdim), (module.kdim, e)))
    v = int(mm_flop((tokens[2], module.vdim), (module.vdim, e)))
    flops = (
        {"in_proj_weight": q + k + v}
        if module.in_proj_weight is not None
        else {"q_proj_weight": q, "k_proj_weight": k, "v_proj_weight": v}
    )
    flops["out_proj.weight"] = q
    source = key[1] if module.batch_first and len(key) == 3 else key[0]
    flops["attention"] = 2 * int(mm_flop((tokens[0], e), (e, source)))
    return flops


def flops_from_calls(model: nn.Module, calls: Mapping[str, Sequence[LayerCall]]) -> dict[str, int]:
    """Forward FLOPs of each named layer of ``model``: the sum of :func:`call_flops` over its ``calls``.

    ``calls`` is keyed by layer name (parameter or module name, as for :func:`layer_flops`;
    ``"<attention>.in_proj_weight"`` and the like for an ``nn.MultiheadAttention``, whose calls they are); the
    result has the same keys, in the same order.
    """
    resolved = resolve(model, list(calls))
    return {
        name: sum((call_flops(model.get_submodule(m), c, weight_attr(name, m)) for c in calls[name]), 0)
        for name, m in resolved.items()
    }


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
    resolved = resolve(model, names)
    args = as_args(example_input)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), counter:
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


def _gradients(output: Any, inputs: list[Tensor]) -> None:
    # Through a sum, not `grad_outputs`: FlopCounterMode attributes a module's backward to it when the gradient
    # of the module's output is *computed*, which it is not for a root given its gradient.
    outputs = [t for t in tensors(output) if t.requires_grad]
    if outputs and inputs:
        torch.autograd.grad(sum(t.sum() for t in outputs), inputs, allow_unused=True)
