"""What each linear/conv layer of a model costs, and how the layers feed each other: the model-side inputs of the
speedup estimates of :mod:`lightning_sparse.cost.speedup`. No Lightning here.

The layers costed are ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``transformers``' ``Conv1D`` (GPT-2's layers, weight
``[in, out]``: ``2 · tokens · in · out`` FLOPs, like a linear layer) and the input projections of
``nn.MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``), named by
their parameter names. An attention module runs its projections itself, so their FLOPs come from the shapes of
its calls (:func:`call_flops`): ``2 · tokens · E · E`` for each of Q, K and V on the query, key and value tokens
(``2 · tokens · 3E · E`` for self-attention: the in-projection is ``3E x E`` per token), and ``2 · query tokens ·
E · E`` for its ``out_proj`` (a Linear the module never calls); the attention core (``Q K^T`` and the weighted
sum of ``V``) is no layer's cost.

* :func:`layer_flops` counts each layer's FLOPs with ``torch.utils.flop_counter.FlopCounterMode``, and
  :func:`layer_times` times each layer's forward+backward in isolation;
* :func:`layer_calls` / :func:`flops_from_calls` record each layer's input and output shapes with hooks during one
  real forward pass and count the same FLOPs from the shapes alone, with torch's own formulas: this works where
  the model cannot be run again piece by piece, e.g. on FSDP2 shards;
* :func:`chain_links` traces the model with ``torch.fx`` to find which layer feeds which along plain chains;
* :class:`CostModel` puts costs, links and conv groups of every layer together, and :class:`InputCapture`
  records what a training step feeds the model to build one.

Layers are named as in :mod:`~lightning_sparse.cost.speedup`: parameter names such as
``"features.0.weight"`` (module names such as ``"features.0"`` are accepted too).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_sparse.cost.speedup import channel_stats, speedup_dense_conv, speedup_sparse_conv
    >>> model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    >>> names = ["0.weight", "2.weight"]
    >>> x = torch.randn(1, 10)
    >>> costs = layer_flops(model, x, names)  # forward FLOPs of batch x: 2 * in * out per linear
    >>> costs
    {'0.weight': 400, '2.weight': 200}
    >>> flops_from_calls(model, layer_calls(model, x, names)) == costs  # the same, from the shapes
    True
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

import itertools
import logging
import math
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, mm_flop

from lightning_sparse.core.layers import ATTENTION_PROJECTIONS, is_hf_conv1d
from lightning_sparse.cost.speedup import ChainLink

__all__ = [
    "LAYER_TYPES",
    "CostModel",
    "InputCapture",
    "LayerCall",
    "call_flops",
    "chain_links",
    "conv_groups",
    "flops_from_calls",
    "layer_calls",
    "layer_flops",
    "layer_times",
]

log = logging.getLogger(__name__)

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose weights ``[out, in, *kernel]`` the channel statistics and chain links understand."""

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ----------------------------------------------------------------------------- cost model


