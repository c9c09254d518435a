"""SNIP (Lee et al. 2019): the masks are chosen once, before training, from one batch: keep the top ``density``
of ``|g ⊙ w|``, ``g`` the gradient of that batch's loss. Called by :meth:`~lightning_sparse.Sparsifier.snip`.

Frozen masked weights (``requires_grad=False`` with ``mask_frozen=True``) are scored exactly like the others, by
their own ``|g ⊙ w|``: :class:`FrozenScoring` turns their ``requires_grad`` on while SNIP waits for its batch (so
the scoring batch's forward pass records them) and back off once the masks are picked; their ``.grad`` is left as
it was, so they never train."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_sparse.core import distributed
from lightning_sparse.core.masking import Masking
from lightning_sparse.functional.patterns import Pattern, unit_shape
from lightning_sparse.functional.prune_grow import snip_masks
from lightning_sparse.functional.units import select_per_unit


class FrozenScoring:
    """The frozen masked weights (``requires_grad=False``) made differentiable for SNIP's scoring batch, and
    frozen again by :meth:`restore` (``requires_grad=False``, their ``.grad`` as it was)."""

    def __init__(self, weights: Sequence[Tensor]) -> None:
        self.frozen = [(w, w.grad) for w in weights if not w.requires_grad]
        for w, _ in self.frozen:
            w.requires_grad_(True)

    def restore(self) -> None:
        """Freeze the weights again (idempotent)."""
        for w, grad in self.frozen:
            w.requires_grad_(False)
            w.grad = grad
        self.frozen = []


def snip_scores(model: nn.Module, masking: Masking, loss: Tensor) -> list[Tensor]:
    """``|g ⊙ w|`` per masked weight (local rows), ``g`` the gradient of ``loss``; the model's ``.grad`` are left
    as they were. Under DDP the gradients are summed over processes first, under FSDP2 they come
    reduce-scattered from the backward pass. Raises ``FloatingPointError`` on a non-finite loss or score."""
    if any(s.sharded for s in masking.specs):
        saved = {p: p.grad for p in model.parameters()}
        for p in saved:
            p.grad = None
        loss.backward()
        grads = [None if w.grad is None else distributed.local(w.grad) for w in masking.weights]
        for p, g in saved.items():
            p.grad = g
    else:
        grads = list(torch.autograd.grad(loss, masking.weights, allow_unused=True))
        if distributed.world_size() > 1:
            flat = [torch.zeros_like(w) if g is None else g for w, g in zip(masking.weights, grads)]
            for g in flat:
                torch.distributed.all_reduce(g)
            grads = flat
    weights = masking.local_weights()
    scores = [(torch.zeros_like(w) if g is None else g * w).abs() for w, g in zip(weights, grads)]
    _check_scores(masking, loss, scores)
    return scores


def top_scores_per_unit(
    scores: Sequence[Tensor], masking: Masking, counts: Sequence[int], pattern: Pattern, transposed: Sequence[bool]
) -> list[Tensor]:
    """Under a structured pattern, the top scores of every unit: top N of each group of M, top k of each row
    (``counts``: active weights per layer)."""
    masks = []
    for score, spec, t, n in zip(scores, masking.specs, transposed, counts):
        units = unit_shape(spec.shape, pattern, t)[0]
        everywhere = torch.ones(score.shape, dtype=torch.bool, device=score.device)
        masks.append(select_per_unit(score, everywhere, n // units if units else 0, pattern, t))
    return masks


def top_scores_per_group(
    scores: Sequence[Tensor], masking: Masking, groups: Mapping[str, Sequence[int]], density: Mapping[str, float]
) -> list[Tensor]:
    """The global top ``density[g]`` scores of each density group ``g`` (``groups``: layer indices by group)."""
    masks = list(masking.masks)
    for pattern, indices in groups.items():
        count = int(round(density[pattern] * sum(masking.sizes[i] for i in indices)))
        chosen = snip_masks(
            [scores[i] for i in indices],
            count,
            offsets=[masking.specs[i].offset for i in indices],
            shards=distributed.shards_of(masking.group),
            sharded=[masking.specs[i].sharded for i in indices],
        )
        for i, mask in zip(indices, chosen):
            masks[i] = mask
    return masks


def _check_scores(masking: Masking, loss: Tensor, scores: Sequence[Tensor]) -> None:
    """Raise ``FloatingPointError`` if the scoring batch's loss or any layer's ``|g ⊙ w|`` is NaN or inf (one
    host read; under FSDP2 the flags are all-reduced over the sharding group, so every process raises)."""
    bad = torch.stack([~torch.isfinite(s).all() for s in scores]).to(torch.int64)
    bad = distributed.reduce_layer_sums(bad, masking.specs, masking.group)
    bad_loss = (~torch.isfinite(loss.detach()).all()).to(torch.int64).reshape(1).to(bad.device)
    distributed.all_reduce_sum_(bad_loss, masking.group)
    flags = torch.cat([bad_loss, bad]).tolist()
    layers = [name for name, flag in zip(masking.names, flags[1:]) if flag]
    if flags[0]:
        also = f" (and so are the scores |g * w| of layer(s) {layers})" if layers else ""
        raise FloatingPointError(
            f"SNIP: the loss of the scoring batch is non-finite{also}: score a batch with a finite loss (check"
            " the inputs, the loss function and the model's initialization)"
        )
    if layers:
        raise FloatingPointError(
            f"SNIP: non-finite scores |g * w| in layer(s) {layers}: the weights or the scoring batch's gradients"
            " hold NaN or inf (check the model's initialization and the inputs)"
        )
