"""How a training loop must drive a :class:`~lightning_sparse.Sparsifier`, checked as it runs: ``step()`` once per
``optimizer.step()``, after it and before ``optimizer.zero_grad()``; one Sparsifier per weight. A step that AMP's
``GradScaler`` skipped (non-finite gradients) is told apart from a call in the wrong place."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils.weak import WeakIdKeyDictionary

from lightning_sparse.core import distributed
from lightning_sparse.core.distributed import ShardSpec
from lightning_sparse.functional.passes import has_nonfinite, nonzero_count

ORDER = (
    "call `sparsifier.step()` once after every `optimizer.step()` and before `optimizer.zero_grad()`"
    " (with gradient accumulation: once per optimizer step, not per micro-batch)"
)
"""The call order, as the errors state it."""


class OptimizerSteps:
    """Counts the steps a torch optimizer really takes (a step post-hook: AMP's ``GradScaler`` skips the call on
    non-finite gradients), so that each ``Sparsifier.step()`` can tell how many optimizer steps came before it.
    Optimizers without ``register_step_post_hook`` are not counted (:meth:`since_last` gives ``None``)."""

    def __init__(self) -> None:
        self._taken = 0
        self._seen = 0
        self._handle: Any = None
        self.counting = False

    def watch(self, optimizer: Any) -> None:
        """Count ``optimizer``'s steps from now on (and no longer those of an optimizer watched before)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.counting = hasattr(optimizer, "register_step_post_hook")
        if self.counting:
            ref = weakref.ref(self)  # the optimizer does not keep the Sparsifier alive

            def taken(*_: Any) -> None:
                counter = ref()
                if counter is not None:
                    counter._taken += 1

            self._handle = optimizer.register_step_post_hook(taken)
        self._seen = self._taken

    def since_last(self) -> int | None:
        """Optimizer steps since the last call (``None`` when they are not counted)."""
        taken, self._seen = self._taken - self._seen, self._taken
        return taken if self.counting else None


def _gradient_flags(g: Tensor) -> Tensor:
    """``[non-finite, any nonzero]`` of one gradient from one ``aminmax`` (for floating point gradients)."""
    if not g.is_floating_point() or g.numel() == 0:
        return torch.stack([has_nonfinite(g), nonzero_count(g) > 0])
    low, high = g.detach().aminmax()
    return torch.stack([~(low.isfinite() & high.isfinite()), (low != 0) | (high != 0)])


def gradients_state(weights: Sequence[Tensor], specs: Sequence[ShardSpec], group: ProcessGroup | None) -> str:
    """``"none"`` when a trained weight has no gradient, ``"non-finite"`` when a gradient holds NaN or inf,
    ``"zero"`` when every gradient is all zero, else ``"ok"``. One host read (all-reduced under FSDP2, where each
    process holds some rows)."""
    trained = [(w, s) for w, s in zip(weights, specs) if w.requires_grad]
    if not trained:
        return "ok"
    if any(w.grad is None for w, _ in trained):
        return "none"
    grads = [distributed.local(w.grad) for w, _ in trained]
    flags = torch.stack([_gradient_flags(g) for g in grads])
    flags = distributed.reduce_layer_sums(flags.to(torch.int64), [s for _, s in trained], group).tolist()
    if any(row[0] for row in flags):
        return "non-finite"
    return "ok" if any(row[1] for row in flags) else "zero"


def check_weights_finite(
    names: Sequence[str], weights: Sequence[Tensor], specs: Sequence[ShardSpec], group: ProcessGroup | None
) -> None:
    """Raise ``FloatingPointError`` naming the layers whose weights hold NaN or inf (a run that diverged, rather
    than a step the GradScaler skipped). One host read (all-reduced under FSDP2)."""
    flags = torch.stack([~torch.isfinite(distributed.local(w)).all() for w in weights]).to(torch.int64)
    flags = distributed.reduce_layer_sums(flags, specs, group).tolist()
    bad = [n for n, flag in zip(names, flags) if flag]
    if bad:
        raise FloatingPointError(
            f"non-finite weights in layer(s) {bad}: the loss diverged (lower the learning rate, or use gradient"
            " clipping)"
        )


_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # masked weight → weakref to the Sparsifier that masks it


def take_over(weights: Sequence[Tensor], owner: object) -> None:
    """Record ``owner`` as the Sparsifier of ``weights`` (an earlier one over any of them stops working)."""
    ref = weakref.ref(owner)
    for weight in weights:
        _OWNERS[weight] = ref


def check_owner(names: Sequence[str], weights: Sequence[Tensor], owner: object) -> None:
    """Refuse to run a Sparsifier whose weights a later Sparsifier took over: two Sparsifiers over the same weights
    would each zero what the other keeps (two at density 0.5 leave about 0.29 active)."""
    taken = [n for n, w in zip(names, weights) if (ref := _OWNERS.get(w)) is not None and ref() is not owner]
    if taken:
        raise RuntimeError(
            f"the masked weight(s) {taken} are masked by another Sparsifier made after this one: two Sparsifiers"
            " over the same weights each zero what the other keeps. Use one Sparsifier (density groups give layers"
            " different densities), or disjoint layers (`dense_layers`, `include`, `layer_types`)"
        )
