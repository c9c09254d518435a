"""GraNet, MEST and Top-KAST as compositions of rules, ITOP's recipe, and the record of explored positions
(ITOP's ``R_s``): each update on hand-made tensors (exact counts and positions), a short training run per method,
the options' refusals, and ``explored()`` through a checkpoint."""

import dataclasses
import math

import pytest
import torch

from lightning_sparse import ALGORITHMS, LayerState, SparseAlgorithm, SparseTrainingCallback, Sparsifier, UpdateContext
from lightning_sparse.functional import layer_active_counts
from lightning_sparse.methods.exploration import (
    BackwardSet,
    GraNetCount,
    MESTScore,
    global_keep_counts,
    itop,
    schedule_density,
)
from tests.helpers import DigitsMLP, MaskRecorder, digits_loader, trainer


def _layer(name, weights, active, grad=None):
    w = torch.tensor(weights)
    mask = torch.zeros(len(weights), dtype=torch.bool)
    mask[list(active)] = True
    g = torch.tensor(grad) if grad is not None else None
    return LayerState(name, w, mask, grad_fn=(lambda: g) if g is not None else None)


def _on(mask):
    return [i for i, v in enumerate(mask.tolist()) if v]


def _train(algorithm, epochs=2, density=0.2, check=None, **kwargs):
    """A plain loop over the digits (12 steps per epoch); ``check(sparsifier)`` after every step."""
    torch.manual_seed(0)
    model = DigitsMLP()
    optimizer = model.configure_optimizers()
    loader = digits_loader()
    sparsifier = Sparsifier(model, optimizer, density=density, algorithm=algorithm, seed=0,
                            total_steps=epochs * len(loader), **kwargs)  # fmt: skip
    for _ in range(epochs):
        for x, y in loader:
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sparsifier.step()
            if check is not None:
                check(sparsifier)
            optimizer.zero_grad()
        sparsifier.epoch_end()
    return sparsifier, model


# ----------------------------------------------------------------------------- GraNet


def test_granet_schedule_runs_from_init_density_to_density():
    assert schedule_density(0.0, 0.05, 0.5) == pytest.approx(0.5)
    assert schedule_density(0.5, 0.05, 0.5) == pytest.approx(0.05 + 0.45 * 0.125)
    assert schedule_density(1.0, 0.05, 0.5) == pytest.approx(0.05)
    assert schedule_density(2.0, 0.05, 0.5) == pytest.approx(0.05)
    assert schedule_density(0.0, 1.0, 0.5) == 1.0  # a dense group stays dense


def test_granet_update_prunes_globally_by_magnitude_then_regrows_by_gradient():
    # 16 weights, 7 active; density 0.25 at the end of the window: keep the 4 largest |W| over both layers
    # (0.9, -0.8 in a; 0.7, 0.6 in b), then drop floor(0.5 * 2) = 1 more per layer and regrow 1 by |grad|
    a = _layer("a", [0.9, -0.8, 0.1, 0.05, 0, 0, 0, 0], range(4), [0, 0, 0, 0, 0.3, -2.0, 0.1, 0])
    b = _layer("b", [0.7, 0.02, 0.6, 0, 0, 0, 0, 0], range(3), [0, 5.0, 0, 0, 0, 0, 0, -1.0])
    result = ALGORITHMS["granet"].update([a, b], [4, 3], UpdateContext(0.5, progress=1.0, density=0.25))
    assert result.pruned == [3, 2] and result.grown == [1, 1] and result.active == [2, 2]
    assert _on(result.pruned_masks[0]) == [0] and _on(result.pruned_masks[1]) == [0]
    assert _on(result.masks[0]) == [0, 5]  # -2.0, the largest |grad| of a's free positions
    assert _on(result.masks[1]) == [0, 1]  # the just dropped 0.02 has b's largest |grad|: regrown (RigL)


