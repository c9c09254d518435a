"""Exact top-n selection that gives the same mask on one tensor and on its row shards, and random scores that
do not depend on how a tensor is split.

``select_lowest`` and ``select_highest`` choose exactly ``n`` candidate positions and break ties by the lowest
*global* flat index, so the choice is a function of the values alone: on a tensor sharded by rows over the
processes (FSDP2's ``Shard(0)``: each process holds a contiguous range of the full tensor's flat
indices, starting at ``offset``), every process gets its part of the mask the full tensor would get, mask for
mask, without any process seeing the full tensor. ``hash_scores`` gives every global flat index a fixed
pseudo-random score, so a random choice made through it is also the same for any number of processes.

Values are compared through ``sortable_key``: floating point values as float32 (``-0.0`` equals ``+0.0``,
every NaN is larger than ``+inf`` and equal to every other NaN), integers exactly.

On one process and the CPU, floating point values are selected by a C++ kernel (``csrc/select.cpp``: two passes
over the values, a histogram of the keys' high 16 bits, then the threshold's bin) that chooses the same positions
as torch's ops, bit for bit; ``kernel`` (``"auto"``, ``"cpp"``, ``"torch"``, as
:func:`~lightning_sparse.kernels.cpu_select`) picks the path. :func:`toggle_selected` also folds ``|values|`` and
the update of the mask into that kernel's passes.

>>> values = torch.tensor([1.0, 0.0, -0.0, 2.0, 0.0])
>>> select_lowest(values, torch.ones(5, dtype=torch.bool), 2)
tensor([False,  True,  True, False, False])
>>> select_highest(values, values != 2.0, 1)
tensor([ True, False, False, False, False])
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sparse.functional.shards import Shards
from lightning_sparse.kernels import SELECT_DTYPES, SelectOp, check_mask_kernel, cpu_select

__all__ = ["hash_scores", "select_highest", "select_lowest", "sortable_key", "toggle_selected"]

_FLOAT_KEY_BITS = 32  # float keys lie in [0, 2**32)
_INT_KEY_BITS = 63  # integer keys lie in [0, 2**63)
_INT_LIMIT = 1 << 62  # integer values must lie in (-2**62, 2**62)
_DIGIT_BITS = 16  # radix select: one 65536-bin histogram per pass
_BINS = 1 << _DIGIT_BITS
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# splitmix64 (Steele, Lea, Flood 2014) constants as signed int64 (torch has no uint64 arithmetic)
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


# ----------------------------------------------------------------------------- keys


def sortable_key(values: Tensor) -> Tensor:
    """Non-negative ``torch.int64`` keys in the order of ``values`` (same shape): ``a < b`` iff ``key(a) < key(b)``.

    Floating point values (float16, bfloat16, float32, float64) are compared as float32: the key of ``x`` is its
    int32 bit pattern, flipped as usual for signed floats, plus ``2**31``, in ``[0, 2**32)``; ``-0.0`` gets the key
    of ``+0.0``, and every NaN the largest key ``2**32 - 1``, above ``+inf``. Integer values (int8 to int64,
    uint8) are compared exactly: the key is ``value + 2**62``, in ``(0, 2**63)``; int64 values must lie in
    ``(-2**62, 2**62)``. That range is checked (``ValueError``) on the CPU only, where the check needs no host
    synchronization; elsewhere values out of range give keys in an unspecified order.

    >>> sortable_key(torch.tensor([-1.0, -0.0, 0.0, 1.0, float("inf"), float("nan")])).tolist()
    [1082130431, 2147483648, 2147483648, 3212836864, 4286578688, 4294967295]
    """
    keys, bits = _keys(values.detach().reshape(-1))
    if bits == _INT_KEY_BITS and values.device.type == "cpu":
        _check_int_keys(keys)
    return keys.view(values.shape)


def _keys(flat: Tensor) -> tuple[Tensor, int]:
    """Keys of the 1-D tensor ``flat`` and their width in bits (every key lies in ``[0, 2**bits)``; int64 values
    out of range give keys ``<= 0``)."""
    if flat.dtype.is_floating_point:
        x = flat.to(torch.float32)
        bits = x.view(torch.int32)
        keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + (1 << 31)  # negative ones: flip all but sign
        keys.masked_fill_(x == 0, 1 << 31)  # -0.0 -> +0.0
        keys.masked_fill_(x.isnan(), (1 << 32) - 1)  # every NaN (also negative ones) above +inf
        return keys, _FLOAT_KEY_BITS
    if flat.dtype in _INT_DTYPES:
        return flat.to(torch.int64) + _INT_LIMIT, _INT_KEY_BITS
    raise TypeError(f"cannot compare values of dtype {flat.dtype}: expected a floating point or integer dtype")


def _check_int_keys(keys: Tensor) -> None:
    """``ValueError`` if int64 values were out of ``(-2**62, 2**62)`` (their keys wrapped to ``<= 0``); syncs."""
    if keys.numel() and bool((keys <= 0).any()):
        raise ValueError("int64 values must lie in (-2**62, 2**62)")


# ----------------------------------------------------------------------------- selection


def select_lowest(
    values: Tensor,
    candidates: Tensor,
    n: int,
    *,
    offset: int = 0,
    shards: Shards | None = None,
    kernel: str = "auto",
) -> Tensor:
    """The ``n`` candidates with the lowest value, ties broken by the lowest global flat index; a new mask.

    Args:
        values: any shape; floating point (compared as float32, ``-0.0 == +0.0``, NaN largest) or integer
            (compared exactly; int64 values in ``(-2**62, 2**62)``), see ``sortable_key``.
        candidates: ``torch.bool``, the shape of ``values``: the positions that may be chosen.
        n: how many positions to choose *in total over the shards* (the same int on every process). ``n <= 0``
            chooses none.
        offset: global flat index of this shard's first entry (``values`` is the contiguous block of flat indices
            ``offset .. offset + values.numel() - 1`` of the full tensor, as a row shard is).
        shards: the processes that hold the shards (:class:`~lightning_sparse.functional.shards.Shards`).
            ``None``: ``values`` is the whole tensor (``offset`` then does not matter).
        kernel: ``"auto"`` (the C++ selection for floating point values on the CPU on one process, when it
            builds), ``"cpp"`` (the same, an error if it cannot be built) or ``"torch"`` (torch's ops only); every
            path chooses the same positions.

    Returns:
        A new ``torch.bool`` tensor of the shape of ``values``, True at the chosen positions: exactly ``n`` over
        all processes, all at candidate positions, the same mask as this selection on the full tensor.

    Raises:
        ValueError: if ``n`` exceeds the number of candidates (over the shards), or int64 candidate values are out
            of range.
            On one process and a device other than the CPU, neither is checked, so that nothing synchronizes
            with the host: ``n`` may not exceed ``values.numel()``, and with fewer than ``n`` candidates, all of
            them are chosen.

    On one process the selection is the C++ kernel's two passes over the values on the CPU (with
    ``kernel="torch"``, or for integer values: one ``kthvalue`` over the candidates), and elsewhere one ``topk``
    over the whole tensor, with no host synchronization (no ``nonzero``, ``.item()``). Over shards it is an
    exact radix select: 16 bits of the keys per pass (2 passes for floats, 4 for integers), each a sum over the
    shards of a 65536-bin histogram, then one of every process's tie count and offset; memory is O(local numel),
    communication does not depend on ``n``, and there is one host synchronization (the global candidate count,
    for the ``ValueError``). Every process must call it with the same ``n``, also one with an empty shard.
    """
    return _select(values, candidates, n, offset, shards, highest=False, kernel=kernel)


def select_highest(
    values: Tensor,
    candidates: Tensor,
    n: int,
    *,
    offset: int = 0,
    shards: Shards | None = None,
    kernel: str = "auto",
) -> Tensor:
    """The ``n`` candidates with the highest value, ties broken by the lowest global flat index; a new mask.

    Everything else as ``select_lowest``; NaN is still the largest value, so NaN candidates are chosen first.
    Random growth that does not depend on the number of processes::

        scores = hash_scores(seed, offset, local.numel(), local.device).view_as(local)
        grown = select_highest(scores, ~mask, n, offset=offset, shards=shards)
    """
    return _select(values, candidates, n, offset, shards, highest=True, kernel=kernel)


def _select(
    values: Tensor, candidates: Tensor, n: int, offset: int, shards: Shards | None, highest: bool, kernel: str
) -> Tensor:
    if candidates.dtype != torch.bool:
        raise TypeError(f"candidates must be a torch.bool tensor, got {candidates.dtype}")
    if candidates.shape != values.shape:
        raise ValueError(f"candidates has shape {tuple(candidates.shape)}, values {tuple(values.shape)}")
    check_mask_kernel(kernel)
    distributed = shards is not None
    if n <= 0:
        return torch.zeros_like(candidates)
    op = None if distributed else _fused_op(values, kernel)
    if op is not None:
        return op(values.detach().contiguous(), candidates.contiguous(), n, highest, False, False, False)
    flat, cand = values.detach().reshape(-1), candidates.reshape(-1)
    if distributed:
        keys, bits = _keys(flat)
        invalid = (cand & (keys <= 0)).any() if bits == _INT_KEY_BITS else None  # int64 values out of range
        chosen = _radix_select(_reverse(keys, bits) if highest else keys, cand, n, bits, offset, shards, invalid)
    elif flat.device.type == "cpu":  # rank the candidates only
        index = cand.nonzero().squeeze(1)  # ascending, so ties in the order of `index` are in flat index order
        if n > index.numel():
            raise ValueError(f"cannot select {n} entries: there are only {index.numel()} candidates")
        keys, bits = _keys(flat.index_select(0, index))
        if bits == _INT_KEY_BITS:
            _check_int_keys(keys)
        chosen = torch.zeros_like(cand)
        if n == index.numel():
            chosen.index_fill_(0, index, True)
        else:
            chosen.index_fill_(0, index[_lowest_cpu(_reverse(keys, bits) if highest else keys, n)], True)
    else:
        keys, bits = _keys(flat)
        chosen = _lowest_device(_reverse(keys, bits) if highest else keys, cand, n)
    return chosen.view(candidates.shape)


def _fused_op(values: Tensor, kernel: str) -> SelectOp | None:
    """The C++ selection for ``values`` (one process), or ``None`` where torch's ops select: ``kernel="torch"``,
    values off the CPU or of a dtype it does not handle, or ``"auto"`` when it cannot be built."""
    if kernel == "torch" or values.device.type != "cpu" or values.dtype not in SELECT_DTYPES:
        return None
    return cpu_select(kernel)


def toggle_selected(
    values: Tensor,
    mask: Tensor,
    n: int,
    *,
    highest: bool,
    inactive: bool = False,
    magnitude: bool = False,
    offset: int = 0,
    shards: Shards | None = None,
    kernel: str = "auto",
) -> Tensor:
    """``mask`` with ``n`` of its positions flipped: the ``n`` active ones (``inactive``: inactive ones) with the
    lowest (``highest``: highest) ``values`` (``magnitude``: ``|values|``), chosen as :func:`select_lowest` /
    :func:`select_highest` choose them; a new mask.

    A prune is ``toggle_selected(score, mask, n, highest=False)`` (``mask & ~chosen``), a growth
    ``toggle_selected(score, mask, n, highest=True, inactive=True)`` (``mask | chosen``). On one process and the
    CPU the C++ kernel computes ``|values|``, the choice and the new mask in its two passes over the values;
    elsewhere torch's ops compute the same. ``offset``, ``shards``, ``kernel`` and the errors as in
    :func:`select_lowest`; ``n <= 0`` returns a copy of ``mask``.
    """
    if n <= 0:
        return mask.clone()
    op = None if shards is not None or mask.dtype != torch.bool or mask.shape != values.shape else _fused_op(values, kernel)
    if op is not None:
        return op(values.detach().contiguous(), mask.contiguous(), n, highest, magnitude, inactive, True)
    scores = values.detach().abs() if magnitude else values.detach()
    chosen = _select(scores, ~mask if inactive else mask, n, offset, shards, highest, kernel)
    return mask ^ chosen


def _reverse(keys: Tensor, bits: int) -> Tensor:
    """Keys in the reverse order, in the same range: the highest values are the lowest reversed keys."""
    return ((1 << bits) - 1) - keys


def _take_lowest(keys: Tensor, eligible: Tensor, threshold: Tensor, need: Tensor) -> Tensor:
    """``eligible`` entries with a key below ``threshold``, plus the first (by index) ``need`` of those equal
    to it. ``keys`` and ``eligible`` are flat; ``threshold`` and ``need`` are tensors (no host synchronization)."""
    ties = eligible & (keys == threshold)
    return (eligible & (keys < threshold)) | (ties & (ties.cumsum(0) <= need))


def _lowest_cpu(keys: Tensor, n: int) -> Tensor:
    """Mask of the ``n`` lowest ``keys`` (1-D), ties broken by the lowest index; ``0 < n < keys.numel()``."""
    threshold = torch.kthvalue(keys, n).values  # the n-th lowest key
    below = keys < threshold
    ties = keys == threshold
    return below | (ties & (ties.cumsum(0) <= n - below.sum()))


def _lowest_device(keys: Tensor, cand: Tensor, n: int) -> Tensor:
    """One process, any device, no host synchronization: one ``topk`` over the keys, non-candidates masked to
    the largest int64 (they only reach the threshold if there are fewer than ``n`` candidates, and are never
    taken)."""
    if n > keys.numel():
        raise ValueError(f"cannot select {n} entries: there are only {keys.numel()} entries")
    masked = keys.masked_fill(~cand, torch.iinfo(torch.int64).max)
    threshold = torch.topk(masked, n, largest=False, sorted=False).values.max()
    below = cand & (keys < threshold)
    return _take_lowest(keys, cand, threshold, n - below.sum())


def _histogram(digits: Tensor, active: Tensor) -> Tensor:
    """Counts of the ``digits`` (in ``[0, 65536)``) where ``active``; no host synchronization off the CPU."""
    if digits.device.type == "cpu":
        return torch.bincount(digits[active], minlength=_BINS)
    return _histogram_scatter(digits, active)


def _histogram_scatter(digits: Tensor, active: Tensor) -> Tensor:
    """``_histogram`` without ``bincount`` and boolean indexing, which synchronize with the host on CUDA."""
    counts = torch.zeros(_BINS + 1, dtype=torch.int64, device=digits.device)  # last bin: inactive entries
    return counts.scatter_add_(0, digits.masked_fill(~active, _BINS), torch.ones_like(digits))[:_BINS]


def _radix_select(
    keys: Tensor, cand: Tensor, n: int, bits: int, offset: int, shards: Shards, invalid: Tensor | None
) -> Tensor:
    """Exact distributed selection of the ``n`` lowest candidate keys of the ``shards``. ``invalid``:
    whether this shard has int64 values out of range (reported by every process, so that all of them raise)."""
    device = keys.device
    need = torch.full((1,), n, dtype=torch.int64, device=device)  # how many are still to choose below the prefix
    prefix = torch.zeros(1, dtype=torch.int64, device=device)  # the threshold's digits found so far
    shifts = range(((bits - 1) // _DIGIT_BITS) * _DIGIT_BITS, -1, -_DIGIT_BITS)
    for i, shift in enumerate(shifts):
        digits = (keys >> shift) & (_BINS - 1)
        active = cand if i == 0 else cand & ((keys >> (shift + _DIGIT_BITS)) == prefix)
        hist = _histogram(digits, active)
        if i == 0:  # one more bin: the number of processes with int64 values out of range
            flag = torch.zeros(1, dtype=torch.int64, device=device) if invalid is None else invalid.reshape(1).long()
            hist = torch.cat([hist, flag])
            shards.sum_(hist)
            total, invalid_ranks = torch.stack([hist[:_BINS].sum(), hist[_BINS]]).tolist()  # host synchronization
            hist = hist[:_BINS]
            if invalid_ranks:
                raise ValueError(f"int64 values must lie in (-2**62, 2**62) (out of range on {invalid_ranks} ranks)")
            if n > total:
                raise ValueError(f"cannot select {n} entries: there are only {total} candidates")
            if n == total:
                return cand.clone()
        else:
            shards.sum_(hist)
        cum = hist.cumsum(0)
        digit = torch.searchsorted(cum, need)  # first digit whose cumulative count reaches the need
        need = need - (cum[digit] - hist[digit])
        prefix = (prefix << _DIGIT_BITS) | digit
    # `prefix` is now the exact threshold key T, and `need` >= 1 the number to take among the keys equal to T.
    ties = cand & (keys == prefix)
    mine = torch.stack([ties.sum(), torch.tensor(offset, dtype=torch.int64, device=device)])
    table = shards.gather(mine)  # (processes, 2): ties, offset
    rank = torch.arange(table.shape[0], device=device)
    me = shards.rank
    earlier = (table[:, 1] < offset) | ((table[:, 1] == offset) & (rank < me))  # shards before this one
    take = (need - (table[:, 0] * earlier).sum()).clamp(min=0)
    return _take_lowest(keys, cand, prefix, take)


# ----------------------------------------------------------------------------- random scores


def hash_scores(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Pseudo-random ``torch.int64`` scores in ``[0, 2**62)`` of the flat indices ``offset .. offset + numel - 1``.

    With ``mix`` splitmix64's output function and ``G = 0x9E3779B97F4A7C15`` (arithmetic modulo ``2**64``), the
    score of index ``i`` is the top 62 bits of ``mix(s + (i + 1) * G)`` with ``s = mix(seed + G)``: the
    ``i + 1``-th output of a splitmix64 generator seeded with the first output of one seeded with ``seed``.
    It depends on ``seed`` and ``i`` only, never on ``offset`` or ``numel``, so a shard's scores are the slice
    of the full tensor's scores, and it is the same on every device (int64 tensor arithmetic, which wraps).
    ``seed`` lies in ``[0, 2**63)``.

    >>> torch.equal(hash_scores(7, 10, 5), hash_scores(7, 0, 15)[10:])
    True
    """
    if not 0 <= seed < (1 << 63):
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    if offset < 0 or numel < 0:
        raise ValueError(f"offset and numel must be non-negative, got offset={offset}, numel={numel}")
    base = _splitmix64_int((seed + _GAMMA) & _MASK64)
    index = torch.arange(offset + 1, offset + numel + 1, dtype=torch.int64, device=device)
    z = index * _signed(_GAMMA) + _signed(base)
    return _shr(_mix(z), 64 - 62)


def _signed(x: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``x``."""
    return x - (1 << 64) if x >= (1 << 63) else x


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 tensors (``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's output function on int64 tensors (multiplication wraps modulo ``2**64``)."""
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def _splitmix64_int(z: int) -> int:
    """splitmix64's output function on a Python int in ``[0, 2**64)``."""
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)
