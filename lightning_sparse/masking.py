"""The masks of one model: which weights are masked, applying the masks, updating them, saving them.

No Lightning here: :class:`Masking` works on any ``nn.Module`` and can be driven by hand.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_sparse.functional.init import layer_active_counts, random_mask
from lightning_sparse.kernels import check_mask_kernel, cpu_masked_zero

MASKED_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def maskable_parameters(
    model: nn.Module,
    dense_layers: Sequence[str] = (),
    module_types: tuple[type[nn.Module], ...] = MASKED_MODULE_TYPES,
) -> dict[str, nn.Parameter]:
    """The weights that get masks: ``weight`` of every Linear and Conv1d/2d/3d, minus ``dense_layers``.

    Biases and normalization weights are never masked. ``dense_layers`` holds module names, parameter names
    or ``fnmatch`` glob patterns of either (``"features.0"``, ``"*.downsample.*"``, ``"fc.weight"``); a
    pattern that matches no maskable weight raises ``ValueError`` listing the names it could match.
    A weight shared by several modules is masked once, under its first name.
    """
    candidates: dict[str, nn.Parameter] = {}
    module_of: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, module_types):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        seen.add(id(weight))
        param_name = f"{module_name}.weight" if module_name else "weight"
        candidates[param_name] = weight
        module_of[param_name] = module_name
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no maskable weights: sparse training masks the weights of"
            f" {', '.join(t.__name__ for t in module_types)} layers"
        )
    dense: set[str] = set()
    for pattern in dense_layers:
        matched = {
            name
            for name in candidates
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module_of[name], pattern)
        }
        if not matched:
            raise ValueError(
                f"`dense_layers` pattern {pattern!r} matches no maskable layer; the maskable layers are:"
                f" {', '.join(module_of[n] for n in candidates)}"
            )
        dense |= matched
    masked = {name: p for name, p in candidates.items() if name not in dense}
    if not masked:
        raise ValueError(f"`dense_layers` {list(dense_layers)} leaves no layer to mask")
    return masked


class Masking:
    """Boolean masks over a set of named weights.

    Args:
        params: the masked weights by name (see :func:`maskable_parameters`).
        masks: one ``torch.bool`` mask per weight, same names and shapes; moved to each weight's device.
        kernel: how :meth:`apply_` zeroes CPU weights: ``"auto"`` (the C++ kernel of
            :mod:`lightning_sparse.kernels` if it builds, else torch's ops), ``"cpp"`` (the C++ kernel or an
            error) or ``"torch"`` (torch's ops only).

    ``active`` holds each layer's number of active weights on the host, kept exact across updates
    without reading the masks back.
    """

    def __init__(
        self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor], kernel: str = "auto"
    ) -> None:
        self.kernel = check_mask_kernel(kernel)
        self.names: list[str] = list(params)
        self.weights: list[nn.Parameter] = list(params.values())
        self.masks: list[Tensor] = []
        self.active: list[int] = []
        self.load_masks(masks)

    @classmethod
    def random(
        cls,
        params: Mapping[str, nn.Parameter],
        density: float,
        init: str = "uniform",
        generator: torch.Generator | None = None,
        kernel: str = "auto",
    ) -> Masking:
        """Random masks with the per-layer counts of ``init`` (``"uniform"``, ``"erk"``, ``"er"``)."""
        shapes = [tuple(p.shape) for p in params.values()]
        counts = layer_active_counts(shapes, density, init)
        masks = {name: random_mask(shape, n, generator) for name, shape, n in zip(params, shapes, counts)}
        return cls(params, masks, kernel)

    # ------------------------------------------------------------------ masks
    def load_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace every mask, checking names, shapes and dtype; a mismatch raises ``ValueError``."""
        missing = [n for n in self.names if n not in masks]
        unexpected = [n for n in masks if n not in self.names]
        if missing or unexpected:
            raise ValueError(
                "the masks do not match the model's masked weights:"
                f" missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        new_masks = []
        for name, weight in zip(self.names, self.weights):
            mask = masks[name]
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be torch.bool, got {mask.dtype}")
            if mask.shape != weight.shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but the weight has shape {tuple(weight.shape)}"
                )
            new_masks.append(mask.to(weight.device))
        self.masks = new_masks
        self.active = [int(n) for n in torch.stack([m.sum() for m in new_masks]).tolist()] if new_masks else []

    def set_masks(self, masks: Sequence[Tensor], active: Sequence[int]) -> None:
        """Install masks computed by an update, whose active counts are already known."""
        self.masks = list(masks)
        self.active = list(active)

    def to_devices(self) -> None:
        """Move each mask to its weight's device (after the trainer has moved the model)."""
        self.masks = [m.to(w.device) for m, w in zip(self.masks, self.weights)]

    @torch.no_grad()
    def apply_(self, kernel: str | None = None) -> None:
        """Zero every masked-out weight in place, all layers in one call.

        CPU weights go through the C++ kernel of :mod:`lightning_sparse.kernels` (one read and one write of
        the weights, masked weights become +0.0 even where they were NaN or inf). Everything else, and every
        weight when ``kernel`` (default: :attr:`kernel`) is ``"torch"`` or the kernel cannot be built, goes
        through one ``torch._foreach_mul_`` with the masks' ``uint8`` view (same bytes, no copy; on the CPU
        converting ``uint8`` to float is twice as fast as converting ``bool``; on CUDA the multiply converts
        on the fly). A masked weight that is NaN or inf stays NaN there.
        """
        kernel = self.kernel if kernel is None else check_mask_kernel(kernel)
        weights = [w.data for w in self.weights]
        fused = None
        if kernel != "torch" and any(w.device.type == "cpu" for w in weights):
            fused = cpu_masked_zero(kernel)
        if fused is None:
            torch._foreach_mul_(weights, [m.view(torch.uint8) for m in self.masks])
            return
        cpu_weights, cpu_masks, other_weights, other_masks = [], [], [], []
        for weight, mask in zip(weights, self.masks):
            if (
                weight.device.type == "cpu"
                and mask.device.type == "cpu"
                and weight.dtype.is_floating_point
                and weight.is_contiguous()
                and mask.is_contiguous()
            ):
                cpu_weights.append(weight)
                cpu_masks.append(mask)
            else:
                other_weights.append(weight)
                other_masks.append(mask.view(torch.uint8))
        if cpu_weights:
            fused(cpu_weights, cpu_masks)
        if other_weights:
            torch._foreach_mul_(other_weights, other_masks)

    # ------------------------------------------------------------------ statistics
    @property
    def sizes(self) -> list[int]:
        return [w.numel() for w in self.weights]

    @property
    def density(self) -> float:
        """Fraction of masked weights that are active in the masks."""
        return sum(self.active) / sum(self.sizes)

    def nonzero_counts(self) -> list[int]:
        """Non-zero weights per masked layer, measured from the weights themselves (one host sync)."""
        return [int(n) for n in torch.stack([torch.count_nonzero(w.detach()) for w in self.weights]).tolist()]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """Masks by name, as ``torch.bool`` CPU tensors (readable with ``torch.load(weights_only=True)``)."""
        return {name: mask.cpu() for name, mask in zip(self.names, self.masks)}

    def items(self) -> Iterable[tuple[str, Tensor]]:
        return zip(self.names, self.masks)
