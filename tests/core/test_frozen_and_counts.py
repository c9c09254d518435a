"""Frozen masked layers (``mask_frozen=True``) with every method and with an optimizer over the trainable
parameters only; and the refusal of a custom rule that grows or prunes another count than asked (issue 20,
items 5 and 6)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sparse import SparseAlgorithm, SparseTrainingCallback, Sparsifier
from lightning_sparse.methods.rules import largest_remainder
from tests.helpers import DigitsMLP, digits_loader, trainer

SIZES = (64 * 32, 32 * 16, 16 * 10)  # the masked weights of _mlp, the first one frozen
DENSITY = 0.2
STEPS = 24  # 4 epochs of the 300-example digits loader (6 batches each)


def _mlp(frozen: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    if frozen:
        model[1].requires_grad_(False)  # a pretrained first layer, frozen
    return model


def _trainable_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The usual way to freeze: the optimizer sees only what trains."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def _loop(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier, steps: int = STEPS) -> list:
    """A plain loop (SNIP's batch first when it waits for one); the masks after every step."""
    loader = digits_loader(n=300)
    if sparsifier.needs_snip:
        x, y = next(iter(loader))
        sparsifier.snip(nn.functional.cross_entropy(model(x), y))
    masks = []
    while len(masks) < steps:
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sparsifier.step()
            optimizer.zero_grad()
            masks.append({k: v.clone() for k, v in sparsifier.masks.items()})
        sparsifier.epoch_end()
    return masks


# ----------------------------------------------------------------------------- item 6: mask_frozen, per method
@pytest.mark.parametrize("algorithm", ["sparse_momentum", "rigl", "set", "dsr", "static", "gmp", "snip"])
def test_an_optimizer_over_the_trainable_parameters_only_works_with_every_method(algorithm):
    model = _mlp()
    frozen = model[1].weight.detach().clone()
    optimizer = _trainable_optimizer(model)
    sparsifier = Sparsifier(model, optimizer, density=DENSITY, algorithm=algorithm, mask_frozen=True, seed=0,
                            update_interval=4, total_steps=STEPS)  # fmt: skip
    assert list(sparsifier.masks) == ["1.weight", "3.weight", "5.weight"]
    start = {k: v.clone() for k, v in sparsifier.masks.items()}
    masks = _loop(model, optimizer, sparsifier)
    assert sparsifier.num_updates == (0 if algorithm in ("static", "snip") else STEPS // 4 - 1)  # not after the last
    assert not model[1].weight.requires_grad and model[1].weight.grad is None
    mask = sparsifier.masks["1.weight"]
    assert torch.equal(model[1].weight[mask], frozen[mask])  # a frozen weight never trains: kept as it was ...
    assert int((model[1].weight[~mask] != 0).sum()) == 0  # ... or masked to zero
    asked = round(DENSITY * sum(SIZES))
    assert sum(sparsifier.masking.active) == sum(int(m.sum()) for m in sparsifier.masks.values()) == asked
    if algorithm in ("sparse_momentum", "rigl", "set", "dsr", "static"):  # the frozen layer's mask is fixed
        assert all(torch.equal(m["1.weight"], start["1.weight"]) for m in masks)
    if algorithm in ("sparse_momentum", "rigl", "set", "dsr"):  # while the trained layers' masks move
        assert not torch.equal(masks[-1]["3.weight"], start["3.weight"])


def test_gmp_prunes_frozen_layers_on_its_schedule_to_the_asked_density():
    model = _mlp()
    optimizer = _trainable_optimizer(model)
    sparsifier = Sparsifier(model, optimizer, density=DENSITY, algorithm="gmp", mask_frozen=True, seed=0,
                            update_interval=4, total_steps=STEPS)  # fmt: skip
    assert sparsifier.masking.active == list(SIZES)  # GMP starts dense, the frozen layer too
    masks = _loop(model, optimizer, sparsifier)
    # every layer, the frozen one too, ends at GMP's per-layer target: the total is the asked density exactly
    assert sparsifier.masking.active == largest_remainder([DENSITY * n for n in SIZES])
    assert [int(masks[-1][k].sum()) for k in ("1.weight", "3.weight", "5.weight")] == sparsifier.masking.active
    assert sum(sparsifier.masking.active) == round(DENSITY * sum(SIZES))
    frozen_counts = [int(m["1.weight"].sum()) for m in masks]
    assert frozen_counts[0] == SIZES[0] > frozen_counts[-1]  # pruned step by step on the schedule
    assert frozen_counts == sorted(frozen_counts, reverse=True) and len(set(frozen_counts)) == 1 + STEPS // 4 - 1
    # pruned by |W|: every active frozen weight is at least as large as every pruned one
    weight, mask = _mlp()[1].weight.detach().abs(), sparsifier.masks["1.weight"]
    assert float(weight[mask].min()) >= float(weight[~mask].max())


def test_snip_scores_frozen_layers_like_trained_ones_and_keeps_them_frozen():
    def snip_masks(frozen: bool) -> tuple[nn.Module, Sparsifier]:
        model = _mlp(frozen)
        sparsifier = Sparsifier(model, _trainable_optimizer(model), density=DENSITY, algorithm="snip",
                                mask_frozen=True, seed=0)  # fmt: skip
        x, y = next(iter(digits_loader(n=300)))
        sparsifier.snip(nn.functional.cross_entropy(model(x), y))
        return model, sparsifier

    model, sparsifier = snip_masks(frozen=True)
    _, reference = snip_masks(frozen=False)  # the same weights, nothing frozen: SNIP as the paper has it
    for name, mask in reference.masks.items():  # the frozen layer is scored by its own |g * w|, exactly
        assert torch.equal(sparsifier.masks[name], mask), name
    assert 0 < int(sparsifier.masks["1.weight"].sum()) < SIZES[0]
    assert sum(sparsifier.masking.active) == round(DENSITY * sum(SIZES))
    assert not model[1].weight.requires_grad and model[1].weight.grad is None  # frozen again, no gradient kept
    assert model[3].weight.requires_grad and model[3].weight.grad is None


def test_snip_keeps_frozen_layers_frozen_when_a_checkpoint_picked_the_masks():
    model = _mlp()
    sparsifier = Sparsifier(model, _trainable_optimizer(model), density=DENSITY, algorithm="snip", mask_frozen=True)
    assert sparsifier.needs_snip
    x, y = next(iter(digits_loader(n=300)))
    sparsifier.snip(nn.functional.cross_entropy(model(x), y))
    state = sparsifier.state_dict()
    other = _mlp()
    again = Sparsifier(other, _trainable_optimizer(other), density=DENSITY, algorithm="snip", mask_frozen=True)
    again.load_state_dict(state)  # the masks are picked: the frozen layer is frozen again
    assert not again.needs_snip and not other[1].weight.requires_grad
    assert all(torch.equal(again.masks[k], v) for k, v in sparsifier.masks.items())


def test_dst_learns_the_masks_of_frozen_layers_with_their_thresholds():
    model = _mlp()
    frozen = model[1].weight.detach().clone()
    optimizer = _trainable_optimizer(model)
    sparsifier = Sparsifier(model, optimizer, algorithm="dst", mask_frozen=True, seed=0)
    threshold = sparsifier.thresholds["1.weight"].threshold
    assert threshold.requires_grad and sparsifier.names == ["1.weight", "3.weight", "5.weight"]
    start = threshold.detach().clone()
    loader = digits_loader(n=300)
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    assert not torch.equal(threshold.detach(), start)  # the frozen layer's threshold trains
    mask = sparsifier.masks["1.weight"]
    sparsifier.finish()
    assert not model[1].weight.requires_grad
    assert torch.equal(model[1].weight[mask], frozen[mask]) and int((model[1].weight[~mask] != 0).sum()) == 0


class _FrozenFirst(DigitsMLP):
    """The first layer frozen; the optimizer sees only what trains."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


@pytest.mark.parametrize("algorithm", ["gmp", "snip"])
def test_trainer_with_a_frozen_layer_and_mask_frozen(algorithm):
    model = _FrozenFirst()
    frozen = model.net[0].weight.detach().clone()
    cb = SparseTrainingCallback(density=DENSITY, algorithm=algorithm, mask_frozen=True, seed=0, figure=False,
                                **({"update_interval": 4} if algorithm == "gmp" else {}))  # fmt: skip
    trainer(max_epochs=2, callbacks=[cb]).fit(model, digits_loader())
    total = 64 * 32 + 32 * 16 + 16 * 10
    assert set(cb.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert sum(int(m.sum()) for m in cb.masks.values()) == round(DENSITY * total)
    mask = cb.masks["net.0.weight"]
    assert 0 < int(mask.sum()) < 64 * 32  # the frozen layer is masked by the method, not left dense
    assert not model.net[0].weight.requires_grad
    assert torch.equal(model.net[0].weight[mask], frozen[mask]) and int((model.net[0].weight[~mask] != 0).sum()) == 0


# ----------------------------------------------------------------------------- item 5: rules with wrong counts
def half_growth(layer, mask, n, generator):
    """A wrong growth rule: grows half of what it is asked for."""
    return layer.add_random(mask, n // 2, generator)


def half_prune(layer, n):
    """A wrong prune rule: removes half of what it is asked for."""
    return layer.drop_lowest(layer.weight.detach().abs(), layer.mask, n // 2)


def _masked_state(model: nn.Module, sparsifier: Sparsifier) -> dict[str, torch.Tensor]:
    """The model's weights as ``step()`` leaves them without an update: this step's weights under the masks."""
    masks = sparsifier.masks
    return {k: v.detach() * masks[k] if k in masks else v.detach().clone() for k, v in model.state_dict().items()}


def _custom_run(**rules) -> tuple[nn.Module, Sparsifier, torch.optim.Optimizer]:
    model = _mlp(frozen=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algorithm = SparseAlgorithm(**rules, redistribute="none", update_interval=2)
    sparsifier = Sparsifier(model, optimizer, density=DENSITY, algorithm=algorithm, seed=0, total_steps=STEPS)
    x, y = next(iter(digits_loader(n=300)))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    sparsifier.step()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model, sparsifier, optimizer


def test_a_growth_rule_that_grows_another_count_is_refused_and_touches_nothing():
    def exact(layer, mask, n, generator):
        return layer.add_random(mask, n, generator)

    _, right, _ = _custom_run(grow=exact)  # the check passes a rule that grows what it is asked for
    assert right.step() is not None and sum(right.masking.active) == round(DENSITY * sum(SIZES))

    model, sparsifier, _ = _custom_run(grow=half_growth)
    weights = _masked_state(model, sparsifier)
    masks = {k: v.clone() for k, v in sparsifier.masks.items()}
    active, described = list(sparsifier.masking.active), sparsifier.describe()
    generator, updates = sparsifier.generator.get_state(), sparsifier.num_updates
    # the rate at step 2 (cosine from 0.5) prunes ceil(rate * active) of each layer; half of it grows back
    with pytest.raises(
        RuntimeError,
        match=r"a mask update got counts other than those asked \(1\.weight: the growth rule 'half_growth' was asked"
        r" to grow (\d+) weights and grew \d+ \(\d+ active, asked 410\); 3\.weight: .*5\.weight: .*\), which would"
        r" leave the masks off the asked density: .* a growth rule `mask` with exactly `n` more.*"
        r"The masks and weights are left as they were",
    ):
        sparsifier.step()
    # refused before anything was set: weights (masked as every step does), masks, counts, random state and the
    # update count as they were
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(masks[k], v) for k, v in sparsifier.masks.items())
    assert sparsifier.masking.active == active and sparsifier.describe() == described
    assert torch.equal(sparsifier.generator.get_state(), generator) and sparsifier.num_updates == updates


def test_a_prune_rule_that_prunes_another_count_is_refused_naming_it():
    model, sparsifier, _ = _custom_run(prune=half_prune, grow="random")
    weights = _masked_state(model, sparsifier)
    with pytest.raises(
        RuntimeError,
        match=r"\(1\.weight: the prune rule 'half_prune' was asked to remove (\d+) of 410 active weights and left"
        r" \d+ \(asked \d+\);.*a prune rule must return `layer.mask` with exactly `n` fewer active entries",
    ):
        sparsifier.step()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
