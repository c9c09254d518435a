"""The condensed layout of a constant-fan-in weight (``values [out, k]``, ``indices [out, k]``, optional ``rows``):
built from a dense weight, checked, and packed in 16-row blocks for the C++ kernel."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def tensor_version(t: Tensor) -> int:
    """``t``'s in-place modification counter (-1 for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def pack_blocks(t: Tensor, block: int = 16) -> Tensor:
    """``[out, k]`` -> ``[ceil(out / block), k, block]``, rows padded with zeros (see ``CondensedLinear._packed``)."""
    out, k = t.shape
    blocks = -(-out // block)
    padded = torch.cat([t, t.new_zeros(blocks * block - out, k)]) if blocks * block != out else t
    return padded.reshape(blocks, block, k).transpose(1, 2).contiguous()


def check_condensed(
    in_features: int,
    values: Tensor,
    indices: Tensor,
    bias: Tensor | None,
    name: str,
    rows: Tensor | None = None,
    out_features: int | None = None,
) -> None:
    """Raise ``ValueError`` unless the parts form a valid condensed layer (indices increasing, in range; ``rows``
    increasing, in ``[0, out_features)``, one per row of ``values``)."""
    out = values.shape[0] if out_features is None else out_features
    if rows is not None and values.dim() == 2:
        if rows.dim() != 1 or rows.numel() != values.shape[0]:
            raise ValueError(f"{name}: rows must be 1-D with one entry per row of values ({values.shape[0]}), got"
                             f" shape {tuple(rows.shape)}")  # fmt: skip
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out or not bool((rows[1:] > rows[:-1]).all())):
            raise ValueError(f"{name}: rows must increase strictly and lie in [0, {out})")
    if values.dim() != 2 or not values.is_floating_point():
        raise ValueError(
            f"{name}: values must be a 2-D floating-point tensor [out, k], got {tuple(values.shape)} {values.dtype}"
        )
    if indices.shape != values.shape or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: indices must be int32 or int64 of the shape of values {tuple(values.shape)}, got"
            f" {indices.dtype} of shape {tuple(indices.shape)}"
        )
    if indices.dtype == torch.int32 and in_features > torch.iinfo(torch.int32).max:
        raise ValueError(f"{name}: {in_features} input features need int64 indices")
    if values.shape[1] > in_features:
        raise ValueError(f"{name}: k = {values.shape[1]} entries per row, more than the {in_features} inputs")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= in_features:
            raise ValueError(
                f"{name}: indices must lie in [0, {in_features}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        if values.shape[1] > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all()):
            raise ValueError(f"{name}: indices must increase strictly along each row (sorted, no repeats)")
    if bias is not None and (bias.shape != (out,) or bias.dtype != values.dtype):
        raise ValueError(f"{name}: bias must be {values.dtype} of shape ({out},), got {bias.dtype} {tuple(bias.shape)}")


def condense(weight: Tensor, mask: Tensor | None, index_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(values, indices, rows)`` of a 2-D weight whose rows all hold the same number of non-zeros (or mask
    entries) or none: ``rows`` lists the rows that hold some (``None`` when all do), and only they are kept."""
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`index_dtype` must be torch.int32 or torch.int64, got {index_dtype}")
    kept = weight != 0 if mask is None else mask.to(weight.device, torch.bool)
    counts = kept.sum(1)
    low, high = fan_in_range(counts)
    if low != high:
        what = "non-zero weights" if mask is None else "mask entries"
        raise ValueError(f"the rows hold {low} to {high} {what}: not a constant fan-in")
    rows = None
    if high and bool((counts == 0).any()):  # rows emptied by neuron ablation: not computed (their output is the bias)
        rows = (counts > 0).nonzero().view(-1)
        weight, kept = weight[rows], kept[rows]
    indices = kept.nonzero()[:, 1].view(weight.shape[0], high)  # row-major: increasing along each row
    return weight.gather(1, indices).contiguous(), indices.to(index_dtype).contiguous(), rows


def fan_in_range(counts: Tensor) -> tuple[int, int]:
    """The fewest and most entries of the non-empty rows (``(0, 0)`` when every row is empty): a constant fan-in
    when they are equal (empty rows, as neuron ablation leaves them, are allowed)."""
    nonempty = counts[counts > 0]
    if nonempty.numel() == 0:
        return 0, 0
    return int(nonempty.min()), int(nonempty.max())


def pointwise_conv_problem(conv: nn.Module) -> str | None:
    """Why a Conv2d is not a channel-wise Linear (1x1, groups 1, no padding), or None."""
    if tuple(conv.kernel_size) != (1, 1):
        return f"kernel {tuple(conv.kernel_size)}"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    padding = conv.padding
    if not (padding in ("valid", "same") or tuple(padding) == (0, 0)):
        return f"padding={padding}"
    return None
