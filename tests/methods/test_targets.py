"""Structured patterns in updates (``methods/targets.py``, ``pattern="N:M"`` / ``"fan_in"``): every method keeping
the pattern after every step and update in a plain loop, the refusals, resume and one Trainer fit (FSDP2 shards:
``test_targets_fsdp.py``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_sparse import SparseAlgorithm, SparseTrainingCallback, Sparsifier
from lightning_sparse.functional.patterns import (
    check_pattern,
    nm_groups_view,
    parse_pattern,
    unit_counts,
)
from lightning_sparse.functional.schedules import gmp_sparsity

ALGORITHMS = ["sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp"]
TOTAL_STEPS = 8


# ----------------------------------------------------------------------------- plain loops, every method


class Conv1D(nn.Module):
    """transformers' Conv1D (weight stored [in, out]), recognized by class name and module."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


Conv1D.__module__ = "transformers.pytorch_utils"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))


def _cnn() -> nn.Module:
    return nn.Sequential(  # input dims 4*3*3 = 36, 8*3*3 = 72, 8*2*2 = 32
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 8),
    )  # fmt: skip


def _gpt() -> nn.Module:
    return nn.Sequential(Conv1D(32, 16), nn.ReLU(), Conv1D(8, 32))  # weights [16, 32] and [32, 8]


MODELS = {"mlp": (_mlp, (16,)), "cnn": (_cnn, (4, 6, 6)), "conv1d": (_gpt, (16,))}


def _assert_pattern(sparsifier: Sparsifier, pattern: str, per_unit: dict[str, int] | None = None) -> dict[str, int]:
    """Every unit counted: N of every M (or ``per_unit``: GMP on its way), equal rows; weights zero outside the
    masks; the host counts exact. Returns each layer's count per unit."""
    parsed = parse_pattern(pattern)
    counts = {}
    params = dict(sparsifier.model.named_parameters())
    for name, mask in sparsifier.masks.items():
        transposed = sparsifier.layers[name].transposed
        units = unit_counts(mask, parsed, transposed)
        assert int(units.min()) == int(units.max()), (name, units)
        counts[name] = int(units[0])
        if parsed.kind == "nm":
            assert units.numel() == mask.numel() // parsed.m
            assert counts[name] == (per_unit[name] if per_unit else parsed.n), (name, counts[name])
        else:
            assert units.numel() == mask.shape[1 if transposed else 0]
            if per_unit:
                assert counts[name] == per_unit[name], (name, counts[name], per_unit[name])
        assert check_pattern(mask, pattern, transposed) or (parsed.kind == "nm" and per_unit)
        assert int((params[name].detach()[~mask] != 0).sum()) == 0
    assert sparsifier.masking.active == [int(m.sum()) for m in sparsifier.masks.values()]
    return counts


def _run(model_name: str, algorithm: str, pattern: str, density: float | None, **kwargs):
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=density, algorithm=algorithm, pattern=pattern, seed=0,
                            update_interval=2, total_steps=TOTAL_STEPS, mask_kernel="torch", **kwargs)  # fmt: skip
    x, y = torch.randn(16, *shape), torch.randint(0, 8, (16,))
    if algorithm == "snip":
        sparsifier.snip(nn.functional.cross_entropy(model(x), y))
    return model, optimizer, sparsifier, x, y


def _gmp_targets(sparsifier: Sparsifier, pattern: str, density: float) -> dict[str, int]:
    """GMP's per-unit target after its last update (N_t of M, or k_t inputs per row)."""
    report = sparsifier.last_update
    progress = report.progress if report is not None else 0.0
    parsed = parse_pattern(pattern)
    keep = 1.0 - gmp_sparsity(progress, final=1.0 - density)
    targets = {}
    for name, mask in sparsifier.masks.items():
        size = (
            parsed.m
            if parsed.kind == "nm"
            else (mask.shape[0] if sparsifier.layers[name].transposed else mask[0].numel())
        )
        targets[name] = math.floor(keep * size + 0.5 + 1e-9)
    return targets


CASES = [(m, a, p) for m in ("mlp", "cnn") for a in ALGORITHMS for p in ("2:4", "fan_in")]
CASES += [("mlp", a, "4:8") for a in ("sparse_momentum", "rigl", "gmp")] + [("cnn", "set", "1:4")]
CASES += [("conv1d", a, p) for a in ("sparse_momentum", "rigl", "set", "snip", "gmp") for p in ("2:4", "fan_in")]


