"""TrainFlops.mask_update counts a mask update as the callback does: the steps so far at the old costs, RigL's
dense weight gradients of the update step, then the new masks' costs."""

import pytest

from lightning_sparse.cost import TrainFlops, training_step_flops


@pytest.mark.parametrize("gradient_growth", [False, True])
def test_mask_update_is_advance_then_dense_gradients_then_new_costs(gradient_growth):
    flops = {"a": 100.0, "b": 50.0}
    counted, by_hand = TrainFlops(), TrainFlops()
    for t in (counted, by_hand):
        t.set_step_flops(flops, {"a": 0.5, "b": 1.0}, dense_weight_gradients=False)
    new = {"a": 0.25, "b": 0.5}
    assert counted.mask_update(4, flops, new, False, gradient_growth) == training_step_flops(flops, new)
    by_hand.advance(4)
    if gradient_growth:
        by_hand.add_dense_weight_gradients()
    by_hand.set_step_flops(flops, new, dense_weight_gradients=False)
    assert counted.state_dict() == by_hand.state_dict() and counted.step_flops == by_hand.step_flops
    extra = (450.0 - 300.0) / 3 if gradient_growth else 0.0
    assert counted.state_dict() == {"sparse": 4 * 300.0 + extra, "dense": 4 * 450.0, "step": 4}
    counted.advance(6)
    assert counted.sparse == 4 * 300.0 + extra + 2 * training_step_flops(flops, new)[0]
