"""The condensed autograd function of ``compute="condensed"`` on small hand-made tensors: gradients against the
dense product (gradcheck in float64, the C++ kernels against a float64 reference), the dense-gradient mode, 1x1
convolutions, empty rows, and the reuse of the weight gradient's memory. No Lightning, no Sparsifier."""

import pytest
import torch
from torch import nn

from lightning_sparse.compute.condensed import (
    CondensedCompute,
    CondensedLinearFunction,
    CondensedPlan,
    condensed_linear,
)


def fan_in_mask(out, features, k, empty=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out, features, dtype=torch.bool)
    for o in range(out):
        if o not in empty:
            mask[o, torch.randperm(features, generator=gen)[:k]] = True
    return mask


def test_plan_of_a_mask():
    mask = fan_in_mask(5, 7, 3, empty=(1,))
    plan = CondensedPlan.from_mask(mask)
    assert (plan.k, plan.held, plan.rows.tolist()) == (3, 4, [0, 2, 3, 4])
    assert torch.equal(plan.dense_mask(), mask)
    assert plan.ptr[-1] == 12 and torch.equal(plan.ptr.diff(), mask.sum(0))
    with pytest.raises(ValueError, match="not a constant fan-in"):
        CondensedPlan.from_mask(torch.tensor([[True, True, False], [True, False, False]]))


@pytest.mark.parametrize(
    "shape", [(5, 7, 3, ()), (1, 1, 1, ()), (4, 6, 0, ()), (300, 520, 11, (1, 299)), (257, 300, 40, ()), (6, 600, 600, (2,))]
)  # fmt: skip
def test_plan_from_cpp_equals_plan_from_torch(shape):
    # C++ counting sorts against the torch path's sorts: every index tensor equal, dtypes too (several tiles of 256
    # inputs and rows, empty rows, all rows empty, full rows)
    out, features, k, empty = shape
    mask = fan_in_mask(out, features, k, empty)
    fast, reference = CondensedPlan.from_mask(mask, kernel="cpp"), CondensedPlan.from_mask(mask, kernel="torch")
    assert (fast.k, fast.held, fast.in_features, fast.out_features) == (reference.k, reference.held, features, out)
    for field in ("indices", "rows", "packed_indices", "positions", "ptr", "cols", "flat", "order", "tindices", "seg",
                  "tpositions", "tcols", "colseg"):  # fmt: skip
        a, b = getattr(fast, field), getattr(reference, field)
        if b is None:
            assert a is None, field
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    uneven = torch.tensor([[True, True, False], [True, False, False]])
    for kernel in ("cpp", "torch"):
        with pytest.raises(ValueError, match="rows with 1 to 2 active entries, not a constant fan-in"):
            CondensedPlan.from_mask(uneven, kernel=kernel)


@pytest.mark.parametrize("empty", [(), (0, 3)])
def test_gradcheck_float64(empty):
    # the torch path (float64): analytic gradients of x, weight and bias against finite differences; the weight's
    # numerical gradient off the mask is zero, as the function reads only the active entries
    mask = fan_in_mask(6, 5, 2, empty)
    plan = CondensedPlan.from_mask(mask)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(6, 5, dtype=torch.float64) * mask).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: condensed_linear(x, w, b, plan), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: condensed_linear(x, w, None, plan), (x, w))


