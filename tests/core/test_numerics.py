"""Numerics and layouts (issue 11, item 6): channels_last and non-contiguous weights for every method, non-finite
values at an update or in SNIP's scores, and gradient growth without a gradient."""

import pytest
import torch
from torch import nn

from lightning_sparse import Sparsifier
from lightning_sparse.core.masking import Masking

ALGORITHMS = ["sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp"]
DENSITY = 0.3
STEPS = 10


def _cnn() -> nn.Sequential:
    """Conv2d(1,4,3) -> ReLU -> Conv2d(4,8,3) -> flatten -> Linear on 8x8 inputs: channels_last convolutions and a
    transposed (non-contiguous) Linear weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    model = model.to(memory_format=torch.channels_last)
    model[4].weight = nn.Parameter(model[4].weight.detach().t().contiguous().t())
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 8, 8, generator=generator).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (32,), generator=generator)


def _optimizer(model: nn.Module, algorithm: str) -> torch.optim.Optimizer:
    if algorithm == "dsr":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _sparsifier(model: nn.Module, algorithm: str, **kwargs) -> tuple[Sparsifier, torch.optim.Optimizer]:
    optimizer = _optimizer(model, algorithm)
    sparsifier = Sparsifier(model, optimizer, density=DENSITY, algorithm=algorithm, total_steps=STEPS,
                            update_interval=2, seed=0, **kwargs)  # fmt: skip
    return sparsifier, optimizer


def _train_step(model, optimizer, sparsifier, x, y, corrupt=None):
    loss = nn.functional.cross_entropy(model(x), y)
    if sparsifier.needs_snip:
        sparsifier.snip(loss)
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    if corrupt is not None:
        corrupt()
    report = sparsifier.step()
    optimizer.zero_grad()
    return report


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_channels_last_and_non_contiguous_weights_for_every_method(algorithm):
    model = _cnn()
    convs = [model[0].weight, model[2].weight]
    linear = model[4].weight
    linear_stride = linear.stride()
    assert not linear.is_contiguous() and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    params = dict(model.named_parameters())
    ids = {n: id(p) for n, p in params.items()}
    sparsifier, optimizer = _sparsifier(model, algorithm)
    x, y = _data()
    for _ in range(STEPS):
        _train_step(model, optimizer, sparsifier, x, y)

    dynamic = algorithm not in ("static", "snip")
    assert sparsifier.num_updates == (4 if dynamic else 0)  # steps 2, 4, 6, 8 (GMP's window ends at 7.5)
    total = sum(w.numel() for w in (*convs, linear))
    assert sum(int(m.sum()) for m in sparsifier.masks.values()) == round(DENSITY * total)  # GMP: at its target
    assert sum(sparsifier.masking.active) == round(DENSITY * total)
    for name, mask in sparsifier.masks.items():
        weight = params[name]
        assert mask.shape == weight.shape and mask.dtype == torch.bool
        assert int((weight.detach()[~mask] != 0).sum()) == 0, name  # zero outside the mask
        assert torch.isfinite(weight).all()
    assert {n: id(p) for n, p in model.named_parameters()} == ids  # the same parameters, updated in place
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert linear.stride() == linear_stride


@pytest.mark.parametrize("algorithm", ["rigl", "set", "gmp"])
def test_an_update_picks_the_same_masks_whatever_the_layout(algorithm):
    """The masks depend on the values only: the same weights and gradients in channels_last and contiguous
    layouts give the same masks (positions are logical, row-major indices, not memory offsets)."""
    masks = []
    for channels_last in (True, False):
        model = _cnn()
        if not channels_last:
            model = model.to(memory_format=torch.contiguous_format)
            model[4].weight = nn.Parameter(model[4].weight.detach().contiguous())
        sparsifier, _ = _sparsifier(model, algorithm)
        generator = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        sparsifier.step_count = 4
        sparsifier.update()
        masks.append(dict(sparsifier.masks))
    for name in masks[0]:
        assert masks[0][name].is_contiguous()
        assert torch.equal(masks[0][name], masks[1][name]), name


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_applying_a_mask_keeps_a_channels_last_weight_in_place(kernel):
    weight = nn.Parameter(torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last))
    expected = weight.detach().clone()
    mask = torch.rand(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    storage = weight.data_ptr()
    masking = Masking({"w": weight}, {"w": mask}, kernel=kernel)
    masking.apply_()
    assert masking.masks[0] is not weight and weight.data_ptr() == storage
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight.detach(), expected * mask)


# ----------------------------------------------------------------------------- non-finite values at an update
def _active_index(sparsifier: Sparsifier, name: str) -> tuple[int, ...]:
    return tuple(int(i) for i in sparsifier.masks[name].nonzero()[0])


def _run_until_error(model, optimizer, sparsifier, corrupt_at: int, corrupt):
    x, y = _data()
    for step in range(1, STEPS + 1):
        _train_step(model, optimizer, sparsifier, x, y, corrupt if step == corrupt_at else None)


def test_a_diverged_loss_with_set_names_the_layers():
    model = _cnn()
    sparsifier, optimizer = _sparsifier(model, "set")
    x, y = _data()
    _train_step(model, optimizer, sparsifier, x, y)
    before = {n: m.clone() for n, m in sparsifier.masks.items()}
    loss = nn.functional.cross_entropy(model(x), y) * float("nan")  # the loss diverged
    loss.backward()
    optimizer.step()
    with pytest.raises(FloatingPointError) as error:
        sparsifier.step()
    assert str(error.value) == (
        "non-finite weights in layer(s) ['0.weight', '2.weight', '4.weight'] at the mask update of step 2: the loss"
        " diverged (lower the learning rate, or use gradient clipping)"
    )
    assert isinstance(error.value, ArithmeticError)
    assert sparsifier.num_updates == 0 and all(torch.equal(before[n], m) for n, m in sparsifier.masks.items())


@pytest.mark.parametrize(
    ("algorithm", "tensor", "kind"),
    [
        ("set", "weight", "weights"),
        ("sparse_momentum", "weight", "weights"),
        ("sparse_momentum", "momentum", "momentum"),
        ("rigl", "weight", "weights"),
        ("rigl", "grad", "gradients"),
    ],
)
def test_a_non_finite_value_at_an_update_names_its_layer_and_tensor(algorithm, tensor, kind):
    model = _cnn()
    sparsifier, optimizer = _sparsifier(model, algorithm)
    weight = model[2].weight

    def corrupt():
        with torch.no_grad():
            if tensor == "weight":
                weight[_active_index(sparsifier, "2.weight")] = float("nan")
            elif tensor == "momentum":
                optimizer.state[weight]["momentum_buffer"][0, 0, 0, 0] = float("inf")
            else:
                weight.grad[0, 0, 0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match=rf"^non-finite {kind} in layer\(s\) \['2.weight'\] at the mask"
                                                 r" update of step 4: the loss diverged \(lower the learning rate,"
                                                 r" or use gradient clipping\)$"):  # fmt: skip
        _run_until_error(model, optimizer, sparsifier, 4, corrupt)
    assert sparsifier.num_updates == 1


def test_several_non_finite_tensors_are_all_named():
    model = _cnn()
    sparsifier, optimizer = _sparsifier(model, "rigl")

    def corrupt():
        with torch.no_grad():
            model[0].weight[_active_index(sparsifier, "0.weight")] = float("inf")
            model[4].weight.grad[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match=r"^non-finite weights in layer\(s\) \['0.weight'\] and gradients"
                                                 r" in layer\(s\) \['4.weight'\] at the mask update of step 2"):  # fmt: skip
        _run_until_error(model, optimizer, sparsifier, 2, corrupt)


# ----------------------------------------------------------------------------- SNIP
def test_snip_refuses_a_non_finite_loss():
    model = _cnn()
    sparsifier, _ = _sparsifier(model, "snip")
    x, y = _data()
    loss = nn.functional.cross_entropy(model(x), y) * float("nan")
    with pytest.raises(FloatingPointError, match=r"^SNIP: the loss of the scoring batch is non-finite \(and so are the"
                                                 r" scores \|g \* w\| of layer\(s\) \['0.weight', '2.weight',"
                                                 r" '4.weight'\]\): score a batch with a finite loss"):  # fmt: skip
        sparsifier.snip(loss)
    assert sparsifier.needs_snip  # no masks were picked
    assert all(bool(m.all()) for m in sparsifier.masks.values())


def test_snip_refuses_non_finite_scores_and_names_the_layer():
    model = _cnn()
    sparsifier, _ = _sparsifier(model, "snip")
    x, y = _data()
    model[2].weight.register_hook(lambda g: g.index_put((torch.tensor([0]),) * 4, torch.tensor(float("nan"))))
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match=r"^SNIP: non-finite scores \|g \* w\| in layer\(s\) \['2.weight'\]:"
                                                 r" the weights or the scoring batch's gradients hold NaN or inf"):  # fmt: skip
        sparsifier.snip(loss)
    assert sparsifier.needs_snip


# ----------------------------------------------------------------------------- gradient growth without a gradient
class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(16, 8)
        self.unused = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.used(x)))


def _linear_step(model, optimizer, sparsifier, zero_grad_first=False):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    if zero_grad_first:
        optimizer.zero_grad()
    sparsifier.step()
    optimizer.zero_grad()


def test_rigl_names_a_masked_layer_without_gradient_at_the_first_step():
    model = _WithUnusedLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="rigl", total_steps=1000, seed=0)
    with pytest.raises(ValueError) as error:
        _linear_step(model, optimizer, sparsifier)
    assert str(error.value) == (
        "gradient growth (RigL) reads the gradient of every masked weight, but ['unused.weight'] got no gradient in"
        " the first step: use those layers in the forward pass, or leave them dense with"
        " `dense_layers=['unused.weight']`"
    )
    # the fix the message gives works
    model = _WithUnusedLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="rigl", total_steps=1000, seed=0,
                            dense_layers=["unused.weight"])  # fmt: skip
    _linear_step(model, optimizer, sparsifier)
    assert sparsifier.step_count == 1


def test_rigl_says_when_step_comes_after_zero_grad():
    model = _WithUnusedLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="rigl", total_steps=1000, seed=0,
                            dense_layers=["unused"])  # fmt: skip
    with pytest.raises(ValueError, match=r"\['used.weight', 'head.weight'\] got no gradient in the first step \(no"
                                         r" masked weight has one: call `sparsifier.step\(\)` after"
                                         r" `optimizer.step\(\)` and before `optimizer.zero_grad\(\)`\)"):  # fmt: skip
        _linear_step(model, optimizer, sparsifier, zero_grad_first=True)


def test_methods_without_gradient_growth_accept_an_unused_layer():
    model = _WithUnusedLayer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.5, algorithm="set", total_steps=10, update_interval=1, seed=0)
    _linear_step(model, optimizer, sparsifier)
    assert sparsifier.num_updates == 1
