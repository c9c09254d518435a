"""Exact, index-tie-broken selection (lightning_sparse.functional.selection): hand-made tensors, a brute-force
reference, hash scores, and the sharded path on a real 2-process gloo group compared mask for mask with the
selection on the full tensor."""

from __future__ import annotations

import math
import random
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sparse.core.distributed import shards_of
from lightning_sparse.functional.selection import (
    _histogram,
    _histogram_scatter,
    _keys,
    _lowest_device,
    _reverse,
    hash_scores,
    select_highest,
    select_lowest,
    sortable_key,
)
from lightning_sparse.functional.shards import Shards

SELECT = {"lowest": select_lowest, "highest": select_highest}


def _mask(size: int, positions: list[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[positions] = True
    return mask


def _reference(values: torch.Tensor, candidates: torch.Tensor, n: int, highest: bool) -> torch.Tensor:
    """Brute force: sort the candidates by (value, index), the value negated for ``highest``; no NaN."""
    if values.dtype.is_floating_point:
        flat = [float(v) for v in values.reshape(-1).float()]
    else:
        flat = [int(v) for v in values.reshape(-1)]
    order = sorted(
        (i for i, c in enumerate(candidates.reshape(-1).tolist()) if c),
        key=lambda i: (-flat[i] if highest else flat[i], i),
    )
    return _mask(len(flat), order[:n]).view(values.shape)


def _device_path(values: torch.Tensor, candidates: torch.Tensor, n: int, highest: bool) -> torch.Tensor:
    """The selection used on one process off the CPU (one topk, no host synchronization), run on the CPU."""
    keys, bits = _keys(values.reshape(-1))
    keys = _reverse(keys, bits) if highest else keys
    return _lowest_device(keys, candidates.reshape(-1), n).view(values.shape)


# ----------------------------------------------------------------------------- hand-made tensors


def test_ties_are_broken_by_the_lowest_index():
    values = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0])
    every = torch.ones(5, dtype=torch.bool)
    assert torch.equal(select_lowest(values, every, 2), _mask(5, [1, 2]))
    assert torch.equal(select_lowest(values, every, 3), _mask(5, [1, 2, 4]))
    assert torch.equal(select_lowest(values, every, 4), _mask(5, [0, 1, 2, 4]))
    assert torch.equal(select_highest(values, every, 1), _mask(5, [3]))
    assert torch.equal(select_highest(values, every, 3), _mask(5, [0, 1, 3]))
    same = torch.full((6,), 7.0)
    assert torch.equal(select_highest(same, torch.ones(6, dtype=torch.bool), 4), _mask(6, [0, 1, 2, 3]))


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_negative_zero_equals_positive_zero(path):
    select = (lambda v, c, n, h: SELECT["highest" if h else "lowest"](v, c, n)) if path == "cpu" else _device_path
    values = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0])
    every = torch.ones(5, dtype=torch.bool)
    assert torch.equal(select(values, every, 2, False), _mask(5, [0, 1]))
    assert torch.equal(select(values, every, 3, True), _mask(5, [0, 1, 4]))
    values = torch.tensor([-0.0, 0.0, -1e-45, 1e-45])  # the smallest subnormals stay on their side of zero
    assert torch.equal(select(values, torch.ones(4, dtype=torch.bool), 1, False), _mask(4, [2]))
    assert torch.equal(select(values, torch.ones(4, dtype=torch.bool), 2, False), _mask(4, [0, 2]))
    assert sortable_key(torch.tensor(-0.0)) == sortable_key(torch.tensor(0.0))


def test_non_candidates_are_never_chosen():
    values = torch.tensor([-5.0, 1.0, -3.0, 2.0, -9.0])
    candidates = torch.tensor([False, True, False, True, False])
    assert torch.equal(select_lowest(values, candidates, 1), _mask(5, [1]))
    assert torch.equal(select_highest(-values, candidates, 1), _mask(5, [1]))
    assert torch.equal(select_lowest(values, candidates, 2), candidates)
    assert torch.equal(_device_path(values, candidates, 1, False), _mask(5, [1]))
    assert torch.equal(_device_path(values, candidates, 1, True), _mask(5, [3]))


