"""``to_semi_structured``: a copy for CUDA inference whose 2:4 ``nn.Linear`` weights (``pattern="2:4"``) are
``torch.sparse`` semi-structured tensors (sparse tensor cores, fp16/bf16); ``semi_structured_layers`` names the
layers it converts."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_sparse.export._copy import apply_masks, freeze

log = logging.getLogger(__name__)

_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_backend() -> type:
    """The ``SparseSemiStructuredTensor`` subclass ``to_sparse_semi_structured`` would use, with CUTLASS
    instead of cuSPARSELt when this torch has no cuSPARSELt."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def semi_structured_layers(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    skip_unsupported: bool = False,
) -> list[str]:
    """The names of the ``nn.Linear`` layers :func:`to_semi_structured` converts: those whose weight is 2:4
    (at most 2 non-zero weights in every group of 4 consecutive inputs; with a mask, exactly 2 of every 4 mask
    entries, :func:`~lightning_sparse.functional.patterns.check_pattern`) and whose shape the semi-structured
    backend takes for ``dtype`` (default: the weight's when it is ``float16`` or ``bfloat16``, else ``float16``,
    what :func:`to_semi_structured` would cast to). Runs on any device and for any dtype of the model (nothing is
    converted): a 2:4-trained ``float32`` CPU model gets its selection.

    Layers without any zero weight (or with an all-True mask) are dense on purpose and not listed. 2:4 layers whose
    shape the backend does not take (``pattern="2:4"`` masks a 10-class output layer, but the kernel needs the rows
    a multiple of 16 or 32) are left out with a ``UserWarning`` naming them and the shape rule. Other sparse layers
    (not 2:4) raise ``ValueError`` naming them and why, unless ``skip_unsupported``: then they are left out with a
    ``UserWarning`` naming them.

    Raises:
        ValueError: sparse layers that are not 2:4 (named), unless ``skip_unsupported``; a ``dtype`` other than
            ``torch.float16`` or ``torch.bfloat16``.
    """
    from lightning_sparse.functional.patterns import check_pattern, nm_groups_view

    if dtype is not None and dtype not in _SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"`dtype` must be torch.float16 or torch.bfloat16 (or None), got {dtype}")
    masks = masks or {}
    backend = _semi_structured_backend()
    chosen: list[str] = []
    refused: dict[str, str] = {}  # sparse, not 2:4
    shapes: dict[str, str] = {}  # 2:4, a shape the backend does not take
    seen: set[int] = set()
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in seen:
            continue
        seen.add(id(module))
        weight = module.weight.detach()
        mask = masks.get(f"{name}.weight" if name else "weight")
        kept = weight != 0 if mask is None else mask.to(weight.device, torch.bool)
        if bool(kept.all()):
            continue
        label = name or "Linear"
        if module.in_features % 4:
            refused[label] = f"not 2:4: {module.in_features} inputs, not a multiple of 4"
            continue
        if mask is not None:
            is_24 = check_pattern(kept, "2:4")
        else:
            is_24 = bool((nm_groups_view(kept, 4).sum(1) <= 2).all())
        if not is_24:
            what = "non-zero weights" if mask is None else "mask entries (or fewer)"
            refused[label] = f"not 2:4: a group of 4 inputs holds more than 2 {what}"
            continue
        target = dtype or (weight.dtype if weight.dtype in _SEMI_STRUCTURED_DTYPES else torch.float16)
        config = backend._DTYPE_SHAPE_CONSTRAINTS[target]
        rows, cols = weight.shape
        if rows % config.sparse_min_rows or cols % config.sparse_min_cols:
            shapes[label] = (
                f"shape {tuple(weight.shape)}: {backend.__name__} needs the rows a multiple of {config.sparse_min_rows}"
                f" and the inputs a multiple of {config.sparse_min_cols} for {target}"
            )
            continue
        chosen.append(name)
    if refused and not skip_unsupported:
        raise ValueError(
            "to_semi_structured: these sparse Linear layers are not 2:4: "
            + "; ".join(f"{n!r} ({why})" for n, why in refused.items())
            + ". Train them with pattern='2:4', keep them dense, or pass skip_unsupported=True to leave them as they are"
        )
    if shapes:
        warnings.warn(
            f"to_semi_structured: left {len(shapes)} 2:4 Linear layer(s) dense, their shape does not fit the"
            " semi-structured kernel: " + "; ".join(f"{n!r} ({why})" for n, why in shapes.items()),
            UserWarning,
            stacklevel=2,
        )
    if refused:
        warnings.warn(
            f"to_semi_structured: left {len(refused)} sparse Linear layer(s) dense: "
            + "; ".join(f"{n!r} ({why})" for n, why in refused.items()),
            UserWarning,
            stacklevel=2,
        )
    return chosen


