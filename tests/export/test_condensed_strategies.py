"""Issue 21, item 2: the condensed kernel's small-batch strategies ('gather', 'scalar') compute the same sums in
the same order (bit-equal), with int32, int64 and uint16 indices; 'auto' is calibrated per shape, overridable by
an environment variable; bad names are refused with the allowed ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sparse import kernels
from lightning_sparse.export import CondensedLinear
from lightning_sparse.export.condensed import CONDENSED_STRATEGIES, STRATEGY_ENV, check_condensed_strategy
from tests.export.test_kernels import _condensed_case

op = kernels.cpu_condensed_linear("auto")
pytestmark = pytest.mark.skipif(op is None, reason="the C++ condensed kernel cannot be built here")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64, torch.uint16])
def test_every_strategy_equals_the_dense_product_and_each_other_bit_for_bit(index_dtype):
    for inputs, outputs, k in [(5, 7, 2), (300, 33, 17), (3072, 40, 307), (768, 70, 76), (9, 16, 0)]:
        weight, values, indices, bias = _condensed_case(inputs, outputs, k)
        for batch in (1, 2, 5, 6, 31):  # below 6 the strategy applies; from 6 on the other order (the same for all)
            x = torch.randn(batch, inputs)
            results = {s: op(x, values, indices.to(index_dtype), bias, outputs, False, None, s) for s in CONDENSED_STRATEGIES}
            torch.testing.assert_close(results["gather"], nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-4)
            assert torch.equal(results["gather"], results["scalar"]), (inputs, outputs, k, batch)
            assert torch.equal(results["auto"], results["gather"]), (inputs, outputs, k, batch)


def test_the_op_refuses_an_unknown_strategy_and_names_a_default():
    _, values, indices, bias = _condensed_case(10, 4, 3)
    with pytest.raises(RuntimeError, match="strategy"):
        op(torch.randn(1, 10), values, indices, bias, 4, False, None, "packed")
    assert torch.ops.lightning_sparse.condensed_default_strategy() in ("gather", "scalar")


def test_condensed_linear_strategies_give_the_same_outputs_and_say_which_runs(monkeypatch):
    monkeypatch.delenv(STRATEGY_ENV, raising=False)
    linear = nn.Linear(300, 40)
    mask = torch.zeros(40, 300, dtype=torch.bool)
    mask[:, :30] = True
    mask = mask[:, torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        linear.weight.mul_(mask)
    x = torch.randn(1, 300)
    layers = {s: CondensedLinear.from_linear(linear, mask, strategy=s) for s in CONDENSED_STRATEGIES}
    assert layers["gather"].kernel_strategy == "gather" and layers["scalar"].kernel_strategy == "scalar"
    assert layers["auto"].kernel_strategy in ("gather", "scalar")  # the faster one on this CPU, measured once
    outputs = {s: layer(x) for s, layer in layers.items()}
    assert torch.equal(outputs["gather"], outputs["scalar"]) and torch.equal(outputs["auto"], outputs["gather"])
    torch.testing.assert_close(outputs["gather"], linear(x), atol=1e-5, rtol=1e-5)
    assert CondensedLinear.from_linear(linear, mask, kernel="torch").kernel_strategy == "torch"
    assert layers["gather"].double().kernel_strategy == "torch"  # not float32: torch's product


def test_the_environment_variable_replaces_auto_and_is_checked(monkeypatch):
    linear = nn.Linear(16, 8)
    mask = torch.ones(8, 16, dtype=torch.bool)
    monkeypatch.setenv(STRATEGY_ENV, "scalar")
    assert CondensedLinear.from_linear(linear, mask).kernel_strategy == "scalar"
    assert CondensedLinear.from_linear(linear, mask, strategy="gather").kernel_strategy == "gather"  # explicit wins
    monkeypatch.setenv(STRATEGY_ENV, "fast")
    with pytest.raises(ValueError, match=rf"environment variable {STRATEGY_ENV} can be 'auto', 'gather', 'scalar', got 'fast'"):
        CondensedLinear.from_linear(linear, mask).kernel_strategy


def test_a_bad_strategy_argument_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"`strategy` can be 'auto', 'gather', 'scalar', got 'simd'"):
        check_condensed_strategy("simd")
    with pytest.raises(ValueError, match=r"`strategy` can be 'auto', 'gather', 'scalar', got 'simd'"):
        CondensedLinear.from_linear(nn.Linear(4, 2), torch.ones(2, 4, dtype=torch.bool), strategy="simd")
