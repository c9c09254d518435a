"""Per-unit selection and counts under a structured pattern (the units of :mod:`~lightning_sparse.functional.patterns`):
the top ``k`` of every unit, filling or trimming units to a target, the per-layer counts a pattern allows, whole-row
rounding that keeps a total exact, and neuron ablation's cutoff. Pure tensor math."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sparse.functional.patterns import (
    Pattern,
    from_unit_view,
    parse_pattern,
    unit_shape,
    unit_view,
)
from lightning_sparse.functional.selection import _keys
from lightning_sparse.kernels import UNIT_SELECT_DTYPES, UnitSelectOp, check_mask_kernel, cpu_select_per_unit


def ablation_cutoff(histogram: Sequence[int], threshold: int, keep: int) -> int:
    """SRigL's neuron ablation (Lasby et al. 2024) for one layer: the salient-weight count below which a row
    (output neuron) is ablated, its budget given to the other rows.

    ``histogram[c]`` is the number of rows with ``c`` salient weights (weights the update keeps by ``|W|`` or would
    grow by its growth score); ``threshold`` is the wanted minimum (SRigL's ``max(1, int(gamma_sal * k))``);
    ``keep`` rows must stay (``budget // fan_in + 1``, so the budget fits in them): when fewer than ``keep`` rows
    reach ``threshold``, the cutoff drops to the salient count of the ``keep``-th most salient row. Rows with fewer
    than the returned count are ablated (0 ablates none); ``keep`` above the number of rows ablates none.

    >>> ablation_cutoff([3, 1, 0, 2, 4], threshold=2, keep=2)  # 3 rows with 0 salient, 1 with 1: ablated
    2
    >>> ablation_cutoff([3, 1, 0, 2, 4], threshold=4, keep=7)  # only 6 rows reach 3
    1
    """
    if keep > sum(histogram) or keep <= 0:
        return 0
    reached = 0
    for count in range(len(histogram) - 1, -1, -1):  # the keep-th most salient row's count
        reached += int(histogram[count])
        if reached >= keep:
            return min(threshold, count)
    return 0


def topk_per_unit(
    values: Tensor, candidates: Tensor, k: int | Tensor, *, largest: bool = True, kernel: str = "auto"
) -> Tensor:
    """In every row (unit) of the 2-D ``values``, the ``k`` candidates with the highest (``largest``) or lowest
    values, ties to the lowest index; a new ``torch.bool`` mask of the shape of ``values``.

    ``k`` is one int for every unit or one per unit (a 1-D integer tensor). Values compare as in
    :func:`~lightning_sparse.functional.selection.sortable_key` (floats as float32, NaN largest; integers exactly).
    A unit with fewer than ``k`` candidates raises ``ValueError`` on the CPU; elsewhere (no host synchronization)
    it takes all of them. On the CPU a C++ kernel selects (``select_per_unit`` in ``csrc/select.cpp``: one
    ``nth_element`` per unit, O(numel)); with ``kernel="torch"``, off the CPU, or when the kernel cannot be built
    (``"auto"``), two stable sorts, O(numel log unit size). Every path chooses the same positions. ``kernel`` as
    :func:`~lightning_sparse.kernels.cpu_select` (``"auto"``, ``"cpp"``, ``"torch"``).

    >>> v = torch.tensor([[0.5, -2.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]])
    >>> topk_per_unit(v.abs(), torch.ones(2, 4, dtype=torch.bool), 2).int().tolist()
    [[0, 1, 1, 0], [1, 0, 0, 1]]
    >>> topk_per_unit(v, v != 3.0, torch.tensor([1, 2]), largest=False).int().tolist()
    [[0, 1, 0, 0], [0, 1, 1, 0]]
    """
    if values.dim() != 2 or candidates.shape != values.shape or candidates.dtype != torch.bool:
        raise ValueError(
            f"values must be 2-D and candidates torch.bool of the same shape, got {tuple(values.shape)} and"
            f" {tuple(candidates.shape)} ({candidates.dtype})"
        )
    units, size = values.shape
    k = torch.as_tensor(k, dtype=torch.int64, device=values.device)
    k = k.expand(units) if k.dim() == 0 else k
    op = _unit_op(values, kernel)
    if op is not None and units and size:
        return op(values.detach().contiguous(), candidates.contiguous(), k.contiguous(), largest, False, 0, False)
    if values.device.type == "cpu" and units and bool((k > candidates.sum(1)).any()):
        raise ValueError("a unit has fewer candidates than the entries to select in it")
    if units == 0 or size == 0:
        return torch.zeros_like(candidates)
    keys, bits = _keys(values.detach().reshape(-1))
    keys = keys.view(units, size)
    if largest:
        keys = ((1 << bits) - 1) - keys
    order = torch.sort(keys, dim=1, stable=True).indices  # ties keep index order: the lowest index first
    candidate_first = torch.sort((~candidates.gather(1, order)).to(torch.int8), dim=1, stable=True).indices
    order = order.gather(1, candidate_first)
    rank_ok = torch.arange(size, device=values.device).unsqueeze(0) < k.unsqueeze(1)
    chosen_sorted = rank_ok & candidates.gather(1, order)
    return torch.zeros_like(candidates).scatter_(1, order, chosen_sorted)


def _unit_op(values: Tensor, kernel: str) -> UnitSelectOp | None:
    """The C++ per-unit selection for ``values``, or ``None`` where torch's sorts select."""
    if check_mask_kernel(kernel) == "torch" or values.device.type != "cpu" or values.dtype not in UNIT_SELECT_DTYPES:
        return None
    return cpu_select_per_unit(kernel)


def _fused_units(values: Tensor, units: Tensor, target: int | Tensor, kernel: str, *, fill: bool) -> Tensor | None:
    """:func:`fill_units` (``fill``) or :func:`trim_units` on the unit views of the score (``values``) and the
    mask (``units``) in one C++ call (the unit view of the new mask), or ``None`` where torch's ops compute it."""
    op = _unit_op(values, kernel) if units.dtype == torch.bool and units.dim() == 2 else None
    if op is None or not units.numel():
        return None
    k = torch.as_tensor(target, dtype=torch.int64)
    k = (k.expand(units.shape[0]) if k.dim() == 0 else k).contiguous()
    return op(values.detach().contiguous(), units.contiguous(), k, fill, fill, 1 if fill else 2, True)


def select_per_unit(
    values: Tensor,
    candidates: Tensor,
    k: int | Tensor,
    pattern: str | Pattern,
    transposed: bool = False,
    *,
    largest: bool = True,
    kernel: str = "auto",
) -> Tensor:
    """:func:`topk_per_unit` on a weight-shaped ``values`` and ``candidates``: ``k`` per unit of ``pattern``;
    returns a mask of the weight's shape."""
    shape = candidates.shape
    values, candidates = unit_view(values, pattern, transposed), unit_view(candidates, pattern, transposed)
    chosen = topk_per_unit(values, candidates, k, largest=largest, kernel=kernel)
    return from_unit_view(chosen, shape, pattern, transposed)


def fill_units(
    score: Tensor,
    mask: Tensor,
    target: int | Tensor,
    pattern: str | Pattern,
    transposed: bool = False,
    *,
    kernel: str = "auto",
) -> Tensor:
    """``mask`` with every unit of ``pattern`` filled up to ``target`` active entries by its inactive positions of
    highest ``score`` (units already at or above ``target`` are unchanged); a new mask. ``target`` is one int for
    every unit or one per unit (a 1-D integer tensor, e.g. 0 for the rows that neuron ablation empties).

    >>> mask = torch.tensor([[True, False, False, False, True, True, False, False]])
    >>> fill_units(torch.arange(8.0).view(1, 8), mask, 2, "2:4").int().tolist()
    [[1, 0, 0, 1, 1, 1, 0, 0]]
    """
    units = unit_view(mask, pattern, transposed)
    fused = _fused_units(unit_view(score, pattern, transposed), units, target, kernel, fill=True)
    if fused is not None:  # the C++ kernel counts, selects and fills in one pass per unit
        return from_unit_view(fused, mask.shape, pattern, transposed)
    need = (target - units.sum(1)).clamp(min=0)
    chosen = topk_per_unit(unit_view(score, pattern, transposed), ~units, need, kernel=kernel)
    return mask | from_unit_view(chosen, mask.shape, pattern, transposed)


def trim_units(
    score: Tensor,
    mask: Tensor,
    target: int | Tensor,
    pattern: str | Pattern,
    transposed: bool = False,
    *,
    kernel: str = "auto",
) -> Tensor:
    """``mask`` with every unit of ``pattern`` holding more than ``target`` active entries cut down to ``target``,
    dropping its active positions of lowest ``score`` (ties: the lowest index first); a new mask. ``target`` is one
    int or one per unit, as in :func:`fill_units`.

    >>> mask = torch.ones(2, 4, dtype=torch.bool)
    >>> trim_units(torch.tensor([[4.0, 3, 2, 1], [1, 1, 1, 1]]), mask, 3, "fan_in").int().tolist()
    [[1, 1, 1, 0], [0, 1, 1, 1]]
    """
    units = unit_view(mask, pattern, transposed)
    fused = _fused_units(unit_view(score, pattern, transposed), units, target, kernel, fill=False)
    if fused is not None:
        return from_unit_view(fused, mask.shape, pattern, transposed)
    extra = (units.sum(1) - target).clamp(min=0)
    dropped = topk_per_unit(unit_view(score, pattern, transposed), units, extra, largest=False, kernel=kernel)
    return mask & ~from_unit_view(dropped, mask.shape, pattern, transposed)


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (``round`` rounds halves to even).

    >>> round_half_up(2.5), round_half_up(3.5), round_half_up(0.49999)
    (3, 4, 0)
    """
    return int(math.floor(x + 0.5 + 1e-9))


def pattern_counts(
    shapes: Sequence[Sequence[int]],
    counts: Sequence[int],
    pattern: str | Pattern,
    transposed: Sequence[bool] | None = None,
) -> list[int]:
    """Per-layer active counts that ``pattern`` allows, from the counts of an initialization (``counts``, e.g.
    :func:`~lightning_sparse.functional.init.layer_active_counts`): ``N/M`` of every layer for ``"N:M"``; for
    ``"fan_in"``, ``rows x k`` with ``k = round(count / rows)`` (the layer's density times its fan-in, halves up):
    every row keeps the same number, so the total may differ from ``sum(counts)`` by up to half a row per layer.

    >>> pattern_counts([(10, 7), (4, 8)], [21, 9], "fan_in"), pattern_counts([(10, 8), (4, 8)], [21, 9], "1:4")
    ([20, 8], [20, 8])
    """
    pattern = parse_pattern(pattern)
    transposed = transposed or [False] * len(shapes)
    if pattern.kind == "nm":
        return [math.prod(s) * pattern.n // pattern.m for s in shapes]
    if pattern.kind == "fan_in":
        result = []
        for shape, count, t in zip(shapes, counts, transposed):
            rows, size = unit_shape(shape, pattern, t)
            result.append(rows * min(round_half_up(count / rows), size) if rows else 0)
        return result
    return [int(c) for c in counts]


def round_to_rows(
    wanted: Sequence[float],
    rows: Sequence[int],
    fan_in: Sequence[int],
    total: int,
    current: Sequence[int],
    *,
    reach: int = 2,
    max_work: int = 50_000_000,
) -> list[int]:
    """Per-layer active inputs per row ``k_l`` (``0 <= k_l <= fan_in_l``) for a redistribution under ``"fan_in"``:
    layer ``l`` wants ``wanted[l]`` active weights, which must become a whole number of rows ``rows[l] x k_l``,
    and the total ``sum(rows[l] x k_l)`` must stay exactly ``total``.

    Each ``k_l`` is the nearest integer to ``wanted[l] / rows[l]`` moved by at most ``reach`` (whole rows), chosen
    by dynamic programming over the running total (kept within ``|total deviation| + reach x max(rows)`` of the
    nearest rounding's) so that the total is exact and the weights moved off what each layer wanted,
    ``sum |rows[l] x k_l - wanted[l]|``, are fewest; ties go to the smaller moves, then to the earlier layers. When
    no choice within ``reach`` reaches the total (layers with few rows, e.g. 10 rows next to 100 and 300, can
    leave a deviation that two rows of each do not cover), ``reach`` doubles and the search runs again, up to the
    reach that contains ``current`` when ``current`` is exact (then it always ends there), else up to the largest
    fan-in, or about ``max_work`` table entries. Only if that bound stops it, or no choice exists at all (every
    layer has the same number of rows and the deviation is not a multiple of it), is ``current`` returned: every
    layer keeps its count and weights move only within layers at this update (neuron ablation passes a fallback
    ``current`` that need not be exact). Host-side.

    >>> round_to_rows([150.0, 50.0], [10, 10], [20, 20], 200, [10, 10])
    [15, 5]
    >>> round_to_rows([104.0, 96.0], [10, 3], [20, 40], 200, [17, 10])  # nearest [10, 32] is 196: 4 short
    [11, 30]
    >>> round_to_rows([9154.0, 3106.0, 990.0], [300, 100, 10], [784, 300, 100], 13250, [39, 15, 5])  # reach 4
    [31, 30, 95]
    """
    if not wanted:
        return []
    base = [min(max(round_half_up(w / r) if r else 0, 0), f) for w, r, f in zip(wanted, rows, fan_in)]
    need = total - sum(r * b for r, b in zip(rows, base))
    if sum(r * c for r, c in zip(rows, current)) == total:
        enough = max([reach, *(abs(b - c) for b, c in zip(base, current))])  # this reach contains `current`
    else:  # `current` is only a fallback (neuron ablation changed the rows): search as far as the work bound allows
        enough = max([reach, *fan_in])
    while True:
        span = min(reach * sum(rows), abs(need) + reach * max(rows))  # partial sums kept within +-span
        too_much = (2 * span + 1) * (2 * reach + 1) * len(wanted) > max_work
        found = None
        if abs(need) <= reach * sum(rows) and not too_much:
            found = _rows_within(wanted, rows, fan_in, base, need, reach, span)
        if found is not None:
            return found
        if reach >= enough or too_much:
            return list(current)
        reach = min(2 * reach, enough)


def _rows_within(
    wanted: Sequence[float],
    rows: Sequence[int],
    fan_in: Sequence[int],
    base: Sequence[int],
    need: int,
    reach: int,
    span: int,
) -> list[int] | None:
    """:func:`round_to_rows`'s dynamic programme for one ``reach``: the ``k_l`` or None when none is exact."""
    size = 2 * span + 1
    inf = float("inf")
    costs = torch.full((size,), inf, dtype=torch.float64)
    costs[span] = 0.0
    moves = [0] + [d for step in range(1, reach + 1) for d in (step, -step)]
    choices = []
    for w, r, f, b in zip(wanted, rows, fan_in, base):
        best = torch.full((size,), inf, dtype=torch.float64)
        choice = torch.zeros(size, dtype=torch.int32)
        for i, d in enumerate(moves):
            shift = r * d
            if not 0 <= b + d <= f or (d and r == 0) or abs(shift) >= size:
                continue
            # partial sum s after this layer comes from s - shift before it
            target = best[shift:] if shift >= 0 else best[:shift]
            source = costs[: size - shift] if shift >= 0 else costs[-shift:]
            candidate = source + abs(r * (b + d) - w)
            better = candidate < target
            target.copy_(torch.where(better, candidate, target))
            (choice[shift:] if shift >= 0 else choice[:shift]).masked_fill_(better, i)
        costs = best
        choices.append(choice)
    at = span + need
    if not 0 <= at < size or not math.isfinite(float(costs[at])):
        return None
    result = [0] * len(wanted)
    for layer in range(len(wanted) - 1, -1, -1):
        d = moves[int(choices[layer][at])]
        result[layer] = base[layer] + d
        at -= rows[layer] * d
    return result
