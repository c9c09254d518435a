"""Issue 11: the callback inside the training loops users write — early stopping, checkpoint scores, weight
averaging, gradient accumulation schedules, unknown or short lengths, frozen layers, refusals that touch nothing,
DST checkpoints. A 64-32-16-10 MLP on scikit-learn digits, 1–4 epochs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_sparse import SparseTrainingCallback
from tests.helpers import DigitsMLP, MaskRecorder, digits, digits_loader, trainer

BATCHES = 12  # digits_loader(): 600 samples / 50
TOTAL = 64 * 32 + 32 * 16 + 16 * 10  # masked weights of DigitsMLP


def _val_loss(model: L.LightningModule, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in loader]
    return float(sum(losses) / len(loader.dataset))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _active_and_nonzero(cb: SparseTrainingCallback, model: nn.Module) -> tuple[int, int, int]:
    """(active weights, non-zero weights, non-zero weights outside the masks) over the masked layers."""
    params = dict(model.named_parameters())
    active = sum(int(m.sum()) for m in cb.masks.values())
    nonzero = sum(int((params[n] != 0).sum()) for n in cb.masks)
    outside = sum(int((params[n][~m] != 0).sum()) for n, m in cb.masks.items())
    return active, nonzero, outside


def test_early_stopping_gets_no_update_after_the_last_epoch():
    val = digits_loader(200, offset=1500, batch_size=200)
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after the second epoch
    rec = MaskRecorder(cb)
    t = trainer(max_epochs=6, callbacks=[cb, rec, stop])
    model = DigitsMLP()
    t.fit(model, digits_loader(), val_dataloaders=val)
    assert t.current_epoch == 2 and t.global_step == 2 * BATCHES
    assert cb.state_dict()["num_updates"] == 1  # epoch 0's boundary only: none after the stopping epoch
    assert all(torch.equal(cb.masks[k], rec.epoch_masks[-1][k]) for k in cb.masks)
    # the model after fit is the model the last validation scored
    assert _val_loss(model, val) == pytest.approx(t.callback_metrics["val_loss"].item(), rel=1e-6)


def test_monitored_checkpoint_score_describes_its_weights(tmp_path):
    val = digits_loader(200, offset=1500, batch_size=200)
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    t = trainer(max_epochs=3, callbacks=[cb, ckpt], enable_checkpointing=True)
    t.fit(DigitsMLP(), digits_loader(), val_dataloaders=val)
    for epoch in range(3):
        checkpoint = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=True)
        model = DigitsMLP()
        model.load_state_dict(checkpoint["state_dict"])
        score = checkpoint["callbacks"][ckpt.state_key]["current_score"].item()
        assert _val_loss(model, val) == pytest.approx(score, rel=1e-6), epoch


def test_gradient_accumulation_scheduler_counts_the_steps_taken():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    accumulate = GradientAccumulationScheduler({0: 1, 1: 4})
    t = trainer(max_epochs=2, callbacks=[cb, accumulate])
    model = DigitsMLP()
    t.fit(model, digits_loader())
    assert t.global_step == 12 + 3
    assert cb.sparsifier.total_steps == 15  # not 24, Lightning's estimate with the first epoch's factor
    state = cb.state_dict()
    assert state["num_updates"] == 1 and state["last_update_step"] == 12  # none after the last step
    active, nonzero, outside = _active_and_nonzero(cb, model)
    assert outside == 0 and active == round(0.2 * TOTAL)


@pytest.mark.parametrize("order", ["sparse_first", "averaging_first"])
def test_ema_weight_averaging_keeps_the_masks(order):
    cb = SparseTrainingCallback(density=0.2, update_interval=4, seed=0, figure=False)
    ema = EMAWeightAveraging(decay=0.9)
    callbacks = [cb, ema] if order == "sparse_first" else [ema, cb]
    model = DigitsMLP()
    trainer(max_epochs=2, callbacks=callbacks).fit(model, digits_loader())
    assert cb.state_dict()["num_updates"] >= 4
    active, nonzero, outside = _active_and_nonzero(cb, model)  # the model after fit is the average
    assert outside == 0 and active == round(0.2 * TOTAL) and nonzero <= active
    averaged = dict(ema._average_model.module.named_parameters())
    assert all(int((averaged[n][~m] != 0).sum()) == 0 for n, m in cb.masks.items())


def test_stochastic_weight_averaging_keeps_the_masks():
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    model = DigitsMLP()
    trainer(max_epochs=4, callbacks=[cb, swa]).fit(model, digits_loader())
    assert cb.state_dict()["num_updates"] == 3
    active, nonzero, outside = _active_and_nonzero(cb, model)
    assert outside == 0 and active == round(0.2 * TOTAL) and nonzero <= active


class _Unsized(IterableDataset):
    def __iter__(self):
        x, y = digits()
        for i in range(0, 600, 50):
            yield x[i : i + 50], y[i : i + 50]


def test_unknown_length_is_refused_before_any_weight_changes():
    model = DigitsMLP()
    before = _weights(model)
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", seed=0, figure=False)
    with pytest.raises(ValueError, match=r"needs? the length of training.*`max_steps`.*`__len__`"):
        trainer(max_epochs=2, callbacks=[cb]).fit(model, DataLoader(_Unsized(), batch_size=None))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_length_with_max_steps_works():
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=3, seed=0, figure=False)
    model = DigitsMLP()
    trainer(max_steps=10, max_epochs=-1, callbacks=[cb]).fit(model, DataLoader(_Unsized(), batch_size=None))
    state = cb.state_dict()  # updates at 3, 6 and 9: the first at or past the window end (7.5) is the last
    assert cb.sparsifier.total_steps == 10 and state["num_updates"] == 3 and state["last_update_step"] == 9


@pytest.mark.parametrize("interval, batches", [(None, 8), (5, 8), (3, 12), (None, 12)])
def test_gmp_reaches_its_target_exactly(interval, batches):
    cb = SparseTrainingCallback(density=0.2, algorithm="gmp", update_interval=interval, seed=0, figure=False)
    model = DigitsMLP()
    trainer(max_epochs=1, limit_train_batches=batches, callbacks=[cb]).fit(model, digits_loader())
    active, _, outside = _active_and_nonzero(cb, model)
    assert active == round(0.2 * TOTAL) and outside == 0
    assert cb.state_dict()["last_update_step"] == -(-batches * 3 // 4)  # the end of its window (stop_at 0.75)


def test_a_run_too_short_for_any_update_is_warned_about():
    cb = SparseTrainingCallback(density=0.2, algorithm="dsr", seed=0, figure=False)  # DSR: every 200 steps by default
    with pytest.warns(UserWarning, match=r"'dsr' updates its masks every 200 steps.*no mask update"):
        trainer(max_epochs=1, limit_train_batches=10, callbacks=[cb]).fit(DigitsMLP(optimizer="adam"), digits_loader())


class _TwoOptimizers(DigitsMLP):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1, momentum=0.9),
                torch.optim.SGD(self.net[2:].parameters(), lr=0.1, momentum=0.9)]  # fmt: skip

    def training_step(self, batch, batch_idx):  # pragma: no cover - refused before training
        raise AssertionError


class _MissesALayer(DigitsMLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[2:].parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    "model, error, match",
    [
        (DigitsMLP(optimizer="plain_sgd"), ValueError, "momentum"),
        (_MissesALayer(), ValueError, r"does not update the masked weight\(s\) \['net.0.weight'\]"),
        (_TwoOptimizers(), RuntimeError, "multiple optimizers"),  # Lightning refuses it first
    ],
)
def test_refusals_leave_the_weights_untouched(model, error, match):
    before = _weights(model)
    with pytest.raises(error, match=match):
        cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
        trainer(max_epochs=1, callbacks=[cb]).fit(model, digits_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dst_checkpoints_are_plain_and_a_dst_run_resumes_exactly(tmp_path):
    def fit(root, epochs, ckpt_path=None):
        cb = SparseTrainingCallback(algorithm="dst", seed=0, figure=False)
        checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}")
        model = DigitsMLP(optimizer="adam", lr=1.0)
        L.seed_everything(0)
        trainer(max_epochs=epochs, callbacks=[cb, checkpoint], enable_checkpointing=True).fit(
            model, digits_loader(), ckpt_path=ckpt_path
        )
        return cb, model

    full_cb, full = fit(tmp_path / "full", 3)
    # after fit the model is plain and exactly sparse; its mid-run checkpoints load into the plain model
    assert not any("parametrizations" in n for n, _ in full.named_parameters())
    plain = DigitsMLP()
    plain.load_state_dict(torch.load(tmp_path / "full" / "epoch=0.ckpt", weights_only=True)["state_dict"])
    resumed_cb, resumed = fit(tmp_path / "resumed", 3, ckpt_path=tmp_path / "full" / "epoch=0.ckpt")
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name
    assert all(torch.equal(full_cb.masks[k], resumed_cb.masks[k]) for k in full_cb.masks)
    assert 0 < sum(int(m.sum()) for m in full_cb.masks.values()) < TOTAL


class _FrozenFirst(DigitsMLP):
    """The first layer frozen, as a pretrained backbone would be; the optimizer sees only what trains."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def test_frozen_layers_stay_dense_by_default(caplog):
    model = _FrozenFirst()
    frozen = model.net[0].weight.detach().clone()
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    with caplog.at_level("INFO", logger="lightning_sparse"):
        trainer(max_epochs=2, callbacks=[cb]).fit(model, digits_loader())
    assert set(cb.masks) == {"net.2.weight", "net.4.weight"}
    assert torch.equal(model.net[0].weight, frozen)  # not one weight of the frozen layer pruned
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(0.2 * (32 * 16 + 16 * 10))
    assert sum("frozen (requires_grad=False) weights left dense: net.0.weight" in r.message for r in caplog.records) == 1


