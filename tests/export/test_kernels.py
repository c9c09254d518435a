"""The C++ mask kernel: same result as torch's multiply, its errors, and the fallbacks when it cannot be built."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_sparse import Masking, SparseTrainingCallback, kernels
from tests.helpers import DigitsCNN, MaskRecorder, digits_loader, trainer


def _masking(shapes, dtype, kernel, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {f"w{i}": nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for i, shape in enumerate(shapes)}
    return Masking.random(params, density, generator=gen, kernel=kernel), params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_kernel_equals_multiply_by_the_mask(dtype):
    # 300_007 elements: several OpenMP chunks of 65536 and a ragged end
    shapes = [(300_007,), (64, 3, 7, 7), (10, 33)]
    masking, params = _masking(shapes, dtype, "cpp")
    expected = [p.detach() * m for p, m in zip(params.values(), masking.masks)]
    masking.apply_()
    for p, e, m in zip(params.values(), expected, masking.masks):
        assert torch.equal(p.detach(), e)
        assert int(torch.count_nonzero(p.detach())) == int(m.sum())
        # kept weights are untouched bit for bit, and masked ones are +0.0 (no -0.0 left by a multiply)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
        assert torch.equal(p.detach()[~m].view(bits), torch.zeros(int((~m).sum()), dtype=bits))


def test_cpp_kernel_zeroes_masked_nan_and_inf_where_torch_multiply_keeps_nan():
    weight = nn.Parameter(torch.tensor([float("nan"), float("inf"), float("nan"), 2.0]))
    mask = torch.tensor([False, False, True, True])
    Masking({"w": weight}, {"w": mask}, kernel="cpp").apply_()
    assert torch.equal(weight.detach()[[0, 1, 3]], torch.tensor([0.0, 0.0, 2.0]))
    assert torch.isnan(weight.detach()[2])

    weight = nn.Parameter(torch.tensor([float("nan"), float("inf"), float("nan"), 2.0]))
    Masking({"w": weight}, {"w": mask}, kernel="torch").apply_()
    assert torch.isnan(weight.detach()[[0, 1, 2]]).all()  # NaN * 0 and inf * 0 are NaN
    assert weight.detach()[3] == 2.0


def test_non_contiguous_weights_take_torch_path_with_the_same_result():
    base = torch.randn(6, 4)
    weight = nn.Parameter(base.clone().t())  # (4, 6), not contiguous
    contiguous = nn.Parameter(base.t().contiguous())
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        weight[~mask] = float("nan")  # the torch path leaves these NaN: proof of the path taken
    masking = Masking({"a": weight, "b": contiguous}, {"a": mask, "b": mask}, kernel="cpp")
    masking.apply_()
    assert torch.isnan(weight.detach()[~mask]).all()
    assert torch.equal(weight.detach()[mask], base.t()[mask])
    assert torch.equal(contiguous.detach(), base.t() * mask)


def test_the_op_checks_its_inputs():
    op = kernels.cpu_masked_zero("cpp")
    assert op is not None
    with pytest.raises(RuntimeError, match=r"masked_zero_: mask 0 must be torch.bool, got Float"):
        op([torch.ones(3)], [torch.ones(3)])
    with pytest.raises(RuntimeError, match=r"masked_zero_: weight 0 has 3 elements but its mask has 4"):
        op([torch.ones(3)], [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match=r"masked_zero_: weight and mask 0 must be contiguous"):
        op([torch.ones(3, 2).t()], [torch.ones(2, 3, dtype=torch.bool)])
    with pytest.raises(RuntimeError, match=r"masked_zero_: got 1 weights and 2 masks"):
        op([torch.ones(3)], [torch.ones(3, dtype=torch.bool)] * 2)


def test_unknown_kernel_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"`mask_kernel` can be 'auto', 'cpp', 'torch', got 'fast'"):
        _masking([(4,)], torch.float32, "fast")
    with pytest.raises(ValueError, match=r"`mask_kernel` can be 'auto', 'cpp', 'torch', got 'cuda'"):
        SparseTrainingCallback(density=0.1, mask_kernel="cuda")
    masking, _ = _masking([(4,)], torch.float32, "auto")
    with pytest.raises(ValueError, match=r"`mask_kernel` can be 'auto', 'cpp', 'torch', got 'fused'"):
        masking.apply_(kernel="fused")


def test_failed_build_auto_warns_once_and_falls_back_cpp_raises(monkeypatch):
    monkeypatch.setattr(kernels, "_build", lambda: (None, "RuntimeError: Error building extension 'x': no c++"))
    masking, params = _masking([(50,), (7, 3)], torch.float32, "auto")
    expected = [p.detach() * m for p, m in zip(params.values(), masking.masks)]
    with pytest.warns(RuntimeWarning, match=r"the C\+\+ mask kernel could not be built.*no c\+\+"):
        masking.apply_()
    assert all(torch.equal(p.detach(), e) for p, e in zip(params.values(), expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masking.apply_()  # warned once per process, not at every step
    with pytest.raises(RuntimeError, match=r"mask_kernel='cpp': the C\+\+ mask kernel could not be built \(RuntimeError: Error building extension 'x': no c\+\+\)"):
        _masking([(4,)], torch.float32, "cpp")[0].apply_()
    _masking([(4,)], torch.float32, "torch")[0].apply_()  # nothing to build, nothing raised


@pytest.mark.slow
def test_build_without_a_compiler_reports_why(tmp_path):
    # a real failed build, in a fresh process so that this one keeps its loaded kernel
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "from lightning_sparse import kernels; op, why = kernels._build(); print(op is None); print(why)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "True"
    assert "/bin/false" in lines[1]  # the reason names the compiler that failed


def test_training_with_cpp_and_torch_kernels_is_identical():
    results = []
    for kernel in ("cpp", "torch"):
        torch.manual_seed(0)
        cb = SparseTrainingCallback(density=0.2, seed=0, mask_kernel=kernel)
        model = DigitsCNN()
        rec = MaskRecorder(cb)
        trainer(max_epochs=2, callbacks=[cb, rec]).fit(model, digits_loader(image=True))
        assert rec.steps_checked == 2 * 12  # masked weights were zero after every step
        results.append((dict(cb.masks), [p.detach().clone() for p in model.parameters()]))
    (masks_a, params_a), (masks_b, params_b) = results
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_callback_with_cpp_kernel_that_cannot_build_fails_at_fit_start(monkeypatch):
    monkeypatch.setattr(kernels, "_build", lambda: (None, "RuntimeError: no compiler here"))
    cb = SparseTrainingCallback(density=0.2, seed=0, mask_kernel="cpp")
    rec = MaskRecorder(cb)
    with pytest.raises(RuntimeError, match=r"mask_kernel='cpp': the C\+\+ mask kernel could not be built"):
        trainer(max_epochs=1, callbacks=[cb, rec]).fit(DigitsCNN(), digits_loader(image=True))
    assert rec.steps_checked == 0


# ------------------------------------------------------------------------------------- the condensed kernel


def _condensed_case(inputs: int, outputs: int, k: int, seed: int = 0):
    """A constant-fan-in weight, its values and int32 indices packed for the kernel, and a bias."""
    from lightning_sparse.export._condensed_format import pack_blocks

    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(outputs, inputs, generator=g).argsort(1)[:, :k].sort(1).values
    values = torch.randn(outputs, k, generator=g)
    weight = torch.zeros(outputs, inputs).scatter_(1, indices, values)
    return weight, pack_blocks(values), pack_blocks(indices.to(torch.int32)), torch.randn(outputs, generator=g)


def test_condensed_kernel_equals_the_dense_product():
    op = kernels.cpu_condensed_linear("cpp")
    # k odd and even; rows not a multiple of the 16-row blocks; batches of both loop orders and ragged chunk ends
    for inputs, outputs, k in [(5, 7, 2), (300, 33, 17), (3072, 40, 307), (768, 70, 76), (9, 16, 0)]:
        weight, values, indices, bias = _condensed_case(inputs, outputs, k)
        for batch in (1, 5, 6, 31, 100, 300):
            x = torch.randn(batch, inputs)
            for idx in (indices, indices.long()):  # sums of up to 307 terms in another order: 1e-4
                expected = nn.functional.linear(x, weight, bias)
                torch.testing.assert_close(op(x, values, idx, bias, outputs, False), expected, atol=1e-4, rtol=1e-4)
                expected = x @ weight.t()
                torch.testing.assert_close(op(x, values, idx, None, outputs, False), expected, atol=1e-4, rtol=1e-4)
            columns = torch.randn(2, inputs, batch)  # [n, in, L] -> [n, out, L]
            expected = torch.einsum("oi,nil->nol", weight, columns) + bias[:, None]
            result = op(columns, values, indices.long(), bias, outputs, True)
            torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_condensed_kernel_other_instruction_sets(isa):
    # this machine may run AVX-512: cap the variant in a fresh process (it is chosen when the library loads).
    # The condensed extension loads first there, then the mask kernel's: both register ops under
    # torch.ops.lightning_sparse (a TORCH_LIBRARY_FRAGMENT and the TORCH_LIBRARY), in either order.
    code = (
        "import torch, tests.export.test_kernels as t; from lightning_sparse import kernels\n"
        "op = kernels.cpu_condensed_linear('cpp'); print(torch.ops.lightning_sparse.condensed_isa())\n"
        "t.test_condensed_kernel_equals_the_dense_product()\n"
        "import tests.export.test_condensed_strategies as s\n"  # each variant's scalar strategy, bit-equal to gather
        "for d in (torch.int32, torch.int64, torch.uint16): s.test_every_strategy_equals_the_dense_product_and_each_other_bit_for_bit(d)\n"
        "assert kernels.cpu_masked_zero('cpp') is not None\n"
    )
    env = {**os.environ, "LIGHTNING_SPARSE_ISA": isa}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # imports this checkout's package and tests
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] in (isa, "portable")  # "portable" on a CPU without AVX2


def test_condensed_kernel_checks_its_inputs():
    op = kernels.cpu_condensed_linear("cpp")
    _, values, indices, bias = _condensed_case(10, 4, 3)
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match=r"condensed_linear: x and values must be float32, got Double and Float"):
        op(x.double(), values, indices, bias, 4, False)
    with pytest.raises(RuntimeError, match=r"condensed_linear: indices must be int32, int64 or uint16, got Short"):
        op(x, values, indices.short(), bias, 4, False)
    with pytest.raises(RuntimeError, match=r"values and indices must be packed as \[1, k, 16\] for 4 rows"):
        op(x, values, indices[:, :2].contiguous(), bias, 4, False)
    with pytest.raises(RuntimeError, match=r"values and indices must be packed as \[2, k, 16\] for 20 rows"):
        op(x, values, indices, None, 20, False)
    with pytest.raises(RuntimeError, match=r"x, values and indices must be contiguous"):
        op(torch.randn(10, 2).t(), values, indices, bias, 4, False)
    with pytest.raises(RuntimeError, match=r"x must be \[n, in, L\], got shape \[2, 10\]"):
        op(x, values, indices, bias, 4, True)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous float32 CPU tensor of 4 elements"):
        op(x, values, indices, bias[:3], 4, False)


def test_condensed_failed_build_auto_warns_once_and_falls_back_cpp_raises(monkeypatch):
    from lightning_sparse.export import CondensedLinear

    monkeypatch.setattr(kernels, "_build_condensed", lambda: (None, "RuntimeError: Error building extension: no c++"))
    g = torch.Generator().manual_seed(0)
    indices = torch.rand(8, 20, generator=g).argsort(1)[:, :5].sort(1).values
    values, bias = torch.randn(8, 5, generator=g), torch.randn(8, generator=g)
    weight = torch.zeros(8, 20).scatter_(1, indices, values)
    x = torch.randn(3, 20)
    layer = CondensedLinear(20, values, indices, bias)
    with pytest.warns(RuntimeWarning, match=r"the C\+\+ condensed kernel could not be built.*no c\+\+"):
        torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, bias))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # warned once per process, not at every call
        CondensedLinear(20, values, indices, bias, kernel="torch")(x)  # nothing to build, nothing raised
    with pytest.raises(RuntimeError, match=r"kernel='cpp': the C\+\+ condensed kernel could not be built"):
        CondensedLinear(20, values, indices, bias, kernel="cpp")(x)
