"""Condensed compute during training (``compute="condensed"``): constant-fan-in ``nn.Linear`` and 1x1 ``nn.Conv2d``
layers compute their forward and backward from the condensed form of their masks, not from the dense weight.

No Lightning here. The optimizer still owns the dense ``weight`` Parameter; what changes is how it is multiplied:

* forward ``y = x W_active^T + b``: the ``k`` values of every row are read from the dense weight (one pass over
  the active entries) and multiplied by the ``condensed_linear`` kernel of ``csrc/condensed_linear.cpp``;
* backward ``dx = dy W_active`` over the layer's columns (a compressed product of ``W^T``), and the weight's gradient
  at the active positions only, ``dW[o, i] = sum_b dy[b, o] x[b, i]`` for ``(o, i)`` in the mask (a sampled
  product), written into a dense gradient that is zero off the mask (``csrc/condensed_train.cpp``);
* in *dense-gradient mode* (:attr:`CondensedCompute.dense_gradients`), the weight's gradient is the full dense
  product ``dy^T x``: what RigL reads at its update steps.

:class:`CondensedLinearFunction` is the autograd function (float32 CPU tensors run the C++ kernels; other dtypes,
devices and ``kernel="torch"`` the same math in torch ops); :class:`CondensedPlan` is the condensed form of one
mask; :class:`CondensedCompute` attaches the function to a model's modules and rebuilds the plans after every
mask update.

>>> import torch
>>> from torch import nn
>>> layer = nn.Linear(6, 4)
>>> mask = torch.zeros(4, 6, dtype=torch.bool)
>>> mask[:, :2] = True  # every row reads 2 inputs
>>> with torch.no_grad():
...     _ = layer.weight.mul_(mask)
>>> compute = CondensedCompute(kernel="torch")
>>> compute.attach({"weight": layer}, {"weight": mask})
['weight']
>>> x = torch.randn(3, 6)
>>> torch.allclose(layer(x), x @ layer.weight.t() + layer.bias)
True
>>> compute.detach()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse import kernels
from lightning_sparse.export._condensed_format import fan_in_range, pack_blocks, pointwise_conv_problem

__all__ = ["CondensedCompute", "CondensedLinearFunction", "CondensedPlan", "condensable", "condensed_linear"]


@dataclass(frozen=True)
class CondensedPlan:
    """The condensed form of one ``[out, in]`` mask whose non-empty rows all hold ``k`` entries.

    Attributes:
        in_features, out_features: the dense weight's shape.
        k: active entries per computed row.
        indices: ``[held, k]`` (int32, int64 past 2**31 inputs) input positions of each computed row, increasing.
        rows: ``[held]`` int64, the computed rows, when some rows are empty (neuron ablation); else ``None``.
        packed_indices: ``indices`` packed in the kernel's ``[ceil(held / 16), k, 16]`` layout.
        positions: ``[held * k]`` int64: where each entry (row-major) lies in the layer's column-major order.
        ptr: ``[in + 1]`` int64 column pointers of the column-major (CSC) order.
        cols: ``[held * k]`` the output row of each entry in column-major order (int32, int64 past 2**31 rows).
        flat: ``[held * k]`` int64 flat position ``o * in + i`` of each entry, row-major (the torch path).
        The C++ kernels' tiled order (batches from 8 samples) stores the entries tile-major: by tile of 256 inputs,
        then row, then input (``order``: the tile-major place of each row-major entry; ``tindices``: their inputs;
        ``seg`` ``[tiles * held + 1]``: where the run of each (tile, row) begins),
        and the column-major entries by tile of 256 rows, then input, then row (``tpositions``: the place of each
        row-major entry; ``tcols``: their rows; ``colseg`` ``[tiles * in + 1]``).
    """

    in_features: int
    out_features: int
    k: int
    indices: Tensor
    rows: Tensor | None
    packed_indices: Tensor
    positions: Tensor
    ptr: Tensor
    cols: Tensor
    flat: Tensor
    order: Tensor
    tindices: Tensor
    seg: Tensor
    tpositions: Tensor
    tcols: Tensor
    colseg: Tensor

    @property
    def held(self) -> int:
        """Rows that hold weights (all rows without neuron ablation)."""
        return self.indices.shape[0]

    @classmethod
    def from_mask(cls, mask: Tensor, name: str = "layer", kernel: str = "auto") -> CondensedPlan:
        """The plan of a ``[out, in]`` boolean mask (a conv mask ``[out, in, 1, 1]`` is flattened). Raises
        ``ValueError`` if the non-empty rows hold different numbers of entries. ``kernel`` is named as in
        :class:`CondensedCompute`: with ``"auto"`` or ``"cpp"`` a CPU mask is indexed by the C++ ``condensed_train_plan``
        (counting sorts, ~6x faster than the sorts of the torch path: ~50 against ~300 ms for 3072 x 3072 at density
        0.1), with ``"torch"``, and on other devices, by torch's ops; both give the same tensors."""
        mask = mask.detach().reshape(mask.shape[0], -1).to(torch.bool)
        out, features = mask.shape
        ops = None
        if mask.device.type == "cpu" and max(out, features) < 2**31 and kernel != "torch":
            ops = kernels.cpu_condensed_train(kernel)
        built = ops.condensed_train_plan(mask.contiguous()) if ops is not None else None
        counts = built[0] if built is not None else mask.sum(1)
        low, high = fan_in_range(counts)
        if low != high:
            raise ValueError(
                f"compute='condensed': the mask of {name} has rows with {low} to {high} active entries, not a constant"
                " fan-in (train with pattern='fan_in')"
            )
        rows, held = _held_rows(counts, high, out)
        if built is not None:
            return cls._from_built(built, out, features, high, rows, held)
        entries = mask.nonzero()  # row-major: (o, i), increasing i along each row
        device = mask.device
        index_dtype = torch.int32 if features < 2**31 else torch.int64
        indices = entries[:, 1].view(held, high).to(index_dtype).contiguous()
        flat = (entries[:, 0] * features + entries[:, 1]).contiguous()
        order = torch.argsort(entries[:, 1] * out + entries[:, 0])  # column-major order of the entries
        positions = _inverse(order)
        ptr = torch.zeros(features + 1, dtype=torch.int64, device=device)
        ptr[1:] = torch.cumsum(torch.bincount(entries[:, 1], minlength=features), 0)
        cols = entries[order, 0].to(torch.int32 if out < 2**31 else torch.int64).contiguous()
        held_of = torch.cumsum(counts > 0, 0) - 1  # output row -> computed row
        forward, seg = _tile_major(held_of[entries[:, 0]], entries[:, 1], held, features)
        tindices = torch.empty_like(indices.view(-1)).index_copy_(0, forward, indices.view(-1))
        by_column, colseg = _tile_major(entries[order, 1], entries[order, 0], features, out)
        tpositions = by_column[positions]
        tcols = torch.empty_like(cols).index_copy_(0, by_column, cols)
        return cls(features, out, high, indices, rows, pack_blocks(indices), positions, ptr, cols, flat,
                   forward, tindices, seg, tpositions, tcols, colseg)  # fmt: skip

    @classmethod
    def _from_built(cls, built: list[Tensor], out: int, features: int, k: int, rows: Tensor | None,
                    held: int) -> CondensedPlan:  # fmt: skip
        _, indices, flat, positions, ptr, cols, order, tindices, seg, tpositions, tcols, colseg = built
        indices = indices.view(held, k)
        return cls(features, out, k, indices, rows, pack_blocks(indices), positions, ptr, cols, flat, order, tindices,
                   seg, tpositions, tcols, colseg)  # fmt: skip

    def dense_mask(self) -> Tensor:
        """The ``[out, in]`` boolean mask this plan was made from."""
        mask = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.indices.device)
        return mask.index_fill_(0, self.flat, True).view(self.out_features, self.in_features)


