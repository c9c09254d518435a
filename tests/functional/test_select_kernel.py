"""The C++ selection (csrc/select.cpp, ``kernel="cpp"``) against torch's path (``kernel="torch"``): the same masks,
bit for bit, on random tensors with ties, -0.0/+0.0, NaN, infinities and subnormals, in every float dtype, for
n = 0, 1, in between, all but one and all, on tensors large enough to be split over threads; and against the
sharded path (row shards at their offsets, summed over threads standing for processes)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lightning_sparse.functional.prune_grow import add_highest, drop_lowest, magnitude_prune, score_growth
from lightning_sparse.functional.selection import select_highest, select_lowest, toggle_selected
from lightning_sparse.functional.shards import Shards
from lightning_sparse.kernels import cpu_select


@pytest.fixture(scope="module", autouse=True)
def _kernel_built():
    try:
        cpu_select("cpp")
    except RuntimeError as error:
        pytest.skip(f"the C++ selection kernel cannot be built here: {error}")


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SELECT = {"lowest": select_lowest, "highest": select_highest}


def _values(numel: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Few distinct values (many ties), both zeros, NaN of both signs, infinities and subnormals."""
    x = torch.randint(-6, 7, (numel,), generator=generator).float() / 4
    u = torch.rand(numel, generator=generator)
    x = torch.where(u < 0.3, torch.randn(numel, generator=generator), x)  # some distinct values too
    x[(u > 0.3) & (u < 0.36)] = -0.0
    x[(u > 0.36) & (u < 0.40)] = 0.0
    x[(u > 0.40) & (u < 0.42)] = float("nan")
    x[(u > 0.42) & (u < 0.43)] = -float("nan")
    x[(u > 0.43) & (u < 0.44)] = float("inf")
    x[(u > 0.44) & (u < 0.45)] = -float("inf")
    x[(u > 0.45) & (u < 0.46)] = 1e-40  # a float32 subnormal (zero in float16, bfloat16 keeps it)
    x = x.to(dtype)
    if dtype == torch.float64:
        x[(u > 0.46) & (u < 0.47)] = 1e-300  # rounds to +0.0 as float32: ties with the zeros
    return x


