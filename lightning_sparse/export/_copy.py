"""The inference copy each exporter returns: masks applied to its weights, submodules replaced, frozen."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def apply_masks(net: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, nn.Parameter]:
    """Zero ``net``'s weights outside ``masks`` (``torch.bool`` by parameter name), in place; its parameters."""
    params = dict(net.named_parameters())
    for name, mask in (masks or {}).items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model; its parameters are: {', '.join(params)}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} must be torch.bool of shape {tuple(params[name].shape)},"
                f" got {getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}"
            )
        with torch.no_grad():
            params[name].mul_(mask.to(params[name].device))
    return params


def replace_module(net: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``net``'s submodule ``name`` (a non-empty dotted name)."""
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, new)


def freeze(net: nn.Module) -> nn.Module:
    """``net`` in eval mode with every parameter ``requires_grad=False`` (an inference copy)."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
