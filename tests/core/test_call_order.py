"""How a loop drives a ``Sparsifier`` (issue 20): every resume order keeps the checkpoint's weights; a step AMP's
GradScaler skipped skips the update; calls in the wrong place, two Sparsifiers over one weight and a refusal at
the first step are caught, the model left as it was."""

import pytest
import torch
from torch import nn

from lightning_sparse import Sparsifier
from tests.helpers import digits_loader

STEPS = 12  # 2 epochs of 6 batches


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train(model, optimizer, sparsifier, steps, *, break_grad_at=None, scaler=None):
    """``steps`` optimizer steps on digits; at step ``break_grad_at`` one gradient is inf (a float16 overflow)."""
    loader = iter(digits_loader(n=300, batch_size=50))
    reports = []
    for step in range(1, steps + 1):
        try:
            x, y = next(loader)
        except StopIteration:
            loader = iter(digits_loader(n=300, batch_size=50))
            x, y = next(loader)
        loss = nn.functional.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if step == break_grad_at:
            model[1].weight.grad[0, 0] = float("inf")
        sparsifier.before_optimizer_step()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        reports.append(sparsifier.step())
        optimizer.zero_grad()
    return reports


def _rigl(model, optimizer, **kwargs):
    options = dict(density=0.2, algorithm="rigl", update_interval=4, total_steps=STEPS, seed=3)
    return Sparsifier(model, optimizer, **{**options, **kwargs})


# ----------------------------------------------------------------------------- resume, in every order


@pytest.fixture(scope="module")
def checkpoint():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    _train(model, optimizer, sparsifier, 6)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return weights, sparsifier.state_dict()


@pytest.mark.parametrize("order", ["load model, build, load state", "build, load model, load state", "state="])
def test_every_resume_order_ends_with_the_checkpoints_weights_and_masks(checkpoint, order):
    weights, state = checkpoint
    model = _mlp(seed=1)  # another initialization: nothing of it may survive
    optimizer = _optimizer(model)
    if order == "load model, build, load state":
        model.load_state_dict(weights)
        sparsifier = _rigl(model, optimizer)
        sparsifier.load_state_dict(state)
    elif order == "build, load model, load state":
        sparsifier = _rigl(model, optimizer)
        model.load_state_dict(weights)
        sparsifier.load_state_dict(state)
    else:
        model.load_state_dict(weights)
        sparsifier = _rigl(model, optimizer, state=state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for name, mask in sparsifier.masks.items():
        assert torch.equal(mask, state["masks"][name]), name
    assert int((weights["1.weight"] != 0).sum()) == int(state["masks"]["1.weight"].sum())  # trained, not redrawn


def test_the_state_dict_holds_copies_of_the_masks():
    model = _mlp()
    sparsifier = _rigl(model, _optimizer(model))
    before = {k: v.clone() for k, v in sparsifier.masks.items()}
    state = sparsifier.state_dict()
    state["masks"]["1.weight"].fill_(True)
    assert torch.equal(sparsifier.masks["1.weight"], before["1.weight"])


# ----------------------------------------------------------------------------- AMP's GradScaler


def test_a_step_the_grad_scaler_skips_moves_the_update_to_the_next_step():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    reports = _train(model, optimizer, sparsifier, STEPS, break_grad_at=4, scaler=scaler)
    assert scaler.get_scale() < 2.0**16  # the scaler did skip step 4
    assert [i + 1 for i, r in enumerate(reports) if r is not None] == [5, 8]
    assert reports[4].step == 5 and sparsifier.num_updates == 2
    for name, p in model.named_parameters():
        if name in sparsifier.masks:
            assert int((p.detach()[~sparsifier.masks[name]] != 0).sum()) == 0


def test_a_diverged_run_still_raises_under_the_grad_scaler():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite weights in layer\(s\) \['3.weight'\]: the loss diverged"):
        _train(model, optimizer, sparsifier, 2, scaler=torch.amp.GradScaler("cpu"))


# ----------------------------------------------------------------------------- calls in the wrong place


def _batch():
    x, y = next(iter(digits_loader(n=50, batch_size=50)))
    return x, y


def test_step_before_the_optimizer_step_is_refused_naming_the_order():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"no `optimizer.step\(\)` since its last call .* Call `sparsifier.step\(\)`"):
        sparsifier.step()


def test_step_once_per_micro_batch_is_refused():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    x, y = _batch()
    for micro in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        if micro == 0:  # an optimizer step, then a second micro-batch without one
            optimizer.step()
            sparsifier.step()
            continue
        with pytest.raises(RuntimeError, match="once per optimizer step, not per micro-batch"):
            sparsifier.step()
        break


def test_several_optimizer_steps_between_two_calls_are_refused():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.step()
    with pytest.raises(RuntimeError, match="the optimizer took 2 steps since the last `sparsifier.step"):
        sparsifier.step()


@pytest.mark.parametrize("set_to_none", [False, True])
def test_rigl_after_zero_grad_is_refused_at_its_update(set_to_none):
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    x, y = _batch()
    for step in range(1, 5):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step < 4:
            sparsifier.step()
            optimizer.zero_grad()
            continue
        optimizer.zero_grad(set_to_none=set_to_none)  # before step(): the update of step 4 would read nothing
        what = "no gradient" if set_to_none else "all-zero gradients"
        with pytest.raises(RuntimeError, match=f"masked weights have {what} at the update of step 4"):
            sparsifier.step()


def test_two_sparsifiers_over_the_same_weights_are_refused():
    model = _mlp()
    optimizer = _optimizer(model)
    first = Sparsifier(model, optimizer, density=0.5, algorithm="set", update_interval=4, total_steps=STEPS)
    second = Sparsifier(model, optimizer, density=0.5, algorithm="set", update_interval=4, total_steps=STEPS)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    second.step()
    with pytest.raises(RuntimeError, match=r"\['1.weight', '3.weight'\] are masked by another Sparsifier"):
        first.step()


def test_a_new_sparsifier_replaces_the_one_it_was_made_over():
    model = _mlp()
    optimizer = _optimizer(model)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="set", update_interval=4, total_steps=STEPS)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="set", update_interval=4, total_steps=STEPS)
    _train(model, optimizer, sparsifier, 4)  # a re-run notebook cell: the new one works
    assert sparsifier.num_updates == 1


# ----------------------------------------------------------------------------- a refusal leaves the model as it was


def test_rigls_missing_gradient_refusal_leaves_every_weight_as_it_was():
    model = _mlp()
    model.append(nn.Linear(10, 10))  # never used in the forward pass below
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = _optimizer(model)
    sparsifier = _rigl(model, optimizer)
    x, y = _batch()
    nn.functional.cross_entropy(model[:4](x), y).backward()
    with pytest.raises(ValueError, match=r"\['4.weight'\] got no gradient in the first step"):
        sparsifier.before_optimizer_step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