def _counts(k: int) -> list[int]:
    return sorted({0, min(1, k), k // 3, max(k - 1, 0), k})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 5, 257, 4099, 20_000, 70_000])
@pytest.mark.parametrize("share", [0.6, 0.05])
def test_fused_selection_equals_torch_path(dtype, numel, share):
    # few candidates: nth_element over (key, index) pairs (select_small); many, or past 65536 entries: the histograms
    generator = torch.Generator().manual_seed(numel)
    values = _values(numel, dtype, generator)
    candidates = torch.rand(numel, generator=generator) < share
    for name, select in SELECT.items():
        for n in _counts(int(candidates.sum())):
            fused = select(values, candidates, n, kernel="cpp")
            reference = select(values, candidates, n, kernel="torch")
            assert torch.equal(fused, reference), (name, n)
            assert int(fused.sum()) == n and not (fused & ~candidates).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_prune_and_growth_equal_torch_path(dtype):
    """The mask update folded into the kernel (``mask & ~chosen``, ``mask | chosen``) and ``|values|`` computed in
    its passes: the same new masks as the torch path, which takes ``abs()`` first."""
    generator = torch.Generator().manual_seed(1)
    values = _values(30 * 41, dtype, generator).view(30, 41)
    mask = torch.rand(30, 41, generator=generator) < 0.3
    active, free = int(mask.sum()), int((~mask).sum())
    for magnitude in (False, True):
        for n in _counts(active):
            args = dict(magnitude=magnitude)
            fused = drop_lowest(values, mask, n, kernel="cpp", **args)
            assert torch.equal(fused, drop_lowest(values, mask, n, kernel="torch", **args)), (magnitude, n)
            assert int(fused.sum()) == active - n
        for n in _counts(free):
            fused = add_highest(values, mask, n, kernel="cpp", magnitude=magnitude)
            assert torch.equal(fused, add_highest(values, mask, n, kernel="torch", magnitude=magnitude)), (magnitude, n)
            assert int(fused.sum()) == active + n and not (mask & ~fused).any()
    n = active // 2
    assert torch.equal(magnitude_prune(values, mask, n, kernel="cpp"), magnitude_prune(values, mask, n, kernel="torch"))
    assert torch.equal(score_growth(values, mask, n, kernel="cpp"), score_growth(values, mask, n, kernel="torch"))


def test_fused_selection_over_threads_equals_torch_path():
    """Tensors of over 2**19 entries are split into one chunk per thread (histograms per chunk, the threshold's
    ties collected chunk by chunk): with two threads, ties across the chunk boundary still go by index."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(2)
        values = _values(700_001, torch.float32, generator)
        values[340_000:360_000] = 0.5  # one long run of ties around the middle
        mask = torch.rand(700_001, generator=generator) < 0.5
        for highest, inactive in ((False, False), (True, True), (True, False), (False, True)):
            k = int((~mask if inactive else mask).sum())
            for n in (1, 10_000, k // 2, k - 3):
                args = dict(highest=highest, inactive=inactive, magnitude=highest)
                fused = toggle_selected(values, mask, n, kernel="cpp", **args)
                assert torch.equal(fused, toggle_selected(values, mask, n, kernel="torch", **args)), (n, args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_signed_zeros_tie_and_nan_is_largest(dtype):
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0, -0.0, 0.0], dtype=dtype)
    everywhere = torch.ones(6, dtype=torch.bool)
    for n in range(7):
        for name, select in SELECT.items():
            expected = torch.arange(6) < n  # all equal: the lowest indices
            assert torch.equal(select(zeros, everywhere, n, kernel="cpp"), expected), (name, n)
    nans = torch.tensor([float("nan"), 1.0, -float("nan"), float("inf"), 0.0], dtype=dtype)
    assert select_highest(nans, torch.ones(5, dtype=torch.bool), 3, kernel="cpp").tolist() == [True, False, True, True, False]


def test_errors_and_inputs_as_the_torch_path():
    values = torch.tensor([3.0, 1.0, 2.0, 1.0])
    candidates = torch.tensor([True, False, True, True])
    for kernel in ("cpp", "torch"):
        with pytest.raises(ValueError, match="cannot select 4 entries: there are only 3 candidates"):
            select_lowest(values, candidates, 4, kernel=kernel)
        assert not select_highest(values, candidates, 0, kernel=kernel).any()
    before = values.clone(), candidates.clone()
    chosen = select_lowest(values, candidates, 2, kernel="cpp")
    assert chosen.tolist() == [False, False, True, True]
    assert torch.equal(values, before[0]) and torch.equal(candidates, before[1])
    strided = torch.arange(24.0).view(4, 6).t() % 5  # not contiguous
    mask = torch.ones(6, 4, dtype=torch.bool)
    assert torch.equal(select_lowest(strided, mask, 7, kernel="cpp"), select_lowest(strided, mask, 7, kernel="torch"))
    ints = torch.tensor([5, 1, 1, 3])  # integer values: torch's path on every kernel
    assert select_lowest(ints, torch.ones(4, dtype=torch.bool), 2, kernel="cpp").tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="kernel"):
        select_lowest(values, candidates, 1, kernel="fast")


class _ThreadGroup:
    """Processes played by threads: ``sum_`` adds up every thread's tensor (a barrier before and after)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)

    def shards(self, rank: int) -> Shards:
        def sum_(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0).to(t.dtype)
            self.barrier.wait()
            return t.copy_(total)

        return Shards(rank, self.size, sum_)


def _row_shard(tensor: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    rows = tensor.shape[0]
    per = math.ceil(rows / world)
    start, stop = min(rows, rank * per), min(rows, (rank + 1) * per)
    return tensor[start:stop], start * (tensor.numel() // rows)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_shards_at_their_offsets_equal_the_fused_selection(world, dtype):
    """Each "process" selects on its row block at its flat offset (the radix path of shards, torch's ops); their
    masks put together are the fused kernel's mask of the full tensor, for prune, growth and plain selections."""
    generator = torch.Generator().manual_seed(world)
    values = _values(5 * 31, dtype, generator).view(5, 31)
    mask = torch.rand(5, 31, generator=generator) < 0.4
    active, free = int(mask.sum()), int((~mask).sum())
    cases = [("prune", n, dict(highest=False, magnitude=True)) for n in _counts(active)]
    cases += [("grow", n, dict(highest=True, inactive=True, magnitude=True)) for n in _counts(free)]
    cases += [("lowest", n, dict(highest=False, inactive=True)) for n in _counts(free)]
    group = _ThreadGroup(world)
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            part, offset = _row_shard(values, rank, world)
            part_mask, _ = _row_shard(mask, rank, world)
            shards = group.shards(rank)
            results[rank] = [
                toggle_selected(part, part_mask, n, offset=offset, shards=shards, **args) for _, n, args in cases
            ]
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, (name, n, args) in enumerate(cases):
        full = toggle_selected(values, mask, n, kernel="cpp", **args)
        got = torch.cat([results[r][i].reshape(-1) for r in range(world)]).view(full.shape)
        assert torch.equal(got, full), (name, n)
