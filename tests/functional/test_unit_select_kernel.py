"""The C++ per-unit selection (``select_per_unit`` in csrc/select.cpp, behind ``topk_per_unit``) against torch's
two stable sorts (``kernel="torch"``): the same masks, bit for bit, with ties, -0.0/+0.0, NaN and infinities, in
every float dtype and for integer scores (random growth's hash scores, out-of-range int64 included), for every k
from none to all, over units split across threads; and through fill_units / trim_units / select_per_unit."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.functional.selection import hash_scores
from lightning_sparse.functional.units import fill_units, select_per_unit, topk_per_unit, trim_units
from lightning_sparse.kernels import cpu_select_per_unit


@pytest.fixture(scope="module", autouse=True)
def _kernel_built():
    try:
        cpu_select_per_unit("cpp")
    except RuntimeError as error:
        pytest.skip(f"the C++ selection kernel cannot be built here: {error}")


def _values(shape: tuple[int, int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Few distinct values (many ties), both zeros, NaN of both signs and infinities."""
    x = torch.randint(-4, 5, shape, generator=generator).float() / 4
    u = torch.rand(shape, generator=generator)
    x = torch.where(u < 0.3, torch.randn(shape, generator=generator), x)
    x[(u > 0.3) & (u < 0.36)] = -0.0
    x[(u > 0.36) & (u < 0.40)] = 0.0
    x[(u > 0.40) & (u < 0.42)] = float("nan")
    x[(u > 0.42) & (u < 0.43)] = -float("nan")
    x[(u > 0.43) & (u < 0.44)] = float("inf")
    x[(u > 0.44) & (u < 0.45)] = -float("inf")
    return x.to(dtype)


def _both(values, candidates, k, largest):
    cpp = topk_per_unit(values, candidates, k, largest=largest, kernel="cpp")
    torch_path = topk_per_unit(values, candidates, k, largest=largest, kernel="torch")
    return cpp, torch_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 300), (700, 33)])
def test_equals_torch_path_floats(dtype, shape):
    generator = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    values = _values(shape, dtype, generator)
    candidates = torch.rand(shape, generator=generator) < 0.7
    have = candidates.sum(1)
    per_unit = (torch.rand(shape[0], generator=generator) * (have + 1)).long().clamp(max=have)  # 0 .. all
    for k in [per_unit, have, torch.zeros_like(have), int(have.min())]:
        for largest in (True, False):
            cpp, torch_path = _both(values, candidates, k, largest)
            assert torch.equal(cpp, torch_path)
            assert cpp.dtype == torch.bool and not bool((cpp & ~candidates).any())
            expected = k if isinstance(k, torch.Tensor) else torch.full_like(have, k)
            assert torch.equal(cpp.sum(1), expected)


def test_hand_made_ties_go_to_the_lowest_index():
    values = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [0.0, -0.0, 0.0, float("nan"), -1.0]])
    candidates = torch.tensor([[True, True, False, True, True], [True, True, True, True, True]])
    highest = topk_per_unit(values, candidates, torch.tensor([2, 2]), kernel="cpp")
    assert highest.int().tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 1, 0]]
    lowest = topk_per_unit(values, candidates, torch.tensor([1, 3]), largest=False, kernel="cpp")
    assert lowest.int().tolist() == [[0, 0, 0, 0, 1], [1, 1, 0, 0, 1]]
    for largest, k in ((True, torch.tensor([2, 2])), (False, torch.tensor([1, 3]))):
        assert torch.equal(*_both(values, candidates, k, largest))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
def test_equals_torch_path_integers(dtype):
    generator = torch.Generator().manual_seed(5)
    values = torch.randint(0, 6, (50, 40), generator=generator).to(dtype)  # many ties
    candidates = torch.rand(50, 40, generator=generator) < 0.5
    k = (candidates.sum(1) * 2) // 3
    for largest in (True, False):
        assert torch.equal(*_both(values, candidates, k, largest))


def test_hash_scores_and_out_of_range_int64():
    scores = hash_scores(7, 0, 90 * 128, torch.device("cpu")).view(90, 128)
    candidates = torch.rand(90, 128, generator=torch.Generator().manual_seed(1)) < 0.8
    for largest in (True, False):
        assert torch.equal(*_both(scores, candidates, 17, largest))
    big = torch.tensor([[2**62, -(2**62), 2**63 - 1, -(2**63), 0, 5]])  # keys wrap as in torch's int64 math
    for k in range(7):
        for largest in (True, False):
            assert torch.equal(*_both(big, torch.ones_like(big, dtype=torch.bool), k, largest))


def test_too_few_candidates_raises():
    values = torch.randn(3, 4)
    candidates = torch.tensor([[True] * 4, [True, False, False, False], [True] * 4])
    for kernel in ("cpp", "torch"):
        with pytest.raises(ValueError, match="a unit has fewer candidates than the entries to select in it"):
            topk_per_unit(values, candidates, 2, kernel=kernel)


def test_fill_trim_and_select_per_unit_equal_torch_path():
    generator = torch.Generator().manual_seed(3)
    score = _values((48, 36), torch.float32, generator)
    mask = torch.rand(48, 36, generator=generator) < 0.3
    for pattern, transposed in (("fan_in", False), ("fan_in", True), ("2:4", False), ("2:4", True)):
        if pattern == "2:4":
            target = 2
        else:
            target = 9 if not transposed else 12
        for fn in (fill_units, trim_units):
            cpp = fn(score, mask, target, pattern, transposed, kernel="cpp")
            assert torch.equal(cpp, fn(score, mask, target, pattern, transposed, kernel="torch"))
        everywhere = torch.ones_like(mask)
        k = 2 if pattern == "2:4" else target
        cpp = select_per_unit(score, everywhere, k, pattern, transposed, kernel="cpp")
        assert torch.equal(cpp, select_per_unit(score, everywhere, k, pattern, transposed, kernel="torch"))


def test_fill_and_trim_per_unit_targets():
    generator = torch.Generator().manual_seed(4)
    score = _values((40, 50), torch.float32, generator)
    mask = torch.rand(40, 50, generator=generator) < 0.4
    target = torch.randint(0, 51, (40,), generator=generator)
    target[:3] = 0  # rows that neuron ablation empties
    for fn in (fill_units, trim_units):
        cpp = fn(score, mask, target, "fan_in", kernel="cpp")
        assert torch.equal(cpp, fn(score, mask, target, "fan_in", kernel="torch"))
    filled = fill_units(score, mask, target, "fan_in", kernel="cpp")
    assert torch.equal(filled.sum(1), torch.maximum(target, mask.sum(1))) and bool((filled | ~mask).all())
    trimmed = trim_units(score, mask, target, "fan_in", kernel="cpp")
    assert torch.equal(trimmed.sum(1), torch.minimum(target, mask.sum(1))) and not bool((trimmed & ~mask).any())
    with pytest.raises(ValueError, match="fewer candidates"):
        fill_units(score, mask, 51, "fan_in", kernel="cpp")


def test_select_per_unit_keeps_a_conv_shape():
    score = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    everywhere = torch.ones_like(score, dtype=torch.bool)
    for kernel in ("cpp", "torch"):
        chosen = select_per_unit(score, everywhere, 5, "fan_in", kernel=kernel)
        assert chosen.shape == score.shape and chosen.reshape(8, -1).sum(1).tolist() == [5] * 8
