"""The input and output shapes of each layer's calls in one forward pass, recorded with forward hooks: what
:func:`~lightning_sparse.cost.flops.flops_from_calls` counts FLOPs from."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.cost.costed import as_args, call_sources, eval_mode, is_costed, resolve
from lightning_sparse.cost.flops import LayerCall

__all__ = ["CallRecorder", "first_calls", "layer_calls"]


def layer_calls(model: nn.Module, example_input: Any, names: Sequence[str]) -> dict[str, list[LayerCall]]:
    """The input and output shapes of every call of each named layer in one forward pass.

    ``model`` runs once on ``example_input`` (in eval mode, without gradients, restored afterwards) with forward
    hooks on the named layers. ``flops_from_calls(model, layer_calls(model, x, names))`` equals
    ``layer_flops(model, x, names)`` for ordinary models. During training,
    :class:`~lightning_sparse.cost.capture.InputCapture` records the same shapes in a real training step
    instead. An ``nn.MultiheadAttention``'s projections (and its ``out_proj``, which it does not call as a
    module) get the attention module's calls.
    """
    resolved = resolve(model, names)
    not_layers = [n for n, m in resolved.items() if not is_costed(model.get_submodule(m))]
    if not_layers:
        raise ValueError(
            f"layer_calls records linear/conv layers only (and Conv1D, MultiheadAttention); {not_layers} are not"
        )
    sources = {name: call_sources(model, m) for name, m in resolved.items()}
    recorder = CallRecorder({module for modules in sources.values() for module in modules})
    recorder.recording = True
    try:
        with eval_mode(model), torch.no_grad():
            model(*as_args(example_input))
    finally:
        recorder.remove()
    return {name: first_calls(recorder.calls, modules) for name, modules in sources.items()}


def first_calls(
    calls: Mapping[nn.Module, Sequence[tuple[int, LayerCall]]],
    modules: Sequence[nn.Module],
    span: tuple[float, float] = (-math.inf, math.inf),
) -> list[LayerCall]:
    """The calls within ``span`` (sequence numbers) of the first of ``modules`` that has some."""
    for module in modules:
        found = [call for seq, call in calls.get(module, []) if span[0] <= seq <= span[1]]
        if found:
            return found
    return []


class CallRecorder:
    """Forward hooks that record ``(sequence number, LayerCall)`` for every call of the given layers while
    :attr:`recording` is true; :meth:`remove` takes the hooks off."""

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
        """Take every hook off."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
