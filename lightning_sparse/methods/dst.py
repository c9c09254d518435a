"""Dynamic Sparse Training with trainable masked layers (Liu et al., ICLR 2020). No Lightning here.

Each masked layer gets a trainable threshold per output neuron, ``t`` (one entry per row of the weight
viewed as ``[n_out, rest]``, initialised to 0). The layer computes with ``W ⊙ S(|W| − t)``, ``S`` the unit
step, whose backward is the long-tailed straight-through estimator

    S'(x) = 2 − 4|x|  for |x| ≤ 0.4,    0.4  for 0.4 < |x| ≤ 1,    0  otherwise,

so gradients reach both ``W`` and ``t``. A regularizer ``α · Σ exp(−t)`` pushes thresholds up (sparsity is
learned, not fixed); a layer that keeps 1% of its weights or fewer has its thresholds reset to 0.

The thresholds are attached with ``torch.nn.utils.parametrize``: ``module.weight`` becomes the masked
weight, the raw weight lives at ``module.parametrizations.weight.original`` and the threshold at
``module.parametrizations.weight[0].threshold``; both are ordinary parameters, so the optimizer trains
them and checkpoints save them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class LongTailedStep(torch.autograd.Function):
    """Unit step ``x > 0`` forward; the long-tailed straight-through estimator backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * long_tailed_derivative(x)


