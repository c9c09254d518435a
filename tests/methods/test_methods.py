"""Each published method's defining behaviour, on small tensors and in a short Trainer run."""

import math
import warnings

import lightning as L
import pytest
import torch

from lightning_sparse import (
    ALGORITHMS,
    DST,
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
from lightning_sparse.methods.dst import LongTailedStep, long_tailed_derivative
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


# ----------------------------------------------------------------------------- DST


def test_long_tailed_estimator_values():
    x = torch.tensor([-1.5, -0.7, -0.4, -0.1, 0.0, 0.25, 0.4, 0.5, 1.0, 1.01], requires_grad=True)
    y = LongTailedStep.apply(x)
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([0.0, 0.4, 0.4, 1.6, 2.0, 1.0, 0.4, 0.4, 0.4, 0.0])
    assert long_tailed_derivative(torch.tensor([0.3])).item() == pytest.approx(0.8)


def test_dst_thresholds_get_gradients_and_sparsity_rises():
    densities = []

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            densities.append(trainer.callback_metrics["sparse/density"].item())

    grads = []

    class GradSpy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append([m.threshold.grad.abs().sum().item() for m in cb.sparsifier.thresholds.values()])

    L.seed_everything(0)
    cb = SparseTrainingCallback(algorithm=DST(alpha=5e-4), seed=0)  # the paper's LeNet value
    model = DigitsMLP()  # SGD, momentum 0.9, lr 0.1
    t = trainer(callbacks=[cb, GradSpy(), Spy()], max_epochs=8)
    t.fit(model, digits_loader(1200))
    names = [n for n, _ in model.named_parameters()]
    assert set(names) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}  # thresholds folded at fit end
    assert all(g > 0 for step in grads for g in step)
    assert densities[0] < 1.0 and densities[-1] < densities[0] - 0.1  # sparsity rises: seen 0.96 -> 0.70
    assert all(later <= earlier + 0.01 for earlier, later in zip(densities, densities[1:]))
    # the forward uses the masked weight: entries under the threshold are exactly zero
    assert set(cb.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}  # the masks at the end of fit
    for name, mask in cb.masks.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert torch.all(module.weight[~mask] == 0)
    val = (model(digits()[0][1200:]).argmax(1) == digits()[1][1200:]).float().mean().item()
    assert val > 0.8


def test_dst_thresholds_are_checkpointed(tmp_path):
    cb = SparseTrainingCallback(algorithm="dst", seed=0)
    model = DigitsMLP(optimizer="adam", lr=1.0)

    class Save(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.save_checkpoint(tmp_path / "during.ckpt")

    t = trainer(callbacks=[cb, Save()], max_epochs=1, enable_checkpointing=False)
    t.fit(model, digits_loader())
    during = torch.load(tmp_path / "during.ckpt", weights_only=True)
    state = during["state_dict"]  # plain also during training: the masked weights, no thresholds
    assert set(state) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    DigitsMLP().load_state_dict(state)
    dst_state = during["callbacks"][cb.state_key]["dst"]  # thresholds and raw weights, for resume
    assert set(dst_state["thresholds"]) == set(dst_state["raw"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert all(bool((t != 0).any()) for t in dst_state["thresholds"].values())  # trained
    t.save_checkpoint(tmp_path / "after.ckpt")
    after = torch.load(tmp_path / "after.ckpt", weights_only=True)["state_dict"]
    assert set(after) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}  # plain after fit
    DigitsMLP().load_state_dict(after)  # loads into the model without the callback


def test_dst_collapse_resets_thresholds():
    cb = SparseTrainingCallback(algorithm=DST(alpha=0.0, collapse_density=0.5), seed=0)
    model = DigitsMLP(optimizer="adam", lr=1.0)

    class Collapse(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                with torch.no_grad():
                    cb.sparsifier.thresholds["net.2.weight"].threshold.fill_(100.0)  # nothing passes: density 0

    seen = []

    class After(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:
                seen.append(cb.sparsifier.thresholds["net.2.weight"].threshold.abs().max().item())

    trainer(callbacks=[Collapse(), cb, After()], max_epochs=1).fit(model, digits_loader())
    assert seen == [0.0]


def test_dst_warns_once_when_a_layer_keeps_collapsing():
    """Each collapse resets the layer's thresholds; the third one of a layer warns, naming it and the advice
    (a learning rate too large for the thresholds), once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    sparsifier = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), algorithm="dst")

    def collapse(name: str) -> None:
        with torch.no_grad():
            sparsifier.thresholds[name].threshold.fill_(100.0)  # nothing passes: density 0

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the first two collapses
        for _ in range(2):
            collapse("2.weight")
            sparsifier.step()
    assert sparsifier.collapses == {"2.weight": 2}
    collapse("2.weight")
    collapse("0.weight")
    with pytest.warns(UserWarning, match=r"DST: the layer\(s\) \['2.weight'\] collapsed 3 times by step 3 .*lr 0.01"):
        sparsifier.step()
    assert sparsifier.collapses == {"2.weight": 3, "0.weight": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer
        collapse("2.weight")
        sparsifier.step()
    assert sparsifier.collapses["2.weight"] == 4


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