def test_granet_update_midway_keeps_the_schedule_total_and_layerwise_option():
    a = _layer("a", [0.9, -0.8, 0.1, 0.05, 0.3, 0.2, 0, 0], range(6), [0.0] * 8)
    b = _layer("b", [0.7, 0.02, 0.6, 0.01, 0, 0, 0, 0], range(4), [0.0] * 8)
    ctx = UpdateContext(0.0, progress=0.5, density=0.25)  # rate 0: no regrowth
    d_t = schedule_density(0.5, 0.25, 0.5)  # 0.28125: round(0.28125 * 16) = 4.5 -> 4 (round half to even)
    kept = global_keep_counts([a, b], round(d_t * 16))
    assert kept == [2, 2]
    result = ALGORITHMS["granet"].update([a, b], [6, 4], ctx)
    assert result.active == [2, 2] and result.grown == [0, 0]
    layerwise = dataclasses.replace(ALGORITHMS["granet"], count=GraNetCount(init_density=0.5, global_pruning=False))
    result = layerwise.update([a, b], [6, 4], ctx)
    assert result.active == [2, 2] and _on(result.masks[0]) == [0, 1] and _on(result.masks[1]) == [0, 2]


def test_global_keep_counts_ties_go_to_the_earlier_layer():
    a = _layer("a", [0.5, 0.5, 0.1], range(3))
    b = _layer("b", [0.5, 0.9, 0.0], range(2))
    assert global_keep_counts([a, b], 3) == [2, 1]
    assert global_keep_counts([a, b], 2) == [1, 1]
    assert global_keep_counts([a, b], 5) == [3, 2]
    assert global_keep_counts([a, b], 0) == [0, 0]


def test_granet_run_starts_at_init_density_never_denser_and_ends_at_density():
    seen = []
    sparsifier, _ = _train("granet", epochs=2, density=0.1, update_interval=2,
                           check=lambda s: seen.append(sum(s.masking.active)))  # fmt: skip
    sizes = sparsifier.sizes
    start = sum(layer_active_counts([tuple(m.shape) for m in sparsifier.masks.values()], 0.5, "erk"))
    assert seen[0] == start and max(seen) == start  # never denser than init_density
    assert sum(sparsifier.masking.active) == round(0.1 * sum(sizes))
    assert seen == sorted(seen, reverse=True)  # pruned on the schedule, regrowth keeps each update's total
    assert sparsifier.explored().model > 0.5


# ----------------------------------------------------------------------------- MEST


def test_mest_prunes_the_lowest_weight_plus_gradient_score():
    # |W| + 1.0 * |g|: 0.1 + 0.0 = 0.1 and 0.05 + 0.5 = 0.55; the small weight with a large gradient stays
    layer = _layer("a", [0.3, 0.1, 0.05, 0.2, 0, 0], range(4), [0.0, 0.0, 0.5, 0.0, 0, 0])
    assert _on(MESTScore(gradient_weight=1.0)(layer, 1)) == [0, 2, 3]
    assert _on(MESTScore(gradient_weight=0.0)(layer, 1)) == [0, 1, 3]
    assert _on(MESTScore()(layer, 0)) == [0, 1, 2, 3]


def test_mest_soft_memory_bound_grows_first_then_prunes_back_to_the_budget():
    ctx = UpdateContext(0.5, progress=0.2, density=0.5, generator=torch.Generator().manual_seed(0))
    mest = ALGORITHMS["mest"]
    layer = _layer("a", [0.3, 0.1, 0.05, 0.2, 0, 0, 0, 0], range(4), [0.0] * 8)
    first = mest.update([layer], [4], ctx)  # budget 4: nothing pruned, floor(0.5 * 4) = 2 grown
    assert first.pruned == [0] and first.grown == [2] and first.active == [6]
    assert ctx.state["mest_budget"] == {"a": 4}
    w = torch.tensor([0.3, 0.1, 0.05, 0.2, 0, 0, 0, 0])
    grown = [i for i in _on(first.masks[0]) if i >= 4]
    w[grown[0]], w[grown[1]] = 0.5, 0.01  # one grown weight trained well, one did not
    again = LayerState("a", w, first.masks[0], grad_fn=lambda: torch.zeros(8))
    second = mest.update([again], [6], ctx)  # back to 4 (the 0.01 and the 0.05 go), then 2 new
    assert second.pruned == [2] and second.grown == [2] and second.active == [6]
    assert set(_on(second.pruned_masks[0])) == {0, 1, 3, grown[0]}
    last = mest.update([LayerState("a", w, second.masks[0], grad_fn=lambda: torch.zeros(8))], [6],
                       dataclasses.replace(ctx, progress=1.0))  # fmt: skip
    assert last.pruned == [2] and last.grown == [0] and last.active == [4]


