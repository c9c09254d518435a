"""Which layers a cost model counts, how layer names resolve to modules, and running a model once to measure it.

The costed layers are the module types of :data:`~lightning_sparse.core.layers.DEFAULT_LAYER_TYPES`
(``nn.Linear``, ``nn.Conv1d/2d/3d``), ``transformers``' ``Conv1D`` and the input projections of
``nn.MultiheadAttention``, named by their parameter paths (``"features.0.weight"``,
``"attn.in_proj_weight"``); module names (``"features.0"``) are accepted too. A module reachable under several
paths is named by its first (``named_modules()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.core.layers import ATTENTION_PROJECTIONS, DEFAULT_LAYER_TYPES, is_hf_conv1d

__all__ = [
    "as_args",
    "attention_module",
    "attention_projections",
    "call_sources",
    "costed_weights",
    "eval_mode",
    "is_costed",
    "resolve",
    "tensors",
    "weight_attr",
]


def is_costed(module: nn.Module) -> bool:
    """Whether a cost model counts ``module`` (or, for an ``nn.MultiheadAttention``, its projections)."""
    return isinstance(module, (*DEFAULT_LAYER_TYPES, nn.MultiheadAttention)) or is_hf_conv1d(module)


def attention_projections(module: nn.MultiheadAttention) -> tuple[str, ...]:
    """The input projection attributes of an ``nn.MultiheadAttention``: packed, or one per Q, K and V."""
    return ("in_proj_weight",) if module.in_proj_weight is not None else ATTENTION_PROJECTIONS


def costed_weights(root: nn.Module) -> dict[str, tuple[str, str]]:
    """Weight name → (module name, attribute) of every layer under ``root`` that a cost model counts: the
    ``weight`` of linear/conv layers and ``Conv1D``, the input projections of ``nn.MultiheadAttention``."""
    found: dict[str, tuple[str, str]] = {}
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DEFAULT_LAYER_TYPES) or is_hf_conv1d(module):
            found[f"{prefix}weight"] = (name, "weight")
        elif isinstance(module, nn.MultiheadAttention):
            found.update({f"{prefix}{attr}": (name, attr) for attr in attention_projections(module)})
    return found


def resolve(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
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
        elif isinstance(modules.get(owner), nn.MultiheadAttention) and attr in attention_projections(modules[owner]):
            resolved[name] = owner
        else:
            layers = list(costed_weights(model))
            raise ValueError(
                f"{name!r} is neither a module name nor a '<module>.weight' parameter name of"
                f" {type(model).__name__}; its linear/conv layers are: {layers}"
            )
    return resolved


def weight_attr(name: str, module_name: str) -> str:
    """The attribute of module ``module_name`` that layer ``name`` names (``"weight"`` for a module name)."""
    if name == module_name:
        return "weight"
    return name[len(module_name) + 1 :] if module_name else name


def _attention_parent(model: nn.Module, module_name: str) -> str | None:
    """The name of the ``nn.MultiheadAttention`` whose ``out_proj`` is the module ``module_name``, or ``None``."""
    parent, _, child = module_name.rpartition(".")
    if child != "out_proj" or not module_name:
        return None
    owner = model.get_submodule(parent)
    is_out_proj = isinstance(owner, nn.MultiheadAttention) and owner.out_proj is model.get_submodule(module_name)
    return parent if is_out_proj else None


def attention_module(model: nn.Module, name: str) -> str | None:
    """The ``nn.MultiheadAttention`` whose calls give the cost of layer ``name`` (one of its projections or its
    ``out_proj``), or ``None``."""
    module_name = resolve(model, [name])[name]
    if isinstance(model.get_submodule(module_name), nn.MultiheadAttention):
        return module_name
    return _attention_parent(model, module_name)


def call_sources(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The modules whose recorded calls are the calls of layer ``module_name``, first non-empty wins: the layer,
    then for an ``nn.MultiheadAttention``'s ``out_proj`` (which the module does not call) the attention module."""
    parent = _attention_parent(model, module_name)
    module = model.get_submodule(module_name)
    return [module] if parent is None else [module, model.get_submodule(parent)]


# ----------------------------------------------------------------------------- running a model to measure it


def as_args(example_input: Any) -> tuple[Any, ...]:
    """The positional arguments of ``model(...)``: a tuple/list as given, anything else as one argument."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
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


def tensors(obj: Any) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors(item)]
    return []
