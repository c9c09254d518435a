"""Each published method's defining behaviour (RigL, SET, DSR, SNIP, GMP), on small tensors and in a short
training loop (a Trainer where the callback's wiring is what is checked)."""

import math

import lightning as L
import pytest
import torch

from lightning_sparse import (
    ALGORITHMS,
    LayerState,
    SparseAlgorithm,
    SparseTrainingCallback,
    Sparsifier,
    UpdateContext,
)
from lightning_sparse.functional import layer_active_counts
from lightning_sparse.functional.prune_grow import set_prune, snip_masks
from lightning_sparse.functional.redistribute import adapt_threshold, below_threshold_counts
from lightning_sparse.functional.schedules import cosine_decay, gmp_sparsity
from lightning_sparse.methods import largest_remainder
from tests.helpers import DigitsMLP, MaskRecorder, digits, digits_loader, trainer


class StepMasks(L.Callback):
    """Records, after every optimizer step, the step number and a copy of the masks."""

    def __init__(self, sparse):
        self.sparse = sparse
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history.append((trainer.global_step, {k: v.clone() for k, v in self.sparse.masks.items()}))


def _fit(cb, model=None, epochs=2, **kwargs):
    spy = StepMasks(cb)
    t = trainer(callbacks=[cb, MaskRecorder(cb), spy], max_epochs=epochs, **kwargs)
    model = model or DigitsMLP()
    t.fit(model, digits_loader())
    return t, model, spy


def _train(epochs=2, check=None, **kwargs):
    """A plain loop over the digits (12 steps per epoch) with a ``Sparsifier``: ``check(sparsifier, optimizer,
    before)`` after every step (``before``: the masks before it); returns the sparsifier and, per step, the step
    number and a copy of the masks after it."""
    torch.manual_seed(0)
    model = DigitsMLP()
    optimizer = model.configure_optimizers()
    loader = digits_loader()
    sparsifier = Sparsifier(model, optimizer, total_steps=epochs * len(loader), **kwargs)
    history = []
    for _ in range(epochs):
        for x, y in loader:
            before = {k: v.clone() for k, v in sparsifier.masks.items()}
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sparsifier.step()
            if check is not None:
                check(sparsifier, optimizer, before)
            optimizer.zero_grad()
            history.append((sparsifier.step_count, {k: v.clone() for k, v in sparsifier.masks.items()}))
        sparsifier.epoch_end()
    return sparsifier, history


def _changed_steps(history):
    steps, previous = [], None
    for step, masks in history:
        if previous is not None and any(not torch.equal(previous[k], masks[k]) for k in masks):
            steps.append(step)
        previous = masks
    return steps


# ----------------------------------------------------------------------------- RigL


def test_rigl_unit_drops_smallest_grows_largest_gradient_keeps_count():
    w = torch.tensor([0.5, -0.1, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, -0.8, 0.2])
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    grad = torch.tensor([0.0, 0.0, 0.0, 0.1, 5.0, -0.2, 3.0, 0.05, 9.0, 0.0])
    layer = LayerState("a", w, mask, grad_fn=lambda: grad)
    # drop fraction 0.5 of 5 active: floor(2.5) = 2 -> drop |w| 0.1 and 0.2, grow the two largest |g| outside
    result = ALGORITHMS["rigl"].update([layer], [5], UpdateContext(0.5))
    assert result.pruned == [2] and result.grown == [2] and result.active == [5]
    assert result.masks[0].tolist() == [True, False, True, False, True, False, True, False, True, False]


def test_rigl_updates_only_on_interval_steps_before_stop_and_keeps_layer_counts():
    cb, history = _train(density=0.2, algorithm="rigl", update_interval=3, seed=0)  # 24 steps; window ends at 18
    changed = _changed_steps(history)
    assert changed and set(changed) <= {3, 6, 9, 12, 15}
    assert len(changed) >= 4
    counts = layer_active_counts([tuple(m.shape) for m in cb.masks.values()], 0.2, "erk")
    for _, masks in history:
        assert [int(m.sum()) for m in masks.values()] == counts
    state = cb.state_dict()
    assert state["last_update_step"] == 18 and state["prune_rate"] == 0.0  # the update at the window's end
    assert cb.current_prune_rate == pytest.approx(cosine_decay(1.0, 0.3))


