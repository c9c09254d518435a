"""SparseTrainingCallback inside real (tiny) Trainer runs on the CPU."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_sparse import SparseTrainingCallback, Sparsifier
from lightning_sparse.functional import cosine_decay, layer_active_counts
from tests.helpers import (
    DigitsCNN,
    DigitsMLP,
    MaskRecorder,
    digits_loader,
    resumable_digits_loader,
    trainer,
)

EPOCHS = 4
BATCHES = 12  # 600 samples / 50


def _fit(callback, model=None, loader=None, recorder=True, **trainer_kwargs):
    model = model or DigitsMLP()
    callbacks = [callback]
    rec = MaskRecorder(callback) if recorder else None
    if rec:
        callbacks.append(rec)
    callbacks += trainer_kwargs.pop("extra_callbacks", [])
    t = trainer(callbacks=callbacks, **trainer_kwargs)
    t.fit(model, loader or digits_loader())
    return t, model, rec


def test_masked_weights_are_zero_after_every_step_sgd():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    _, _, rec = _fit(cb, max_epochs=EPOCHS)
    assert rec.steps_checked == EPOCHS * BATCHES


def test_masked_weights_are_zero_after_every_step_adam_cnn():
    cb = SparseTrainingCallback(density=0.3, seed=0, figure=False)
    _, model, rec = _fit(cb, model=DigitsCNN(optimizer="adam"), loader=digits_loader(image=True), max_epochs=3)
    assert rec.steps_checked == 3 * BATCHES
    assert set(cb.masks) == {"net.0.weight", "net.3.weight", "net.7.weight"}  # BatchNorm and biases dense


def test_density_exact_and_metrics_logged():
    cb = SparseTrainingCallback(density=0.1, seed=1, figure=False)
    t, model, _ = _fit(cb, max_epochs=3)
    shapes = [tuple(m.shape) for m in cb.masks.values()]
    expected = sum(layer_active_counts(shapes, 0.1))
    assert sum(int(m.sum()) for m in cb.masks.values()) == expected
    nonzero = sum(int(torch.count_nonzero(p)) for n, p in model.named_parameters() if n in cb.masks)
    assert nonzero <= expected
    metrics = t.callback_metrics
    for name in cb.masks:
        assert f"sparse/density/{name}" in metrics
    total = sum(m.numel() for m in cb.masks.values())
    assert metrics["sparse/density"].item() == pytest.approx(expected / total, rel=1e-6)  # the masks' density
    assert metrics["sparse/nonzero_density"].item() == pytest.approx(nonzero / total, abs=0.02)
    assert metrics["sparse/prune_rate"].item() == pytest.approx(cosine_decay(2 / 3, 0.5))


def test_masks_change_every_epoch_but_not_after_the_last():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    _, _, rec = _fit(cb, max_epochs=EPOCHS)
    masks = rec.epoch_masks  # recorded at each epoch's end, before the (deferred) epoch-boundary update
    assert len(masks) == EPOCHS
    for before, after in zip(masks, masks[1:]):  # each epoch-boundary update ran at the next epoch's first step
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(cb.masks[k], masks[-1][k]) for k in masks[-1])  # nothing after the last epoch
    assert cb.state_dict()["num_updates"] == EPOCHS - 1
    assert cb.state_dict()["last_update_step"] == (EPOCHS - 1) * BATCHES


def test_prune_rate_follows_cosine_per_epoch():
    rates = []

    class RateSpy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            rates.append(trainer.callback_metrics.get("sparse/prune_rate"))

    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    _fit(cb, max_epochs=EPOCHS, extra_callbacks=[RateSpy()], recorder=False)
    expected = [cosine_decay((e + 1) / EPOCHS, 0.5) for e in range(EPOCHS - 1)]
    # the update of epoch e's boundary runs (and is logged) at the first step of epoch e + 1
    assert rates[0] is None and [r.item() for r in rates[1:]] == pytest.approx(expected)
    assert cb.current_prune_rate == pytest.approx(expected[-1])


def test_step_updates_happen_every_interval():
    updates = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            updates.append(cb.state_dict()["last_update_step"])

    cb = SparseTrainingCallback(density=0.2, update_interval=5, seed=0, figure=False)
    _fit(cb, max_epochs=2, extra_callbacks=[Spy()], recorder=False)
    # 24 steps: updates at 5, 10, 15, 20 (never on the last step)
    assert sorted(set(updates) - {-1}) == [5, 10, 15, 20]
    assert cb.state_dict()["num_updates"] == 4


def _plain_epochs(sparsifier, model, optimizer, epochs):
    """The callback's calls in a plain loop over ``digits_loader()``; checks after every step that masked-out
    weights are zero (as MaskRecorder does) and returns the masks at each epoch's end."""
    step, epoch_masks = 0, []
    for _ in range(epochs):
        for x, y in digits_loader():
            nn.functional.cross_entropy(model(x), y).backward()
            sparsifier.before_optimizer_step()
            optimizer.step()
            step += 1
            sparsifier.step(step)
            optimizer.zero_grad()
            params = dict(model.named_parameters())
            assert all(torch.all(params[n].detach()[~m] == 0) for n, m in sparsifier.masks.items())
        epoch_masks.append({k: v.clone() for k, v in sparsifier.masks.items()})
        sparsifier.epoch_end(step)
    return epoch_masks


