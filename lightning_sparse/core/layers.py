"""Which weights of a model are masked, under which names, and why the others are not. No Lightning here.

By default the masked weights are the ``weight`` of ``nn.Linear`` and ``nn.Conv1d/2d/3d``, the input projections
of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``; its
``out_proj`` is a Linear), and the ``weight`` of Hugging Face ``transformers``' ``Conv1D`` (GPT-2's layers,
recognized by class name without importing transformers; stored ``[in, out]``, so its rows are input channels).
Embedding tables are not masked unless asked (``mask_embeddings``), also when an output layer shares them (tied
weights). A weight shared by several modules is masked once, under the name ``named_parameters()`` gives it.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Embedding(1000, 16), nn.TransformerEncoderLayer(16, 2, 32), nn.Linear(16, 4))
    >>> found = find_layers(model)
    >>> sorted(found.masked)
    ['1.linear1.weight', '1.linear2.weight', '1.self_attn.in_proj_weight', '1.self_attn.out_proj.weight', '2.weight']
    >>> found.masked["1.self_attn.in_proj_weight"].heads
    2
    >>> found.dense["0.weight"]
    'embedding (mask_embeddings=False)'
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
ATTENTION_PROJECTIONS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
LARGE_DENSE = 4096  # 2-D parameters at least this large that stay dense are listed with the reason


@dataclass(frozen=True)
class AttentionHeads:
    """Where the heads of one attention module lie along the output channels of its projection weight(s).

    Attributes:
        layers: names of the projection weight(s) whose output channels, concatenated in this order, are the
            ``parts`` stacked projections (Q | K | V), each ``heads`` consecutive blocks of ``head_dim`` channels:
            one packed weight (``nn.MultiheadAttention``'s ``in_proj_weight``, timm's ``qkv``, GPT-2's
            ``c_attn``), or one per part (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``).
        heads: number of heads.
        parts: number of stacked projections over all ``layers`` (3: Q, K and V).

    Found in a model by :func:`lightning_sparse.core.layers.find_attention`.
    """

    layers: tuple[str, ...]
    heads: int
    parts: int = 3



@dataclass(frozen=True)
class MaskedLayer:
    """One masked weight.

    Attributes:
        name: the parameter's name, as ``named_parameters()`` gives it (the key of its mask).
        module: the name of the module that holds it (its first holder, for a shared weight).
        attr: the attribute of ``module`` that is the weight (``"weight"``, ``"in_proj_weight"``, ...).
        kind: ``"linear"``, ``"conv"``, ``"attention"`` (a ``MultiheadAttention`` input projection),
            ``"embedding"`` or ``"other"`` (named by ``include``, or a ``layer_types`` type).
        transposed: the weight is stored ``[in, out]`` (``transformers``' ``Conv1D``): its rows are input
            channels, its columns output channels.
        heads: attention heads of a ``MultiheadAttention`` projection (0 otherwise).
        parts: how many projections are stacked along the rows (3 for ``in_proj_weight``: Q, K, V).
    """

    name: str
    module: str
    attr: str
    kind: str
    transposed: bool = False
    heads: int = 0
    parts: int = 1

    @property
    def out_dim(self) -> int:
        """The dimension of the weight that indexes output channels."""
        return 1 if self.transposed else 0


@dataclass
class FoundLayers:
    """What :func:`find_layers` found: ``masked`` (parameter name → :class:`MaskedLayer`, in module order),
    ``params`` (the same names → the parameters), ``dense`` (large 2-D parameters left dense → why), and
    ``groups`` (masked name → its density group, filled by :func:`lightning_sparse.core.selection.select_layers`)."""

    masked: dict[str, MaskedLayer] = field(default_factory=dict)
    params: dict[str, Tensor] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    def drop(self, names: Iterable[str], reason: str) -> None:
        """Leave ``names`` dense, recording ``reason``."""
        for name in list(names):
            self.masked.pop(name, None)
            self.groups.pop(name, None)
            param = self.params.pop(name, None)
            if param is not None and _large_2d(param):
                self.dense[name] = reason


def _large_2d(param: Tensor) -> bool:
    return not is_lazy(param) and param.dim() >= 2 and param.numel() >= LARGE_DENSE


def name_matches(param: str, module: str, glob: str) -> bool:
    """Whether the ``fnmatch`` glob ``glob`` names a weight, by its parameter name or its module's name (the way
    ``dense_layers``, ``density`` groups and ``keep_neurons`` name layers)."""
    return fnmatch.fnmatchcase(param, glob) or fnmatch.fnmatchcase(module, glob)


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers, weight ``[in, out]``), without importing it."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def find_attention(model: nn.Module) -> dict[str, AttentionHeads]:
    """The attention modules of ``model`` whose heads :func:`~lightning_sparse.cost.heads.empty_heads`
    can count: module name → :class:`~AttentionHeads` (the parameter names of
    its Q | K | V projections, as ``named_parameters()`` gives them, its heads, 3 parts), in module order.

    Recognized, without importing their libraries:

    * ``nn.MultiheadAttention``: ``in_proj_weight`` ``[3E, E]``, or ``q_proj_weight``, ``k_proj_weight`` and
      ``v_proj_weight`` (``E`` rows each);
    * timm's ``Attention`` (and any module with an integer ``num_heads`` and an ``nn.Linear`` child ``qkv``):
      ``qkv.weight``, output channels Q | K | V;
    * GPT-2's ``GPT2Attention`` (a module with ``num_heads`` and a ``transformers`` ``Conv1D`` child ``c_attn``):
      ``c_attn.weight`` ``[E, 3E]``, whose *columns* are Q | K | V; with cross-attention, ``q_attn.weight``
      (Q) then ``c_attn.weight`` (K | V).

    A module whose projections cannot hold ``3 x heads`` equal blocks is left out. Other attention layouts
    (separate ``query``/``key``/``value`` linear layers, grouped-query attention) are not recognized.

    Example:
        >>> from torch import nn
        >>> model = nn.TransformerEncoderLayer(16, 2, 32)
        >>> find_attention(model)
        {'self_attn': AttentionHeads(layers=('self_attn.in_proj_weight',), heads=2, parts=3)}
    """
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, AttentionHeads] = {}

    def weight_name(module_name: str, module: nn.Module, attr: str) -> str | None:
        weight = getattr(module, attr, None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or is_lazy(weight):
            return None
        path = f"{module_name}.{attr}" if module_name else attr
        return names.get(id(weight), path)

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        heads = getattr(module, "num_heads", None)
        if isinstance(module, nn.MultiheadAttention):
            attrs = ["in_proj_weight"] if module.in_proj_weight is not None else list(ATTENTION_PROJECTIONS)
            layers = [weight_name(module_name, module, attr) for attr in attrs]
            channels = 3 * module.embed_dim
        elif not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
            continue
        elif isinstance(getattr(module, "qkv", None), nn.Linear):
            layers = [weight_name(f"{prefix}qkv", module.qkv, "weight")]
            channels = module.qkv.out_features
        elif is_hf_conv1d(getattr(module, "c_attn", None)):
            attrs = ["c_attn"]
            if getattr(module, "is_cross_attention", False) and is_hf_conv1d(getattr(module, "q_attn", None)):
                attrs = ["q_attn", "c_attn"]  # Q from the decoder, K | V from the encoder's states
            layers = [weight_name(f"{prefix}{attr}", getattr(module, attr), "weight") for attr in attrs]
            channels = sum(getattr(module, attr).weight.shape[-1] for attr in attrs)
        else:
            continue
        heads = module.num_heads
        if None in layers or channels == 0 or channels % (3 * heads):
            continue
        found[module_name] = AttentionHeads(tuple(layers), heads, 3)  # type: ignore[arg-type]
    return found


def _type_matches(module: nn.Module, types: Sequence[type[nn.Module] | str]) -> bool:
    return any(
        isinstance(module, t) if isinstance(t, type) else type(module).__name__ == t or type(module).__qualname__ == t
        for t in types
    )


def _candidates(
    module: nn.Module, layer_types: Sequence[type[nn.Module] | str] | None, mask_embeddings: bool
) -> list[tuple[str, str, bool, int, int]]:
    """(attribute, kind, transposed, heads, parts) of the weights of ``module`` that are masked by type."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", "attention", False, module.num_heads, 3)]
        return [(attr, "attention", False, module.num_heads, 1) for attr in ATTENTION_PROJECTIONS]
    if isinstance(module, EMBEDDING_TYPES):
        return [("weight", "embedding", False, 0, 1)] if mask_embeddings else []
    if is_hf_conv1d(module):
        return [("weight", "linear", True, 0, 1)]
    if layer_types is None:
        if isinstance(module, DEFAULT_LAYER_TYPES):
            return [("weight", "linear" if isinstance(module, nn.Linear) else "conv", False, 0, 1)]
        return []
    if _type_matches(module, layer_types):
        kind = "linear" if isinstance(module, nn.Linear) else "conv" if isinstance(module, nn.modules.conv._ConvNd) else "other"
        return [("weight", kind, False, 0, 1)]
    return []


