"""SRigL's neuron ablation under pattern="fan_in": the cutoff, one update on a hand-made layer, whole runs (every
row empty or at its layer's k, budgets kept), resume, refusals, and the condensed export of emptied rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_sparse import ALGORITHMS, SparseAlgorithm, SparseTrainingCallback, Sparsifier
from lightning_sparse.export import CondensedLinear, to_condensed
from lightning_sparse.functional.patterns import check_pattern, unit_counts
from lightning_sparse.functional.units import ablation_cutoff, fill_units, trim_units
from lightning_sparse.methods import ABLATION_BUDGETS, LayerState, UpdateContext

# ----------------------------------------------------------------------------- tensor math


def test_ablation_cutoff():
    histogram = [3, 1, 0, 2, 4]  # 3 rows with no salient weight, 1 with one, 2 with three, 4 with four
    assert ablation_cutoff(histogram, threshold=2, keep=2) == 2  # rows under 2 go: 4 of 10
    assert ablation_cutoff(histogram, threshold=1, keep=2) == 1  # the 3 rows without a salient weight
    assert ablation_cutoff(histogram, threshold=4, keep=4) == 4  # the 4 rows at 4 stay
    assert ablation_cutoff(histogram, threshold=4, keep=5) == 3  # 5 must stay: the cutoff drops to the 5th row's 3
    assert ablation_cutoff(histogram, threshold=4, keep=7) == 1
    assert ablation_cutoff(histogram, threshold=4, keep=10) == 0  # every row must stay
    assert ablation_cutoff(histogram, threshold=1, keep=11) == 0  # more than the rows: nothing ablated
    assert ablation_cutoff([0, 0, 5], threshold=1, keep=1) == 1  # every row salient: none below 1


def test_fill_and_trim_units_take_a_target_per_row():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    score = torch.tensor([[1.0, 2, 3, 4], [4, 3, 2, 1], [1, 2, 3, 4]])
    targets = torch.tensor([3, 0, 2])
    trimmed = trim_units(score, mask, targets, "fan_in")
    assert trimmed.int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]
    assert fill_units(score, trimmed, targets, "fan_in").int().tolist() == [[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    assert check_pattern(torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool), "fan_in", empty_rows=True)
    assert not check_pattern(torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool), "fan_in", empty_rows=True)


def _hand_made_layer() -> LayerState:
    """4 rows of 8 inputs, 2 active per row (inputs 0 and 1); rows 2 and 3 have tiny weights and gradients."""
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :2] = True
    weight = torch.zeros(4, 8)
    weight[:, :2] = torch.tensor([[5.0, 4.0], [3.0, 2.5], [0.1, 0.2], [0.05, 0.01]])
    grad = torch.full((4, 8), 0.01)
    grad[0, 2:6] = torch.tensor([9.0, 8.0, 7.0, 6.0])
    grad[1, 2:6] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    return LayerState("w", weight, mask, grad_fn=lambda: grad)


def test_one_update_ablates_the_rows_without_salient_weights_and_gives_their_budget_to_the_others():
    # RigL prunes floor(0.5 * 8) = 4: the weights of rows 2 and 3. Salient: the 4 kept (rows 0, 1) and the 4 largest
    # gradients (row 0, inputs 2..5): rows 2 and 3 hold none, under max(1, int(0.3 * 2)) = 1, and 8 // 8 + 1 = 2
    # rows must stay. The budget 8 goes to the 2 rows left: k = 4, grown by gradient within each row.
    layer = _hand_made_layer()
    state: dict = {}
    context = UpdateContext(rate=0.5, pattern="fan_in", ablation=0.3, state=state)
    result = ALGORITHMS["rigl"].update([layer], [8], context)
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[:2, :4] = True
    assert torch.equal(result.masks[0], expected)
    assert result.active == [8] and result.pruned == [4] and result.grown == [4]
    assert state[ABLATION_BUDGETS] == {"w": 8}

    # the same layer with row 2 kept whole by name: nothing happens to it, its k stays 2... and the layer's k with it
    layer = _hand_made_layer()
    context = UpdateContext(rate=0.5, pattern="fan_in", ablation=0.3, keep_neurons=frozenset({"w"}))
    result = ALGORITHMS["rigl"].update([layer], [8], context)
    assert unit_counts(result.masks[0], "fan_in").tolist() == [2, 2, 2, 2]


def test_ablation_never_leaves_fewer_rows_than_hold_the_budget():
    # 4 rows of 4 inputs, 3 active each: 12 weights need 4 rows of at most 4, so no row may go, whatever gamma
    mask = torch.tensor([[1, 1, 1, 0]] * 4, dtype=torch.bool)
    weight = torch.where(mask, torch.tensor([[4.0, 3, 2, 0], [4, 3, 2, 0], [1e-3, 1e-3, 1e-3, 0], [1e-4, 1e-4, 1e-4, 0]]), 0.0)
    grad = torch.zeros(4, 4)
    grad[0, 3], grad[1, 3] = 1.0, 0.5
    layer = LayerState("w", weight, mask, grad_fn=lambda: grad)
    result = ALGORITHMS["rigl"].update([layer], [12], UpdateContext(rate=0.5, pattern="fan_in", ablation=1.0))
    assert unit_counts(result.masks[0], "fan_in").tolist() == [3, 3, 3, 3]


# ----------------------------------------------------------------------------- whole runs


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 6))


def _sparsifier(model, algorithm="rigl", gamma=1.0, **kwargs) -> Sparsifier:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = {"density": 0.2, "update_interval": 3, "total_steps": 60, "seed": 0, "mask_kernel": "torch"}
    return Sparsifier(model, optimizer, algorithm=algorithm, pattern="fan_in", neuron_ablation=gamma,
                      **{**options, **kwargs})  # fmt: skip


def _steps(sparsifier: Sparsifier, x, y, n: int, check=None) -> None:
    model, optimizer = sparsifier.model, sparsifier.optimizer
    for _ in range(n):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
        if check is not None:
            check(sparsifier)


def _rows(sparsifier: Sparsifier) -> dict[str, tuple[int, int]]:
    """Per layer (emptied rows, k): every row of every layer is empty or at k; weights zero outside the masks."""
    params = dict(sparsifier.model.named_parameters())
    found = {}
    for name, mask in sparsifier.masks.items():
        counts = unit_counts(mask, "fan_in")
        k = int(counts.max())
        assert bool(((counts == 0) | (counts == k)).all()), (name, counts)
        assert int((params[name].detach()[~mask] != 0).sum()) == 0
        found[name] = (int((counts == 0).sum()), k)
    assert sparsifier.masking.active == [int(m.sum()) for m in sparsifier.masks.values()]
    return found


@pytest.mark.parametrize("algorithm", ["rigl", "sparse_momentum"])
def test_every_row_is_empty_or_at_k_after_every_step_and_the_budgets_hold(algorithm):
    model = _mlp()
    sparsifier = _sparsifier(model, algorithm)
    start = list(sparsifier.masking.active)
    x, y = torch.randn(64, 32), torch.randint(0, 6, (64,))
    seen = []

    def check(s: Sparsifier) -> None:
        rows = _rows(s)
        seen.append(rows)
        assert rows["4.weight"][0] == 0  # the last layer (the classes) keeps its neurons by default
        budgets = s.algorithm_state.get(ABLATION_BUDGETS)
        if budgets is None:
            return
        alive = [s.masks[n].shape[0] - rows[n][0] for n in s.names]
        if algorithm == "rigl":  # fixed budgets: each layer holds alive * (budget // alive)
            assert [budgets[n] for n in s.names] == start
            assert s.masking.active == [b // a * a for b, a in zip(start, alive)]
        else:  # redistributed budgets: the total is kept exactly
            assert sum(budgets.values()) == sum(start) == sum(s.masking.active)

    _steps(sparsifier, x, y, 30, check)
    assert sparsifier.num_updates >= 9
    assert any(rows["0.weight"][0] + rows["2.weight"][0] > 0 for rows in seen)  # rows were ablated
    grown_k = max(rows["0.weight"][1] for rows in seen)
    assert grown_k > round(0.2 * 32)  # the emptied rows' budget went to the others


def test_resume_with_ablation_continues_exactly_and_checks_the_option():
    x, y = torch.randn(64, 32), torch.randint(0, 6, (64,))
    model = _mlp()
    sparsifier = _sparsifier(model)
    _steps(sparsifier, x, y, 7)
    assert sum(r[0] for r in _rows(sparsifier).values()) > 0
    state = sparsifier.state_dict()
    assert state["neuron_ablation"] == 1.0 and ABLATION_BUDGETS in state["algorithm_state"]
    resumed_model = _mlp()
    resumed_model.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(copy.deepcopy(sparsifier.optimizer.state_dict()))
    resumed = Sparsifier(resumed_model, optimizer, algorithm="rigl", density=0.2, update_interval=3, total_steps=60,
                         pattern="fan_in", neuron_ablation=1.0, mask_kernel="torch", state=state)  # fmt: skip
    kept = copy.deepcopy(state)
    for _ in range(3):
        _steps(sparsifier, x, y, 3)
        _steps(resumed, x, y, 3)
        assert all(torch.equal(sparsifier.masks[n], resumed.masks[n]) for n in sparsifier.names)
        assert sparsifier.algorithm_state == resumed.algorithm_state
    assert kept["algorithm_state"] == state["algorithm_state"]  # the state handed out is not the live one

    with pytest.raises(ValueError, match=r"trained with neuron_ablation=1.0, this run asks for neuron_ablation=None"):
        Sparsifier(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), total_steps=100, algorithm="rigl", density=0.2,
                   pattern="fan_in", state=state)  # fmt: skip
    broken = copy.deepcopy(state)
    mask = broken["masks"]["0.weight"]
    full = int(unit_counts(mask, "fan_in").max())
    row = int((unit_counts(mask, "fan_in") == full).nonzero()[0])
    mask[row] = False
    mask[row, : full - 1] = True  # one row neither empty nor at k
    model = _mlp()
    with pytest.raises(ValueError, match=r"masks of \['0.weight'\] do not hold pattern='fan_in'"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=100, algorithm="rigl", density=0.2,
                   pattern="fan_in", neuron_ablation=1.0, state=broken)  # fmt: skip


def test_keep_neurons_names_the_layers_left_whole():
    x, y = torch.randn(64, 32), torch.randint(0, 6, (64,))
    sparsifier = _sparsifier(_mlp(), keep_neurons=["0", "4.weight"])
    assert sparsifier.keep_neurons == {"0.weight", "4.weight"}
    assert sparsifier.describe().endswith(", pattern fan_in, neuron ablation 1")
    _steps(sparsifier, x, y, 15)
    rows = _rows(sparsifier)
    assert rows["0.weight"][0] == 0 and rows["4.weight"][0] == 0
    with pytest.raises(ValueError, match=r"`keep_neurons` entry 'head' matches no masked layer; the masked layers"
                                         r" are: 0.weight, 2.weight, 4.weight"):  # fmt: skip
        _sparsifier(_mlp(), keep_neurons=["head"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"neuron_ablation": 0.3}, r"needs pattern='fan_in', got pattern='unstructured'"),
        ({"neuron_ablation": 0.3, "pattern": "2:4", "density": 0.5}, r"needs pattern='fan_in', got pattern='2:4'"),
        ({"neuron_ablation": 0.0, "pattern": "fan_in"}, r"a number in \(0, 1\].*got 0.0"),
        ({"neuron_ablation": 1.5, "pattern": "fan_in"}, r"a number in \(0, 1\].*got 1.5"),
        ({"neuron_ablation": "0.3", "pattern": "fan_in"}, r"a number in \(0, 1\].*got '0.3'"),
        ({"neuron_ablation": True, "pattern": "fan_in"}, r"a number in \(0, 1\].*got True"),
        ({"neuron_ablation": 0.3, "pattern": "fan_in", "algorithm": "set"}, r"grows by a score.*random growth"),
        ({"neuron_ablation": 0.3, "pattern": "fan_in", "algorithm": "gmp"}, r"grows by a score.*not DST, GMP"),
        ({"neuron_ablation": 0.3, "pattern": "fan_in", "algorithm": "static"}, r"grows by a score"),
        ({"keep_neurons": ["0"], "pattern": "fan_in"}, r"`keep_neurons` names the layers.*give `neuron_ablation`"),
    ],
)
def test_bad_ablation_options_are_refused(kwargs, message):
    options = {"density": 0.2, "algorithm": "rigl", **kwargs}
    with pytest.raises(ValueError, match=message):
        SparseTrainingCallback(**options)


def test_ablation_takes_numpy_and_tensor_numbers_and_custom_scored_growth():
    import numpy as np

    assert SparseTrainingCallback(density=0.2, pattern="fan_in", neuron_ablation=np.float32(0.5)).neuron_ablation == 0.5
    assert SparseTrainingCallback(density=0.2, pattern="fan_in", neuron_ablation=torch.tensor(0.25)).neuron_ablation == 0.25
    custom = SparseAlgorithm(grow="gradient", redistribute="none", count="floor")
    SparseTrainingCallback(density=0.2, algorithm=custom, pattern="fan_in", neuron_ablation=0.3)
    with pytest.raises(ValueError, match="grows by a score"):
        SparseTrainingCallback(density=0.2, algorithm=SparseAlgorithm(grow="random"), pattern="fan_in",
                               neuron_ablation=0.3)  # fmt: skip


# ----------------------------------------------------------------------------- export


def test_condensed_export_of_emptied_rows_computes_the_same_function():
    x, y = torch.randn(64, 32), torch.randint(0, 6, (64,))
    model = _mlp()
    sparsifier = _sparsifier(model)
    _steps(sparsifier, x, y, 12)
    rows = _rows(sparsifier)
    assert rows["0.weight"][0] + rows["2.weight"][0] > 0
    condensed = to_condensed(model, masks=sparsifier.masks, kernel="torch")
    assert all(isinstance(condensed[i], CondensedLinear) for i in (0, 2, 4))
    model.eval()
    with torch.no_grad():
        for batch in (1, 7, 64):
            torch.testing.assert_close(condensed(x[:batch]), model(x[:batch]), rtol=1e-5, atol=1e-5)
    held = unit_counts(sparsifier.masks["0.weight"], "fan_in") > 0
    assert condensed[0].rows.tolist() == held.nonzero().view(-1).tolist()  # the emptied rows are not computed
    assert condensed[0].values.shape == (int(held.sum()), rows["0.weight"][1])
    torch.testing.assert_close(condensed[0].dense_weight(), model[0].weight.detach())
    with torch.no_grad():  # the C++ kernel (batch 1: gather order; 64: axpy order) gives the torch result
        cpp = to_condensed(model, masks=sparsifier.masks, kernel="auto")
        for batch in (1, 64):
            torch.testing.assert_close(cpp(x[:batch]), condensed(x[:batch]), rtol=1e-5, atol=1e-5)

    # rows of 0 and k are a constant fan-in; rows of 2 and 3 are not
    linear = nn.Linear(6, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 3, 0, 4]]))
    layer = CondensedLinear.from_linear(linear, kernel="torch")
    assert layer.values.tolist() == [[1.0, 2.0], [3.0, 4.0]] and layer.rows.tolist() == [0, 2]
    assert "out_features=3, k=2, rows=2 with weights" in repr(layer)
    inputs = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(inputs), linear(inputs))
        assert torch.equal(layer(inputs)[:, 1], linear.bias[1].expand(5))  # the emptied row: its bias
        for one in inputs.split(1):  # one sample: the output is a new tensor, not a view of the bias
            torch.testing.assert_close(layer(one), linear(one))
        assert torch.equal(layer.bias, linear.bias)
    reloaded = CondensedLinear(6, torch.zeros(2, 2), torch.tensor([[0, 1], [0, 1]]), torch.zeros(3),
                               rows=torch.tensor([0, 1]), out_features=3)  # fmt: skip
    reloaded.load_state_dict(layer.state_dict())
    assert reloaded.rows.tolist() == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs), linear(inputs))
    bad = layer.state_dict()
    bad["rows"] = torch.tensor([2, 0])
    with pytest.raises(ValueError, match=r"rows must increase strictly and lie in \[0, 3\)"):
        reloaded.load_state_dict(bad)
    with pytest.raises(ValueError, match="give `rows` and `out_features` together"):
        CondensedLinear(6, torch.zeros(2, 2), torch.tensor([[0, 1], [0, 1]]), rows=torch.tensor([0, 1]))
    with torch.no_grad():
        linear.weight[1, 0] = 5.0
        linear.weight[0, 5] = 6.0
    with pytest.raises(ValueError, match="rows with 1 to 3 non-zero weights"):
        to_condensed(nn.Sequential(linear))


# ----------------------------------------------------------------------------- Trainer


def test_trainer_resume_with_ablation_continues_like_the_uninterrupted_run(tmp_path):
    from tests.lightning.test_callback import EPOCHS, _assert_same_run, _ckpt_fit

    def callback() -> SparseTrainingCallback:
        return SparseTrainingCallback(density=0.2, algorithm="rigl", pattern="fan_in", neuron_ablation=1.0,
                                      update_interval=5, seed=3, figure=False)  # fmt: skip

    full = callback()
    model_full = _ckpt_fit(full, tmp_path / "full", EPOCHS, every_n_train_steps=7)
    state = torch.load(tmp_path / "full" / "epoch=1-step=21.ckpt", weights_only=True)["callbacks"][full.state_key]
    assert state["neuron_ablation"] == 1.0 and state["algorithm_state"][ABLATION_BUDGETS]
    emptied = {n: int((unit_counts(m, "fan_in") == 0).sum()) for n, m in full.masks.items()}
    assert sum(emptied.values()) > 0 and emptied[list(emptied)[-1]] == 0, emptied
    resumed = callback()
    model_resumed = _ckpt_fit(resumed, tmp_path / "resumed", EPOCHS, ckpt_path=tmp_path / "full" / "epoch=1-step=21.ckpt",
                              every_n_train_steps=7)  # fmt: skip
    _assert_same_run(full, model_full, resumed, model_resumed)


def test_condensed_conv_skips_emptied_channels_in_both_layouts():
    conv = nn.Conv2d(8, 6, 1)
    torch.manual_seed(0)
    mask = torch.zeros(6, 8, 1, 1, dtype=torch.bool)
    for row in (0, 2, 3, 5):  # rows 1 and 4 emptied, the others at k = 3
        mask[row, torch.randperm(8)[:3]] = True
    with torch.no_grad():
        conv.weight.mul_(mask)
    condensed = to_condensed(nn.Sequential(conv), masks={"0.weight": mask})[0]
    assert condensed.rows.tolist() == [0, 2, 3, 5] and condensed.k == 3
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        for inputs in (x, x.to(memory_format=torch.channels_last), x[:, :, :2, :2]):
            torch.testing.assert_close(condensed(inputs), conv(inputs), rtol=1e-5, atol=1e-5)
        assert condensed(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("model_name", ["cnn", "conv1d"])
def test_ablation_on_convolutions_and_transposed_weights(model_name):
    from tests.methods.test_targets import MODELS

    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.3, algorithm="rigl", pattern="fan_in", neuron_ablation=1.0,
                            update_interval=2, total_steps=40, seed=0, mask_kernel="torch")  # fmt: skip
    x, y = torch.randn(32, *shape), torch.randint(0, 8, (32,))
    emptied = 0
    for _ in range(12):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
        for name, mask in sparsifier.masks.items():
            transposed = sparsifier.layers[name].transposed
            counts = unit_counts(mask, "fan_in", transposed)  # per output neuron: rows, or columns of [in, out]
            assert counts.numel() == mask.shape[1 if transposed else 0]
            assert check_pattern(mask, "fan_in", transposed, empty_rows=True), (name, counts)
            emptied += int((counts == 0).sum())
    assert emptied > 0 and sparsifier.num_updates >= 5