def test_nan_is_the_largest_value():
    values = torch.tensor([float("nan"), 1.0, -float("nan"), float("inf"), -float("inf")])
    every = torch.ones(5, dtype=torch.bool)
    for select in (lambda v, c, n, h: (select_highest if h else select_lowest)(v, c, n), _device_path):
        assert torch.equal(select(values, every, 3, False), _mask(5, [1, 3, 4]))
        assert torch.equal(select(values, every, 4, False), _mask(5, [0, 1, 3, 4]))  # first NaN by index
        assert torch.equal(select(values, every, 2, True), _mask(5, [0, 2]))
        assert torch.equal(select(values, every, 3, True), _mask(5, [0, 2, 3]))


def test_n_zero_negative_and_too_large():
    values, candidates = torch.arange(6.0), torch.tensor([True, False, True, False, True, False])
    for n in (0, -3):
        out = select_lowest(values, candidates, n)
        assert out.dtype == torch.bool and out.shape == values.shape and not out.any()
    with pytest.raises(ValueError, match=r"select 4 entries: there are only 3 candidates"):
        select_lowest(values, candidates, 4)
    with pytest.raises(ValueError, match=r"select 7 entries: there are only 6 entries"):
        _device_path(values, candidates, 7, False)
    # off the CPU the candidate count is not checked (that would synchronize): all the candidates are chosen
    assert torch.equal(_device_path(values, candidates, 5, False), candidates)
    assert torch.equal(_device_path(values, candidates, 5, True), candidates)


def test_result_is_a_new_tensor_and_inputs_are_untouched():
    values = torch.tensor([[3.0, 1.0], [2.0, 0.0]], requires_grad=True)
    candidates = torch.ones(2, 2, dtype=torch.bool)
    for n in (0, 2, 4):
        out = select_lowest(values, candidates, n)
        assert out.shape == (2, 2) and out.dtype == torch.bool
        assert out.data_ptr() != candidates.data_ptr()
        out.fill_(False)
        assert candidates.all()
    with pytest.raises(TypeError, match="torch.bool"):
        select_lowest(values, candidates.float(), 1)
    with pytest.raises(ValueError, match="shape"):
        select_lowest(values, candidates.view(-1), 1)
    with pytest.raises(TypeError, match="dtype"):
        select_lowest(torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.bool), 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes(dtype):
    values = torch.tensor([0.5, -2.0, 3.0, -2.0, 0.25, 3.0], dtype=dtype)
    every = torch.ones(6, dtype=torch.bool)
    assert torch.equal(select_lowest(values, every, 3), _mask(6, [1, 3, 4]))
    assert torch.equal(select_highest(values, every, 3), _mask(6, [0, 2, 5]))
    assert torch.equal(_device_path(values, every, 3, True), _mask(6, [0, 2, 5]))