def test_mest_run_keeps_the_soft_bound_and_ends_at_density():
    seen = []
    sparsifier, _ = _train("mest", epochs=2, density=0.2, update_interval=2,
                           check=lambda s: seen.append(list(s.masking.active)))  # fmt: skip
    budget = layer_active_counts([tuple(m.shape) for m in sparsifier.masks.values()], 0.2, "erk")
    assert seen[0] == budget and list(sparsifier.masking.active) == budget
    assert all(b <= a <= b + math.floor(0.3 * b) for counts in seen for a, b in zip(counts, budget))
    assert max(sum(c) for c in seen) > sum(budget)  # it did grow first


# ----------------------------------------------------------------------------- Top-KAST


def test_topkast_swaps_at_most_the_backward_set():
    # 10 weights, 4 active at density 0.4; backward density 0.6: |B \ A| = 2, so a rate of 0.75 (3) swaps 2
    layer = _layer("a", [0.5, -0.1, 0.3, 0.2, 0, 0, 0, 0, 0, 0], range(4), [0, 0, 0, 0, 1.0, 0, -3.0, 0, 2.0, 0])
    algo = dataclasses.replace(ALGORITHMS["topkast"], count=BackwardSet(backward_density=0.6))
    result = algo.update([layer], [4], UpdateContext(0.75, density=0.4))
    assert result.pruned == [2] and result.grown == [2]
    assert _on(result.masks[0]) == [0, 2, 6, 8]
    wide = algo.update([layer], [4], UpdateContext(0.25, density=0.4))  # floor(0.25 * 4) = 1 below the cap
    assert wide.pruned == [1] and _on(wide.masks[0]) == [0, 2, 3, 6]
    assert BackwardSet().density_of_b(0.05) == pytest.approx(0.1) and BackwardSet().density_of_b(0.7) == 1.0


def test_topkast_refuses_a_backward_set_no_larger_than_the_forward_set():
    layer = _layer("a", [0.5, 0.1, 0, 0], range(2), [0.0] * 4)
    algo = dataclasses.replace(ALGORITHMS["topkast"], count=BackwardSet(backward_density=0.5))
    with pytest.raises(ValueError, match=r"`backward_density` \(0.5\) must be above the run's density \(0.5\)"):
        algo.update([layer], [2], UpdateContext(0.3, density=0.5))


# ----------------------------------------------------------------------------- every new method, trained


@pytest.mark.parametrize("algorithm", ["granet", "mest", "topkast"])
def test_trainer_run_keeps_masked_weights_zero_and_logs_explored(algorithm):
    cb = SparseTrainingCallback(density=0.2, algorithm=algorithm, update_interval=3, seed=0)
    recorder = MaskRecorder(cb)
    t = trainer(callbacks=[cb, recorder], max_epochs=2)
    t.fit(DigitsMLP(), digits_loader())
    assert recorder.steps_checked == 24
    state = cb.state_dict()
    assert state["num_updates"] >= 4
    sizes = dict(zip(cb.sparsifier.names, cb.sparsifier.sizes))
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(0.2 * sum(sizes.values()))
    explored = cb.sparsifier.explored()
    assert float(t.callback_metrics["sparse/explored"]) == pytest.approx(explored.model)
    for name, mask in cb.masks.items():
        assert torch.equal(state["explored"][name] | mask, state["explored"][name])
        assert float(t.callback_metrics[f"sparse/explored/{name}"]) == pytest.approx(explored.layers[name])
    assert explored.model > 0.2


# ----------------------------------------------------------------------------- explored (R_s)