def test_rigl_zeroes_grown_weights_and_their_momentum():
    grown_checked = []

    def check(sparsifier, optimizer, before):
        if sparsifier.step_count % 3:
            return
        params = dict(sparsifier.model.named_parameters())
        for name, mask in sparsifier.masks.items():
            grown = mask & ~before[name]
            if grown.any():
                assert torch.all(params[name][grown] == 0)
                assert torch.all(optimizer.state[params[name]]["momentum_buffer"][grown] == 0)
                grown_checked.append(int(grown.sum()))

    _train(epochs=1, check=check, density=0.2, algorithm="rigl", update_interval=3, seed=0)
    assert sum(grown_checked) > 0


# ----------------------------------------------------------------------------- SET


def test_set_removes_closest_to_zero_on_each_side():
    w = torch.tensor([0.9, 0.05, 0.4, 0.2, -0.01, -0.3, -0.7, -0.02])
    mask = torch.ones(8, dtype=torch.bool)
    new = set_prune(w, mask, 4)
    # two smallest positives (0.05, 0.2) and two largest negatives (-0.01, -0.02)
    assert new.tolist() == [True, False, True, False, False, True, True, False]


def test_set_takes_the_rest_from_the_other_side():
    w = torch.tensor([0.9, 0.5, 0.4, -0.01])
    new = set_prune(w, torch.ones(4, dtype=torch.bool), 3)
    assert new.tolist() == [True, False, False, False]


def test_set_trainer_keeps_layer_counts_and_is_reproducible():
    a = SparseTrainingCallback(density=0.2, algorithm="set", seed=5)
    b = SparseTrainingCallback(density=0.2, algorithm="set", seed=5)
    L.seed_everything(0)
    _, _, spy = _fit(a, epochs=3)
    L.seed_everything(0)
    _fit(b, epochs=3)
    assert a.algorithm_name == "set" and a.init == "er"
    assert _changed_steps(spy.history) == [13, 25]  # updated at the end of epochs 0 and 1, seen at the next step
    counts = layer_active_counts([tuple(m.shape) for m in a.masks.values()], 0.2, "er")
    assert [int(m.sum()) for m in a.masks.values()] == counts
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


# ----------------------------------------------------------------------------- DSR


def test_dsr_threshold_counts_and_adaptation():
    w = [torch.tensor([0.0005, 0.002, -0.0001, 0.5]), torch.tensor([0.0009, 0.3])]
    m = [torch.tensor([True, True, True, False]), torch.ones(2, dtype=torch.bool)]
    assert below_threshold_counts(w, m, 0.001) == [2, 1]  # 0.5 is below nothing; inactive 0.5 ignored anyway
    assert adapt_threshold(0.001, pruned=1, target=10) == 0.002
    assert adapt_threshold(0.001, pruned=20, target=10) == 0.0005
    assert adapt_threshold(0.001, pruned=10, target=10) == 0.001


def test_dsr_update_regrows_in_proportion_to_survivors_and_adapts_threshold():
    wa = torch.tensor([0.0001, 0.0002, 0.5, 0.6, 0.7, 0.8, 0.0, 0.0, 0.0, 0.0])
    ma = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    wb = torch.tensor([0.0003, 0.9, 0.0, 0.0, 0.0, 0.0])
    mb = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    ctx = UpdateContext(rate=0.5, generator=torch.Generator().manual_seed(0))
    layers = [LayerState("a", wa, ma), LayerState("b", wb, mb)]
    result = ALGORITHMS["dsr"].update(layers, [6, 2], ctx)
    assert result.pruned == [2, 1]  # |w| < 0.001
    assert result.grown == [2, 1]  # 3 regrown in proportion to survivors 4 : 1 -> 2.4, 0.6
    assert result.active == [6, 2]
    # 3 pruned < (1 - 0.1) * 0.5 * 8 = 3.6: the threshold doubles for next time
    assert ctx.state["dsr_threshold"] == 0.002


def test_dsr_threshold_is_checkpointed_and_adapts():
    cb, _ = _train(density=0.2, algorithm="dsr", update_interval=4, seed=0)
    threshold = cb.state_dict()["algorithm_state"]["dsr_threshold"]
    assert threshold != 1e-3 and math.log2(threshold / 1e-3).is_integer()
    assert sum(int(m.sum()) for m in cb.masks.values()) == sum(
        layer_active_counts([tuple(m.shape) for m in cb.masks.values()], 0.2)
    )


