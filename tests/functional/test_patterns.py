"""The tensor math of structured patterns (``functional/patterns.py``: ``"N:M"`` / ``"fan_in"`` units, selection
within units, counts) on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.functional.patterns import (
    check_pattern,
    from_unit_view,
    nm_groups_view,
    parse_pattern,
    rows_view,
    unit_counts,
    unit_view,
)
from lightning_sparse.functional.units import fill_units, pattern_counts, round_to_rows, topk_per_unit, trim_units

# ----------------------------------------------------------------------------- tensor math


def test_nm_groups_run_along_the_input_dimension():
    conv = torch.arange(2 * 2 * 2 * 2).view(2, 2, 2, 2)  # [out, in, kh, kw]: a row is in*kh*kw = 8 weights
    groups = nm_groups_view(conv, 4)
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    stored = torch.arange(12).view(4, 3)  # transposed [in=4, out=3]: groups along dim 0 for each column
    assert nm_groups_view(stored, 2, transposed=True).tolist() == [[0, 3], [6, 9], [1, 4], [7, 10], [2, 5], [8, 11]]
    assert rows_view(stored, transposed=True).tolist() == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    for pattern in ("2:4", "fan_in"):
        for t, transposed in ((conv, False), (stored, True)):
            if pattern == "2:4" and t is stored:
                continue
            assert torch.equal(from_unit_view(unit_view(t, pattern, transposed), t.shape, pattern, transposed), t)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        nm_groups_view(torch.zeros(2, 6), 4)


def test_check_pattern_counts_every_group_exactly():
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert check_pattern(mask, "2:4") and not check_pattern(mask, "1:4") and check_pattern(mask, "fan_in")
    assert unit_counts(mask, "2:4").tolist() == [2, 2, 2, 2]
    mask[1, 7] = False
    assert not check_pattern(mask, "2:4") and not check_pattern(mask, "fan_in")
    stored = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.bool)  # [in=4, out=2], each column 2 of 4
    assert check_pattern(stored, "2:4", transposed=True) and check_pattern(stored, "fan_in", transposed=True)
    assert not check_pattern(stored, "2:4") and not check_pattern(stored, "fan_in")
    assert check_pattern(torch.zeros(3, 6, dtype=torch.bool), "unstructured")
    assert not check_pattern(torch.ones(3, 6, dtype=torch.bool), "2:4")  # 6 is not a multiple of 4


def test_topk_per_unit_is_exact_with_ties_to_the_lowest_index():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-0.0, 0.0, 2.0, float("nan")], [5.0, 4.0, 3.0, 2.0]])
    everywhere = torch.ones(3, 4, dtype=torch.bool)
    assert topk_per_unit(values, everywhere, 2).int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]]
    assert topk_per_unit(values, everywhere, 2, largest=False).int().tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
    ]
    candidates = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    chosen = topk_per_unit(values, candidates, torch.tensor([1, 2, 1]))
    assert chosen.int().tolist() == [[0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]
    assert topk_per_unit(values, everywhere, 0).sum() == 0
    ints = torch.tensor([[2**61, 7, 2**61, 0]])  # integer scores (random hashes) compare exactly
    assert topk_per_unit(ints, torch.ones(1, 4, dtype=torch.bool), 1).int().tolist() == [[1, 0, 0, 0]]
    with pytest.raises(ValueError, match="fewer candidates"):
        topk_per_unit(values, candidates, 3)


def test_fill_and_trim_units():
    mask = torch.tensor([[1, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    score = torch.tensor([[9.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.7, 8.0]])
    trimmed = trim_units(score, mask, 2, "2:4")  # the second group drops its lowest score (0.1)
    assert trimmed.int().tolist() == [[1, 0, 0, 0, 1, 0, 1, 0]]
    filled = fill_units(score, trimmed, 2, "2:4")  # the first group grows its best free position (3.0)
    assert filled.int().tolist() == [[1, 0, 1, 0, 1, 0, 1, 0]] and check_pattern(filled, "2:4")
    stored = torch.tensor([[1, 0], [0, 0], [1, 0]], dtype=torch.bool)  # [in=3, out=2]: columns with 2 and 0
    grown = fill_units(torch.arange(6.0).view(3, 2), stored, 2, "fan_in", transposed=True)
    assert grown.int().tolist() == [[1, 0], [0, 1], [1, 1]]


def test_pattern_counts_and_row_rounding():
    assert pattern_counts([(8, 16), (4, 12)], [40, 10], "fan_in") == [40, 12]  # k = round(5) and round(2.5) = 3
    assert pattern_counts([(8, 16), (4, 12)], [40, 10], "1:4") == [32, 12]
    assert pattern_counts([(6, 3)], [4], "fan_in", transposed=[True]) == [3]  # 3 columns of 6, k = round(1.33)
    # exact totals: 100 = 10 * 7 + 6 * 5 though the nearest counts (7.3 -> 7, 4.5 -> 5) would also be 100
    assert round_to_rows([73.0, 27.0], [10, 6], [20, 20], 100, [5, 8]) == [7, 5]
    # nearest would be 10 * 8 + 6 * 4 = 104: the total stays 100 with the least moved
    assert round_to_rows([78.0, 22.0], [10, 6], [20, 20], 100, [5, 8]) == [7, 5]
    # equal rows and a remainder no rounding can absorb: every layer keeps its count
    assert round_to_rows([35.0, 25.0], [10, 10], [20, 20], 60, [3, 3]) == [3, 3]
    # a layer capped at its fan-in (19 rows wanted, 18 possible): the rest goes to the other layer
    assert round_to_rows([190.0, 10.0], [10, 10], [18, 20], 200, [10, 10]) == [18, 2]
    # LeNet-300-100's first sparse momentum update: the nearest rounding [31, 31, 99] is 140 over; two rows of
    # each layer (+-600, +-200, +-20) cannot take 140 off, four rows of the 10-row layer can (95 = 99 - 4)
    wanted, rows, fan_in, current = [9154.0, 3106.0, 990.0], [300, 100, 10], [784, 300, 100], [39, 15, 5]
    assert round_to_rows(wanted, rows, fan_in, 13250, current) == [31, 30, 95]
    # the search is bounded: when the bound stops it first, every layer keeps its count
    assert round_to_rows(wanted, rows, fan_in, 13250, current, max_work=50_000) == current


def test_parse_pattern_names_the_allowed_values():
    assert str(parse_pattern("2:4")) == "2:4" and parse_pattern("fan_in").structured
    assert not parse_pattern("unstructured").structured
    for bad in ("4:2", "0:4", "2:2", "2/4", "fanin", None, 4):
        with pytest.raises(ValueError, match=r"`pattern` can be 'unstructured', 'N:M' with integers 1 <= N < M"):
            parse_pattern(bad)
