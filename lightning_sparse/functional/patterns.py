"""Structured sparsity patterns: the units a mask is counted in, and exact selection within units. Pure tensor
math, no Lightning.

A pattern splits every masked weight into *units* of equal size, and a mask holds the pattern when every unit of
a layer has the same number of active entries:

* ``"N:M"`` (``"2:4"``, ``"1:4"``, ``"4:8"``): units are groups of ``M`` consecutive weights along the layer's input
  dimension, each with exactly ``N`` active. For a weight ``[out, in, kh, kw]`` the groups run along its rows
  flattened as ``[out, in*kh*kw]`` (in-channels x kernel, as the GEMM sees them); for a *transposed* weight
  (``transformers``' ``Conv1D``, stored ``[in, out]``) along dim 0, for each column.
* ``"fan_in"``: units are the output neurons (rows; columns of a transposed weight), each with the same number of
  active inputs ``k``.
* ``"unstructured"``: one unit, the whole layer (no constraint).

Selections within units are exact and deterministic like :mod:`~lightning_sparse.functional.selection`: values
are compared through their sortable keys and ties go to the lowest flat index. A unit never spans two rows of a
(non-transposed) weight, so on FSDP2 row shards everything here is local to a shard.

>>> mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
>>> check_pattern(mask, "2:4"), check_pattern(mask, "1:4"), check_pattern(mask, "fan_in")
(True, False, True)
>>> unit_counts(mask, "2:4").tolist()
[2, 2]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor

__all__ = [
    "PATTERNS",
    "Pattern",
    "check_pattern",
    "from_unit_view",
    "input_size",
    "nm_groups_view",
    "parse_pattern",
    "rows_view",
    "unit_counts",
    "unit_shape",
    "unit_view",
]

PATTERNS = ("unstructured", "N:M", "fan_in")
"""The pattern forms ``pattern=`` accepts (``N:M`` with integers ``1 <= N < M``)."""

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is ``"unstructured"``, ``"nm"`` or ``"fan_in"``; ``n``, ``m`` for ``"nm"``.
    ``str(pattern)`` gives the canonical spelling (``"2:4"``, ``"fan_in"``, ``"unstructured"``).

    >>> parse_pattern("2:4"), str(parse_pattern(" 4 : 8 ")), parse_pattern("2:4").density
    (Pattern(kind='nm', n=2, m=4), '4:8', 0.5)
    """

    kind: str = "unstructured"
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    @property
    def density(self) -> float | None:
        """``N/M`` for an N:M pattern (every layer's density), else ``None``."""
        return self.n / self.m if self.kind == "nm" else None


def parse_pattern(value: str | Pattern) -> Pattern:
    """The :class:`Pattern` of ``"unstructured"``, ``"N:M"`` (integers ``1 <= N < M``) or ``"fan_in"``; anything
    else raises ``ValueError`` naming the allowed values.

    >>> parse_pattern("fan_in")
    Pattern(kind='fan_in', n=0, m=0)
    >>> parse_pattern("4:4")
    Traceback (most recent call last):
    ...
    ValueError: `pattern` can be 'unstructured', 'N:M' with integers 1 <= N < M (e.g. '2:4', '1:4', '4:8') or 'fan_in', got '4:4'
    """
    if isinstance(value, Pattern):
        return value
    if isinstance(value, str):
        if value in ("unstructured", "fan_in"):
            return Pattern(value)
        match = _NM.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if 1 <= n < m:
                return Pattern("nm", n, m)
    raise ValueError(
        "`pattern` can be 'unstructured', 'N:M' with integers 1 <= N < M (e.g. '2:4', '1:4', '4:8') or 'fan_in',"
        f" got {value!r}"
    )


# ----------------------------------------------------------------------------- units


