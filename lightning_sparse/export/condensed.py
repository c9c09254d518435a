"""``to_condensed``: a copy for CPU inference whose constant-fan-in ``nn.Linear`` (and 1x1 ``nn.Conv2d``) layers,
as trained with ``pattern="fan_in"``, hold only their ``k`` weights per output row (:class:`CondensedLinear`,
:class:`CondensedConv2d`), multiplied by the C++ kernel of ``csrc/condensed_linear.cpp``.

>>> import torch
>>> from torch import nn
>>> layer = nn.Linear(8, 4)
>>> with torch.no_grad():
...     layer.weight[:, 3:] = 0  # every output row reads inputs 0, 1 and 2 only: a constant fan-in of 3
>>> to_condensed(layer)
CondensedLinear(in_features=8, out_features=4, k=3, bias=True, indices=int32)
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse import kernels
from lightning_sparse.export._condensed_format import (
    check_condensed,
    condense,
    fan_in_range,
    pack_blocks,
    pointwise_conv_problem,
    tensor_version,
)
from lightning_sparse.export._copy import apply_masks, freeze, replace_module

log = logging.getLogger(__name__)

CONDENSED_STRATEGIES = ("auto", "gather", "scalar")
"""How the C++ kernel reads the inputs below 6 samples (batch 1): ``"gather"`` (hardware gathers, AVX-512 or
AVX2), ``"scalar"`` (scalar loads into vectors, no gather instruction: for CPUs whose gathers are slow, such as
AMD's), or ``"auto"`` (both timed once per layer shape in the process, the faster kept)."""
STRATEGY_ENV = "LIGHTNING_SPARSE_CONDENSED_STRATEGY"
"""Environment variable that, when set, replaces ``strategy="auto"`` (one of :data:`CONDENSED_STRATEGIES`)."""
SMALL_BATCH = 6  # below this many samples the kernel takes the gather order, where the strategy applies (csrc)
_CALIBRATED: dict[tuple[Any, ...], str] = {}  # (in, held rows, k, out, index dtype) -> the faster strategy


def check_condensed_strategy(strategy: str, source: str = "`strategy`") -> str:
    """Return ``strategy`` if it is one of :data:`CONDENSED_STRATEGIES`, else raise ``ValueError`` listing them."""
    if strategy not in CONDENSED_STRATEGIES:
        raise ValueError(f"{source} can be {', '.join(map(repr, CONDENSED_STRATEGIES))}, got {strategy!r}")
    return strategy


def requested_strategy(strategy: str) -> str:
    """``strategy``, or for ``"auto"`` the value of :data:`STRATEGY_ENV` when that is set (checked)."""
    if strategy == "auto" and os.environ.get(STRATEGY_ENV):
        return check_condensed_strategy(os.environ[STRATEGY_ENV], f"environment variable {STRATEGY_ENV}")
    return strategy


def calibrate_strategy(op: Any, values: Tensor, indices: Tensor, out_features: int, in_features: int,
                       rows: Tensor | None = None) -> str:  # fmt: skip
    """The faster of ``"gather"`` and ``"scalar"`` for one sample through the C++ ``op`` with these packed
    ``values`` and ``indices``, measured once per (shape, index dtype) in this process and cached: each strategy
    is timed in 5 alternating samples of a few calls (about 1-3 ms in all), and the minimum per sample kept. The
    CPU's default (``torch.ops.lightning_sparse.condensed_default_strategy()``) is kept unless the other is at
    least 5 % faster, so that noise on a busy machine does not flip the choice."""
    key = (in_features, values.shape[0], values.shape[1], out_features, indices.dtype, None if rows is None else rows.numel())
    found = _CALIBRATED.get(key)
    if found is not None:
        return found
    x = torch.ones(1, in_features)
    default = str(torch.ops.lightning_sparse.condensed_default_strategy())
    other = "scalar" if default == "gather" else "gather"

    def sample(strategy: str, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            op(x, values, indices, None, out_features, False, rows, strategy)
        return (time.perf_counter() - start) / calls

    with torch.inference_mode():
        single = min(sample(default, 1), sample(other, 1))  # also the warm-up
        calls = max(1, min(50, int(1e-4 / max(single, 1e-7))))
        best = {default: float("inf"), other: float("inf")}
        for _ in range(5):
            for strategy in best:
                best[strategy] = min(best[strategy], sample(strategy, calls))
    chosen = other if best[other] < 0.95 * best[default] else default
    log.debug("condensed kernel strategy for %s: %s (%s)", key, chosen, best)
    _CALIBRATED[key] = chosen
    return chosen


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

    ``strategy`` picks how the C++ kernel reads the inputs below 6 samples (see :data:`CONDENSED_STRATEGIES`):
    ``"gather"``, ``"scalar"`` or ``"auto"`` (the default: both timed once per layer shape and CPU in the process,
    about 1-3 ms at the first call below 6 samples; the environment variable ``LIGHTNING_SPARSE_CONDENSED_STRATEGY``
    replaces ``"auto"`` when set). Both compute the same sums in the same order. :attr:`kernel_strategy` says which
    one runs.

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
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        self.kernel = kernels.check_condensed_kernel(kernel)
        self.strategy = check_condensed_strategy(strategy)
        self.in_features = int(in_features)
        if (rows is None) != (out_features is None):
            raise ValueError(f"{type(self).__name__}: give `rows` and `out_features` together (or neither)")
        self.out_features = int(values.shape[0] if out_features is None else out_features)
        if rows is not None:
            rows = rows.detach().to(torch.int64).contiguous()
        check_condensed(self.in_features, values, indices, bias, type(self).__name__, rows, self.out_features)
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
        strategy: str = "auto",
    ) -> CondensedLinear:
        """The condensed counterpart of ``linear``: each row's non-zero weights (or, with ``mask``, the weights
        where the mask is True, zero or not); rows without any are left out (see ``rows``). Raises ``ValueError``
        if the other rows differ in count."""
        values, indices, rows = condense(linear.weight.detach(), mask, index_dtype)
        out = None if rows is None else linear.out_features
        return cls(linear.in_features, values, indices, linear.bias, rows=rows, out_features=out, kernel=kernel,
                   strategy=strategy)  # fmt: skip

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
            op, values, indices, strategy = cpp
            if x.shape[0] >= SMALL_BATCH:
                strategy = "auto"  # the axpy order: no strategy to choose
            elif strategy is None:
                strategy = self._resolve_strategy(op, values, indices)
            return op(x.contiguous(), values, indices, buffers["bias"], self.out_features, False, buffers["rows"],
                      strategy)  # fmt: skip
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
        if cpp is not None:  # the axpy order: no strategy to choose
            op, values, indices, _ = cpp
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

    def _cpp(self, x: Tensor) -> tuple[Any, Tensor, Tensor, str | None] | None:
        """``(C++ op, packed values, packed indices, small-batch strategy or None if not chosen yet)`` when the
        kernel applies to ``x`` (float32, CPU, kernel "auto"/"cpp" and built), else None. On the per-call path:
        buffers are read from ``_buffers`` directly (``nn.Module.__getattr__`` costs about as much as a small
        layer's product at batch 1)."""
        buffers = self._buffers
        values, indices = buffers["values"], buffers["indices"]
        if x.dtype != torch.float32 or x.device.type != "cpu" or values.device.type != "cpu":
            return None
        op = kernels.cpu_condensed_linear(self.kernel)
        return None if op is None else (op, *self._packed(values, indices))

    def _packed(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, str | None]:
        """``values`` and ``indices`` in the kernel's layout, ``[ceil(out / 16), k, 16]``: entry ``(o, j)`` at
        ``[o // 16, j, o % 16]`` (the last block padded with zero values at index 0), the indices as ``uint16``
        when ``in_features <= 65536`` (a quarter fewer bytes to read per weight than int32, whatever the buffers'
        dtype); and the small-batch strategy once resolved (None before). Built on first use and again whenever
        the buffers change (replaced, moved or modified in place)."""
        cached = self.__dict__.get("_packed_cache")
        if (
            cached is not None
            and cached[0] is values
            and cached[1] is indices
            and cached[2] == (values.data_ptr(), tensor_version(values), indices.data_ptr(), tensor_version(indices))
        ):
            return cached[3]
        packed_indices = pack_blocks(indices)
        if self.in_features <= 1 << 16:
            packed_indices = packed_indices.to(torch.uint16)
        packed = (pack_blocks(values), packed_indices, None)
        key = (values.data_ptr(), tensor_version(values), indices.data_ptr(), tensor_version(indices))
        self.__dict__["_packed_cache"] = [values, indices, key, packed]
        return packed

    def _resolve_strategy(self, op: Any, values: Tensor, indices: Tensor) -> str:
        """The small-batch strategy for these packed buffers: the one asked for, or for ``"auto"`` the calibrated
        one (see :func:`calibrate_strategy`); remembered with the packed buffers."""
        strategy = requested_strategy(self.strategy)
        if strategy == "auto":
            strategy = calibrate_strategy(op, values, indices, self.out_features, self.in_features,
                                          self._buffers["rows"])  # fmt: skip
        cached = self.__dict__.get("_packed_cache")
        if cached is not None and cached[3][1] is indices:
            cached[3] = (cached[3][0], indices, strategy)
        return strategy

    @property
    def kernel_strategy(self) -> str:
        """How this layer's products below 6 samples (batch 1) run on the CPU in float32: ``"gather"`` or
        ``"scalar"`` (the C++ kernel's strategies, see :data:`CONDENSED_STRATEGIES`; for ``strategy="auto"`` the
        calibrated one, calibrating now if no call has yet), or ``"torch"`` (``kernel="torch"``, or the kernel
        could not be built, or the buffers are not float32 CPU tensors).

        Raises:
            ValueError: :data:`STRATEGY_ENV` is set to a name not in :data:`CONDENSED_STRATEGIES`.
        """
        cpp = self._cpp(torch.empty(0, self.in_features))
        if cpp is None or self._buffers["values"].dtype != torch.float32:
            return "torch"
        op, values, indices, strategy = cpp
        return strategy if strategy is not None else self._resolve_strategy(op, values, indices)

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
        strategy: str = "auto",
    ) -> None:
        super().__init__(in_channels, values, indices, bias, rows=rows, out_features=out_features, kernel=kernel,
                         strategy=strategy)  # fmt: skip
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
        strategy: str = "auto",
    ) -> CondensedConv2d:
        """The condensed counterpart of a 1x1 ``conv`` (see :func:`to_condensed` for which convolutions)."""
        reason = pointwise_conv_problem(conv)
        if reason is not None:
            raise ValueError(f"CondensedConv2d needs a 1x1 Conv2d with groups=1 and no padding: {reason}")
        weight = conv.weight.detach().flatten(1)
        values, indices, rows = condense(weight, None if mask is None else mask.flatten(1), index_dtype)
        out = None if rows is None else conv.out_channels
        return cls(conv.in_channels, values, indices, conv.bias, stride=conv.stride, rows=rows, out_features=out,
                   kernel=kernel, strategy=strategy)  # fmt: skip

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