def long_tailed_derivative(x: Tensor) -> Tensor:
    """``S'(x)``: ``2 − 4|x|`` on ``|x| ≤ 0.4``, ``0.4`` on ``0.4 < |x| ≤ 1``, ``0`` beyond."""
    a = x.abs()
    return torch.where(a <= 0.4, 2.0 - 4.0 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


class ThresholdMask(nn.Module):
    """The parametrization ``W ↦ W ⊙ S(|W| − t)`` with a trainable per-output threshold ``t``, one entry per
    index of dimension ``dim`` of the weight (0; 1 for weights stored ``[in, out]``)."""

    def __init__(
        self, out_features: int, device: torch.device | None = None, dtype: torch.dtype | None = None, dim: int = 0
    ):
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.dim = dim

    def _shaped_threshold(self, weight: Tensor) -> Tensor:
        shape = [1] * weight.dim()
        shape[self.dim] = -1
        return self.threshold.view(shape)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * LongTailedStep.apply(weight.abs() - self._shaped_threshold(weight))

    def mask(self, weight: Tensor) -> Tensor:
        """The current mask ``|W| > t`` as ``torch.bool``."""
        return weight.detach().abs() > self._shaped_threshold(weight).detach()


ALPHA_LENET = 5e-4
"""The reference's α for LeNet-300-100 and LeNet-5-Caffe on MNIST (``mnist/train_argument.py`` default, README)."""
ALPHA_LARGE = 1e-6
"""The reference's default α for its CIFAR networks, VGG-16 and WideResNet-28-8 (``cifar/train_argument.py``;
its README runs them with 5e-6)."""
LENET_MAX_WEIGHTS = 1_000_000
"""Networks with at most this many masked weights get :data:`ALPHA_LENET`, larger ones :data:`ALPHA_LARGE`. The
paper's LeNets have 266,200 (LeNet-300-100) and 430,500 (LeNet-5-Caffe) masked weights; the reference code's
CIFAR networks (``cifar/train.py``) have 14,977,728 (VGG-16) and about 23 million (WideResNet-28-8). One million
lies more than 2x above both LeNets and 15x below the smaller CIFAR network."""


def default_alpha(masked_weights: int) -> float:
    """DST's α chosen for a network with ``masked_weights`` masked weights: :data:`ALPHA_LENET` (5e-4) up to
    :data:`LENET_MAX_WEIGHTS` (LeNet size), :data:`ALPHA_LARGE` (1e-6) above."""
    return ALPHA_LENET if masked_weights <= LENET_MAX_WEIGHTS else ALPHA_LARGE


@dataclass(frozen=True)
class DST:
    """Dynamic Sparse Training: learned per-neuron thresholds instead of a target density.

    Args:
        alpha: weight of the sparse regularizer ``α · Σ_l Σ exp(−t_l)``. ``None`` (default): chosen for the
            network when the run starts (:func:`default_alpha`, logged): 5e-4, the reference's LeNet value, for
            networks of at most one million masked weights (the paper's LeNet-300-100 has 266,200, LeNet-5-Caffe
            430,500), 1e-6, the reference code's default for its CIFAR networks (VGG-16: 14,977,728;
            WideResNet-28-8: about 23 million), above; the reference never uses the LeNet value on a CIFAR
            network. Pass a number to choose it yourself.
        collapse_density: a layer keeping this fraction of its weights or fewer gets its thresholds reset.
    """

    alpha: float | None = None
    collapse_density: float = 0.01

    def __post_init__(self) -> None:
        if self.alpha is not None and not self.alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0 (or None: chosen for the network), got {self.alpha}")
        if not 0.0 <= self.collapse_density < 1.0:
            raise ValueError(f"`collapse_density` must be in [0, 1), got {self.collapse_density}")

    def alpha_for(self, masked_weights: int) -> float:
        """``alpha``, or when it is ``None`` the value :func:`default_alpha` gives for ``masked_weights``."""
        return self.alpha if self.alpha is not None else default_alpha(masked_weights)


def attach_thresholds(
    modules: Mapping[str, nn.Module], attrs: Mapping[str, str] | None = None, dims: Mapping[str, int] | None = None
) -> dict[str, ThresholdMask]:
    """Register a :class:`ThresholdMask` on the ``weight`` of each module (or on its attribute ``attrs[key]``,
    thresholds along dimension ``dims[key]``); returns them by the keys of ``modules``.

    The module's ``state_dict`` stays plain: it holds ``weight`` (the masked weight ``W ⊙ (|W| > t)``) instead
    of the raw weight and the threshold, so checkpoints load into the model without DST; loading a plain
    ``weight`` into the parametrized module sets the raw weight to it and keeps the threshold (DST's own state,
    :meth:`~lightning_sparse.DSTSparsifier.state_dict`, restores both exactly). Sharded (FSDP2) weights keep
    the parametrized keys.
    """
    attached = {}
    for name, module in modules.items():
        attr = (attrs or {}).get(name, "weight")
        dim = (dims or {}).get(name, 0)
        weight = getattr(module, attr)
        mask = ThresholdMask(weight.shape[dim], device=weight.device, dtype=weight.dtype, dim=dim)
        parametrize.register_parametrization(module, attr, mask)
        if not getattr(module, "_lightning_sparse_plain_state", False):
            module.register_state_dict_post_hook(_plain_state_dict)
            module.register_load_state_dict_pre_hook(_load_plain_state_dict)
            module._lightning_sparse_plain_state = True
        attached[name] = mask
    return attached


def threshold_mask(module: nn.Module, attr: str = "weight") -> ThresholdMask | None:
    """The :class:`ThresholdMask` on ``module.<attr>``, when it is that attribute's only parametrization."""
    if not parametrize.is_parametrized(module, attr):
        return None
    chain = getattr(module.parametrizations, attr)
    return chain[0] if len(chain) == 1 and isinstance(chain[0], ThresholdMask) else None


def _is_sharded(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def thresholded(module: nn.Module) -> dict[str, ThresholdMask]:
    if not parametrize.is_parametrized(module):
        return {}
    found = {attr: threshold_mask(module, attr) for attr in module.parametrizations}
    return {attr: t for attr, t in found.items() if t is not None}


def _plain_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: ``<attr>`` = the masked weight, in place of the raw weight and threshold."""
    for attr, threshold in thresholded(module).items():
        raw_key = f"{prefix}parametrizations.{attr}.original"
        t_key = f"{prefix}parametrizations.{attr}.0.threshold"
        if raw_key not in state_dict or _is_sharded(state_dict[raw_key]):
            continue
        raw = state_dict.pop(raw_key)
        t = state_dict.pop(t_key, threshold.threshold).detach()
        state_dict[f"{prefix}{attr}"] = raw * threshold.mask(raw.to(t.device)).to(raw.device)


def _load_plain_state_dict(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: a plain ``<attr>`` becomes the raw weight; the threshold is kept."""
    for attr, threshold in thresholded(module).items():
        original = getattr(module.parametrizations, attr).original
        if f"{prefix}{attr}" not in state_dict or _is_sharded(original):
            continue
        state_dict[f"{prefix}parametrizations.{attr}.original"] = state_dict.pop(f"{prefix}{attr}")
        state_dict.setdefault(f"{prefix}parametrizations.{attr}.0.threshold", threshold.threshold.detach().clone())


def raw_weight(module: nn.Module, attr: str = "weight") -> Tensor:
    """The trainable weight under a parametrized module's ``<attr>``."""
    return getattr(module.parametrizations, attr).original


def regularizer(thresholds: Iterable[Tensor], alpha: float) -> Tensor:
    """``α · Σ exp(−t)`` over every threshold entry."""
    return alpha * sum(torch.exp(-t).sum() for t in thresholds)


@torch.no_grad()
def add_regularizer_grad_(
    thresholds: Iterable[Tensor], alpha: float, grads: Iterable[Tensor | None] | None = None
) -> None:
    """Add the gradient of :func:`regularizer`, ``−α · exp(−t)``, to each threshold's ``.grad`` (or, given
    ``grads``, to those tensors in place; a ``None`` among them is an error).

    Adding it after the backward pass is the same as adding the regularizer to the loss, without touching
    the user's ``training_step``.
    """
    thresholds = list(thresholds)
    if grads is not None:
        for t, g in zip(thresholds, grads, strict=True):
            if g is None:
                raise RuntimeError("a DST threshold got no gradient: was its layer used in the forward pass?")
            g.add_(torch.exp(-t), alpha=-alpha)
        return
    for t in thresholds:
        g = -alpha * torch.exp(-t)
        if t.grad is None:
            t.grad = g
        else:
            t.grad.add_(g)


@torch.no_grad()
def reset_collapsed_(masks: Mapping[str, ThresholdMask], densities: Mapping[str, float], collapse_density: float) -> list[str]:
    """Reset to 0 the thresholds of layers whose density is ``collapse_density`` or below; returns their names."""
    reset = [name for name, d in densities.items() if d <= collapse_density]
    for name in reset:
        masks[name].threshold.zero_()
    return reset