def test_float64_is_compared_as_float32():
    values = torch.tensor([1.0, 1.0 + 1e-12, 0.5], dtype=torch.float64)  # equal in float32: a tie
    assert torch.equal(select_highest(values, torch.ones(3, dtype=torch.bool), 1), _mask(3, [0]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_dtypes_are_compared_exactly(dtype):
    values = torch.tensor([5, 3, 9, 3, 0, 9], dtype=dtype)
    every = torch.ones(6, dtype=torch.bool)
    assert torch.equal(select_lowest(values, every, 2), _mask(6, [1, 4]))
    assert torch.equal(select_lowest(values, every, 3), _mask(6, [1, 3, 4]))
    assert torch.equal(select_highest(values, every, 3), _mask(6, [0, 2, 5]))


def test_int64_beyond_float_precision_and_range():
    big = 2**60
    values = torch.tensor([big + 1, big, big + 2, 2**62 - 1, -(2**62) + 1])  # big, big + 1 are equal as floats
    every = torch.ones(5, dtype=torch.bool)
    assert torch.equal(select_lowest(values, every, 2), _mask(5, [1, 4]))
    assert torch.equal(select_highest(values, every, 2), _mask(5, [2, 3]))
    assert torch.equal(_device_path(values, every, 2, True), _mask(5, [2, 3]))
    for bad in (2**62, -(2**62), 2**63 - 1, -(2**63)):
        with pytest.raises(ValueError, match="2\\*\\*62"):
            select_lowest(torch.tensor([0, bad]), every[:2], 1)
        with pytest.raises(ValueError, match="2\\*\\*62"):
            sortable_key(torch.tensor([bad]))
    # only candidate values have to be in range
    assert torch.equal(select_lowest(torch.tensor([2**62, 1, 0]), _mask(3, [1, 2]), 1), _mask(3, [2]))


def test_conv_shaped_input():
    values = torch.tensor([3.0, 1.0, 2.0, 1.0]).repeat(4 * 3 * 3 * 3 // 4 + 1)[: 4 * 3 * 3 * 3].view(4, 3, 3, 3)
    candidates = torch.ones_like(values, dtype=torch.bool)
    candidates[0, 0] = False  # the first 9 entries, 4 of them equal to 1
    out = select_lowest(values, candidates, 5)
    assert out.shape == (4, 3, 3, 3)
    ones = [i for i, v in enumerate(values.view(-1).tolist()) if v == 1.0 and i >= 9]
    assert torch.equal(out.view(-1), _mask(108, ones[:5]))
    assert torch.equal(select_highest(values, candidates, 108 - 9), candidates)


def test_sortable_key_preserves_the_order():
    finfo = torch.finfo(torch.float32)
    special = [-float("inf"), -finfo.max, -1.0, -finfo.tiny, -1e-45, 0.0, 1e-45, finfo.tiny, 1.0, finfo.max]
    values = torch.cat(
        [torch.tensor(special + [float("inf")]), torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))]
    )
    ordered = values.unique()  # sorted, distinct
    keys = sortable_key(ordered)
    assert keys.dtype == torch.int64 and bool((keys[1:] > keys[:-1]).all())
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32
    assert int(sortable_key(torch.tensor(float("nan")))) == 2**32 - 1
    ints = torch.tensor([-(2**62) + 1, -5, 0, 7, 2**62 - 1])
    assert torch.equal(sortable_key(ints), ints + 2**62)
    assert sortable_key(torch.zeros(2, 0, 3)).shape == (2, 0, 3)


def test_histogram_without_bincount_matches_bincount():
    digits = torch.randint(0, 65536, (5000,))
    digits[:100] = 65535
    active = torch.rand(5000) < 0.6
    assert torch.equal(_histogram_scatter(digits, active), _histogram(digits, active))


# ----------------------------------------------------------------------------- brute-force reference


def _random_case(rng: random.Random, generator: torch.Generator):
    shape = rng.choice([(1,), (7,), (5, 4), (13, 9), (3, 4, 5), (6, 2, 3, 3), (40, 50)])
    kind = rng.choice(["few", "few", "zeros", "normal", "int64"])
    if kind == "few":
        values = torch.randint(-2, 3, shape, generator=generator).float()
    elif kind == "zeros":  # -0.0, +0.0, -1, 1, -2, 2
        sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        values = torch.randint(0, 3, shape, generator=generator).float() * sign
    elif kind == "normal":
        values = torch.randn(shape, generator=generator).to(rng.choice([torch.float32, torch.float16, torch.bfloat16]))
    else:
        values = torch.randint(-3, 4, shape, generator=generator) * rng.choice([1, 2**59])
    candidates = torch.rand(shape, generator=generator) < rng.choice([0.1, 0.5, 0.9, 1.0])
    count = int(candidates.sum())
    n = rng.choice([1, 2, count // 3, count // 2, count - 1, count, rng.randint(0, max(count, 1))])
    return values, candidates, max(0, min(n, count))


def test_matches_brute_force_reference_on_tie_heavy_tensors():
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(300):
        values, candidates, n = _random_case(rng, generator)
        for highest in (False, True):
            expected = _reference(values, candidates, n, highest)
            got = (select_highest if highest else select_lowest)(values, candidates, n)
            assert torch.equal(got, expected), (values, candidates, n, highest)
            assert int(got.sum()) == n and not (got & ~candidates).any()
            if n > 0:
                assert torch.equal(_device_path(values, candidates, n, highest), expected)


# ----------------------------------------------------------------------------- hash scores


def _splitmix64_reference(seed: int, index: int) -> int:
    """Pure Python: the index + 1-th output of splitmix64 seeded with the first output of splitmix64(seed)."""
    mask, gamma = 2**64 - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    base = mix((seed + gamma) & mask)
    return mix((base + (index + 1) * gamma) & mask) >> 2


def test_hash_scores_slice_range_and_reference():
    for seed in (0, 1, 12345, 2**63 - 1):
        full = hash_scores(seed, 0, 15)
        assert full.dtype == torch.int64 and full.shape == (15,)
        assert torch.equal(hash_scores(seed, 10, 5), full[10:])
        assert torch.equal(hash_scores(seed, 3, 0), torch.zeros(0, dtype=torch.int64))
        assert full.tolist() == [_splitmix64_reference(seed, i) for i in range(15)]
    far = 2**40
    assert hash_scores(7, far, 4).tolist() == [_splitmix64_reference(7, i) for i in range(far, far + 4)]
    scores = hash_scores(3, 0, 100_000)
    assert int(scores.min()) >= 0 and int(scores.max()) < 2**62
    assert 0.45 < float((scores.double() / 2**62).mean()) < 0.55
    assert scores.unique().numel() == scores.numel()
    assert not torch.equal(hash_scores(4, 0, 1000), hash_scores(3, 0, 1000))
    assert (hash_scores(4, 0, 1000) == hash_scores(3, 0, 1000)).sum() == 0
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="seed"):
            hash_scores(bad, 0, 3)
    with pytest.raises(ValueError, match="offset"):
        hash_scores(0, -1, 3)


def test_hash_scores_random_growth_is_uniform_over_free_positions():
    mask = torch.zeros(100, 100, dtype=torch.bool)
    mask[:50] = True
    grown = select_highest(hash_scores(11, 0, mask.numel()).view_as(mask), ~mask, 1000)
    assert int(grown.sum()) == 1000 and not (grown & mask).any()
    assert 400 < int(grown[50:75].sum()) < 600  # about half in each half of the free rows


# ----------------------------------------------------------------------------- sharded path, 2 gloo processes


def _distributed_cases() -> list[dict]:
    """Full tensors, candidates and counts; every case is run as lowest and highest."""
    generator = torch.Generator().manual_seed(1)
    cases = []

    def add(name, values, candidates, ns):
        count = int(candidates.sum())
        for n in ns:
            cases.append({"name": f"{name} n={n}", "values": values, "candidates": candidates, "n": min(n, count)})

    few = torch.randint(-2, 3, (64, 32), generator=generator).float()
    cand = torch.rand(64, 32, generator=generator) < 0.7
    count = int(cand.sum())
    add("few values", few, cand, [1, 5, 100, count // 2, count - 1, count])
    uneven = torch.randint(0, 3, (7, 3, 3, 3), generator=generator).float() * torch.tensor(-1.0) ** torch.randint(
        0, 2, (7, 3, 3, 3), generator=generator
    )  # 7 rows: 4 and 3 on the two ranks; -0.0 and +0.0
    add("uneven conv", uneven, torch.rand(7, 3, 3, 3, generator=generator) < 0.8, [1, 20, 60, 100, 1000])
    add(
        "one row",
        torch.randint(0, 4, (1, 50), generator=generator).float(),
        torch.ones(1, 50, dtype=torch.bool),
        [1, 13, 49, 50],
    )
    add("one row 1-d", torch.randint(0, 4, (3,), generator=generator).float(), torch.ones(3, dtype=torch.bool), [2])
    same = torch.full((10, 10), 0.5)  # ties only: the first n by index, across the rank boundary
    add("all equal", same, torch.ones(10, 10, dtype=torch.bool), [1, 30, 50, 51, 70, 100])
    normal = torch.randn(301, 200, generator=generator)
    normal[3, :7] = float("nan")
    normal[200, 5:9] = float("inf")
    add("normal", normal, torch.rand(301, 200, generator=generator) < 0.5, [1, 1000, 20000, 30000])
    add(
        "bfloat16",
        torch.randn(40, 30, generator=generator).bfloat16(),
        torch.rand(40, 30, generator=generator) < 0.5,
        [1, 100, 300],
    )
    scores = hash_scores(5, 0, 128 * 64).view(128, 64)
    free = torch.rand(128, 64, generator=generator) < 0.3
    add("hash scores", scores, free, [1, 17, 1000, int(free.sum())])
    ints = torch.randint(-3, 4, (33, 17), generator=generator) * 2**59
    ints[0, 0], ints[32, 16] = 2**62 - 1, -(2**62) + 1
    add("int64 ties", ints, torch.rand(33, 17, generator=generator) < 0.6, [1, 50, 200, 300])
    nocand = torch.rand(20, 5, generator=generator)
    cand = torch.zeros(20, 5, dtype=torch.bool)
    cand[:3] = True  # no candidate on rank 1
    add("candidates on rank 0 only", nocand, cand, [1, 7, 15])
    add("candidates on rank 1 only", nocand, cand.flip(0), [1, 7, 15])
    return cases


_SMALL = torch.tensor([2.0, 1.0, 1.0, 0.0]).repeat(6).view(6, 4)


def _shard(tensor: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """Rank's rows of ``tensor``, as torch.chunk / FSDP2's Shard(0) splits them, and the flat offset."""
    rows = tensor.shape[0]
    per = math.ceil(rows / world)
    start, stop = min(rows, rank * per), min(rows, (rank + 1) * per)
    return tensor[start:stop], start * (tensor.numel() // rows if rows else 0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        shards = shards_of(dist.group.WORLD)
        results = []
        for case in torch.load(Path(out) / "cases.pt", weights_only=True):
            values, offset = _shard(case["values"], rank, world)
            candidates, _ = _shard(case["candidates"], rank, world)
            for select in SELECT.values():
                results.append(select(values, candidates, case["n"], offset=offset, shards=shards))
        errors = []
        values, offset = _shard(_SMALL, rank, world)
        candidates = torch.ones_like(values, dtype=torch.bool)
        for values_, n in ((values, 25), (torch.full_like(values, 2**62 if rank else 0, dtype=torch.int64), 1)):
            try:
                select_lowest(values_, candidates, n, offset=offset, shards=shards)
                errors.append("")
            except ValueError as error:
                errors.append(str(error))
        results.append(select_lowest(values, candidates, 3, offset=offset, shards=shards))  # still in step
        singles = [dist.new_group([r]) for r in range(world)]  # groups of one process: the local path
        values = torch.randint(0, 3, (5, 4)).float()
        assert shards_of(singles[rank]) is None
        single = select_highest(values, values > 0, 1, offset=123, shards=shards_of(singles[rank]))
        results.append(torch.equal(single, select_highest(values, values > 0, 1)))
        torch.save({"results": results, "errors": errors}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sharded_selection_equals_full_selection(tmp_path):
    cases = _distributed_cases()
    torch.save(cases, tmp_path / "cases.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    shards = [iter(r["results"]) for r in ranks]
    for case in cases:
        for name, select in SELECT.items():
            full = select(case["values"], case["candidates"], case["n"])
            parts = [next(s) for s in shards]
            got = torch.cat([p.reshape(-1) for p in parts]).view(full.shape)
            assert parts[0].shape[0] == _shard(full, 0, 2)[0].shape[0]
            assert torch.equal(got, full), f"{case['name']} {name}"
            assert int(got.sum()) == case["n"]
            if not case["values"].isnan().any():
                assert torch.equal(full, _reference(case["values"], case["candidates"], case["n"], name == "highest"))
    after = select_lowest(_SMALL, torch.ones(6, 4, dtype=torch.bool), 3)
    for r, result in enumerate(ranks):
        too_many, out_of_range = result["errors"]
        assert "select 25 entries: there are only 24 candidates" in too_many, r
        assert "2**62" in out_of_range, r  # raised on both ranks, though only rank 1 has values out of range
        after_errors, single = list(shards[r])
        assert torch.equal(after_errors, _shard(after, r, 2)[0]), r
        assert single is True


def test_the_sharded_path_in_one_process_equals_the_local_path():
    """A one-process ``Shards`` (its sum is the identity) runs the radix select that shards use: the same masks
    as the local path on every case, and every sum it asks for is a histogram or the tie table."""
    sums = []
    one = Shards(rank=0, size=1, sum_=lambda t: sums.append(tuple(t.shape)) or t)
    for case in _distributed_cases():
        for name, select in SELECT.items():
            local = select(case["values"], case["candidates"], case["n"])
            assert torch.equal(select(case["values"], case["candidates"], case["n"], shards=one), local), case["name"]
    assert sums and set(sums) <= {(65537,), (65536,), (1, 2)}
    table = Shards(rank=1, size=3, sum_=lambda t: t).gather(torch.tensor([4, 5]))
    assert table.tolist() == [[0, 0], [4, 5], [0, 0]]
