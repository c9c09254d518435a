"""The masks of one model: which weights are masked, applying the masks, updating them, saving them.

No Lightning here: :class:`Masking` works on any ``nn.Module`` and can be driven by hand. Weights may be plain
tensors (one process, or replicated by DDP) or FSDP2 row shards (``DTensor``, see
:mod:`lightning_sparse.core.distributed`): each process then keeps only the mask of its own rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sparse.core import distributed
from lightning_sparse.core.distributed import ShardSpec, shards_of
from lightning_sparse.functional.init import layer_active_counts
from lightning_sparse.functional.passes import nonzero_count
from lightning_sparse.functional.patterns import parse_pattern, unit_shape
from lightning_sparse.functional.selection import hash_scores, select_highest
from lightning_sparse.functional.units import pattern_counts, select_per_unit
from lightning_sparse.kernels import check_mask_kernel, cpu_masked_zero


class Masking:
    """Boolean masks over a set of named weights.

    Args:
        params: the masked weights by name (see :func:`maskable_parameters`): tensors, or FSDP2 ``DTensor``
            row shards.
        masks: one full ``torch.bool`` mask per weight, same names and (full) shapes; each process keeps the
            rows of its shard, on the weight's device.
        kernel: how :meth:`apply_` zeroes CPU weights: ``"auto"`` (the C++ kernel of
            :mod:`lightning_sparse.kernels` if it builds, else torch's ops), ``"cpp"`` (the C++ kernel or an
            error) or ``"torch"`` (torch's ops only).

    ``masks`` holds the local masks (the whole mask, or this process's rows of it under FSDP2); ``active``
    holds each layer's number of active weights over the whole weight, on the host, kept exact across updates
    without reading the masks back; ``specs`` says which part of each weight is here.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        kernel: str = "auto",
        *,
        local_masks: Sequence[Tensor] | None = None,
        active: Sequence[int] | None = None,
    ) -> None:
        self.kernel = check_mask_kernel(kernel)
        self.names: list[str] = list(params)
        self.weights: list[Tensor] = list(params.values())
        self.specs: list[ShardSpec] = [distributed.shard_spec(w, n) for n, w in params.items()]
        self.group = distributed.common_group(self.specs)
        self.masks: list[Tensor] = []
        self.active: list[int] = []
        if local_masks is not None:
            self._check_local(local_masks)
            self.masks = [m.contiguous() for m in local_masks]  # flat (row-major) order, whatever the weight's layout
            self.active = list(active) if active is not None else self.count_active()
        elif masks is not None:
            self.load_masks(masks)
        else:
            raise ValueError("pass `masks` (full masks by name) or `local_masks`")

    @classmethod
    def random(
        cls,
        params: Mapping[str, Tensor],
        density: float | Sequence[int],
        init: str = "uniform",
        generator: torch.Generator | None = None,
        kernel: str = "auto",
        *,
        pattern: str = "unstructured",
        transposed: Sequence[bool] | None = None,
    ) -> Masking:
        """Random masks with the per-layer counts of ``init`` (``"uniform"``, ``"erk"``, ``"er"``) at ``density``,
        or with the given per-layer counts (a sequence of ints, one per weight).

        The positions are the ``n`` highest of a counter-based hash of (a seed drawn from ``generator``, the
        flat index), so the same generator state gives the same masks on any device and with any number of
        FSDP2 shards; each process computes only its own rows.

        ``pattern`` (``"N:M"``, ``"fan_in"``; see :mod:`~lightning_sparse.functional.patterns`): the positions are
        the highest hashes of every unit (group of ``M``, row; ``transposed`` flags the weights stored
        ``[in, out]``), the same number in every unit of a layer. Given counts must then be a multiple of the
        layer's number of units; counts from ``density`` are rounded as
        :func:`~lightning_sparse.functional.patterns.pattern_counts` says.
        """
        specs = [distributed.shard_spec(p, n) for n, p in params.items()]
        parsed = parse_pattern(pattern)
        transposed = list(transposed) if transposed is not None else [False] * len(specs)
        if isinstance(density, Sequence):
            counts = [int(n) for n in density]
            if len(counts) != len(specs):
                raise ValueError(f"got {len(counts)} counts for {len(specs)} weights")
        else:
            counts = layer_active_counts([s.shape for s in specs], density, init)
            if parsed.structured:
                counts = pattern_counts([s.shape for s in specs], counts, parsed, transposed)
        per_unit: list[int | None] = [None] * len(specs)
        if parsed.structured:
            for i, (name, spec, n, t) in enumerate(zip(params, specs, counts, transposed)):
                units = unit_shape(spec.shape, parsed, t)[0]
                if (units and n % units) or (not units and n):
                    raise ValueError(
                        f"pattern={str(parsed)!r}: {n} active weights cannot be spread evenly over the {units} units"
                        f" of {name!r}"
                    )
                per_unit[i] = n // units if units else 0
        empty = [name for name, n in zip(params, counts) if n == 0]
        if empty:
            what = f"density {density}" if not isinstance(density, Sequence) else "the `density` groups"
            warnings.warn(
                f"{what} with init={init!r} leaves 0 active weights in {', '.join(empty)}:"
                " they will output only their bias. Raise `density`, use init='erk' or 'er', or keep them dense"
                " with `dense_layers`",
                UserWarning,
                stacklevel=2,
            )
        local_masks = []
        for weight, spec, n, k, t in zip(params.values(), specs, counts, per_unit, transposed):
            seed = draw_seed(generator)
            shape = distributed.local(weight).shape
            scores = hash_scores(seed, spec.offset, math.prod(shape), weight.device).view(shape)
            everywhere = torch.ones(shape, dtype=torch.bool, device=weight.device)
            if k is not None:  # the highest hashes of every unit: local to each row shard
                local_masks.append(select_per_unit(scores, everywhere, k, parsed, t))
                continue
            local_masks.append(select_highest(scores, everywhere, n, offset=spec.offset, shards=shards_of(spec.group)))
        return cls(params, kernel=kernel, local_masks=local_masks, active=counts)

    # ------------------------------------------------------------------ masks
    def _check_local(self, masks: Sequence[Tensor]) -> None:
        if len(masks) != len(self.weights):
            raise ValueError(f"got {len(masks)} masks for {len(self.weights)} weights")
        for name, weight, mask in zip(self.names, self.weights, masks):
            expected = distributed.local(weight).shape
            if mask.dtype != torch.bool or mask.shape != expected:
                raise ValueError(f"mask {name!r} must be torch.bool of shape {tuple(expected)}")

    def load_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Replace every mask by full masks (as :meth:`state_dict` gives them), checking names, shapes and
        dtype; a mismatch raises ``ValueError``. Under FSDP2 each process keeps its rows."""
        missing = [n for n in self.names if n not in masks]
        unexpected = [n for n in masks if n not in self.names]
        if missing or unexpected:
            raise ValueError(
                "the masks do not match the model's masked weights:"
                f" missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        new_masks = []
        for name, weight, spec in zip(self.names, self.weights, self.specs):
            mask = masks[name]
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be torch.bool, got {mask.dtype}")
            if tuple(mask.shape) != spec.shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)} but the weight has shape {spec.shape}")
            new_masks.append(distributed.local_rows(mask, spec).to(weight.device).contiguous())
        self.masks = new_masks
        self.active = self.count_active()

    def count_active(self) -> list[int]:
        """Active weights per layer over the whole weight, counted from the masks (one host read)."""
        if not self.masks:
            return []
        local_counts = torch.stack([nonzero_count(m) for m in self.masks])
        totals = distributed.reduce_layer_sums(local_counts, self.specs, self.group)
        return [int(n) for n in totals.tolist()]

    def set_masks(self, masks: Sequence[Tensor], active: Sequence[int]) -> None:
        """Install (local) masks computed by an update, whose active counts are already known (kept contiguous,
        whatever the weight's memory format, so that collectives and the C++ kernel can read them flat)."""
        self.masks = [m.contiguous() for m in masks]
        self.active = list(active)

    def to_devices(self) -> None:
        """Move each mask to its weight's device (after the trainer has moved the model)."""
        self.masks = [m.to(w.device) for m, w in zip(self.masks, self.weights)]

    def local_weights(self) -> list[Tensor]:
        """The locally stored part of every weight (views: in-place changes reach the weights)."""
        return [distributed.local(w) for w in self.weights]

    @torch.no_grad()
    def apply_(self, kernel: str | None = None) -> None:
        """Zero every masked-out weight in place, all layers in one call.

        CPU weights go through the C++ kernel of :mod:`lightning_sparse.kernels` (one read and one write of
        the weights, masked weights become +0.0 even where they were NaN or inf). Everything else, and every
        weight when ``kernel`` (default: :attr:`kernel`) is ``"torch"`` or the kernel cannot be built, goes
        through one ``torch._foreach_mul_`` with the masks' ``uint8`` view (same bytes, no copy; on the CPU
        converting ``uint8`` to float is twice as fast as converting ``bool``; on CUDA the multiply converts
        on the fly). A masked weight that is NaN or inf stays NaN there. FSDP2 shards are masked locally.
        """
        kernel = self.kernel if kernel is None else check_mask_kernel(kernel)
        weights = self.local_weights()
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
        """Number of entries of each (full) weight."""
        return [s.numel for s in self.specs]

    @property
    def density(self) -> float:
        """Fraction of masked weights that are active in the masks."""
        return sum(self.active) / sum(self.sizes)

    def nonzero_counts(self) -> list[int]:
        """Non-zero weights per masked layer, measured from the weights themselves (one host sync; one
        all-reduce under FSDP2)."""
        local_counts = torch.stack([nonzero_count(w) for w in self.local_weights()])
        totals = distributed.reduce_layer_sums(local_counts, self.specs, self.group)
        return [int(n) for n in totals.tolist()]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """Full masks by name, as ``torch.bool`` CPU tensors (readable with ``torch.load(weights_only=True)``).

        Under FSDP2 the row blocks are gathered from every process (a collective: call it on every process);
        the full masks then live on the host, one byte per weight, while the checkpoint is written."""
        return {
            name: distributed.gather_rows(mask, spec).to("cpu", copy=True)  # never the live mask
            for name, mask, spec in zip(self.names, self.masks, self.specs)
        }

    def items(self) -> Iterable[tuple[str, Tensor]]:
        return zip(self.names, self.masks)

    # ------------------------------------------------------------------ undo
    @torch.no_grad()
    def apply_recording_(self) -> ZeroedWeights:
        """:meth:`apply_` (torch's ops), recording the values it zeroes (on the host): what :meth:`restore` puts
        back, so that masks drawn for a run that does not go on (a refusal at its first step; a checkpoint's
        masks loaded over them) cost no trained weight."""
        masks = [m.clone() for m in self.masks]
        values = [w[~m].cpu() for w, m in zip(self.local_weights(), masks)]
        self.apply_(kernel="torch")
        return ZeroedWeights(masks, values, [w._version for w in self.local_weights()])

    @torch.no_grad()
    def restore(self, zeroed: ZeroedWeights, force: bool = False) -> None:
        """Put back the values :meth:`apply_recording_` zeroed, in the weights nothing has written to since
        (``force``: in every weight); the masks are left as they are."""
        for weight, mask, values, version in zip(self.local_weights(), zeroed.masks, zeroed.values, zeroed.versions):
            if force or weight._version == version:  # not loaded, trained or masked since
                weight[~mask] = values.to(weight.device, weight.dtype)


@dataclass(frozen=True)
class ZeroedWeights:
    """The weights' values that masks zeroed, with the masks and each weight's version counter just after."""

    masks: list[Tensor]
    values: list[Tensor]
    versions: list[int]


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed in [0, 2**62) drawn from ``generator`` (the same draw on every process with the same state)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
