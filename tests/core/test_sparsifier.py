"""The Lightning-free core: a plain PyTorch loop and a Lightning Fabric loop with ``Sparsifier``; and the callback
bound late (``configure_model``, a second model, ``ddp_spawn``)."""


import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse import DSTSparsifier, SparseTrainingCallback, Sparsifier
from tests.helpers import DigitsMLP, digits, digits_loader, trainer

EPOCHS = 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def _assert_masked(model: nn.Module, sparsifier: Sparsifier) -> None:
    params = dict(model.named_parameters())
    for name, mask in sparsifier.masks.items():
        assert int((params[name].detach()[~mask] != 0).sum()) == 0, name


def _plain_loop(model, optimizer, sparsifier, epochs=EPOCHS, check=True):
    loader = digits_loader(n=300)
    masks = []
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sparsifier.before_optimizer_step()
            optimizer.step()
            sparsifier.step()
            optimizer.zero_grad()
            if check:
                _assert_masked(model, sparsifier)
        sparsifier.epoch_end()
        masks.append({k: v.clone() for k, v in sparsifier.masks.items()})
    sparsifier.finish()
    return masks


def test_plain_pytorch_loop():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.2, seed=0, total_steps=EPOCHS * 6)
    assert list(sparsifier.masks) == ["1.weight", "3.weight", "5.weight"]
    expected = [round(0.2 * n) for n in (64 * 32, 32 * 16, 16 * 10)]
    assert sparsifier.masking.active == expected
    masks = _plain_loop(model, optimizer, sparsifier)
    assert sparsifier.num_updates == EPOCHS - 1  # every epoch but the last
    assert sparsifier.step_count == EPOCHS * 6
    assert sum(int(m.sum()) for m in sparsifier.masks.values()) == sum(expected)  # the total is kept exactly
    assert not all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])  # the masks moved

    # the same seed gives the same run; a resumed Sparsifier continues from the checkpoint's state
    state = sparsifier.state_dict()
    other = _mlp()
    again = Sparsifier(other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), density=0.2, seed=0,
                       total_steps=EPOCHS * 6, state=state)  # fmt: skip
    assert all(torch.equal(again.masks[k], v) for k, v in sparsifier.masks.items())
    assert again.num_updates == sparsifier.num_updates and again.step_count == sparsifier.step_count


def test_plain_loop_refusals_touch_nothing():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparse momentum needs an optimizer that keeps a momentum"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=100, density=0.2)
    with pytest.raises(ValueError, match=r"the optimizer does not update the masked weight\(s\) \['5.weight'\]"):
        Sparsifier(model, torch.optim.SGD(model[1:4].parameters(), lr=0.1, momentum=0.9), total_steps=100, density=0.2)
    with pytest.raises(ValueError, match="the 'cosine' prune-rate schedule needs the length of training"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.2, total_steps=-1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plain_loop_snip_and_dst():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.1, algorithm="snip")
    with pytest.raises(RuntimeError, match=r"call `sparsifier.snip\(loss\)`"):
        sparsifier.step()
    x, y = digits()
    sparsifier.snip(nn.functional.cross_entropy(model(x[:50]), y[:50]))
    assert sum(int(m.sum()) for m in sparsifier.masks.values()) == round(0.1 * (64 * 32 + 32 * 16 + 16 * 10))
    assert all(p.grad is None for p in model.parameters())  # the scoring batch left no gradients behind
    _plain_loop(model, optimizer, sparsifier, epochs=1)

    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # made before the thresholds exist
    sparsifier = Sparsifier(model, optimizer, algorithm="dst")
    assert isinstance(sparsifier, DSTSparsifier) and len(optimizer.param_groups) == 2
    _plain_loop(model, optimizer, sparsifier, epochs=2, check=False)
    assert all(float(t.threshold.abs().sum()) > 0 for t in sparsifier.thresholds.values())  # trained
    keys = set(model.state_dict())
    assert keys == {f"{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")}  # a plain model again
    assert sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")) > 0


def test_fabric_loop():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(digits_loader(n=300))
    sparsifier = Sparsifier(model.module, optimizer, algorithm="rigl", density=0.2, update_interval=4,
                            total_steps=2 * len(loader), seed=0)  # fmt: skip
    start = {k: v.clone() for k, v in sparsifier.masks.items()}
    for _ in range(2):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            sparsifier.step()
            optimizer.zero_grad()
            _assert_masked(model.module, sparsifier)
        sparsifier.epoch_end()
    assert sparsifier.num_updates == 2  # steps 4 and 8 of 12 (RigL stops at 75%)
    assert [int(m.sum()) for m in sparsifier.masks.values()] == [int(m.sum()) for m in start.values()]
    assert not all(torch.equal(start[k], v) for k, v in sparsifier.masks.items())


