"""What the sparsity report reads of a run (:meth:`~lightning_sparse.Sparsifier.report_layers`): the local masks,
the local weights of the other costed layers, and their layout (FSDP2 shards, weights stored ``[in, out]``,
attention modules)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_sparse.core import distributed
from lightning_sparse.core.layers import AttentionHeads, MaskedLayer, is_hf_conv1d


def report_inputs(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    layers: Mapping[str, MaskedLayer],
    layout: dict[str, Any],
    attention: Mapping[str, AttentionHeads],
    names: Iterable[str],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The (local) ``masks``, plus the (local) weights of the other layers in ``names``, and the layout: the
    shard layout (FSDP2: ``layout`` holds the masks' ``specs`` and ``group``, extended here),
    ``transposed`` (the layers stored ``[in, out]``, ``transformers``' ``Conv1D``, whose columns are their output
    channels) and ``attention`` (the modules of ``attention`` whose projections are all among the layers, for
    their empty heads). Under FSDP2 a layer that every process holds whole has no spec (the report counts it
    on the first process only); a ``Conv1D`` weight is sharded by its stored rows (input channels), which the report's all-reduced
    counts handle (each process passes its row block as stored, not transposed)."""
    result: dict[str, Tensor] = dict(masks)
    params = dict(model.named_parameters())
    for name in names:
        if name in result or name not in params:
            continue
        spec = distributed.shard_spec(params[name], name)
        result[name] = distributed.local(params[name])
        if layout and spec.sharded:  # a weight every process holds whole is counted once by the report
            layout["specs"][name] = spec
    transposed = [name for name in result if _transposed(model, layers, name)]
    if transposed:
        layout["transposed"] = transposed
    attention = {m: a for m, a in attention.items() if all(n in result for n in a.layers)}
    if attention:
        layout["attention"] = attention
    return result, layout


def _transposed(model: nn.Module, layers: Mapping[str, MaskedLayer], name: str) -> bool:
    """Whether the weight ``name`` is stored ``[in, out]`` (``transformers``' ``Conv1D``)."""
    layer = layers.get(name)
    if layer is not None:
        return layer.transposed
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return attr == "weight" and is_hf_conv1d(module)