@pytest.mark.parametrize("model_name,algorithm,pattern", CASES)
def test_every_method_keeps_the_pattern_after_every_step_and_update(model_name, algorithm, pattern):
    density = None if ":" in pattern else 0.3
    model, optimizer, sparsifier, x, y = _run(model_name, algorithm, pattern, density)
    nm = parse_pattern(pattern).density
    if nm is not None:
        assert sparsifier.options.density == nm
    gmp = algorithm == "gmp"
    first = _assert_pattern(sparsifier, pattern, _gmp_targets(sparsifier, pattern, nm or 0.3) if gmp else None)
    total = sum(sparsifier.masking.active)
    layer_counts = list(sparsifier.masking.active)
    history = [{k: v.clone() for k, v in sparsifier.masks.items()}]
    updates = 0
    for _ in range(TOTAL_STEPS):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        report = sparsifier.step()
        optimizer.zero_grad()
        updates += report is not None
        per_unit = _gmp_targets(sparsifier, pattern, nm or 0.3) if gmp else None
        counts = _assert_pattern(sparsifier, pattern, per_unit)
        if report is not None and not gmp:
            result = report.result
            assert result.active == sparsifier.masking.active
            assert [a - p + g for a, p, g in zip(layer_counts, result.pruned, result.grown)] == result.active
        if not gmp:
            assert sum(sparsifier.masking.active) == total  # the group's total is kept exactly
        if algorithm in ("rigl", "set", "static", "snip") or ":" in pattern and not gmp:
            assert sparsifier.masking.active == layer_counts  # no redistribution: every layer keeps its count
            assert counts == first
        layer_counts = list(sparsifier.masking.active)
        history.append({k: v.clone() for k, v in sparsifier.masks.items()})
    changed = any(not torch.equal(a[k], b[k]) for a, b in zip(history, history[1:]) for k in a)
    if algorithm in ("static", "snip"):
        assert updates == 0 and not changed
    else:
        assert updates >= 2 and changed
    if gmp:  # the window's end (stop_at 0.75): N of every M, or round(density * fan_in) inputs per row
        final = _assert_pattern(sparsifier, pattern)
        for name, mask in sparsifier.masks.items():
            if nm is not None:
                assert final[name] == parse_pattern(pattern).n
            else:
                fan_in = mask.shape[0] if sparsifier.layers[name].transposed else mask[0].numel()
                assert final[name] == math.floor(0.3 * fan_in + 0.5)


def test_fan_in_counts_follow_the_init():
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    uniform = Sparsifier(model, optimizer, density=0.3, algorithm="static", pattern="fan_in", seed=0)
    # k_l = round(0.3 * fan_in): 16 -> 5, 32 -> 10 (9.6), 24 -> 7 (7.2); totals rows x k
    assert uniform.masking.active == [32 * 5, 24 * 10, 8 * 7]
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    erk = Sparsifier(model, optimizer, density=0.3, algorithm="static", init="erk", pattern="fan_in", seed=0)
    from lightning_sparse.functional.init import layer_active_counts

    shapes = [(32, 16), (24, 32), (8, 24)]
    counts = layer_active_counts(shapes, 0.3, "erk")
    assert erk.masking.active == [r * math.floor(c / r + 0.5) for (r, _), c in zip(shapes, counts)]
    _assert_pattern(erk, "fan_in")


def test_static_masks_are_random_within_units_and_seeded():
    def masks(seed):
        torch.manual_seed(1)
        model = _cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return Sparsifier(model, optimizer, algorithm="static", pattern="2:4", seed=seed).masks

    a, b, c = masks(3), masks(3), masks(4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    groups = nm_groups_view(a["0.weight"], 4)  # every position of a group is used by some group
    assert bool(groups.any(0).all())


def test_snip_keeps_the_top_scores_of_every_unit():
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, optimizer, algorithm="snip", pattern="2:4", seed=0)
    x, y = torch.randn(16, 16), torch.randint(0, 8, (16,))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    sparsifier.snip(nn.functional.cross_entropy(model(x), y))
    for name, mask in sparsifier.masks.items():
        score = nm_groups_view((grads[name] * weights[name]).abs(), 4)
        kept = nm_groups_view(mask, 4)
        assert bool((kept.sum(1) == 2).all())
        # the kept scores of each group are its two largest
        assert bool(((score * kept).sum(1) >= score.topk(2, dim=1).values.sum(1) - 1e-6).all())


