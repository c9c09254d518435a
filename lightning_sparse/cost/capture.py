"""What a training step feeds the model, recorded to build its cost model: :class:`InputCapture`."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

from lightning_sparse.cost.calls import CallRecorder, first_calls
from lightning_sparse.cost.costed import call_sources, costed_weights, is_costed
from lightning_sparse.cost.flops import LayerCall
from lightning_sparse.cost.model import CostModel

__all__ = ["InputCapture"]

log = logging.getLogger(__name__)


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
        layers = {m for m in model.modules() if is_costed(m)} if self._modules else set()
        self._recorder = CallRecorder(layers)

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
            weight: first_calls(self._recorder.calls, call_sources(root, module_name), (start, end))
            for weight, (module_name, _) in costed_weights(root).items()
        }

    def cost_model(self, measure_time: bool, sharded: bool) -> CostModel | None:
        """Remove the hooks and build the cost model of the outermost called module containing every layer.

        Args:
            measure_time: also time each layer (:func:`~lightning_sparse.cost.timing.layer_times`); only without ``sharded``.
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