def test_static_masks_never_change():
    model = DigitsMLP(optimizer="plain_sgd")
    optimizer = model.configure_optimizers()
    sparsifier = Sparsifier(model, optimizer, density=0.2, algorithm="static", seed=0, total_steps=3 * BATCHES)
    epoch_masks = _plain_epochs(sparsifier, model, optimizer, epochs=3)
    assert all(torch.equal(epoch_masks[0][k], epoch_masks[-1][k]) for k in sparsifier.masks)


def test_same_seed_same_masks_other_seed_other_masks():
    def masks(seed):
        model = DigitsMLP()
        return Sparsifier(model, model.configure_optimizers(), total_steps=100, density=0.2, seed=seed).masks

    a, b, c = masks(7), masks(7), masks(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_dense_layers_are_not_masked():
    cb = SparseTrainingCallback(density=0.2, dense_layers=["net.0", "*.4.weight"], seed=0, figure=False)
    _, model, _ = _fit(cb, max_epochs=1)
    assert list(cb.masks) == ["net.2.weight"]
    assert int(torch.count_nonzero(model.net[0].weight)) == model.net[0].weight.numel()


def test_summary_table_lists_every_layer():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    _fit(cb, max_epochs=1, recorder=False)
    table = cb.summary()
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.split()}
    active = sum(int(m.sum()) for m in cb.masks.values())
    assert f"{active} of {sum(m.numel() for m in cb.masks.values())} masked weights active" in table.splitlines()[0]
    for name, mask in cb.masks.items():  # one row per layer: its shape and its exact density
        assert rows[name][1] == "x".join(map(str, mask.shape))
        assert rows[name][2] == f"{mask.float().mean().item():.4f}"


# ----------------------------------------------------------------------------- checkpoints and resume


def _ckpt_fit(cb, tmp_path, max_epochs, ckpt_path=None, **ckpt_kwargs):
    val = digits_loader(200, offset=1500) if ckpt_kwargs.pop("validate", False) else None
    model = DigitsMLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **ckpt_kwargs)
    loader = resumable_digits_loader()
    L.seed_everything(0)
    t = trainer(max_epochs=max_epochs, callbacks=[cb, ckpt], enable_checkpointing=True)
    t.fit(model, loader, val_dataloaders=val, ckpt_path=ckpt_path)
    return model


def _assert_same_run(cb_a, model_a, cb_b, model_b):
    assert cb_a.masks.keys() == cb_b.masks.keys()
    for k in cb_a.masks:
        assert torch.equal(cb_a.masks[k], cb_b.masks[k]), k
    assert cb_a.current_prune_rate == cb_b.current_prune_rate
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_resume_from_epoch_checkpoint_continues_like_the_uninterrupted_run(tmp_path):
    full = SparseTrainingCallback(density=0.2, seed=3, figure=False)
    model_full = _ckpt_fit(full, tmp_path / "full", EPOCHS)
    ckpt = tmp_path / "full" / "epoch=1-step=24.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=True)["callbacks"][full.state_key]
    # epoch 1's boundary update is deferred to the first step of epoch 2: the checkpoint holds the weights and
    # masks as trained, and that pending update
    assert state["num_updates"] == 1 and state["prune_rate"] == pytest.approx(cosine_decay(1 / EPOCHS, 0.5))
    assert state["pending_epoch_end"] == 24
    assert all(m.dtype == torch.bool for m in state["masks"].values())

    resumed = SparseTrainingCallback(density=0.2, seed=999, figure=False)  # the checkpoint's masks win over a new seed
    model_resumed = _ckpt_fit(resumed, tmp_path / "resumed", EPOCHS, ckpt_path=ckpt)
    _assert_same_run(full, model_full, resumed, model_resumed)


