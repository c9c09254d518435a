"""Measured time: each layer's forward+backward seconds in isolation (:func:`layer_times`), the share of an
attention module's time that each of its projections takes (:func:`attention_times`), and :class:`Stopwatch`,
which adds up the time the callback spends on the masks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.cost.calls import layer_calls
from lightning_sparse.cost.costed import as_args, eval_mode, resolve, tensors
from lightning_sparse.cost.flops import attention_flops

__all__ = ["Stopwatch", "attention_times", "layer_times"]


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
    pool's scheduling; prefer :func:`~lightning_sparse.cost.flops.layer_flops` there.

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
    resolved = resolve(model, names)
    args = as_args(example_input)
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
        with eval_mode(model), torch.enable_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    with eval_mode(model):
        return {name: _time_calls(model.get_submodule(m), calls[name], repeats, warmup) for name, m in resolved.items()}


def attention_times(model: nn.Module, example_input: Any, names: Mapping[str, str]) -> dict[str, float]:
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
            for key, value in attention_flops(model.get_submodule(m), call).items():
                totals[key] = totals.get(key, 0) + value
        shares[m] = totals
    times = {}
    for name, m in names.items():
        module_name = resolve(model, [name])[name]
        key = "out_proj.weight" if module_name != m else name.rpartition(".")[2]
        total = sum(shares[m].values())
        times[name] = seconds[m] * shares[m].get(key, 0) / total if total else 0.0
    return times


def _time_calls(
    module: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], repeats: int, warmup: int
) -> float:
    if not calls:
        return 0.0
    params = [p for p in module.parameters() if p.requires_grad]
    device = next((t.device for t in tensors((params, calls))), torch.device("cpu"))
    prepared = []
    with torch.enable_grad():
        for call_args, call_kwargs in calls:
            inputs = params + [t for t in tensors((call_args, call_kwargs)) if t.requires_grad]
            outputs = [t for t in tensors(module(*call_args, **call_kwargs)) if t.requires_grad]
            prepared.append((call_args, call_kwargs, inputs, [torch.ones_like(t) for t in outputs]))

    def run() -> None:
        with torch.enable_grad():
            for call_args, call_kwargs, inputs, grad_outputs in prepared:
                out = module(*call_args, **call_kwargs)
                if inputs and grad_outputs:
                    outputs = [t for t in tensors(out) if t.requires_grad]
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


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)


class Stopwatch:
    """Adds up the time spent in blocks: wall time on the CPU, CUDA events (no synchronization) on a GPU.

    Example:
        >>> watch = Stopwatch()
        >>> with watch(torch.device("cpu")):
        ...     _ = sum(range(1000))
        >>> watch.total() > 0
        True
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, device: torch.device) -> Iterator[None]:
        """Time the block, for work on ``device`` (CUDA: between two events recorded on its current stream)."""
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - began

    def total(self) -> float:
        """Seconds so far (waits for the recorded GPU events)."""
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._seconds