class BuiltLate(DigitsMLP):
    """Builds its network in ``configure_model``, as Lightning recommends for large models."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = None
        self.width = width

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(64, self.width), nn.ReLU(), nn.Linear(self.width, 10))


def test_layers_built_in_configure_model_are_masked_and_one_callback_serves_two_models():
    cb = SparseTrainingCallback(density=0.25, seed=0, figure=False)
    first = BuiltLate(32)
    trainer(callbacks=[cb], max_epochs=2).fit(first, digits_loader(n=200))
    assert list(cb.masks) == ["net.0.weight", "net.2.weight"]
    assert cb.masks["net.0.weight"].shape == (32, 64)
    second = BuiltLate(24)  # a sweep: the same callback on another model
    trainer(callbacks=[cb], max_epochs=2).fit(second, digits_loader(n=200))
    assert cb.masks["net.0.weight"].shape == (24, 64)
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(0.25 * 24 * 64) + round(0.25 * 10 * 24)
    for name, mask in cb.masks.items():
        assert int((dict(second.named_parameters())[name].detach()[~mask] != 0).sum()) == 0


def test_a_version_1_state_still_loads():
    # lightning-sparse 0.1 wrote version 1 without `step_count`; its masks and counters load as they are
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    old = Sparsifier(model, optimizer, total_steps=100, density=0.2, seed=3).state_dict()
    old = {k: v for k, v in old.items() if k not in ("step_count", "snip_pending")}
    old.update(version=1, last_update_step=12, num_updates=2, prune_rate=0.25)
    other = _mlp()
    resumed = Sparsifier(other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), total_steps=100, density=0.2, state=old)
    assert all(torch.equal(resumed.masks[k], v) for k, v in old["masks"].items())
    assert (resumed.last_update_step, resumed.num_updates, resumed.current_prune_rate) == (12, 2, 0.25)
    assert resumed.step_count == 12
    with pytest.raises(ValueError, match="has version 3; this lightning-sparse reads up to 2"):
        resumed.load_state_dict({**old, "version": 3})


def test_a_second_fit_of_the_same_model_keeps_its_masks():
    cb = SparseTrainingCallback(density=0.3, algorithm="static", seed=0, figure=False)
    model = DigitsMLP()
    trainer(callbacks=[cb], max_epochs=1).fit(model, digits_loader(n=200))
    first = {k: v.clone() for k, v in cb.masks.items()}
    trainer(callbacks=[cb], max_epochs=1).fit(model, digits_loader(n=200))
    assert all(torch.equal(first[k], v) for k, v in cb.masks.items())


@pytest.mark.parametrize(
    ("options", "needs"),
    [
        (dict(algorithm="gmp"), "the update window \\(stop_at=0.75\\) and GMP's pruning schedule need"),
        (dict(algorithm="rigl"), "the 'cosine' prune-rate schedule and the update window \\(stop_at=0.75\\) need"),
        (dict(algorithm="sparse_momentum"), "the 'cosine' prune-rate schedule needs"),
        (dict(algorithm="set", prune_rate_schedule="constant", stop_at=0.5), "the update window \\(stop_at=0.5\\) needs"),
    ],
)
def test_a_schedule_that_needs_the_length_of_training_refuses_a_missing_total_steps(options, needs):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=f"{needs} the length of training, which is unknown \\(got None\\): .*`total_steps`"):
        Sparsifier(model, optimizer, density=0.2, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any mask is drawn


@pytest.mark.parametrize(
    "options",
    [dict(algorithm="static"), dict(algorithm="snip"), dict(algorithm="set", prune_rate_schedule="constant")],
)
def test_schedules_without_a_length_accept_a_missing_total_steps(options):
    model = _mlp()
    sparsifier = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.2, **options)
    assert sparsifier.total_steps == math.inf


def test_density_groups_that_no_layer_falls_into_are_refused_by_name():
    model = _mlp()  # masked layers 1.weight, 3.weight, 5.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"the `density` group '\*\.atn\.\*' matches no maskable layer; the maskable"
                                         r" layers are: 1.weight, 3.weight, 5.weight"):  # fmt: skip
        Sparsifier(model, optimizer, density={"*.atn.*": 0.5, "*": 0.1}, total_steps=100)
    with pytest.raises(ValueError, match=r"the `density` group '3\*' is shadowed: every layer it matches \(3.weight\)"
                                         r" falls into the earlier group\(s\) \['\*'\]"):  # fmt: skip
        Sparsifier(model, optimizer, density={"*": 0.1, "3*": 0.5}, total_steps=100)
    with pytest.raises(ValueError, match=r"the `density` group '5' matches no maskable layer"):  # kept dense
        Sparsifier(model, optimizer, density={"5": 0.5, "*": 0.1}, dense_layers=["5"], total_steps=100)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cb = SparseTrainingCallback(density={"*": 0.1, "net.2*": 0.5}, seed=0, figure=False)  # the callback, at fit
    with pytest.raises(ValueError, match=r"the `density` group 'net.2\*' is shadowed"):
        trainer(callbacks=[cb], max_epochs=1).fit(DigitsMLP(), digits_loader(n=100))
    other = _mlp()
    grouped = Sparsifier(other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), total_steps=100,
                         density={"3*": 0.5, "5": 1.0, "*": 0.1})  # fmt: skip  # every group used
    assert grouped.layer_groups == ["*", "3*"]


def test_snip_names_the_layers_it_leaves_empty():
    model = _mlp()
    with torch.no_grad():
        model[5].weight.zero_()  # its scores |g * w| are 0, and so are 3.weight's (no gradient flows back through 5)
    sparsifier = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.1,
                            algorithm="snip")  # fmt: skip
    x, y = digits()
    with pytest.warns(UserWarning, match=r"SNIP leaves 0 active weights in 3.weight, 5.weight: none of their scores \|g \* w\|"
                                         r" made the top 0.1 \(all zero, or too low for this density\)"):  # fmt: skip
        sparsifier.snip(nn.functional.cross_entropy(model(x[:50]), y[:50]))
    assert sparsifier.masking.active[1:] == [0, 0] and sum(sparsifier.masking.active) == round(0.1 * (64 * 32 + 32 * 16 + 160))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every layer keeps a weight
        other = _mlp()
        snip = Sparsifier(other, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9), density=0.1, algorithm="snip")
        snip.snip(nn.functional.cross_entropy(other(x[:50]), y[:50]))
