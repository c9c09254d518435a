"""The report's Lightning-free bookkeeping: training FLOPs so far (TrainFlops) and time spent (Stopwatch)."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_sparse.cost import Stopwatch, TrainFlops

FLOPS = {"a": 1000.0, "b": 200.0}  # forward FLOPs per layer: f_D = 1200


def test_step_flops_as_the_rigl_paper_counts_them():
    flops = TrainFlops()
    assert flops.step_flops == (0.0, 0.0) and flops.ratio is None
    # f_S = 1000 * 0.1 + 200 * 0.5 = 200
    assert flops.set_step_flops(FLOPS, {"a": 0.1, "b": 0.5}, dense_weight_gradients=False) == (600.0, 3600.0)
    assert flops.set_step_flops(FLOPS, {"a": 0.1, "b": 0.5}, dense_weight_gradients=True) == (1600.0, 3600.0)
    assert flops.step_flops == (1600.0, 3600.0)
    # a layer without a density counts dense; densities of other layers are ignored
    assert flops.set_step_flops(FLOPS, {"a": 0.1, "other": 0.0}, dense_weight_gradients=False) == (900.0, 3600.0)
    assert flops.set_step_flops(None, {"a": 0.1}, dense_weight_gradients=True) == (0.0, 0.0)


def test_steps_are_counted_between_calls_with_rigl_updates():
    flops = TrainFlops()
    flops.set_step_flops(FLOPS, {"a": 0.1, "b": 0.5}, dense_weight_gradients=False)  # (600, 3600)
    flops.advance(4)
    assert (flops.sparse, flops.dense, flops.step) == (2400.0, 14400.0, 4)
    flops.add_dense_weight_gradients()  # RigL's update at step 4: (3600 - 600) / 3 more
    assert flops.sparse == 3400.0
    flops.set_step_flops(FLOPS, {"a": 0.2, "b": 0.5}, dense_weight_gradients=False)  # f_S = 300: (900, 3600)
    flops.advance(4)  # no new step: nothing counted
    assert (flops.sparse, flops.dense) == (3400.0, 14400.0)
    flops.advance(8)
    assert (flops.sparse, flops.dense, flops.step) == (3400.0 + 4 * 900.0, 28800.0, 8)
    assert flops.ratio == 7000.0 / 28800.0


def test_constant_densities_give_the_callbacks_rigl_ratio():
    # 12 steps, updates at steps 4 and 8 keeping each layer's density: what tests/test_report.py expects
    densities = {"a": 0.1, "b": 0.5}
    f_sparse, f_dense = 200.0, 1200.0
    flops = TrainFlops()
    flops.set_step_flops(FLOPS, densities, dense_weight_gradients=False)
    for update in (4, 8):
        flops.advance(update)
        flops.add_dense_weight_gradients()
        flops.set_step_flops(FLOPS, densities, dense_weight_gradients=False)
    flops.advance(12)
    expected = (12 * 3 * f_sparse + 2 * (f_dense - f_sparse)) / (12 * 3 * f_dense)
    assert flops.ratio == pytest.approx(expected, rel=1e-15)


def test_state_dict_is_plain_numbers_and_round_trips():
    flops = TrainFlops()
    flops.set_step_flops(FLOPS, {"a": 0.5, "b": 0.5}, dense_weight_gradients=True)
    flops.advance(3)
    state = flops.state_dict()
    assert state == {"sparse": 3 * (2 * 600.0 + 1200.0), "dense": 3 * 3600.0, "step": 3}
    assert [type(v) for v in state.values()] == [float, float, int]
    restored = TrainFlops()
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.ratio == flops.ratio
    assert restored.step_flops == (0.0, 0.0)  # set again from the current masks after a restore
    restored.set_step_flops(FLOPS, {"a": 0.5, "b": 0.5}, dense_weight_gradients=True)
    restored.advance(5)
    flops.advance(5)
    assert restored.state_dict() == flops.state_dict()
    # the callback's checkpoints hold the same keys
    legacy = TrainFlops()
    legacy.load_state_dict({"sparse": 1, "dense": 4, "step": 2})
    assert (legacy.sparse, legacy.dense, legacy.step, legacy.ratio) == (1.0, 4.0, 2, 0.25)


def test_stopwatch_adds_up_cpu_blocks():
    watch = Stopwatch()
    assert watch.total() == 0.0
    with watch(torch.device("cpu")):
        time.sleep(0.02)
    first = watch.total()
    assert first >= 0.02
    with watch(torch.device("cpu")):
        time.sleep(0.01)
    assert watch.total() >= first + 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stopwatch_times_cuda_work_with_events():
    watch = Stopwatch()
    x = torch.randn(2048, 2048, device="cuda")
    with watch(torch.device("cuda")):
        for _ in range(5):
            x = x @ x.T / 2048
    assert watch.total() > 0.0
