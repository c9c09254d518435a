"""``compute="condensed"`` with the Sparsifier and the callback: the same masks after every update and the same
weights (float tolerance) as ``compute="dense"`` for RigL, SET, static and GMP, the refusals, resume, and
RigL's dense gradient at the update steps only."""

import pytest
import torch
from torch import nn

from lightning_sparse import SparseOptions, SparseTrainingCallback, Sparsifier
from tests.helpers import DigitsMLP, digits_loader, trainer


class ConvMLP(nn.Module):
    """A 1x1 convolution (stride 2), a 3x3 one (left dense-computed), Linear layers with a frozen-size input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 1, stride=2)
        self.fc1 = nn.Linear(16 * 16, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(torch.relu(self.conv3(x.view(-1, 1, 8, 8)))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _run(compute, algorithm, epochs=3, model_cls=ConvMLP, **options):
    torch.manual_seed(0)
    model = model_cls()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = digits_loader(n=400, batch_size=40)
    total = epochs * len(loader)
    defaults = {"density": 0.3, "update_interval": 4, "seed": 0, "pattern": "fan_in"}
    sparsifier = Sparsifier(model, optimizer, total_steps=total, algorithm=algorithm, compute=compute,
                            **{**defaults, **options})  # fmt: skip
    masks, dense_steps = [], []
    for _ in range(epochs):
        for x, y in loader:
            if sparsifier._compute is not None:
                dense_steps.append(sparsifier._compute.dense_gradients)
            nn.functional.cross_entropy(model(x), y).backward()
            sparsifier.before_optimizer_step()
            optimizer.step()
            if sparsifier.step() is not None:
                masks.append({k: v.clone() for k, v in sparsifier.masks.items()})
            optimizer.zero_grad()
    condensed = sparsifier.condensed_layers
    sparsifier.finish()
    return model, masks, condensed, dense_steps


@pytest.mark.parametrize("algorithm", ["rigl", "set", "static", "gmp"])
def test_condensed_run_equals_dense_run(algorithm):
    dense, dense_masks, none, _ = _run("dense", algorithm)
    condensed, condensed_masks, attached, dense_steps = _run("condensed", algorithm)
    assert none == [] and attached == ["conv1.weight", "fc1.weight", "fc2.weight"]
    assert len(dense_masks) == len(condensed_masks) and (algorithm == "static" or dense_masks)
    for a, b in zip(dense_masks, condensed_masks):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for (name, p), q in zip(dense.named_parameters(), condensed.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    if algorithm == "rigl":  # dense weight gradients before the updates only: steps 4, 8, ... (in the window)
        assert [i + 1 for i, d in enumerate(dense_steps) if d] == [4 * (j + 1) for j in range(len(dense_masks))]
    else:
        assert not any(dense_steps)
    assert all("forward" not in m.__dict__ for m in condensed.modules())  # finish() detached


def test_neuron_ablation_rows_left_empty():
    dense, dense_masks, _, _ = _run("dense", "rigl", neuron_ablation=0.6, density=0.2)
    condensed, condensed_masks, _, _ = _run("condensed", "rigl", neuron_ablation=0.6, density=0.2)
    assert any((~m.flatten(1).any(1)).any() for m in dense_masks[-1].values())  # some rows were emptied
    for a, b in zip(dense_masks, condensed_masks):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for p, q in zip(dense.parameters(), condensed.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"algorithm": "sparse_momentum"}, "momentum of every weight"),
        ({"algorithm": "dst", "density": None, "pattern": "unstructured"}, "DST trains"),
        ({"algorithm": "rigl", "pattern": "unstructured"}, "pattern='fan_in'"),
        ({"algorithm": "rigl", "pattern": "2:4", "density": None}, "pattern='fan_in'"),
        ({"algorithm": "rigl", "update_interval": "epoch"}, "epoch-end updates"),
        ({"algorithm": "rigl", "compute": "sparse"}, "`compute` can be 'dense', 'condensed'"),
    ],
)
def test_refusals(options, match):
    given = {"density": 0.3, "pattern": "fan_in", "compute": "condensed", **options}
    with pytest.raises(ValueError, match=match):
        SparseOptions(**given)
    with pytest.raises(ValueError, match=match):
        SparseTrainingCallback(**given)


def test_custom_rules_refused():
    from lightning_sparse import SparseAlgorithm

    algorithm = SparseAlgorithm(prune="magnitude", grow=lambda layer, n, ctx: None, redistribute="none")
    with pytest.raises(ValueError, match="custom prune"):
        SparseOptions(density=0.3, pattern="fan_in", algorithm=algorithm, compute="condensed")


def test_update_by_hand_refused_for_rigl():
    torch.manual_seed(0)
    model = ConvMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier = Sparsifier(model, optimizer, total_steps=100, algorithm="rigl", density=0.3, pattern="fan_in",
                            compute="condensed", update_interval=10)  # fmt: skip
    x, y = next(iter(digits_loader(n=40, batch_size=40)))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    sparsifier.step()
    with pytest.raises(RuntimeError, match="dense gradient"):
        sparsifier.update()


def test_resume_continues_as_the_uninterrupted_run():
    full, full_masks, _, _ = _run("condensed", "rigl", epochs=2)
    torch.manual_seed(0)
    model = ConvMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = digits_loader(n=400, batch_size=40)
    options = {"density": 0.3, "update_interval": 4, "seed": 0, "pattern": "fan_in", "algorithm": "rigl",
               "compute": "condensed"}  # fmt: skip
    sparsifier = Sparsifier(model, optimizer, total_steps=2 * len(loader), **options)
    batches = list(loader)
    for x, y in batches[:6]:  # stop after step 6: the next update is at step 8
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    saved = (model.state_dict(), optimizer.state_dict(), sparsifier.state_dict())
    torch.manual_seed(1)
    model = ConvMLP()
    model.load_state_dict(saved[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    optimizer.load_state_dict(saved[1])
    sparsifier = Sparsifier(model, optimizer, total_steps=2 * len(loader), state=saved[2], **options)
    assert sparsifier.condensed_layers == ["conv1.weight", "fc1.weight", "fc2.weight"]
    for x, y in batches[6:] + batches:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    assert all(torch.equal(full_masks[-1][n], m) for n, m in sparsifier.masks.items())
    for p, q in zip(full.parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


def test_callback_condensed_equals_dense():
    results = []
    for compute in ("dense", "condensed"):
        torch.manual_seed(0)
        model = DigitsMLP()
        callback = SparseTrainingCallback(density=0.3, algorithm="rigl", pattern="fan_in", update_interval=5, seed=0,
                                          compute=compute, figure=False)  # fmt: skip
        trainer(callbacks=[callback], max_epochs=2).fit(model, digits_loader())
        assert callback.compute == compute
        results.append((model, {k: v.clone() for k, v in callback.masks.items()}))
    (dense, dense_masks), (condensed, condensed_masks) = results
    assert all(torch.equal(dense_masks[n], condensed_masks[n]) for n in dense_masks)
    for p, q in zip(dense.parameters(), condensed.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)