def test_redistribution_moves_whole_rows_and_keeps_the_total():
    model, optimizer, sparsifier, x, y = _run("mlp", "sparse_momentum", "fan_in", 0.3, prune_rate=0.5,
                                              prune_rate_schedule="constant")  # fmt: skip
    rows = [32, 24, 8]
    start = list(sparsifier.masking.active)
    for _ in range(TOTAL_STEPS):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
        assert all(a % r == 0 for a, r in zip(sparsifier.masking.active, rows))
        assert sum(sparsifier.masking.active) == sum(start)
    assert sparsifier.num_updates >= 3


# ----------------------------------------------------------------------------- refusals


def _model_and_optimizer(make=_mlp):
    torch.manual_seed(0)
    model = make()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_nm_fixes_the_density():
    model, optimizer = _model_and_optimizer()
    with pytest.raises(
        ValueError, match=r"pattern='2:4' fixes every masked layer's density at 2/4 = 0.5: give density=0.5 or leave"
    ):
        Sparsifier(model, optimizer, density=0.3, pattern="2:4")
    with pytest.raises(ValueError, match=r"every `density` group must be 0.25 \(or 1.0 to keep it dense\)"):
        SparseTrainingCallback(density={"0.*": 0.25, "*": 0.5}, pattern="1:4")
    callback = SparseTrainingCallback(algorithm="rigl", pattern="1:4")
    assert callback.density == 0.25 and callback.pattern == "1:4"
    grouped = Sparsifier(model, optimizer, density={"4.*": 1.0, "*": 0.5}, algorithm="static", pattern="2:4")
    assert grouped.names == ["0.weight", "2.weight"] and "4.weight" not in grouped.masks  # the 1.0 group is dense
    _assert_pattern(grouped, "2:4")
    assert SparseTrainingCallback(density=0.5000000001, pattern="2:4").density == 0.5


def test_layers_whose_input_dimension_is_not_a_multiple_of_m_are_refused_by_name():
    def cnn():
        return nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2)
        )

    model, optimizer = _model_and_optimizer(cnn)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError,
        match=r"multiple of 4; not for 0.weight \(input dimension 9\), 5.weight \(input dimension 3\)\. Keep those layers dense with `dense_layers=\['0.weight', '5.weight'\]`",
    ):
        Sparsifier(model, optimizer, total_steps=100, pattern="2:4")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing touched
    sparsifier = Sparsifier(model, optimizer, total_steps=100, pattern="2:4", dense_layers=["0", "5"], algorithm="static")
    assert sparsifier.names == ["2.weight", "4.weight"]
    _assert_pattern(sparsifier, "2:4")
    Sparsifier(*_model_and_optimizer(cnn), total_steps=100, density=0.5, pattern="fan_in")  # fan_in takes any input dimension


def test_dst_and_methods_without_growth_are_refused():
    with pytest.raises(
        ValueError,
        match=r"algorithm 'dst' learns per-neuron thresholds.*`pattern` must be 'unstructured' for DST, got '2:4'",
    ):
        SparseTrainingCallback(algorithm="dst", pattern="2:4")
    with pytest.raises(ValueError, match="`pattern` must be 'unstructured' for DST, got 'fan_in'"):
        Sparsifier(*_model_and_optimizer(), algorithm="dst", pattern="fan_in")
    prune_only = SparseAlgorithm(grow="none", redistribute="none")
    with pytest.raises(ValueError, match=r"pattern='fan_in' needs a method that regrows what it prunes"):
        SparseTrainingCallback(density=0.5, algorithm=prune_only, pattern="fan_in")
    with pytest.raises(
        ValueError,
        match=r"`pattern` can be 'unstructured', 'N:M' with integers 1 <= N < M \(e.g. '2:4', '1:4', '4:8'\) or 'fan_in', got '3:2'",
    ):
        SparseTrainingCallback(density=0.5, pattern="3:2")