@dataclass
class CostModel:
    """The cost of every linear/conv layer (and ``Conv1D``, and ``nn.MultiheadAttention`` projection) of a model
    for one batch, keyed by parameter name.

    Attributes:
        flops: forward FLOPs per layer (``torch.utils.flop_counter``'s formulas), for the captured input shapes.
        times: measured forward+backward seconds per layer, or ``None`` when only FLOPs were counted.
        links: plain-chain links (see :func:`chain_links`); empty when built from shapes (:meth:`from_calls`).
        groups: ``groups`` of each conv (1 for linear layers).
    """

    flops: dict[str, int]
    times: dict[str, float] | None
    links: dict[str, ChainLink]
    groups: dict[str, int]

    @classmethod
    def build(cls, root: nn.Module, prefix: str, example_input: Any, measure_time: bool = False) -> CostModel:
        """Count the layers under ``root`` (named ``prefix`` in the full model) on ``example_input``.

        Runs ``root`` under ``FlopCounterMode`` (:func:`layer_flops`), times each layer when ``measure_time``
        (:func:`layer_times`) and traces ``root`` with ``torch.fx`` (:func:`chain_links`): ``root`` must be an
        ordinary module whose layers can be called on their own (not FSDP2 shards: see :meth:`from_calls`).

        The projections of an ``nn.MultiheadAttention`` (and its ``out_proj``) get their FLOPs from the shapes of
        the module's calls (:func:`layer_calls`, :func:`call_flops`); their times are the module's measured time
        split in proportion to the FLOPs of its projections and of its attention core (not counted).
        """
        local = _layer_names(root)
        full = {name: f"{prefix}.{name}" if prefix else name for name in local}
        by_attention = {n: m for n in local if (m := _attention_module(root, n)) is not None}
        plain = [n for n in local if n not in by_attention]
        flops = layer_flops(root, example_input, plain)
        if by_attention:
            flops.update(flops_from_calls(root, layer_calls(root, example_input, list(by_attention))))
        flops = {n: flops[n] for n in local}
        times = None
        if measure_time:
            times = layer_times(root, example_input, plain)
            times.update(_attention_times(root, example_input, by_attention))
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
            calls: the calls of each layer in one forward pass of ``root`` (:func:`layer_calls`,
                :class:`InputCapture`), keyed by its name under ``root`` (``"0.weight"``); a layer of ``root``
                missing here was not called (0 FLOPs).

        Returns:
            A cost model with the same FLOPs as :meth:`build` on that pass, no times, and no links: chain
            idling (an empty output channel idling the next layer's input channel) is not counted.
        """
        local = _layer_names(root)
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


def _layer_names(root: nn.Module) -> list[str]:
    """The weight names of every costed layer under ``root`` (:func:`_costed_weights`)."""
    return list(_costed_weights(root))


def _is_costed(module: nn.Module) -> bool:
    return isinstance(module, (*LAYER_TYPES, nn.MultiheadAttention)) or is_hf_conv1d(module)


def _attention_projections(module: nn.MultiheadAttention) -> tuple[str, ...]:
    return ("in_proj_weight",) if module.in_proj_weight is not None else ATTENTION_PROJECTIONS


def _costed_weights(root: nn.Module) -> dict[str, tuple[str, str]]:
    """Weight name → (module name, attribute) of every layer under ``root`` that a cost model counts: the
    ``weight`` of linear/conv layers and ``Conv1D``, the input projections of ``nn.MultiheadAttention``."""
    found: dict[str, tuple[str, str]] = {}
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LAYER_TYPES) or is_hf_conv1d(module):
            found[f"{prefix}weight"] = (name, "weight")
        elif isinstance(module, nn.MultiheadAttention):
            found.update({f"{prefix}{attr}": (name, attr) for attr in _attention_projections(module)})
    return found


def _attention_parent(model: nn.Module, module_name: str) -> str | None:
    """The name of the ``nn.MultiheadAttention`` whose ``out_proj`` is the module ``module_name``, or ``None``."""
    parent, _, child = module_name.rpartition(".")
    if child != "out_proj" or not module_name:
        return None
    owner = model.get_submodule(parent)
    is_out_proj = isinstance(owner, nn.MultiheadAttention) and owner.out_proj is model.get_submodule(module_name)
    return parent if is_out_proj else None


def _attention_module(model: nn.Module, name: str) -> str | None:
    """The ``nn.MultiheadAttention`` whose calls give the cost of layer ``name`` (one of its projections or its
    ``out_proj``), or ``None``."""
    module_name = _resolve(model, [name])[name]
    if isinstance(model.get_submodule(module_name), nn.MultiheadAttention):
        return module_name
    return _attention_parent(model, module_name)


def _call_sources(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The modules whose recorded calls are the calls of layer ``module_name``, first non-empty wins: the layer,
    then for an ``nn.MultiheadAttention``'s ``out_proj`` (which the module does not call) the attention module."""
    parent = _attention_parent(model, module_name)
    module = model.get_submodule(module_name)
    return [module] if parent is None else [module, model.get_submodule(parent)]


def _attention_times(model: nn.Module, example_input: Any, names: Mapping[str, str]) -> dict[str, float]:
    """Seconds of each attention layer ``name`` (→ its ``nn.MultiheadAttention``): the module's measured
    forward+backward time split in proportion to the FLOPs of its projections and attention core."""
    if not names:
        return {}
    modules = list(dict.fromkeys(names.values()))
    seconds = layer_times(model, example_input, modules)
    calls = layer_calls(model, example_input, modules)
    shares: dict[str, dict[str, int]] = {}
    for m in modules:
        totals: dict[str, int] = {}
        for call in calls[m]:
            for key, value in _attention_flops(model.get_submodule(m), call).items():
                totals[key] = totals.get(key, 0) + value
        shares[m] = totals
    times = {}
    for name, m in names.items():
        module_name = _resolve(model, [name])[name]
        key = "out_proj.weight" if module_name != m else name.rpartition(".")[2]
        total = sum(shares[m].values())
        times[name] = seconds[m] * shares[m].get(key, 0) / total if total else 0.0
    return times


# ----------------------------------------------------------------------------- FLOPs from shapes


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
        flops = _attention_flops(module, call)
        if attr not in _attention_projections(module):
            raise ValueError(
                f"call_flops of an nn.MultiheadAttention counts one of its projections"
                f" {_attention_projections(module)}, got attr={attr!r}"
            )
        return flops[attr]
    weight_shape = tuple(module.weight.shape)
    if is_hf_conv1d(module):
        n_in, n_out = weight_shape
        return int(mm_flop((math.prod(call.input_shape[:-1]), n_in), (n_in, n_out)))
    if isinstance(module, nn.Linear):
        n_out, n_in = weight_shape
        return int(mm_flop((math.prod(call.input_shape[:-1]), n_in), (n_in, n_out)))
    if isinstance(module, _CONV_TYPES):
        x_shape, out_shape = list(call.input_shape), list(call.output_shape)
        if len(x_shape) == len(weight_shape) - 1:  # unbatched
            x_shape, out_shape = [1, *x_shape], [1, *out_shape]
        return int(conv_flop_count(x_shape, list(weight_shape), out_shape, transposed=False))
    raise TypeError(
        f"call_flops counts {', '.join(t.__name__ for t in LAYER_TYPES)}, Conv1D and MultiheadAttention, got"
        f" {type(module).__name__}"
    )


def _attention_flops(module: nn.MultiheadAttention, call: LayerCall) -> dict[str, int]:
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


def _weight_attr(name: str, module_name: str) -> str:
    """The attribute of module ``module_name`` that layer ``name`` names (``"weight"`` for a module name)."""
    if name == module_name:
        return "weight"
    return name[len(module_name) + 1 :] if module_name else name


def flops_from_calls(model: nn.Module, calls: Mapping[str, Sequence[LayerCall]]) -> dict[str, int]:
    """Forward FLOPs of each named layer of ``model``: the sum of :func:`call_flops` over its ``calls``.

    ``calls`` is keyed by layer name (parameter or module name, as for :func:`layer_flops`;
    ``"<attention>.in_proj_weight"`` and the like for an ``nn.MultiheadAttention``, whose calls they are); the
    result has the same keys, in the same order.
    """
    resolved = _resolve(model, list(calls))
    return {
        name: sum((call_flops(model.get_submodule(m), c, _weight_attr(name, m)) for c in calls[name]), 0)
        for name, m in resolved.items()
    }


def layer_calls(model: nn.Module, example_input: Any, names: Sequence[str]) -> dict[str, list[LayerCall]]:
    """The input and output shapes of every call of each named layer in one forward pass.

    ``model`` runs once on ``example_input`` (in eval mode, without gradients, restored afterwards) with forward
    hooks on the named layers. ``flops_from_calls(model, layer_calls(model, x, names))`` equals
    ``layer_flops(model, x, names)`` for ordinary models. During training, :class:`InputCapture` records the same
    shapes in a real training step instead. An ``nn.MultiheadAttention``'s projections (and its ``out_proj``,
    which it does not call as a module) get the attention module's calls.
    """
    resolved = _resolve(model, names)
    not_layers = [n for n, m in resolved.items() if not _is_costed(model.get_submodule(m))]
    if not_layers:
        raise ValueError(
            f"layer_calls records linear/conv layers only (and Conv1D, MultiheadAttention); {not_layers} are not"
        )
    sources = {name: _call_sources(model, m) for name, m in resolved.items()}
    recorder = _CallRecorder({module for modules in sources.values() for module in modules})
    recorder.recording = True
    try:
        with _eval_mode(model), torch.no_grad():
            model(*_as_args(example_input))
    finally:
        recorder.remove()
    return {name: _first_calls(recorder.calls, modules) for name, modules in sources.items()}


def _first_calls(
    calls: Mapping[nn.Module, Sequence[tuple[int, LayerCall]]],
    modules: Sequence[nn.Module],
    span: tuple[float, float] = (-math.inf, math.inf),
) -> list[LayerCall]:
    """The calls within ``span`` of the first of ``modules`` that has some."""
    for module in modules:
        found = [call for seq, call in calls.get(module, []) if span[0] <= seq <= span[1]]
        if found:
            return found
    return []


class _CallRecorder:
    """Forward hooks that record ``(sequence number, LayerCall)`` for every call of the given layers."""

    def __init__(self, modules: Sequence[nn.Module] | set[nn.Module], counter: Iterator[int] | None = None) -> None:
        self.counter = counter if counter is not None else itertools.count()
        self.recording = False
        self.calls: dict[nn.Module, list[tuple[int, LayerCall]]] = {}
        self._open: dict[nn.Module, list[tuple[int, tuple[int, ...] | None, tuple[tuple[int, ...], ...]]]] = {}
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True, always_call=True))

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.recording:
            return
        others: tuple[tuple[int, ...], ...] = ()
        if isinstance(module, nn.MultiheadAttention):  # forward(query, key, value, ...)
            x = args[0] if args else kwargs.get("query")
            key, value = (args[i] if len(args) > i else kwargs.get(k) for i, k in ((1, "key"), (2, "value")))
            if isinstance(key, Tensor) and isinstance(value, Tensor):
                others = (tuple(key.shape), tuple(value.shape))
        else:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        self._open.setdefault(module, []).append(
            (next(self.counter), tuple(x.shape) if isinstance(x, Tensor) else None, others)
        )

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        pending = self._open.get(module)
        if not pending:
            return
        seq, input_shape, others = pending.pop()
        if isinstance(module, nn.MultiheadAttention) and isinstance(output, tuple) and output:
            output = output[0]  # (attention output, attention weights)
        if input_shape is not None and isinstance(output, Tensor):
            self.calls.setdefault(module, []).append((seq, LayerCall(input_shape, tuple(output.shape), others)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------- capture in a training step


class InputCapture:
    """Records, in one training step, what a cost model of the model's linear/conv layers needs.

    Forward pre-hooks on each module of ``model`` that contains every one of ``layer_modules`` (the
    LightningModule, ``self.net``, ...) keep the positional tensor inputs of each of its calls; forward hooks on
    every ``nn.Linear`` / ``nn.Conv1d/2d/3d``, ``transformers`` ``Conv1D`` and ``nn.MultiheadAttention`` of
    ``model`` record each layer's input and output shapes during the
    first recorded call of any of those modules. Call :meth:`cost_model` (or :meth:`finish`) after the step to
    remove the hooks.

    Args:
        model: the model (e.g. the LightningModule).
        layer_modules: module names (in ``model``) of the layers that the cost model must cover, e.g. the masked
            ones. No module is hooked when it is empty.
    """

    def __init__(self, model: nn.Module, layer_modules: Sequence[str]) -> None:
        self._calls: dict[str, list[tuple[Tensor, ...]]] = {}
        self._modules: dict[str, nn.Module] = {}
        self._spans: dict[str, list[float]] = {}  # [start, end] sequence numbers of each root's first call
        self._stacks: dict[str, list[bool]] = {}  # per root: is each open call its first recorded one?
        self._open_spans = 0
        self._handles = []
        for name, module in model.named_modules():
            if layer_modules and all(not name or m == name or m.startswith(f"{name}.") for m in layer_modules):
                self._modules[name] = module
                self._handles.append(module.register_forward_pre_hook(partial(self._pre, name)))
                self._handles.append(module.register_forward_hook(partial(self._post, name), always_call=True))
        layers = {m for m in model.modules() if _is_costed(m)} if self._modules else set()
        self._recorder = _CallRecorder(layers)

    def _pre(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        # Only calls on tensors: strategies such as DDP call the LightningModule with (batch, batch_idx) to
        # reach `training_step`, which then calls the network on the real input.
        first = False
        if args and all(isinstance(a, Tensor) for a in args):
            self._calls.setdefault(name, []).append(tuple(a.detach() for a in args))
            if name not in self._spans:
                first = True
                self._spans[name] = [next(self._recorder.counter), math.inf]
                self._open_spans += 1
                self._recorder.recording = True
        self._stacks.setdefault(name, []).append(first)

    def _post(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stack = self._stacks.get(name)
        if stack and stack.pop():
            self._spans[name][1] = next(self._recorder.counter)
            self._open_spans -= 1
            self._recorder.recording = self._open_spans > 0

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorder.remove()
        self._recorder.recording = False

    def finish(self) -> tuple[str, nn.Module, tuple[Tensor, ...]] | None:
        """Remove the hooks; the outermost called module containing every layer, its name and first input."""
        self._remove()
        called = sorted(self._calls, key=lambda n: (n.count(".") + bool(n), n))
        if not called:
            return None
        name = called[0]
        return name, self._modules[name], self._calls[name][0]

    def layer_calls(self, name: str) -> dict[str, list[LayerCall]]:
        """The calls of every costed layer under the module ``name`` during that module's first recorded call,
        keyed by weight name under it (``"0.weight"``, ``"attn.in_proj_weight"``), as :meth:`CostModel.from_calls`
        takes them (an ``nn.MultiheadAttention``'s projections and ``out_proj`` get the attention module's calls)."""
        if name not in self._spans:
            raise ValueError(f"module {name!r} has no recorded call; recorded: {sorted(self._spans)}")
        start, end = self._spans[name]
        root = self._modules[name]
        return {
            weight: _first_calls(self._recorder.calls, _call_sources(root, module_name), (start, end))
            for weight, (module_name, _) in _costed_weights(root).items()
        }

    def cost_model(self, measure_time: bool, sharded: bool) -> CostModel | None:
        """Remove the hooks and build the cost model of the outermost called module containing every layer.

        Args:
            measure_time: also time each layer (:func:`layer_times`); only without ``sharded``.
            sharded: the model's weights are FSDP2 shards (DTensors), so its layers cannot be run again outside
                the real forward pass: count the FLOPs from the recorded shapes (:meth:`CostModel.from_calls`:
                no times, no chain links). Otherwise :meth:`CostModel.build` runs the module again on its first
                recorded input (``FlopCounterMode``, timing, ``torch.fx``).

        Returns:
            The cost model, its layers named as in ``model``; ``None`` when no module containing every layer
            was called on tensors.
        """
        found = self.finish()
        if found is None:
            return None
        prefix, root, example_input = found
        if not sharded:
            return CostModel.build(root, prefix, example_input, measure_time)
        if measure_time:
            log.warning(
                "layer times cannot be measured on a sharded model (its layers cannot run outside the forward"
                " pass); the speedup estimates count FLOPs instead"
            )
        return CostModel.from_calls(root, prefix, self.layer_calls(prefix))


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
        return {name: _time_calls(model.get_submodule(m), calls[name], repeats, warmup) for name, m in resolved.items()}


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


def conv_groups(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """``groups`` of each named layer (1 for linear layers), for
    :func:`~lightning_sparse.cost.speedup.channel_stats`."""
    resolved = _resolve(model, names)
    return {name: int(getattr(model.get_submodule(m), "groups", 1)) for name, m in resolved.items()}


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
    """``{name: module name}``: a module name stays, ``"<module>.weight"`` (or ``"weight"``) names its module, and
    ``"<attention>.in_proj_weight"`` (or ``q_proj_weight``, ...) its ``nn.MultiheadAttention``."""
    if isinstance(names, str):
        raise ValueError(f"`names` must be a sequence of layer names, got the string {names!r}")  # noqa: TRY004
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        if name in modules:
            resolved[name] = name
        elif name == "weight" or (name.endswith(".weight") and name[: -len(".weight")] in modules):
            resolved[name] = name[: -len(".weight")] if name != "weight" else ""
        elif isinstance(modules.get(owner), nn.MultiheadAttention) and attr in _attention_projections(modules[owner]):
            resolved[name] = owner
        else:
            layers = list(_costed_weights(model))
            raise ValueError(
                f"{name!r} is neither a module name nor a '<module>.weight' parameter name of"
                f" {type(model).__name__}; its linear/conv layers are: {layers}"
            )
    return resolved


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, each one's own flag restored afterwards; and the fused fast path of
    ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` off (it runs in eval mode without gradients and
    skips the calls of their submodules, so ``FlopCounterMode`` and the hooks would see none of their layers)."""
    modes = [(m, m.training) for m in model.modules()]
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    for m, _ in modes:
        m.training = False
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
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