def test_resume_from_mid_epoch_checkpoint(tmp_path):
    full = SparseTrainingCallback(density=0.2, seed=3, figure=False)
    model_full = _ckpt_fit(full, tmp_path / "full", EPOCHS, every_n_train_steps=7)
    ckpt = tmp_path / "full" / "epoch=1-step=21.ckpt"  # 21 = 12 + 9: in the middle of epoch 1
    resumed = SparseTrainingCallback(density=0.2, seed=3, figure=False)
    model_resumed = _ckpt_fit(resumed, tmp_path / "resumed", EPOCHS, ckpt_path=ckpt, every_n_train_steps=7)
    _assert_same_run(full, model_full, resumed, model_resumed)


def test_resume_from_checkpoint_saved_after_validation_before_the_epoch_update(tmp_path):
    # With save_on_train_epoch_end=False, ModelCheckpoint saves at the end of validation, which Lightning
    # runs before `on_train_epoch_end`: the checkpoint holds the masks before that epoch's update. The
    # resumed run must still make that update (Lightning runs the epoch-end hooks of the resumed epoch).
    kwargs = dict(validate=True, monitor="val_loss", save_on_train_epoch_end=False)
    full = SparseTrainingCallback(density=0.2, seed=3, figure=False)
    model_full = _ckpt_fit(full, tmp_path / "full", EPOCHS, **kwargs)
    ckpt = tmp_path / "full" / "epoch=1-step=24.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"][full.state_key]
    assert state["num_updates"] == 1  # saved before epoch 1's update
    resumed = SparseTrainingCallback(density=0.2, seed=3, figure=False)
    model_resumed = _ckpt_fit(resumed, tmp_path / "resumed", EPOCHS, ckpt_path=ckpt, **kwargs)
    _assert_same_run(full, model_full, resumed, model_resumed)
    assert resumed.state_dict()["num_updates"] == EPOCHS - 1


def test_checkpoint_with_other_masks_raises(tmp_path):
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    _ckpt_fit(cb, tmp_path, 1)
    ckpt = next(tmp_path.glob("*.ckpt"))
    other = SparseTrainingCallback(density=0.2, dense_layers=["net.0"], seed=0, figure=False)
    with pytest.raises(ValueError, match=r"the masks do not match the model's masked weights: missing none, unexpected \['net.0.weight'\]"):
        _ckpt_fit(other, tmp_path / "other", 2, ckpt_path=ckpt)


def test_load_state_dict_rejects_wrong_shapes():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    _, model, _ = _fit(cb, max_epochs=1, recorder=False)
    state = cb.state_dict()
    state["masks"]["net.2.weight"] = torch.ones(3, 3, dtype=torch.bool)
    cb.load_state_dict(state)  # outside a fit: checked when the next fit binds the masks to the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"mask 'net.2.weight' has shape \(3, 3\) but the weight has shape \(16, 32\)"):
        _fit(cb, model=model, max_epochs=2, recorder=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before touching it


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, True, "0.1"])
def test_density_out_of_range(density):
    with pytest.raises(ValueError, match=r"`density` must be a number in \(0, 1\]"):
        SparseTrainingCallback(density=density)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(algorithm="sparse_mom"), r"`algorithm` can be sparse_momentum, rigl, set, dsr, static, snip, gmp, granet, mest, topkast, dst, a SparseAlgorithm or a DST, got 'sparse_mom'"),
        (dict(prune_rate_schedule="step"), r"`prune_rate_schedule` can be cosine, linear, constant"),
        (dict(init="kaiming"), r"`init` can be uniform, erk, er, got 'kaiming'"),
        (dict(prune_rate=1.5), r"`prune_rate` must be in \[0, 1\]"),
        (dict(update_interval=0), r"`update_interval` must be 'epoch', an int >= 1, or None, got 0"),
        (dict(stop_at=0.0), r"`stop_at` must be in \(0, 1\], got 0.0"),
    ],
)
def test_bad_arguments_name_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseTrainingCallback(density=0.1, **kwargs)


def test_density_is_required_except_for_dst():
    with pytest.raises(ValueError, match=r"`density` is required for algorithm 'rigl' \(only 'dst' learns its density\)"):
        SparseTrainingCallback(algorithm="rigl")
    assert SparseTrainingCallback(algorithm="dst").density is None


def test_dense_layers_pattern_matching_nothing():
    cb = SparseTrainingCallback(density=0.1, dense_layers=["encoder.*"], figure=False)
    with pytest.raises(ValueError, match=r"`dense_layers` pattern 'encoder.\*' matches no maskable layer; the maskable layers are: net.0.weight, net.2.weight, net.4.weight"):
        _fit(cb, recorder=False)


def test_model_without_maskable_weights():
    class NoLinear(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.LayerNorm(64))
            self.scale = nn.Parameter(torch.ones(64, 10))

        def forward(self, x):
            return self.net(x) @ self.scale

    with pytest.raises(ValueError, match=r"NoLinear has no maskable weights: sparse training masks the weights of Linear, Conv1d, Conv2d, Conv3d, MultiheadAttention and transformers' Conv1D layers"):
        _fit(SparseTrainingCallback(density=0.1, figure=False), model=NoLinear(), recorder=False)