def _reference(x, w, b, dy):
    x, w, b = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = nn.functional.linear(x, w, b)
    y.backward(dy.double())
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize(
    "shape",
    [(5, 7, 3, 1, ()), (37, 50, 9, 3, (2, 5)), (40, 33, 5, 8, ()), (70, 300, 31, 257, (0, 69)), (33, 20, 20, 9, ()),
     (17, 300, 4, 700, ()), (48, 64, 16, 130, ()), (300, 520, 11, 70, (1, 299))],
)  # fmt: skip
@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_float32_against_float64_reference(shape, kernel):
    # batch sizes on both sides of the kernels' small-batch switch, chunked batches, k below, at and above 16,
    # inputs and outputs over several tiles of the tiled order (256)
    out, features, k, batch, empty = shape
    mask = fan_in_mask(out, features, k, empty)
    plan = CondensedPlan.from_mask(mask)
    w = (torch.randn(out, features) * mask).requires_grad_()
    b = torch.randn(out, requires_grad=True)
    x = torch.randn(batch, features, requires_grad=True)
    y = condensed_linear(x, w, b, plan, kernel=kernel)
    dy = torch.randn_like(y)
    y.backward(dy)
    ry, rx, rw, rb = _reference(x, w, b, dy)
    for got, want in [(y, ry), (x.grad, rx), (w.grad, rw * mask), (b.grad, rb)]:
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max()))
    assert not w.grad[~mask].any()  # zero off the mask


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
def test_dense_gradient_mode_gives_the_true_dense_gradient(kernel):
    mask = fan_in_mask(20, 30, 4)
    plan = CondensedPlan.from_mask(mask)
    w = (torch.randn(20, 30) * mask).requires_grad_()
    b = torch.randn(20, requires_grad=True)
    x = torch.randn(11, 30, requires_grad=True)
    y = condensed_linear(x, w, b, plan, kernel=kernel, dense_gradients=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, rx, rw, _ = _reference(x, w, b, dy)
    assert torch.allclose(w.grad.double(), rw, atol=1e-5) and w.grad[~mask].abs().sum() > 0
    assert torch.allclose(x.grad.double(), rx, atol=1e-5)


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
@pytest.mark.parametrize("stride", [1, 2])
def test_attached_conv1x1_and_linear_equal_dense(kernel, stride):
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(12, 8, 1, stride=stride), nn.Linear(8, 5)
    masks = {"conv.weight": fan_in_mask(8, 12, 3).view(8, 12, 1, 1), "lin.weight": fan_in_mask(5, 8, 2, empty=(4,))}
    with torch.no_grad():
        conv.weight.mul_(masks["conv.weight"])
        lin.weight.mul_(masks["lin.weight"])
    dense = nn.ModuleDict({"conv": conv, "lin": lin})
    condensed = nn.ModuleDict({"conv": nn.Conv2d(12, 8, 1, stride=stride), "lin": nn.Linear(8, 5)})
    condensed.load_state_dict(dense.state_dict())
    compute = CondensedCompute(kernel)
    assert compute.attach({"conv.weight": condensed.conv, "lin.weight": condensed.lin}, masks) == list(masks)
    x = torch.randn(3, 12, 9, 9)
    outputs = [net.lin(net.conv(x).permute(0, 2, 3, 1)) for net in (dense, condensed)]
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for out in outputs:
        out.square().sum().backward()
    for (name, p), q in zip(dense.named_parameters(), condensed.parameters()):
        expected = p.grad * masks[name] if name in masks else p.grad
        assert torch.allclose(q.grad, expected, atol=1e-4), name
    compute.detach()
    assert "forward" not in condensed.conv.__dict__ and "forward" not in condensed.lin.__dict__
    assert torch.allclose(condensed.lin(condensed.conv(x).permute(0, 2, 3, 1)), outputs[0], atol=1e-5)


def test_other_modules_are_left_dense():
    compute = CondensedCompute("torch")
    conv3 = nn.Conv2d(4, 4, 3)
    assert compute.attach({"c.weight": conv3}, {"c.weight": torch.ones(4, 4, 3, 3, dtype=torch.bool)}) == []
    assert "forward" not in conv3.__dict__


def test_gradient_memory_is_reused_and_accumulation_stays_exact():
    mask = fan_in_mask(64, 48, 6)
    lin = nn.Linear(48, 64)
    with torch.no_grad():
        lin.weight.mul_(mask)
    compute = CondensedCompute("cpp")
    compute.attach({"weight": lin}, {"weight": mask})
    x = torch.randn(16, 48)
    lin(x).sum().backward()
    first = lin.weight.grad.clone()
    lin(x).sum().backward()  # accumulated: the kept memory holds .grad, so fresh memory is used
    assert torch.allclose(lin.weight.grad, 2 * first)
    lin.weight.grad = None
    lin(x).sum().backward()
    pointer = lin.weight.grad.data_ptr()
    lin.weight.grad = None  # zero_grad(set_to_none=True): the next gradient reuses the memory
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad, first) and lin.weight.grad.data_ptr() == pointer
    compute.refresh({"weight": fan_in_mask(64, 48, 2, seed=1)})
    assert compute.plan("weight").k == 2


def test_copies_of_an_attached_module_compute_densely():
    import copy
    import pickle

    mask = fan_in_mask(6, 8, 2)
    lin = nn.Linear(8, 6)
    compute = CondensedCompute("torch")
    compute.attach({"weight": lin}, {"weight": mask})
    with torch.no_grad():
        lin.weight.fill_(1.0)  # not masked: the attached module reads only the active entries, a copy all of them
    x = torch.ones(2, 8)
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert torch.allclose(clone(x), nn.functional.linear(x, clone.weight, clone.bias))
    assert torch.allclose(lin(x), x @ (lin.weight * mask).t() + lin.bias)


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_an_input_of_the_wrong_width_is_refused(kernel):
    # the kernels index x by the plan's positions: a narrower input would be read past its rows, a wider one
    # multiplied at the wrong positions; nn.Linear refuses both, so does the condensed layer (2-D inputs take a
    # path without reshapes, whose size checks refused them before)
    lin = nn.Linear(100, 20)
    plan = CondensedPlan.from_mask(fan_in_mask(20, 100, 10))
    for shape in [(1, 50), (128, 50), (4, 200), (4, 3, 50), (50,)]:
        with pytest.raises(RuntimeError, match=rf"in_features = 100, got input of shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
            condensed_linear(torch.randn(*shape), lin.weight, lin.bias, plan, kernel=kernel)
    for shape, out in [((100,), (20,)), ((3, 100), (3, 20)), ((2, 3, 100), (2, 3, 20))]:
        assert condensed_linear(torch.randn(*shape), lin.weight, lin.bias, plan, kernel=kernel).shape == out


def test_the_function_refuses_operands_that_do_not_fit_its_plan():
    plan = CondensedPlan.from_mask(fan_in_mask(20, 100, 10))
    x, w = torch.randn(4, 100), torch.randn(20, 100)
    for bad_x, bad_w in [(torch.randn(4, 50), w), (torch.randn(2, 4, 100), w), (x, torch.randn(20, 50)), (x, torch.randn(10, 100))]:
        with pytest.raises(RuntimeError, match=r"x must be \[batch, 100\] and weight \[20, 100\] for this plan"):
            CondensedLinearFunction.apply(bad_x, bad_w, None, plan, "auto", False, None)