def to_semi_structured(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    skip_unsupported: bool = False,
) -> nn.Module:
    """A copy of ``model`` for CUDA inference in which every 2:4 ``nn.Linear`` weight is a
    ``torch.sparse`` semi-structured tensor (sparse tensor cores: Ampere, compute capability 8.0, or newer).

    Follows torch's documented usage: ``linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight))``
    on a CUDA fp16/bf16 model; ``F.linear`` then runs the 2:4 kernel (cuSPARSELt, or CUTLASS where torch has no
    cuSPARSELt or ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set). Which layers: see
    :func:`semi_structured_layers` (the same ``masks``, ``dtype`` and ``skip_unsupported``). Inputs must have the
    model's dtype.

    Args:
        model: the trained 2:4 model, on a CUDA device; not modified.
        masks: optional ``torch.bool`` masks by parameter name, applied to the copy first.
        dtype: ``torch.float16`` or ``torch.bfloat16`` to cast the copy to; default: keep the model's dtype,
            which must then be one of them for the converted layers.
        skip_unsupported: leave sparse layers that are not 2:4 (or whose shape or dtype the backend does not
            take) dense, with a warning, instead of raising.

    Returns:
        The copy, in eval mode, every parameter ``requires_grad=False``.

    Raises:
        RuntimeError: the model's Linear weights are not on a CUDA device (e.g. on the CPU: use
            :func:`to_condensed` there), or the GPU is older than compute capability 8.0.
        ValueError: sparse layers that are not 2:4 (named), unless ``skip_unsupported``; a bad ``dtype``; 2:4
            layers whose weights are neither ``float16`` nor ``bfloat16`` when ``dtype`` is not given.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in _SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"`dtype` must be torch.float16 or torch.bfloat16, got {dtype}")
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    off_gpu = {name or "Linear": m.weight.device for name, m in linears.items() if m.weight.device.type != "cuda"}
    if off_gpu:
        listed = ", ".join(map(repr, list(off_gpu)[:5])) + (" ..." if len(off_gpu) > 5 else "")
        where = ", ".join(sorted({str(d) for d in off_gpu.values()}))
        raise RuntimeError(
            "to_semi_structured: 2:4 semi-structured weights run on CUDA GPUs only (sparse tensor cores), but"
            f" Linear layer(s) {listed} are on {where}. Move the model first (model.cuda().half()); on the CPU"
            " use to_condensed() for fan_in models, or to_sparse()"
        )
    devices = {m.weight.device for m in linears.values()}
    for device in devices:
        if torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            raise RuntimeError(
                f"to_semi_structured: {device} has compute capability {major}.{minor}; 2:4 semi-structured"
                " sparsity needs 8.0 or newer (Ampere)"
            )
    net = copy.deepcopy(model)
    apply_masks(net, masks)
    if dtype is not None:
        net = net.to(dtype)
    names = semi_structured_layers(net, masks, dtype=dtype, skip_unsupported=skip_unsupported)
    wrong = {n or "Linear": net.get_submodule(n).weight.dtype for n in names}
    wrong = {n: d for n, d in wrong.items() if d not in _SEMI_STRUCTURED_DTYPES}
    if wrong:
        raise ValueError(
            f"to_semi_structured: the 2:4 Linear layer(s) {', '.join(map(repr, wrong))} hold"
            f" {', '.join(sorted({str(d) for d in wrong.values()}))} weights; semi-structured weights are"
            " torch.float16 or torch.bfloat16: pass dtype=torch.float16 or dtype=torch.bfloat16 (or cast the model)"
        )
    backend = _semi_structured_backend()
    for name in names:
        module = net.get_submodule(name)
        weight = module.weight.detach().contiguous()
        if backend is torch.sparse.SparseSemiStructuredTensorCUSPARSELT:
            sparse = torch.sparse.to_sparse_semi_structured(weight)
        else:
            sparse = backend.from_dense(weight)
        module.weight = nn.Parameter(sparse, requires_grad=False)
    log.info("to_semi_structured: %d Linear layers 2:4 semi-structured", len(names))
    return freeze(net)