def _held_rows(counts: Tensor, k: int, out: int) -> tuple[Tensor | None, int]:
    """The rows a plan computes (``None``: all ``out``) and their number, from the active entries per row
    ``counts``: rows that neuron ablation emptied are not computed, and with ``k == 0`` none is."""
    if not k:
        return (counts.new_zeros(0) if out else None), 0
    if bool((counts == 0).any()):
        rows = (counts > 0).nonzero().view(-1)
        return rows, rows.numel()
    return None, out


_TILE = 256  # inputs per tile of the C++ kernels' tiled order (kTile in csrc/condensed_train.cpp)
_SMALL_BATCH = 8  # below this, the C++ kernels' gather order (kSmallBatch)


def _tile_major(owner: Tensor, position: Tensor, owners: int, positions: int) -> tuple[Tensor, Tensor]:
    """For entries sorted by owner, then position: the place of each in the order by tile of ``_TILE``
    positions, then owner, then position, and ``[tiles * owners + 1]`` where the run of each (tile, owner) begins
    in that order. A counting sort: the runs are contiguous in both orders."""
    tiles = -(-positions // _TILE)
    tile = position // _TILE
    here = owner * tiles + tile  # nondecreasing
    start = torch.zeros(owners * tiles + 1, dtype=torch.int64, device=owner.device)
    start[1:] = torch.cumsum(torch.bincount(here, minlength=owners * tiles), 0)
    there = tile * owners + owner
    seg = torch.zeros(tiles * owners + 1, dtype=torch.int64, device=owner.device)
    seg[1:] = torch.cumsum(torch.bincount(there, minlength=tiles * owners), 0)
    return seg[there] + torch.arange(owner.numel(), device=owner.device) - start[here], seg


def _inverse(perm: Tensor) -> Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _cpp_ops(kernel: str, *tensors: Tensor | None) -> Any:
    """The C++ ops when they apply (float32 CPU tensors, kernel "auto"/"cpp" and built), else None."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            if kernel == "cpp":
                raise RuntimeError(
                    f"kernel='cpp': the C++ condensed kernels take float32 CPU tensors, got {t.dtype} on {t.device}"
                )
            return None
    return kernels.cpu_condensed_train(kernel)


class CondensedLinearFunction(torch.autograd.Function):
    """``y = x W_active^T + b`` from the condensed form of ``W``'s mask, as an autograd function.

    ``apply(x [batch, in], weight [out, in], bias [out] or None, plan, kernel, dense_gradients, layer)``:
    ``weight`` is the dense weight (zero off the mask, as the masks keep it); only its active entries are read.
    Gradients: ``x`` gets ``dy W_active``; ``weight`` a dense ``[out, in]`` gradient that is zero off the mask
    (the sampled product), or with ``dense_gradients`` the full dense ``dy^T x``; ``bias`` ``dy.sum(0)``.
    ``layer`` is None, or the attachment of a :class:`CondensedCompute`: its compute's ``last_backward_dense``
    is set when the weight's gradient is computed, and the C++ path writes that gradient into memory the layer
    keeps from step to step (see :func:`_gradient_memory`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: CondensedPlan,
        kernel: str,
        dense_gradients: bool,
        layer: Any,
    ) -> Tensor:
        if x.dim() != 2 or x.shape[1] != plan.in_features or weight.shape != (plan.out_features, plan.in_features):
            raise RuntimeError(  # the kernels index x and weight by the plan: never read past them
                f"CondensedLinearFunction: x must be [batch, {plan.in_features}] and weight [{plan.out_features},"
                f" {plan.in_features}] for this plan, got {tuple(x.shape)} and {tuple(weight.shape)}"
            )
        ops = _cpp_ops(kernel, x, weight, bias) if plan.held and plan.k else None
        ctx.plan, ctx.dense, ctx.layer, ctx.ops = plan, dense_gradients, layer, ops
        ctx.values_t = None
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tiled = ops is not None and x.shape[0] >= _SMALL_BATCH
        ctx.tiled = tiled
        if not plan.held or not plan.k:  # every row empty: the outputs are the bias
            ctx.save_for_backward(x if needs_w else None, None)
            y = x.new_zeros(x.shape[0], plan.out_features)
            return y if bias is None else y + bias
        if ops is not None:
            x = x.contiguous()
            values, values_t = ops.condensed_train_values(
                weight.contiguous(), plan.indices, plan.rows,
                (plan.tpositions if tiled else plan.positions) if needs_x else None, plan.order if tiled else None,
            )
            ctx.values_t = values_t if needs_x else None
            if not tiled:
                ctx.save_for_backward(x if needs_w else None, None)
                return ops.condensed_linear(x, values, plan.packed_indices, bias, plan.out_features, False, plan.rows)
            b = None if bias is None else bias.contiguous()
            y, x_chunks = ops.condensed_train_forward(x, values, plan.tindices, plan.seg, b, plan.out_features, plan.rows)
            # the backward's sampled product reads x in chunks; the dense product (RigL's update steps) reads x
            ctx.save_for_backward(x if needs_w and dense_gradients else None, x_chunks if needs_w else None)
            return y
        ctx.save_for_backward(x if needs_w else None, weight if needs_x else None)
        values = _values(weight, plan)  # [held, k]
        y = nn.functional.embedding_bag(plan.indices.long(), x.t().contiguous(), per_sample_weights=values,
                                        mode="sum").t()  # fmt: skip
        if plan.rows is not None:
            y = x.new_zeros(x.shape[0], plan.out_features).index_copy_(1, plan.rows, y)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan: CondensedPlan = ctx.plan
        x, saved = ctx.saved_tensors
        weight = x_chunks = None
        if ctx.tiled:
            x_chunks = saved
        else:
            weight = saved
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        dy = dy.contiguous()
        ops = ctx.ops
        empty = not plan.held or not plan.k
        dy_chunks = None
        if ctx.tiled and not empty and (needs_x or (needs_w and not ctx.dense)):
            dy_chunks = ops.condensed_train_chunks(dy)
        if needs_x:
            if empty:
                dx = dy.new_zeros(dy.shape[0], plan.in_features)
            elif dy_chunks is not None:
                dx = ops.condensed_train_tiled_grad_input(dy_chunks, dy.shape[0], plan.tcols, ctx.values_t, plan.colseg,
                                                          plan.in_features)  # fmt: skip
            elif ops is not None:
                dx = ops.condensed_train_grad_input(dy, plan.ptr, plan.cols, ctx.values_t, plan.in_features)
            else:
                dx = dy @ _active_weight(weight, plan)
        if needs_w:
            if ctx.dense:
                dw = dy.t().mm(x) if ops is None else torch.mm(dy.t(), x, out=_gradient_memory(ctx.layer, x, plan))
            elif empty:
                dw = dy.new_zeros(plan.out_features, plan.in_features)
            elif ops is not None:
                if x_chunks is not None:
                    grad_values = ops.condensed_train_tiled_grad_values(dy_chunks, x_chunks, plan.tindices, plan.seg,
                                                                        plan.rows)  # fmt: skip
                    dw = _gradient_memory(ctx.layer, x_chunks, plan)
                    ops.condensed_train_dense_grad(grad_values, plan.indices, plan.rows, dw, plan.order)
                else:
                    grad_values = ops.condensed_train_grad_values(dy, x.contiguous(), plan.indices, plan.rows)
                    dw = _gradient_memory(ctx.layer, x, plan)
                    ops.condensed_train_dense_grad(grad_values, plan.indices, plan.rows, dw, None)
            else:
                dw = _sampled_grad(dy, x, plan)
            if ctx.layer is not None:
                ctx.layer.compute.last_backward_dense = bool(ctx.dense)
        if needs_b:
            db = dy.sum(0)
        ctx.values_t = None
        return dx, dw, db, None, None, None, None


def _gradient_memory(layer: _Attached | None, like: Tensor, plan: CondensedPlan) -> Tensor:
    """A new ``[out, in]`` tensor for the weight's gradient, over memory the layer keeps between steps.

    A fresh tensor of a large layer's size is new memory from the system, and its page faults cost several times
    the writes (a 3072 x 3072 float32 gradient: ~20 ms against ~3 ms on the reference CPU); ``nn.Linear``'s
    backward pays that at every step after ``zero_grad(set_to_none=True)``. Here the gradient is a new tensor
    object over the layer's kept storage: autograd takes it as the weight's ``.grad`` (nothing else references
    the tensor), ``zero_grad`` drops the tensor, and the storage serves the next step. When the weight's current
    ``.grad`` still lies in that storage (gradients accumulated over several backward passes), fresh memory is
    used instead, so nothing is overwritten."""
    shape = (plan.out_features, plan.in_features)
    if layer is None:
        return like.new_empty(shape)
    storage = layer.grad_storage
    grad = layer.param.grad
    needed = plan.out_features * plan.in_features * like.element_size()
    if (
        storage is None
        or storage.nbytes() != needed
        or storage.device != like.device
        or (grad is not None and grad.untyped_storage().data_ptr() == storage.data_ptr())
    ):
        fresh = like.new_empty(shape)
        layer.grad_storage = fresh.untyped_storage()
        return fresh
    return like.new_empty(0).set_(storage, 0, shape)


def _values(weight: Tensor, plan: CondensedPlan) -> Tensor:
    """``[held, k]``: the active entries of the dense weight, row by row."""
    return weight.reshape(-1).index_select(0, plan.flat).view(plan.held, plan.k)


def _active_weight(weight: Tensor, plan: CondensedPlan) -> Tensor:
    """The dense weight with zeros off the mask (the torch path's ``W_active``)."""
    flat = weight.reshape(-1)
    return torch.zeros_like(flat).index_copy_(0, plan.flat, flat.index_select(0, plan.flat)).view_as(weight)


def _sampled_grad(dy: Tensor, x: Tensor, plan: CondensedPlan) -> Tensor:
    """The torch path's weight gradient at the active positions, in batch slices (memory ``~ slice * held * k``)."""
    rows = torch.arange(plan.out_features, device=dy.device) if plan.rows is None else plan.rows
    indices = plan.indices.long()
    values = dy.new_zeros(plan.held, plan.k)
    step = max(1, (1 << 22) // max(1, plan.held * plan.k))
    for b0 in range(0, dy.shape[0], step):
        g, xs = dy[b0 : b0 + step].index_select(1, rows), x[b0 : b0 + step]  # [s, held], [s, in]
        values += torch.einsum("sh,shk->hk", g, xs[:, indices])
    grad = dy.new_zeros(plan.out_features * plan.in_features)
    return grad.index_copy_(0, plan.flat, values.view(-1)).view(plan.out_features, plan.in_features)


def condensed_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: CondensedPlan,
    *,
    kernel: str = "auto",
    dense_gradients: bool = False,
    layer: Any = None,
) -> Tensor:
    """``x [..., in]`` -> ``[..., out]`` with :class:`CondensedLinearFunction` (``weight`` ``[out, in]`` or a 1x1
    conv's ``[out, in, 1, 1]``)."""
    if x.dim() == 0 or x.shape[-1] != plan.in_features:  # the kernels index x by the plan: never read past a row
        raise RuntimeError(
            f"condensed layer: the input's last dimension must be in_features = {plan.in_features}, got input of"
            f" shape {tuple(x.shape)} (nn.Linear would refuse it too)"
        )
    if x.dim() == 2 and weight.dim() == 2:  # no views: two backward nodes fewer, 10-20 % of a small layer's step
        return CondensedLinearFunction.apply(x, weight, bias, plan, kernel, dense_gradients, layer)
    w = weight.reshape(plan.out_features, plan.in_features)
    y = CondensedLinearFunction.apply(x.reshape(-1, plan.in_features), w, bias, plan, kernel, dense_gradients, layer)
    return y.reshape(*x.shape[:-1], plan.out_features)


def condensable(module: nn.Module) -> bool:
    """Whether ``compute="condensed"`` applies to ``module``: a plain ``nn.Linear``, or a 1x1 ``nn.Conv2d`` with
    ``groups=1`` and no padding."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and pointwise_conv_problem(module) is None)


class _Forward:
    """The ``forward`` an attached module gets (an instance attribute): the condensed product while the module is
    attached, else the module's own ``forward``. A copy of the module (``copy.deepcopy``, pickling: EMA or SWA
    copies, ``torch.save(model)``) keeps this object but not the attachment (:meth:`_Attached.__reduce__`), so it
    computes densely from its own weights."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        module = self.module
        layer: _Attached | None = module.__dict__.get("_condensed")
        weight = module.weight
        if layer is None or x.dtype != weight.dtype:  # detached, a copy, or autocast: the module's own product
            return type(module).forward(module, x)
        compute = layer.compute
        if type(module) is nn.Linear:
            return condensed_linear(x, weight, module.bias, layer.plan, kernel=compute.kernel,
                                    dense_gradients=compute.dense_gradients, layer=layer)  # fmt: skip
        if x.dim() == 3:  # unbatched [C, H, W]
            return self(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            return type(module).forward(module, x)
        stride = module.stride
        if tuple(stride) != (1, 1):
            x = x[:, :, :: stride[0], :: stride[1]]
        n, _, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, -1)
        y = condensed_linear(rows, weight, module.bias, layer.plan, kernel=compute.kernel,
                             dense_gradients=compute.dense_gradients, layer=layer)  # fmt: skip
        return y.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _detached() -> None:
    return None


