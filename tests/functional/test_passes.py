"""The passes of a mask update (functional/passes.py): the C++ passes give torch's results, bit for bit, on every
dtype they take, at lengths that end inside a word, a 64-byte block and a thread's chunk; everything else falls back
to torch."""

import pytest
import torch

from lightning_sparse import kernels
from lightning_sparse.functional import passes


@pytest.fixture(scope="module", autouse=True)
def mask_kernel():
    if kernels.cpu_masked_zero("auto") is None:
        pytest.skip("the C++ mask kernel could not be built")


@pytest.fixture(params=["cpp", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(kernels, "loaded_mask_passes", lambda: None)
    return request.param


LENGTHS = [1, 7, 8, 63, 64, 65, 2041, 2047, 70001, 3 * 65536 + 5]  # words, blocks, 255-word runs, thread chunks


def _values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    t[torch.rand(n, generator=g) < 0.6] = 0.0
    t[torch.rand(n, generator=g) < 0.05] = -0.0
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", LENGTHS)
def test_nonzero_count_of_floats_equals_torch(path, dtype, n):
    t = _values(n, dtype, n)
    assert int(passes.nonzero_count(t)) == int(torch.count_nonzero(t))


@pytest.mark.parametrize("n", LENGTHS)
def test_nonzero_count_of_masks_equals_torch(path, n):
    g = torch.Generator().manual_seed(n)
    for p in (0.0, 0.003, 0.5, 1.0):
        m = torch.rand(n, generator=g) < p
        assert int(passes.nonzero_count(m)) == int(m.sum())


def test_nonzero_count_counts_nan_and_inf_not_signed_zeros(path):
    t = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45])
    assert passes.nonzero_count(t).dtype == torch.int64
    assert int(passes.nonzero_count(t)) == 5 == int(torch.count_nonzero(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_has_nonfinite_finds_nan_and_inf_anywhere(path, dtype, bad):
    for n, where in [(1, 0), (65, 64), (70001, 12345), (3 * 65536 + 5, 3 * 65536 + 4)]:
        t = _values(n, dtype, n)
        t[where] = 3.0e38 if dtype in (torch.float32, torch.float64, torch.bfloat16) else 6.0e4  # large but finite
        assert not bool(passes.has_nonfinite(t))
        if bad is not None:
            t[where] = bad
            assert bool(passes.has_nonfinite(t))


def test_has_nonfinite_of_integers_and_empty_tensors_is_false(path):
    assert not bool(passes.has_nonfinite(torch.tensor([1, 2])))
    assert not bool(passes.has_nonfinite(torch.zeros(0)))


@pytest.mark.parametrize("n", LENGTHS)
def test_zero_where_equals_masked_fill(path, n):
    g = torch.Generator().manual_seed(n)
    for p in (0.0, 0.001, 0.3, 1.0):
        mask = torch.rand(n, generator=g) < p
        tensors = [_values(n, d, n) for d in (torch.float32, torch.float64, torch.bfloat16)]
        expected = [t.masked_fill(mask, 0) for t in tensors]
        versions = [t._version for t in tensors]
        passes.zero_where_(tensors, mask)
        for t, e, v in zip(tensors, expected, versions):
            assert torch.equal(t.view(torch.uint8), e.view(torch.uint8))  # bits: -0.0 kept where not masked
            assert t._version > v


def test_zero_where_of_a_parameter_and_of_strided_views():
    w = torch.nn.Parameter(torch.ones(4, 6))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 5] = True
    passes.zero_where_([w], mask)
    assert w.requires_grad and torch.equal(w.detach() == 0, mask)
    base = torch.ones(6, 4)
    view = base.t()  # not contiguous: torch's masked_fill_
    passes.zero_where_([view], mask)
    assert torch.equal(view == 0, mask)


def test_the_cpp_passes_are_used_only_when_the_mask_kernel_is_loaded(monkeypatch):
    assert passes._ops(torch.ones(3)) is not None
    assert passes._ops(torch.ones(3, 2).t()) is None  # strided
    assert passes._ops(torch.ones(3, dtype=torch.int32)) is None
    monkeypatch.setattr(kernels._build, "cache_info", lambda: type("Info", (), {"currsize": 0})())
    assert kernels.loaded_mask_passes() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", LENGTHS)
def test_abs_sum_where_equals_torch(path, dtype, n):
    g = torch.Generator().manual_seed(n)
    t = _values(n, dtype, n + 1)
    mask = torch.rand(n, generator=g) < 0.3
    expected = t.double().abs()[mask].sum()
    got = passes.abs_sum_where(t, mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_abs_sum_where_is_the_same_at_any_thread_count():
    t = _values(5 * 65536 + 3, torch.float32, 0) * 1e3
    mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    threads = torch.get_num_threads()
    try:
        sums = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums.append(passes.abs_sum_where(t, mask).item())
    finally:
        torch.set_num_threads(threads)
    assert sums[0] == sums[1] == sums[2]