def test_explored_counts_every_position_ever_active_and_survives_a_checkpoint():
    history = []

    def check(s):
        history.append({k: v.clone() for k, v in s.masks.items()})

    sparsifier, model = _train("rigl", epochs=2, density=0.2, update_interval=3, check=check)
    union = {k: torch.stack([h[k] for h in history]).any(0) for k in history[0]}
    explored = sparsifier.explored()
    for name, size in zip(sparsifier.names, sparsifier.sizes):
        assert explored.layers[name] == int(union[name].sum()) / size
    assert explored.model == sum(int(u.sum()) for u in union.values()) / sum(sparsifier.sizes)
    state = sparsifier.state_dict()
    assert all(torch.equal(state["explored"][k], union[k]) for k in union)
    resumed = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.2,
                         algorithm="rigl", update_interval=3, seed=0, total_steps=24, state=state)  # fmt: skip
    assert resumed.explored() == explored
    old = {k: v for k, v in state.items() if k != "explored"}  # a checkpoint written before the record
    assert Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.2,
                      algorithm="rigl", update_interval=3, seed=0, total_steps=24,
                      state=old).explored().model == pytest.approx(0.2, abs=0.01)  # fmt: skip
    bad = {**state, "explored": {k: v[:1] for k, v in state["explored"].items()}}
    with pytest.raises(ValueError, match="explored positions of .* must be torch.bool of shape"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.2,
                   algorithm="rigl", update_interval=3, seed=0, total_steps=24, state=bad)  # fmt: skip


def test_explored_of_static_masks_is_the_density_and_of_dense_starts_is_everything():
    static, _ = _train("static", epochs=1, density=0.2)
    assert static.explored().model == sum(static.masking.active) / sum(static.sizes)
    gmp, _ = _train("gmp", epochs=1, density=0.2, update_interval=2)
    assert gmp.explored().model == 1.0 and set(gmp.explored().layers.values()) == {1.0}


# ----------------------------------------------------------------------------- ITOP and refusals


def test_itop_sets_the_recipe_and_refuses_what_cannot_explore():
    algo = itop("rigl", update_interval=50)
    assert (algo.update_interval, algo.prune_rate, algo.stop_at) == (50, 0.5, 1.0)
    assert dataclasses.replace(algo, update_interval=100, prune_rate=0.3, stop_at=0.75) == ALGORITHMS["rigl"]
    assert itop("set", update_interval=7, prune_rate=0.2).grow == "random"
    for method in ("static", "gmp", "snip"):
        with pytest.raises(ValueError, match="`algorithm` must be a dynamic method that regrows"):
            itop(method, update_interval=10)
    with pytest.raises(ValueError, match="`update_interval` must be an int >= 1, got 0"):
        itop("rigl", update_interval=0)
    with pytest.raises(ValueError, match=r"`prune_rate` must be in \(0, 1\], got 1.5"):
        itop("rigl", update_interval=10, prune_rate=1.5)


def test_rule_options_are_validated_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"`init_density` must be a number in \(0, 1\], got 0"):
        GraNetCount(init_density=0)
    with pytest.raises(ValueError, match="`global_pruning` must be True or False"):
        GraNetCount(global_pruning="yes")
    with pytest.raises(ValueError, match="`gradient_weight` must be a finite number >= 0, got -1"):
        MESTScore(gradient_weight=-1)
    with pytest.raises(ValueError, match=r"`backward_density` must be a number in \(0, 1\] \(or None\), got 1.5"):
        BackwardSet(backward_density=1.5)


@pytest.mark.parametrize("algorithm", ["granet", "mest"])
def test_patterns_are_refused_for_methods_with_their_own_growth_counts(algorithm):
    model = DigitsMLP()
    with pytest.raises(ValueError, match="pattern='2:4' is refused for algorithm .*use pattern='unstructured'"):
        Sparsifier(model, model.configure_optimizers(), density=0.5, algorithm=algorithm, pattern="2:4", total_steps=10)


def test_granet_from_dense_starts_with_full_masks():
    dense = SparseAlgorithm(prune="magnitude", grow="gradient", redistribute="none", count=GraNetCount(init_density=1.0),
                            update_interval=2, stop_at=0.75, reset_grown=True)  # fmt: skip
    model = DigitsMLP()
    s = Sparsifier(model, model.configure_optimizers(), density=0.2, algorithm=dense, total_steps=10)
    assert all(bool(m.all()) for m in s.masks.values()) and s.explored().model == 1.0
