"""DST (:mod:`lightning_sparse.methods.dst`): its alpha chosen for the network (reference:
``mnist/train_argument.py`` 5e-4, ``cifar/train_argument.py`` 1e-6), the long-tailed estimator, and its thresholds
in training (gradients, checkpoints, collapse)."""

import logging
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse import (
    DST,
    SparseTrainingCallback,
    Sparsifier,
)
from lightning_sparse.methods.dst import (
    ALPHA_LARGE,
    ALPHA_LENET,
    LENET_MAX_WEIGHTS,
    LongTailedStep,
    default_alpha,
    long_tailed_derivative,
)
from tests.helpers import DigitsMLP, digits, digits_loader, trainer


def test_dst_default_alpha_rule():
    # the paper's networks: LeNet-300-100 266,200 and LeNet-5-Caffe 430,500 masked weights -> 5e-4;
    # VGG-16 (CIFAR, the reference's masked_vgg) 14,977,728 -> 1e-6. The threshold is 1,000,000.
    assert LENET_MAX_WEIGHTS == 1_000_000
    assert default_alpha(784 * 300 + 300 * 100 + 100 * 10) == ALPHA_LENET == 5e-4
    assert default_alpha(20 * 25 + 50 * 20 * 25 + 800 * 500 + 500 * 10) == 5e-4
    assert default_alpha(1_000_000) == 5e-4
    assert default_alpha(1_000_001) == ALPHA_LARGE == 1e-6
    assert default_alpha(14_977_728) == 1e-6
    assert DST().alpha is None
    assert DST().alpha_for(266_200) == 5e-4 and DST().alpha_for(14_977_728) == 1e-6
    assert DST(alpha=2e-4).alpha_for(14_977_728) == 2e-4  # explicit values are kept
    assert DST(alpha=0.0).alpha_for(10) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        DST(alpha=-1e-3)


@pytest.mark.parametrize(
    ("out_features", "algorithm", "expected"),
    [
        (1000, DST(), 5e-4),  # 1000 x 1000 = 1,000,000 masked weights: LeNet size
        (1001, DST(), 1e-6),  # 1,001,000: larger
        (1001, DST(alpha=3e-4), 3e-4),
        (10, "dst", 5e-4),
    ],
)
def test_dst_sparsifier_uses_the_alpha_for_the_network(out_features, algorithm, expected, caplog):
    model = nn.Linear(1000, out_features, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with caplog.at_level(logging.INFO, logger="lightning_sparse.methods.dst_sparsifier"):
        sparsifier = Sparsifier(model, opt, algorithm=algorithm)
    assert sparsifier.alpha == expected
    chosen = [r.getMessage() for r in caplog.records if "DST: alpha" in r.getMessage()]
    if isinstance(algorithm, DST) and algorithm.alpha is not None:
        assert not chosen
    else:
        assert chosen and f"alpha = {expected:g} chosen for {1000 * out_features} masked weights" in chosen[0]
    # the regularizer's gradient at t = 0 is -alpha * exp(0) = -alpha per threshold
    (threshold,) = [t.threshold for t in sparsifier.thresholds.values()]
    sparsifier.before_optimizer_step()
    assert torch.allclose(threshold.grad, torch.full_like(threshold, -expected))


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
