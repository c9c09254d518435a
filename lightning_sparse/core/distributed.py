"""Where a masked weight lives and how processes agree on it. ``torch.distributed`` only, no Lightning.

Three layouts are handled:

* a plain tensor on one process, or replicated by DDP: every process holds the whole weight and computes the
  same update (``ShardSpec.group is None``);
* an FSDP2 shard (a ``DTensor`` with placement ``Shard(0)`` on a 1-D mesh, or ``(Replicate(), Shard(0))``
  for HSDP): each process holds a contiguous block of rows, flat indices ``[offset, offset + local numel)``
  of the full tensor, and every statistic or selection is reduced over the mesh's sharding group;
* anything else (tensor parallelism: ``Shard`` on another dim or on several mesh dims, ``Partial``) is refused
  with an error.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_sparse.functional.shards import Shards

log = logging.getLogger(__name__)

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - older torch without public DTensor
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a weight this process holds.

    Attributes:
        shape: the full (global) shape of the weight.
        row_offset: the first global row (index along dim 0) held here.
        rows: the number of rows held here (0 is possible: FSDP2 gives some ranks no rows of a small weight).
        group: the process group the rows are spread over; ``None`` when this process holds the whole weight.
    """

    shape: tuple[int, ...]
    row_offset: int = 0
    rows: int = -1
    group: dist.ProcessGroup | None = None

    @property
    def numel(self) -> int:
        """Number of entries of the full weight."""
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def offset(self) -> int:
        """Flat (row-major) index of the first local entry in the full weight."""
        return self.row_offset * self.row_numel

    @property
    def sharded(self) -> bool:
        return self.group is not None


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` stored on this process: a DTensor's local tensor (a view sharing its storage, so an
    in-place change shows in the DTensor), else ``t``'s data."""
    if is_dtensor(t):
        return t.to_local().detach()
    return t.detach()


def shard_spec(param: Tensor, name: str = "weight") -> ShardSpec:
    """The :class:`ShardSpec` of a weight. Raises ``ValueError`` for layouts other than whole or row-sharded."""
    shape = tuple(param.shape)
    if not is_dtensor(param):
        return ShardSpec(shape, 0, shape[0] if shape else 1, None)
    placements = list(param.placements)
    shards = [(i, p) for i, p in enumerate(placements) if p.is_shard()]
    others = [p for p in placements if not p.is_shard() and not isinstance(p, Replicate)]
    if others or len(shards) > 1 or (shards and (type(shards[0][1]) is not Shard or shards[0][1].dim != 0)):
        raise ValueError(
            f"{name!r} is a DTensor with placements {placements}: sparse training supports weights that are whole"
            " on every process (single device, DDP) or sharded by rows with FSDP2 (`fully_shard`: Shard(0), or"
            " (Replicate(), Shard(0)) for HSDP). Tensor parallelism is not supported; leave tensor-parallel"
            " layers dense with `dense_layers`"
        )
    if not shards:
        return ShardSpec(shape, 0, shape[0], None)
    mesh_dim = shards[0][0]
    local_shape, global_offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    group = param.device_mesh.get_group(mesh_dim)
    if dist.get_world_size(group) == 1:
        return ShardSpec(shape, 0, shape[0], None)
    return ShardSpec(shape, int(global_offset[0]), int(local_shape[0]), group)


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (the default group when ``None``); 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def all_reduce_sum_(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum ``tensor`` in place over ``group``; nothing to do when ``group`` is ``None``."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def shards_of(group: dist.ProcessGroup | None) -> Shards | None:
    """The :class:`~lightning_sparse.functional.shards.Shards` of ``group`` for the functional code (its sums are
    ``all_reduce``\ s, on the backend's device: NCCL's CUDA device for CPU tensors); ``None`` for no group or a group
    of one process."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None

    def sum_(tensor: Tensor) -> Tensor:
        if device is None or tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            return tensor
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        return tensor.copy_(moved)

    return Shards(dist.get_rank(group), dist.get_world_size(group), sum_)


def common_group(specs: Sequence[ShardSpec]) -> dist.ProcessGroup | None:
    """The one group the sharded weights are spread over (``None`` if none is sharded). Weights sharded over
    different groups are refused: one sparse model is sharded over one mesh."""
    groups = {id(s.group): s.group for s in specs if s.group is not None}
    if len(groups) > 1:
        raise ValueError("the masked weights are sharded over different process groups; shard them over one mesh")
    return next(iter(groups.values()), None)


def reduce_layer_sums(values: Tensor, specs: Sequence[ShardSpec], group: dist.ProcessGroup | None) -> Tensor:
    """Per-layer sums of local contributions ``values`` (shape ``[L, ...]``) over the sharding group.

    A sharded layer's value is the sum over its shards; a layer that every process holds whole contributes
    from the first process only, so it is not counted ``world`` times. One collective for all layers.
    """
    if group is None or dist.get_world_size(group) == 1:
        return values
    if dist.get_rank(group) != 0:
        whole = torch.tensor([not s.sharded for s in specs], device=values.device)
        values = values.masked_fill(whole.view(-1, *([1] * (values.dim() - 1))), 0)
    else:
        values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def gather_rows(local_tensor: Tensor, spec: ShardSpec) -> Tensor:
    """The full tensor from every process's row block (for checkpoints only: it holds the whole weight)."""
    if not spec.sharded:
        return local_tensor
    group = spec.group
    size = dist.get_world_size(group)
    info = torch.tensor([spec.row_offset, spec.rows], dtype=torch.int64, device=local_tensor.device)
    infos = [torch.empty_like(info) for _ in range(size)]
    dist.all_gather(infos, info, group=group)
    max_rows = max(int(i[1]) for i in infos)
    block = local_tensor.new_zeros((max_rows, *spec.shape[1:]))
    block[: spec.rows] = local_tensor
    blocks = [torch.empty_like(block) for _ in range(size)]
    dist.all_gather(blocks, block, group=group)
    full = local_tensor.new_zeros(spec.shape)
    for i, b in zip(infos, blocks):
        start, rows = int(i[0]), int(i[1])
        full[start : start + rows] = b[:rows]
    return full


def local_rows(full: Tensor, spec: ShardSpec) -> Tensor:
    """This process's row block of a full tensor (the whole tensor when not sharded)."""
    if not spec.sharded:
        return full
    return full[spec.row_offset : spec.row_offset + spec.rows]


def shared_seed(seed: int | None) -> int:
    """``seed``, or a random seed drawn on rank zero and broadcast to every process of the default group."""
    if seed is not None:
        return seed
    drawn = random.randrange(2**63)
    if world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        value = torch.tensor([drawn], dtype=torch.int64, device=device)
        dist.broadcast(value, src=0)
        drawn = int(value.item())
    return drawn


def mask_checksum(mask: Tensor) -> Tensor:
    """Count, sum and sum of squares of the active positions (int64, wrapping), as one tensor on the device."""
    flat = mask.reshape(-1).to(torch.int64)
    idx = torch.arange(flat.numel(), device=mask.device)
    return torch.stack([flat.sum(), (idx * flat).sum(), (idx * idx * flat).sum()])


def ensure_masks_agree(names: Sequence[str], masks: Sequence[Tensor]) -> list[str]:
    """Under data parallelism (whole masks on every process) every process computes the same update from the same
    synchronized weights, momentum, gradients and random state, so the masks agree; this checks it with one small
    all-gather of per-layer checksums over the default group and, should they ever differ (a non-deterministic
    kernel breaking a tie differently), makes every process take rank zero's masks (in place). Returns the names
    of the layers that differed."""
    if world_size() <= 1 or not masks:
        return []
    checksums = torch.stack([mask_checksum(m) for m in masks])
    gathered = [torch.empty_like(checksums) for _ in range(world_size())]
    dist.all_gather(gathered, checksums)
    stacked = torch.stack(gathered)
    if torch.equal(stacked.amin(dim=0), stacked.amax(dim=0)):
        return []
    differing = [n for n, same in zip(names, (stacked == stacked[0]).all(dim=2).all(dim=0).tolist()) if not same]
    log.warning("lightning_sparse: masks of %s differ across processes; taking rank zero's", differing)
    for mask in masks:
        dist.broadcast(mask.view(torch.uint8), src=0)
    return differing