def has_candidates(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module] | str] | None = None,
    include: Sequence[str] = (),
    mask_embeddings: bool = False,
) -> bool:
    """Whether ``model`` holds a weight that :func:`find_layers` would consider with these options (by module
    type, or by an ``include`` glob), before any is checked, kept dense or refused: ``False`` for a model whose
    layers are built later (``configure_model``)."""
    if any(_candidates(module, layer_types, mask_embeddings) for module in model.modules()):
        return True
    return any(
        not is_lazy(p) and p.dim() >= 2 and any(fnmatch.fnmatchcase(n, g) for g in include)
        for n, p in model.named_parameters()
    )


PRUNED = "pruned with torch.nn.utils.prune: weight_orig * weight_mask, recomputed by a forward pre-hook"
"""Why a weight that ``torch.nn.utils.prune`` computes is refused (see :func:`find_layers`)."""


def _pruned(module: nn.Module, attr: str) -> bool:
    """Whether ``module.<attr>`` is recomputed by a ``torch.nn.utils.prune`` forward pre-hook."""
    from torch.nn.utils import prune

    return any(
        isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == attr
        for hook in module._forward_pre_hooks.values()
    )


def _weight_of(module: nn.Module, attr: str, include_parametrized: Sequence[str], module_name: str) -> Tensor | None:
    if parametrize.is_parametrized(module, attr):
        if module_name in include_parametrized:
            return getattr(module.parametrizations, attr).original
        return None
    return getattr(module, attr, None)


