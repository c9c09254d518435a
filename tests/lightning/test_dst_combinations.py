"""DST with what it is combined with (issue 20, items 9 and 11): weight averaging callbacks in either order,
another sparse callback over the same layers, a checkpoint of another algorithm, and refusals that leave the
model as it was (no DST thresholds left on it)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse import SparseTrainingCallback
from tests.helpers import DigitsMLP, digits_loader, trainer


class BuiltLate(DigitsMLP):
    """The MLP built in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=1.0)
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def _model(built: str) -> DigitsMLP:
    torch.manual_seed(0)
    return DigitsMLP(optimizer="adam", lr=1.0) if built == "init" else BuiltLate()


def _parametrized(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]


def _dst(**kwargs: Any) -> SparseTrainingCallback:
    return SparseTrainingCallback(algorithm="dst", seed=0, figure=False, **kwargs)


@pytest.mark.parametrize(
    "averaging, built",
    [("ema", "init"), ("ema", "configure_model"), ("swa", "init")],  # Lightning's SWA copies no configure_model layers
)
def test_weight_averaging_before_or_after_a_dst_callback_gives_the_same_run(averaging, built):
    def fit(order: str) -> tuple[DigitsMLP, SparseTrainingCallback]:
        cb = _dst()
        average = EMAWeightAveraging(decay=0.9) if averaging == "ema" else StochasticWeightAveraging(0.05, 1)
        model = _model(built)
        L.seed_everything(0)
        trainer(max_epochs=2, callbacks=[average, cb] if order == "averaging_first" else [cb, average]).fit(
            model, digits_loader()
        )
        return model, cb

    first_model, first = fit("averaging_first")  # crashed at step 1 (a tensor size mismatch) before the fix
    last_model, last = fit("sparse_first")
    assert _parametrized(first_model) == _parametrized(last_model) == []  # DST folded its thresholds at the end
    for (name, p), (_, q) in zip(first_model.named_parameters(), last_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # the model handed back is the average, the same in either order
    assert all(torch.equal(first.masks[k], last.masks[k]) for k in last.masks)
    assert 0 < sum(int(m.sum()) for m in first.masks.values()) < sum(m.numel() for m in first.masks.values())


@pytest.mark.parametrize("built", ["init", "configure_model"])
@pytest.mark.parametrize("dst_first", [True, False])
def test_dst_overlapping_another_callback_is_refused_leaving_no_thresholds(built, dst_first):
    model = _model(built)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callbacks = [_dst(), SparseTrainingCallback(density=0.5, algorithm="rigl", seed=0, figure=False)]
    with pytest.raises(ValueError, match=r"two SparseTrainingCallbacks mask the same weights \['net.0.weight'"):
        trainer(max_epochs=1, callbacks=callbacks if dst_first else callbacks[::-1]).fit(model, digits_loader())
    assert _parametrized(model) == []  # was 3 modules
    after = model.state_dict()  # (the layers `configure_model` built stay: the user's code built them)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert "configure_model" not in vars(model)  # the callback's hook after `configure_model` is taken off


class _TwoOptimizers(DigitsMLP):
    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[:2].parameters()), torch.optim.Adam(self.net[2:].parameters())]


class _CrashesAtStepOne(DigitsMLP):
    def training_step(self, batch, batch_idx):
        raise KeyError("the user's bug")


@pytest.mark.parametrize(
    "model, match",
    [
        (_TwoOptimizers(), "multiple optimizers"),  # refused by Lightning after DST's `setup`
        (_CrashesAtStepOne(optimizer="adam"), "the user's bug"),  # before the first optimizer step
    ],
)
def test_a_refused_dst_run_leaves_no_thresholds_on_the_model(model, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = _dst()
    with pytest.raises((KeyError, RuntimeError), match=match):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, digits_loader())
    assert _parametrized(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert cb.sparsifier is None


def test_a_dst_resume_with_other_layers_is_refused_by_name_leaving_no_thresholds(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(max_epochs=1, callbacks=[_dst(), checkpoint], enable_checkpointing=True).fit(
        DigitsMLP(optimizer="adam"), digits_loader()
    )
    model = DigitsMLP(optimizer="adam")
    with pytest.raises(ValueError, match=r"the checkpoint's DST layers \['net.0.weight', 'net.2.weight', 'net.4"):
        trainer(max_epochs=2, callbacks=[_dst(dense_layers=["net.4"])]).fit(
            model, digits_loader(), ckpt_path=tmp_path / "last.ckpt"
        )
    assert _parametrized(model) == []


@pytest.mark.parametrize("saved, resumed", [("dst", "rigl"), ("rigl", "dst")])
def test_resuming_a_checkpoint_of_the_other_algorithm_is_refused_naming_both(tmp_path, saved, resumed):
    def cb(algorithm: str) -> SparseTrainingCallback:
        density = None if algorithm == "dst" else 0.2
        return SparseTrainingCallback(density=density, algorithm=algorithm, seed=0, figure=False)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer(max_epochs=1, callbacks=[cb(saved), checkpoint], enable_checkpointing=True).fit(
        DigitsMLP(optimizer="adam"), digits_loader()
    )
    model = DigitsMLP(optimizer="adam")
    with pytest.raises(ValueError, match=rf"trained with algorithm '{saved}', this run asks for '{resumed}'"):
        trainer(max_epochs=2, callbacks=[cb(resumed)]).fit(model, digits_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert _parametrized(model) == []
