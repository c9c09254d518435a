"""Passes over a whole tensor that every mask update makes: count the active (non-zero) entries, look for NaN and
inf, sum the magnitudes of the active entries, zero the positions an update grew. On the CPU torch runs these at
1-3 GB/s per thread (``count_nonzero`` of a float tensor converts it first; ``masked_fill_`` writes every element it
reads; a float times a bool mask converts the mask first), which made them half of a ResNet-50 update; the C++
passes of ``csrc/masked_zero.cpp`` run at the memory's speed.

The C++ passes run where the mask kernel (:func:`lightning_sparse.kernels.cpu_masked_zero`) is already loaded in
this process (the masks' ``mask_kernel="auto"`` or ``"cpp"`` loaded it; ``"torch"`` compiles nothing, and these
passes then use torch's ops too), on contiguous CPU tensors of the dtypes they take. Everything else (CUDA, FSDP2's
DTensors, strided views) goes through torch's ops. Both give the same results (tests/functional/test_passes.py).

>>> import torch
>>> int(nonzero_count(torch.tensor([0.0, -0.0, 2.0, float("nan")])))
2
>>> bool(has_nonfinite(torch.tensor([1.0, float("inf")])))
True
>>> t = torch.ones(4)
>>> zero_where_([t], torch.tensor([True, False, False, True]))
>>> t.tolist()
[0.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse import kernels

__all__ = ["abs_sum_where", "has_nonfinite", "nonzero_count", "zero_where_"]

_DTYPES = (torch.bool, torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _ops(*tensors: Tensor) -> Any:
    """``torch.ops.lightning_sparse`` when the mask kernel is loaded and every tensor is a plain contiguous CPU
    tensor of a dtype the passes take; else None."""
    for t in tensors:
        if type(t) not in (Tensor, nn.Parameter) or t.device.type != "cpu" or not t.is_contiguous():
            return None
        if t.dtype not in _DTYPES:
            return None
    return kernels.loaded_mask_passes()


def nonzero_count(t: Tensor) -> Tensor:
    """``torch.count_nonzero(t)``: a 0-dim int64 tensor (no host synchronization on CUDA)."""
    ops = _ops(t)
    if ops is None or t.numel() == 0:
        return torch.count_nonzero(t.detach()).to(torch.int64)
    return ops.nonzero_count(t.detach())


def has_nonfinite(t: Tensor) -> Tensor:
    """Whether ``t`` holds NaN or inf, as a 0-dim bool tensor (no host synchronization): a C++ pass over the bits,
    or one ``aminmax`` (NaN propagates to both, an infinity is the minimum or the maximum): one read of ``t`` and no
    temporary of its size, unlike ``isfinite(t).all()``."""
    if not t.is_floating_point() or t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    ops = _ops(t)
    if ops is not None:
        return ops.any_nonfinite(t.detach())
    low, high = t.detach().aminmax()
    return ~(low.isfinite() & high.isfinite())


def abs_sum_where(t: Tensor, mask: Tensor) -> Tensor:
    """The sum of ``|t|`` where the bool ``mask`` is True, as a 0-dim float32 tensor (no host synchronization): a C++
    pass summing in float64 in a fixed order (the same at any thread count), or torch's ``t.abs().mul_(mask).sum()``
    (float32 sums: the last bits may differ between the two)."""
    ops = _ops(t, mask) if t.dtype in (torch.float32, torch.float64) and mask.dtype == torch.bool else None
    if ops is None or t.shape != mask.shape:
        return t.detach().abs().float().mul_(mask.view(torch.uint8)).sum()
    return ops.abs_sum_where(t.detach(), mask).float()


@torch.no_grad()
def zero_where_(tensors: Sequence[Tensor], mask: Tensor) -> None:
    """Zero every tensor of ``tensors`` (each shaped like ``mask``) where the bool ``mask`` is True, in place, as
    ``t.masked_fill_(mask, 0)`` does; each tensor's version counter moves as an in-place op moves it."""
    ops = _ops(mask, *tensors) if mask.dtype == torch.bool and all(t.shape == mask.shape for t in tensors) else None
    if ops is None:
        for t in tensors:
            t.masked_fill_(mask, 0)
        return
    ops.zero_where_([t.detach() for t in tensors], mask)
    for t in tensors:  # a C++ op that writes in place does not move the counter itself
        torch.autograd.graph.increment_version(t)