def test_more_than_one_optimizer():
    class TwoOptimizers(DigitsMLP):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
                    torch.optim.SGD(self.net[2].parameters(), lr=0.1, momentum=0.9)]

    class Manual(TwoOptimizers):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    # Lightning itself refuses several optimizers with automatic optimization; with manual optimization
    # the callback refuses first
    with pytest.raises(ValueError, match=r"SparseTrainingCallback needs automatic optimization"):
        _fit(SparseTrainingCallback(density=0.1, figure=False), model=Manual(), recorder=False)


def test_more_than_one_optimizer_from_on_fit_start():
    # Lightning refuses several optimizers under automatic optimization before this hook; the callback's
    # own check guards strategies that do not
    cb = SparseTrainingCallback(density=0.1, figure=False)
    model = DigitsMLP()
    t = trainer(callbacks=[cb])
    cb.setup(t, model, "fit")
    t.strategy.optimizers = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)] * 2
    with pytest.raises(ValueError, match=r"SparseTrainingCallback supports exactly one optimizer, got 2"):
        cb.on_fit_start(t, model)


def test_plain_sgd_is_refused_for_sparse_momentum():
    with pytest.raises(ValueError, match=r"sparse momentum needs an optimizer that keeps a momentum: torch.optim.SGD with momentum > 0, Adam, AdamW, NAdam or RAdam. Got SGD with momentum=0.0"):
        _fit(SparseTrainingCallback(density=0.1, figure=False), model=DigitsMLP(optimizer="plain_sgd"), recorder=False)


def test_other_optimizer_is_refused_for_sparse_momentum():
    class Adagrad(DigitsMLP):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters())

    with pytest.raises(ValueError, match=r"Got Adagrad"):
        _fit(SparseTrainingCallback(density=0.1, figure=False), model=Adagrad(), recorder=False)


def test_cosine_schedule_needs_a_finite_length():
    with pytest.raises(ValueError, match=r"the 'cosine' prune-rate schedule needs the length of training"):
        _fit(SparseTrainingCallback(density=0.1, figure=False), recorder=False, max_epochs=-1, max_steps=-1)


def test_callable_schedule_returning_out_of_range():
    # in range at 0, 0.5 and 1 (checked when the callback is made), out of range at the first update
    cb = SparseTrainingCallback(
        density=0.1, prune_rate_schedule=lambda progress: 2.0 if 0 < progress < 0.5 else 0.1, figure=False
    )
    with pytest.raises(ValueError, match=r"`prune_rate_schedule` returned 2.0 at progress 0.25; rates must be in \[0, 1\]"):
        _fit(cb, recorder=False, max_epochs=4)


def test_callable_schedule_is_used():
    cb = SparseTrainingCallback(density=0.1, prune_rate_schedule=lambda progress: 0.1 * (1 - progress), figure=False)
    _fit(cb, recorder=False, max_epochs=2)
    assert cb.current_prune_rate == pytest.approx(0.05)
    assert math.isclose(cb.prune_rate_at(0.0), 0.1)


def test_gradients_and_momentum_of_missing_weights_stay_dense():
    model = DigitsMLP()
    optimizer = model.configure_optimizers()
    sparsifier = Sparsifier(model, optimizer, density=0.1, seed=0, total_steps=BATCHES)
    _plain_epochs(sparsifier, model, optimizer, epochs=1)
    for name, param in model.named_parameters():
        if name in sparsifier.masks:
            buffer = optimizer.state[param]["momentum_buffer"]
            assert torch.count_nonzero(buffer[~sparsifier.masks[name]]) > 0, name


def test_a_second_shorter_fit_with_the_same_callback_schedules_its_own_length():
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=4, seed=0, figure=False)
    model = DigitsMLP()
    trainer(callbacks=[cb], max_epochs=4).fit(model, digits_loader(n=600))  # 48 steps: updates at 4, 8, ..., 36
    assert (cb.sparsifier.num_updates, cb.sparsifier.last_update_step) == (9, 36)
    masks = {k: v.clone() for k, v in cb.masks.items()}
    trainer(callbacks=[cb], max_epochs=1).fit(model, digits_loader(n=600))  # a new Trainer: 12 steps, window to 9
    assert (cb.sparsifier.num_updates, cb.sparsifier.last_update_step) == (11, 8)  # updates at steps 4 and 8
    assert any(not torch.equal(masks[k], v) for k, v in cb.masks.items())
    assert sum(int(m.sum()) for m in cb.masks.values()) == sum(int(m.sum()) for m in masks.values())