# ----------------------------------------------------------------------------- SNIP


def test_snip_unit_keeps_global_top():
    masks = snip_masks([torch.tensor([3.0, 1.0]), torch.tensor([[2.0, 5.0], [0.0, 4.0]])], 3)
    assert [m.tolist() for m in masks] == [[True, False], [[False, True], [False, True]]]


def test_snip_trainer_keeps_top_g_times_w_of_the_first_batch():
    L.seed_everything(0)
    model = DigitsMLP()
    reference = DigitsMLP()
    reference.load_state_dict(model.state_dict())
    x, y = digits()
    loss = torch.nn.functional.cross_entropy(reference(x[:50]), y[:50])
    weights = [p for n, p in reference.named_parameters() if n.endswith("weight")]
    grads = torch.autograd.grad(loss, weights)
    expected = snip_masks([(g * w).abs() for g, w in zip(grads, weights)], round(0.1 * sum(w.numel() for w in weights)))

    cb = SparseTrainingCallback(density=0.1, algorithm="snip", seed=0)
    _, _, spy = _fit(cb, model=model, epochs=1)
    for mask, exp in zip(cb.masks.values(), expected):
        assert torch.equal(mask, exp)
    assert _changed_steps(spy.history) == []  # fixed after the start


# ----------------------------------------------------------------------------- GMP


def test_gmp_schedule_values():
    assert gmp_sparsity(0.0, 0.9) == 0.0
    assert gmp_sparsity(0.5, 0.9) == pytest.approx(0.9 - 0.9 * 0.125)
    assert gmp_sparsity(1.0, 0.9) == pytest.approx(0.9)
    assert gmp_sparsity(2.0, 0.9) == pytest.approx(0.9)


def test_gmp_follows_cubic_schedule_and_ends_at_density():
    cb, history = _train(density=0.1, algorithm="gmp", update_interval=2, seed=0)
    sizes = [m.numel() for m in cb.masks.values()]
    for step, masks in history:
        if step % 2:
            continue
        sparsity = gmp_sparsity(min(step / 18, 1.0), 0.9)  # window: 0.75 * 24 steps
        expected = largest_remainder([(1 - sparsity) * n for n in sizes])  # the total is round((1 - s) * N)
        assert [int(m.sum()) for m in masks.values()] == expected, step
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(0.1 * sum(sizes))
    assert cb.state_dict()["last_update_step"] == 18


# ----------------------------------------------------------------------------- composition


def test_ablation_momentum_redistribution_random_growth_runs_and_keeps_total():
    algo = SparseAlgorithm(prune="magnitude", grow="random", redistribute="momentum", nearly_dense_edge_case=True)
    cb = SparseTrainingCallback(density=0.2, algorithm=algo, seed=0)
    _, _, spy = _fit(cb, epochs=3)
    total = sum(layer_active_counts([tuple(m.shape) for m in cb.masks.values()], 0.2))
    assert all(sum(int(m.sum()) for m in masks.values()) == total for _, masks in spy.history)
    assert _changed_steps(spy.history) == [13, 25]  # epoch-end updates, seen at the next step


def test_unknown_rule_name():
    with pytest.raises(ValueError, match=r"`count` can be ceil, floor, gmp, dsr or a function, got 'half'"):
        SparseAlgorithm(count="half")


def test_readme_custom_growth_rule_runs():
    from lightning_sparse.functional import add_highest

    def grow_by_gradient_times_momentum(layer, mask, n, generator):
        return add_highest((layer.grad * layer.momentum).abs(), mask, n)

    algo = SparseAlgorithm(grow=grow_by_gradient_times_momentum, redistribute="none", update_interval=4)
    assert not algo.needs_momentum  # checked lazily, when the rule reads layer.momentum
    cb = SparseTrainingCallback(density=0.2, algorithm=algo, seed=0)
    _, _, spy = _fit(cb, epochs=1)
    assert cb.state_dict()["num_updates"] == 2 and _changed_steps(spy.history) == [4, 8]
    with pytest.raises(ValueError, match="sparse momentum needs an optimizer that keeps a momentum"):
        _fit(SparseTrainingCallback(density=0.2, algorithm=algo, seed=0), model=DigitsMLP(optimizer="plain_sgd"), epochs=1)