def _check_loaded_condensed(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the loaded indices are read by the kernel unchecked, so check them here."""
    if module.rows is None:
        module.out_features = module.values.shape[0]
    module.k = module.values.shape[1]
    check_condensed(module.in_features, module.values, module.indices, module.bias, type(module).__name__,
                     module.rows, module.out_features)  # fmt: skip


def _condensable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and pointwise_conv_problem(module) is None)


def to_condensed(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    skip_unstructured: bool = False,
    index_dtype: torch.dtype = torch.int32,
    kernel: str = "auto",
    strategy: str = "auto",
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
        index_dtype: ``torch.int32`` (default: half the index bytes of int64) or ``torch.int64``, the dtype
            of the ``indices`` buffers (the C++ kernel reads its own uint16 copy below 65537 inputs).
        kernel: ``"auto"``, ``"cpp"`` or ``"torch"``, see :class:`CondensedLinear`.
        strategy: ``"auto"``, ``"gather"`` or ``"scalar"``: how the C++ kernel reads the inputs at batch 1, see
            :class:`CondensedLinear`.

    Returns:
        The copy, in eval mode, every parameter ``requires_grad=False`` (it is for inference; see
        :class:`CondensedLinear` on autograd).

    Raises:
        ValueError: a sparse layer's rows hold different numbers of non-zero weights (or mask entries), naming
            the layers, unless ``skip_unstructured``; bad ``masks``, ``index_dtype``, ``kernel`` or ``strategy``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}")
    kernels.check_condensed_kernel(kernel)
    check_condensed_strategy(strategy)
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`index_dtype` must be torch.int32 or torch.int64, got {index_dtype}")
    net = copy.deepcopy(model)
    apply_masks(net, masks)
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
        low, high = fan_in_range(counts)
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
            new: nn.Module = CondensedLinear.from_linear(module, mask, index_dtype=index_dtype, kernel=kernel,
                                                         strategy=strategy)  # fmt: skip
        else:
            new = CondensedConv2d.from_conv(module, mask, index_dtype=index_dtype, kernel=kernel, strategy=strategy)
        for name in names[key]:
            if not name:
                return freeze(new)
            replace_module(net, name, new)
    log.info("to_condensed: %d layers condensed, %d left unstructured", len(plans), len(unstructured))
    return freeze(net)