def test_a_growth_rule_that_breaks_the_pattern_is_named():
    def anywhere(layer, mask, n, generator):  # grows without LayerState.add_highest/add_random
        from lightning_sparse.functional.prune_grow import add_highest

        return add_highest(layer.grad.abs(), mask, n)

    algorithm = SparseAlgorithm(grow=anywhere, redistribute="none", update_interval=2)
    model, optimizer, sparsifier, x, y = _run("mlp", algorithm, "2:4", None)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    sparsifier.step()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.raises(
        RuntimeError, match=r"pattern='2:4': the update left units off their target \(0.weight: \d+ units"
    ):
        sparsifier.step()


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("algorithm,pattern", [("rigl", "2:4"), ("sparse_momentum", "fan_in"), ("gmp", "2:4")])
def test_resume_keeps_the_pattern(algorithm, pattern):
    density = None if ":" in pattern else 0.3
    model, optimizer, sparsifier, x, y = _run("cnn", algorithm, pattern, density)
    for _ in range(4):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    state = sparsifier.state_dict()
    assert state["pattern"] == pattern
    resumed_model = _cnn()
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # own momentum buffers
    resumed = Sparsifier(resumed_model, resumed_optimizer, density=density, algorithm=algorithm, pattern=pattern,
                         update_interval=2, total_steps=TOTAL_STEPS, state=state)  # fmt: skip
    assert all(torch.equal(sparsifier.masks[k], resumed.masks[k]) for k in sparsifier.masks)
    for _ in range(4):  # further updates keep the pattern, exactly as the uninterrupted run
        for m, o, s in ((model, optimizer, sparsifier), (resumed_model, resumed_optimizer, resumed)):
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
            o.zero_grad()
        assert all(torch.equal(sparsifier.masks[k], resumed.masks[k]) for k in sparsifier.masks)
        _assert_pattern(resumed, pattern, _gmp_targets(sparsifier, pattern, 0.5) if algorithm == "gmp" else None)
    assert resumed.num_updates == sparsifier.num_updates >= 3

    other = "fan_in" if ":" in pattern else "2:4"
    with pytest.raises(ValueError, match=rf"trained with pattern='{pattern}', this run asks for pattern='{other}'"):
        Sparsifier(_cnn(), torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9), total_steps=100, algorithm=algorithm,
                   density=0.5 if other == "2:4" else 0.3, pattern=other, state=state)  # fmt: skip


def test_an_unstructured_checkpoint_does_not_resume_a_structured_run():
    model, optimizer = _model_and_optimizer()
    state = Sparsifier(model, optimizer, density=0.5, algorithm="rigl", update_interval=2, total_steps=10).state_dict()
    with pytest.raises(ValueError, match=r"trained with pattern='unstructured', this run asks for pattern='2:4'"):
        Sparsifier(model, optimizer, algorithm="rigl", pattern="2:4", update_interval=2, total_steps=10, state=state)
    del state["pattern"]  # a state written before patterns existed was unstructured
    with pytest.raises(ValueError, match=r"pattern='unstructured'"):
        Sparsifier(model, optimizer, algorithm="rigl", pattern="2:4", update_interval=2, total_steps=10, state=state)
    Sparsifier(
        model, optimizer, density=0.5, algorithm="rigl", update_interval=2, total_steps=10, state=state
    )  # unstructured: fine


def test_masks_that_break_the_pattern_are_refused_on_load():
    model, optimizer = _model_and_optimizer()
    sparsifier = Sparsifier(model, optimizer, algorithm="rigl", pattern="2:4", update_interval=2, total_steps=10)
    state = sparsifier.state_dict()
    state["masks"]["2.weight"] = torch.ones_like(state["masks"]["2.weight"])
    with pytest.raises(ValueError, match=r"masks of \['2.weight'\] do not hold pattern='2:4'"):
        sparsifier.load_state_dict(state)
    state["masks"]["2.weight"][0, :2] = False  # uneven groups
    with pytest.raises(ValueError, match=r"masks of \['2.weight'\] do not hold pattern='2:4'"):
        sparsifier.load_state_dict(state)
    model, optimizer = _model_and_optimizer()
    sparsifier = Sparsifier(
        model, optimizer, density=0.3, algorithm="rigl", pattern="fan_in", update_interval=2, total_steps=10
    )
    state = sparsifier.state_dict()
    state["masks"]["0.weight"][0] = True  # one row fuller than the others
    with pytest.raises(ValueError, match=r"masks of \['0.weight'\] do not hold pattern='fan_in'"):
        sparsifier.load_state_dict(state)


# ----------------------------------------------------------------------------- Trainer


def test_trainer_fit_with_a_2_4_pattern():
    from tests.helpers import DigitsMLP, digits_loader, trainer

    torch.manual_seed(0)
    callback = SparseTrainingCallback(algorithm="rigl", pattern="2:4", update_interval=2, seed=0, figure=False,
                                      mask_kernel="torch")  # fmt: skip
    module = DigitsMLP()
    trainer(max_steps=8, callbacks=[callback]).fit(module, digits_loader(n=200))
    sparsifier = callback.sparsifier
    assert sparsifier.num_updates >= 2 and callback.density == 0.5
    _assert_pattern(sparsifier, "2:4")
    assert "pattern 2:4" in sparsifier.describe()
    assert callback.state_dict()["pattern"] == "2:4"