def find_layers(
    model: nn.Module,
    *,
    dense_layers: Sequence[str] = (),
    layer_types: Sequence[type[nn.Module] | str] | None = None,
    include: Sequence[str] = (),
    mask_embeddings: bool = False,
    include_parametrized: Sequence[str] = (),
) -> FoundLayers:
    """The weights of ``model`` that get masks, and the large 2-D parameters that do not (with the reason).

    Args:
        dense_layers: module or parameter names, or ``fnmatch`` globs of either, kept dense; a pattern that
            matches no maskable weight raises ``ValueError`` listing what it could match.
        layer_types: module types (or class names) whose ``weight`` is masked, instead of Linear and
            Conv1d/2d/3d (``MultiheadAttention`` and ``transformers``' ``Conv1D`` are always recognized).
        include: parameter-name globs of further weights to mask (any parameter with 2 or more dimensions).
        mask_embeddings: mask ``nn.Embedding``/``nn.EmbeddingBag`` tables (and the output layers tied to them).
        include_parametrized: module names whose parametrized weight is DST's: their raw weight is returned.

    A weight under another parametrization (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``)
    or computed by a forward hook (the old ``weight_norm``/``spectral_norm``) is refused with a ``ValueError``
    naming it (a mask on the raw weight would not hold on the weight the layer uses): keep it dense with
    ``dense_layers``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDING_TYPES)}
    found = FoundLayers()
    module_names: dict[str, str] = {}
    refused: list[tuple[str, str, str]] = []  # (weight path, module name, why)
    for module_name, module in model.named_modules():
        for attr, kind, transposed, heads, parts in _candidates(module, layer_types, mask_embeddings):
            weight = _weight_of(module, attr, include_parametrized, module_name)
            path = f"{module_name}.{attr}" if module_name else attr
            if weight is None and parametrize.is_parametrized(module, attr):
                why = f"parametrized: {type(getattr(module.parametrizations, attr)[0]).__name__}"
                refused.append((path, module_name, why))
                continue
            if not isinstance(weight, nn.Parameter):
                if isinstance(weight, Tensor) and _pruned(module, attr):
                    refused.append((path, module_name, PRUNED))
                elif isinstance(weight, Tensor) and any(hasattr(module, f"{attr}{s}") for s in ("_v", "_orig")):
                    refused.append((path, module_name, "computed by a forward hook: weight_norm or spectral_norm"))
                continue
            if module_name in include_parametrized and parametrize.is_parametrized(module, attr):
                name = path  # DST's raw weight, keyed as the weight it parametrizes
            else:
                name = names.get(id(weight), path)
            if name in found.masked:
                continue  # a shared weight, masked once
            if id(weight) in embeddings and kind != "embedding":
                if not mask_embeddings:
                    found.params[name] = weight
                    found.drop([name], f"embedding tied to {path} (mask_embeddings=False)")
                    continue
                kind = "embedding"
            found.masked[name] = MaskedLayer(name, module_name, attr, kind, transposed, heads, parts)
            found.params[name] = weight
            module_names[name] = module_name
    for pattern in include:
        matched = [
            n for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, pattern) and not is_lazy(p) and p.dim() >= 2
        ]
        if not matched:
            raise ValueError(f"`include` pattern {pattern!r} matches no parameter with 2 or more dimensions")
        params = dict(model.named_parameters())
        for name in matched:
            if name not in found.masked:
                module_name, _, attr = name.rpartition(".")
                found.masked[name] = MaskedLayer(name, module_name, attr, "other")
                found.params[name] = params[name]
                module_names[name] = module_name
    dense: set[str] = set()
    for pattern in dense_layers:
        matched = {
            n for n in found.masked if name_matches(n, module_names[n], pattern)
        }
        keeps_refused = any(name_matches(path, m, pattern) for path, m, _ in refused)
        if not matched and found.masked and not keeps_refused:
            raise ValueError(
                f"`dense_layers` pattern {pattern!r} matches no maskable layer; the maskable layers are:"
                f" {', '.join(found.masked)}"
            )
        dense |= matched
    refused = [
        f"{path} ({why})"
        for path, module_name, why in refused
        if not any(name_matches(path, module_name, p) for p in dense_layers)
    ]
    if refused:
        pruned = any(PRUNED in why for why in refused)
        raise ValueError(
            f"cannot mask {', '.join(refused)}: the layer computes its weight from other parameters, so a mask on"
            " them would not hold on the weight it uses. Keep those layers dense with `dense_layers`, or remove"
            + (
                " the pruning first: `torch.nn.utils.prune.remove(module, 'weight')` makes it permanent (the"
                " weight becomes a plain parameter, its pruned entries zero)"
                if pruned
                else " the parametrization (`torch.nn.utils.parametrize.remove_parametrizations`)"
            )
        )
    found.drop(dense, "dense_layers")
    lazy = [
        f"{module_names[n]!r} ({type(model.get_submodule(module_names[n])).__name__})"
        for n, p in found.params.items()
        if is_lazy(p)
    ]
    if lazy:
        raise ValueError(
            f"the layer(s) {', '.join(lazy)} have uninitialized (lazy) weights, so they cannot be masked: run one"
            " forward pass through the model before binding the masks (before `fit`; or build the layers with"
            " their sizes in the LightningModule's `configure_model`), or keep them dense with `dense_layers`"
        )
    for name, param in model.named_parameters():
        if name not in found.masked and name not in found.dense and _large_2d(param):
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, EMBEDDING_TYPES):
                found.dense[name] = "embedding (mask_embeddings=False)"
            else:
                found.dense[name] = f"not a masked layer type ({type(owner).__name__})"
    return found