def test_mask_frozen_masks_frozen_layers_and_keeps_their_masks():
    model = _FrozenFirst()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = SparseTrainingCallback(density=0.2, seed=0, mask_frozen=True, update_interval=4, figure=False)
    rec = MaskRecorder(cb)
    trainer(max_epochs=2, callbacks=[cb, rec]).fit(model, digits_loader())
    assert set(cb.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"} and rec.steps_checked == 2 * BATCHES
    assert cb.state_dict()["num_updates"] >= 4
    first = rec.epoch_masks[0]["net.0.weight"]
    assert torch.equal(cb.masks["net.0.weight"], first)  # the frozen layer's mask never moves
    assert any(not torch.equal(cb.masks[k], rec.epoch_masks[0][k]) for k in ("net.2.weight", "net.4.weight"))
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(0.2 * TOTAL)


def test_all_frozen_is_refused():
    model = DigitsMLP()
    model.requires_grad_(False)
    model.net[4].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"every maskable weight of DigitsMLP is frozen.*`mask_frozen=True`"):
        trainer(max_epochs=1, callbacks=[SparseTrainingCallback(density=0.2, figure=False)]).fit(model, digits_loader())


def test_ema_keeps_the_masks_of_every_sparse_callback():
    first = SparseTrainingCallback(density={"net.0.*": 0.2}, update_interval=4, seed=0, figure=False)
    second = SparseTrainingCallback(density=0.3, dense_layers=["net.0"], update_interval=4, seed=0, figure=False)
    ema = EMAWeightAveraging(decay=0.9)
    model = DigitsMLP()
    trainer(max_epochs=2, callbacks=[first, second, ema]).fit(model, digits_loader())
    averaged = dict(ema._average_model.module.named_parameters())
    params = dict(model.named_parameters())
    masks = {**first.masks, **second.masks}
    assert set(masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    for name, mask in masks.items():  # both callbacks' masks hold on the average and on the model it hands back
        assert int((averaged[name][~mask] != 0).sum()) == 0 and int((params[name][~mask] != 0).sum()) == 0, name


def test_fit_from_the_checkpoint_of_a_finished_run_trains_nothing_and_says_so(tmp_path):
    # examples' `--ckpt_path last` on a run that already reached max_epochs: no error, a warning, weights as saved
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=5, seed=0, figure=False, table=False)
    first = trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path, enable_checkpointing=True)
    model = DigitsMLP()
    first.fit(model, digits_loader())
    path = first.checkpoint_callback.best_model_path
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    again = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=5, seed=0, figure=False, table=False)
    second = trainer(max_epochs=1, callbacks=[again], default_root_dir=tmp_path)
    fresh = DigitsMLP()
    with pytest.warns(UserWarning, match="nothing was trained, the checkpoint's run had already reached its end"):
        second.fit(fresh, digits_loader(), ckpt_path=path)
    assert second.global_step == first.global_step
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert again.sparsifier is None