@dataclass(eq=False)
class _Attached:
    """One attached layer: its compute, weight name, weight Parameter, plan, and the memory its weight gradient
    reuses (:func:`_gradient_memory`). Copied or pickled, it is ``None``: copies of the module compute densely."""

    compute: CondensedCompute
    name: str
    param: Tensor
    plan: CondensedPlan
    grad_storage: Any = None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _detached, ()


class CondensedCompute:
    """Condensed forward and backward for the constant-fan-in layers of a model, attached to their modules.

    Args:
        kernel: ``"auto"`` (the C++ kernels for float32 CPU tensors if they build, else a warning and torch's
            ops), ``"cpp"`` (raise if they cannot be built or do not apply) or ``"torch"``.

    :meth:`attach` replaces the ``forward`` of every given module (an instance attribute; the class and its
    parameters are untouched, so ``state_dict``, DDP and optimizers see the same model), :meth:`refresh` rebuilds
    the condensed forms from new masks (after every mask update), :meth:`detach` restores the modules.
    :attr:`dense_gradients` switches the next backward passes to dense weight gradients (RigL's update steps);
    :attr:`last_backward_dense` says whether the latest weight gradient was dense.
    """

    def __init__(self, kernel: str = "auto") -> None:
        self.kernel = kernels.check_condensed_kernel(kernel)
        self.dense_gradients = False
        self.last_backward_dense = False
        self._layers: dict[str, tuple[nn.Module, _Attached]] = {}

    @property
    def names(self) -> list[str]:
        """The parameter names of the attached weights."""
        return list(self._layers)

    def attach(self, modules: Mapping[str, nn.Module], masks: Mapping[str, Tensor]) -> list[str]:
        """Compute every module of ``modules`` (weight name -> module, as in ``named_parameters()``) from the
        condensed form of ``masks[name]``; modules :func:`condensable` refuses are left as they are. Returns the
        names attached. Raises ``ValueError`` for a mask without a constant fan-in (nothing is attached then)."""
        plans = {}
        for name, module in modules.items():
            if not condensable(module) or name in self._layers:
                continue
            if "forward" in module.__dict__:
                raise ValueError(f"compute='condensed': the module of {name} already has its own forward attribute")
            plans[name] = (module, CondensedPlan.from_mask(masks[name], name, self.kernel))
        for name, (module, plan) in plans.items():
            attached = _Attached(self, name, module.weight, plan)
            module.__dict__["_condensed"] = attached
            module.__dict__["forward"] = _Forward(module)
            self._layers[name] = (module, attached)
        return list(plans)

    def refresh(self, masks: Mapping[str, Tensor]) -> None:
        """Rebuild the condensed form of every attached layer from ``masks`` (after a mask update)."""
        plans = {name: CondensedPlan.from_mask(masks[name], name, self.kernel) for name in self._layers}
        for name, plan in plans.items():
            self._layers[name][1].plan = plan

    def detach(self) -> None:
        """Restore the modules' own ``forward``."""
        for module, _ in self._layers.values():
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_condensed", None)
        self._layers.clear()

    def plan(self, name: str) -> CondensedPlan:
        """The current condensed form of the weight ``name``."""
        return self._layers[name][1].plan