def input_size(shape: Sequence[int], transposed: bool = False) -> int:
    """A layer's input dimension (its fan-in): ``in*kh*kw`` of a weight ``[out, in, kh, kw]``, dim 0 of a
    transposed ``[in, out]`` weight.

    >>> input_size((16, 8, 3, 3)), input_size((768, 2304), transposed=True)
    (72, 768)
    """
    if transposed:
        return int(shape[0])
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def unit_shape(shape: Sequence[int], pattern: str | Pattern, transposed: bool = False) -> tuple[int, int]:
    """``(number of units, entries per unit)`` of a weight of ``shape`` under ``pattern``.

    >>> unit_shape((16, 8, 3, 3), "2:4"), unit_shape((16, 8, 3, 3), "fan_in"), unit_shape((6, 4), "fan_in", True)
    ((288, 4), (16, 72), (4, 6))
    """
    pattern = parse_pattern(pattern)
    numel = math.prod(shape)
    if pattern.kind == "nm":
        if input_size(shape, transposed) % pattern.m:
            raise ValueError(
                f"a weight of shape {tuple(shape)} has input dimension {input_size(shape, transposed)}, not a"
                f" multiple of {pattern.m}"
            )
        return numel // pattern.m, pattern.m
    if pattern.kind == "fan_in":
        size = input_size(shape, transposed)
        return (numel // size if size else 0), size
    return 1, numel


def _outputs_first(t: Tensor, transposed: bool) -> Tensor:
    """``t`` as ``[out, fan_in]`` (a copy for transposed or non-contiguous tensors)."""
    if transposed:
        if t.dim() != 2:
            raise ValueError(f"a transposed weight must have 2 dimensions, got shape {tuple(t.shape)}")
        return t.t().reshape(t.shape[1], t.shape[0])
    return t.reshape(t.shape[0] if t.dim() else 1, input_size(t.shape))


def rows_view(t: Tensor, transposed: bool = False) -> Tensor:
    """``t`` as ``[output neurons, fan_in]``: its rows flattened (``[out, in*kh*kw]``), or the columns of a
    transposed ``[in, out]`` weight. A view where ``t`` is contiguous and not transposed.

    >>> rows_view(torch.arange(6).view(2, 3), transposed=True).tolist()
    [[0, 3], [1, 4], [2, 5]]
    """
    return _outputs_first(t, transposed)


def nm_groups_view(t: Tensor, m: int, transposed: bool = False) -> Tensor:
    """``t`` as ``[groups, m]``: every ``m`` consecutive entries along the input dimension of each output neuron
    (the rows flattened as ``[out, in*kh*kw]``; dim 0 of a transposed weight, for each column).

    >>> nm_groups_view(torch.arange(8).view(1, 8), 4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> nm_groups_view(torch.arange(8).view(4, 2), 2, transposed=True).tolist()
    [[0, 2], [4, 6], [1, 3], [5, 7]]
    """
    rows = _outputs_first(t, transposed)
    if rows.shape[1] % m:
        raise ValueError(f"the input dimension {rows.shape[1]} is not a multiple of {m}")
    return rows.reshape(-1, m)


def unit_view(t: Tensor, pattern: str | Pattern, transposed: bool = False) -> Tensor:
    """``t`` as ``[units, entries per unit]`` under ``pattern`` (see :func:`unit_shape`); entries of a unit are in
    increasing flat index order of ``t``."""
    pattern = parse_pattern(pattern)
    if pattern.kind == "nm":
        return nm_groups_view(t, pattern.m, transposed)
    if pattern.kind == "fan_in":
        return rows_view(t, transposed)
    return t.reshape(1, -1)


def from_unit_view(units: Tensor, shape: Sequence[int], pattern: str | Pattern, transposed: bool = False) -> Tensor:
    """The inverse of :func:`unit_view`: a contiguous tensor of ``shape``.

    >>> w = torch.arange(8).view(4, 2)
    >>> torch.equal(from_unit_view(unit_view(w, "2:4", True), w.shape, "2:4", True), w)
    True
    """
    shape = tuple(shape)
    if parse_pattern(pattern).structured and transposed:
        return units.reshape(shape[1], shape[0]).t().contiguous()
    return units.reshape(shape).contiguous()


def unit_counts(mask: Tensor, pattern: str | Pattern, transposed: bool = False) -> Tensor:
    """Active entries of every unit of ``mask`` (``torch.int64``, one per unit)."""
    return unit_view(mask, pattern, transposed).sum(1)


def check_pattern(
    mask: Tensor, pattern: str | Pattern, transposed: bool = False, *, empty_rows: bool = False
) -> bool:
    """Whether ``mask`` holds ``pattern``: every group of ``M`` exactly ``N`` active (``"N:M"``), every output neuron
    the same number of active inputs (``"fan_in"``; with ``empty_rows``, neuron ablation's form: every row either
    empty or at the same count); always for ``"unstructured"``. One host read.

    >>> check_pattern(torch.tensor([[True, False], [False, True]]), "fan_in")
    True
    >>> check_pattern(torch.tensor([[True, True], [False, False]]), "fan_in")
    False
    >>> check_pattern(torch.tensor([[True, True], [False, False]]), "fan_in", empty_rows=True)
    True
    """
    pattern = parse_pattern(pattern)
    if not pattern.structured or mask.numel() == 0:
        return True
    if pattern.kind == "nm" and input_size(mask.shape, transposed) % pattern.m:
        return False
    counts = unit_counts(mask, pattern, transposed)
    if pattern.kind == "nm":
        return bool((counts == pattern.n).all())
    if empty_rows:
        return bool(((counts == 0) | (counts == counts.max())).all())
    return bool((counts == counts[0]).all())


# ----------------------------------------------------------------------------- selection within units


# ----------------------------------------------------------------------------- counts
