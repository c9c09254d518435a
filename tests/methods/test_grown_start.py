"""How grown weights and their optimizer state start (``SparseAlgorithm.grown_positions``, ``start_grown_``), per
method, as each reference does it, on small hand-made tensors.

* RigL keeps a weight it drops and regrows in the same update (value and optimizer state), as
  google-research/rigl ``sparse_optimizers_base.py`` ``_get_update_op`` with ``reinit_when_same=False`` and
  rigl-torch ``RigLScheduler._rigl_step`` (``new_connections = (mask2 == 1) & (current_mask == 0)``).
* SET and DSR treat every regrown position as new; sparse momentum keeps the momentum of grown positions.
"""


import pytest
import torch
from torch import nn

from lightning_sparse import ALGORITHMS, SparseAlgorithm, Sparsifier, UpdateResult


# ----------------------------------------------------------------------------- helpers
def _linear(values, mask, momentum=0.9, optimizer="sgd"):
    """A bias-free Linear whose weight is ``values`` (shape [out, in]), a Sparsifier-free optimizer with state."""
    out_features, in_features = values.shape
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(values * mask)
    if optimizer == "sgd":
        opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=momentum)
    else:
        opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    return layer, opt


def _make_state(opt, param):
    """Run one zero-gradient step so the optimizer has its per-weight state, without moving the weight."""
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 0.0
    param.grad = torch.zeros_like(param)
    opt.step()
    opt.param_groups[0]["lr"] = lr


def _sparsifier_with_mask(model, opt, values, mask, **kwargs):
    """A Sparsifier on the one-layer ``model`` whose mask is replaced by ``mask`` and weight by ``values * mask``."""
    sparsifier = Sparsifier(model, opt, seed=0, total_steps=100, update_interval=1, **kwargs)
    sparsifier.masking.set_masks([mask.clone()], [int(mask.sum())])
    with torch.no_grad():
        model.weight.copy_(values * mask)
    return sparsifier


# ----------------------------------------------------------------------------- RigL: dropped-and-regrown kept
def _rigl_case(optimizer):
    # 10 weights (2 x 5), positions 0..7 active with |W| = 1..8, positions 8 and 9 inactive.
    # RigL with drop fraction 0.25 at the first update: k = floor(0.25 * 8) = 2.
    # Drop the 2 smallest |W| among the active: positions 0 (1.0) and 1 (2.0).
    # Grow the 2 largest |grad| among the positions free after the drop, {0, 1, 8, 9}:
    #   |grad| = 10 (pos 0), 0.1 (pos 1), 20 (pos 8), 0.2 (pos 9)  ->  positions 8 and 0.
    # So position 0 is dropped and regrown (keeps value 1.0 and its state), position 8 is new (0, zero state),
    # position 1 is dropped (0), position 9 stays out.
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0, 0.0]).view(2, 5)
    mask = torch.tensor([True] * 8 + [False] * 2).view(2, 5)
    layer, opt = _linear(values, mask, optimizer=optimizer)
    sparsifier = _sparsifier_with_mask(layer, opt, values, mask, density=0.8, algorithm="rigl", prune_rate=0.25)
    _make_state(opt, layer.weight)
    state = opt.state[layer.weight]
    for key, value in state.items():  # distinct non-zero state everywhere, 0.5 + 0.1 * index
        if torch.is_tensor(value) and value.shape == layer.weight.shape:
            value.copy_(0.5 + 0.1 * torch.arange(10, dtype=torch.float32).view(2, 5))
    layer.weight.grad = torch.tensor([10.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 20.0, 0.2]).view(2, 5)
    report = sparsifier.update()
    return layer, opt, sparsifier, report


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rigl_keeps_dropped_and_regrown_weights_and_resets_new_ones(optimizer):
    layer, opt, sparsifier, report = _rigl_case(optimizer)
    assert report.rate == pytest.approx(0.25)
    assert report.result.pruned == [2] and report.result.grown == [2]
    new_mask = sparsifier.masks["weight"].view(-1)
    assert new_mask.tolist() == [True, False, True, True, True, True, True, True, True, False]
    w = layer.weight.detach().view(-1)
    assert w.tolist() == [1.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0, 0.0]  # pos 0 kept its 1.0, pos 8 new: 0
    keys = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq"]
    for key in keys:
        s = opt.state[layer.weight][key].view(-1)
        assert s[0].item() == pytest.approx(0.5)  # dropped and regrown: state kept
        assert s[8].item() == 0.0  # newly grown: state reset
        assert s[2:8].tolist() == pytest.approx([0.7, 0.8, 0.9, 1.0, 1.1, 1.2])  # kept weights untouched


def test_rigl_full_layer_stays_fully_nonzero():
    # ERK at density 0.3 over a 30x30 and a 2x30 layer makes the small layer dense (228 + 60 active). A RigL update
    # drops floor(0.3 * 60) = 18 of its weights; the only free positions are those 18, so it regrows exactly them.
    # None was inactive before the update, so none may be zeroed: all 60 weights stay non-zero.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30, bias=False), nn.Linear(30, 2, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, opt, density=0.3, algorithm="rigl", total_steps=100, update_interval=1, seed=0)
    assert sparsifier.masking.active == [228, 60]
    loss = model(torch.randn(8, 30)).pow(2).sum()
    loss.backward()
    opt.step()
    sparsifier.masking.apply_()
    before = model[1].weight.detach().clone()
    buf_before = opt.state[model[1].weight]["momentum_buffer"].clone()
    assert int((before != 0).sum()) == 60
    report = sparsifier.update()
    assert report.result.pruned == [68, 18]  # floor(0.3 * 228), floor(0.3 * 60)
    assert report.result.grown == [68, 18]
    assert int((model[1].weight != 0).sum()) == 60
    assert torch.equal(model[1].weight.detach(), before)  # values untouched
    assert torch.equal(opt.state[model[1].weight]["momentum_buffer"], buf_before)  # and state


# ----------------------------------------------------------------------------- per method
def test_start_flags_per_method():
    # method: (reset_grown: optimizer state zeroed at grown positions, reinit_when_same: dropped-and-regrown
    # counts as grown). RigL: rigl sparse_optimizers_base.py reset_momentum / reinit_when_same=False.
    # SET: Mocanu's weightsEvolution (pdw of a new connection = 0; every regrown position is a new connection).
    # DSR: Intel's parameterized_tensors.py (gradients masked, unused weights zeroed before growth).
    # Sparse momentum: sparse_learning never touches the optimizer state (momentum_growth reads it); ours resets
    # it at grown positions (issue 24: carried momentum diverged LeNet-5), reset_grown=False is the reference's.
    expected = {
        "sparse_momentum": (True, False),
        "rigl": (True, False),
        "set": (True, True),
        "dsr": (True, True),
    }
    for name, (reset, reinit) in expected.items():
        assert (ALGORITHMS[name].reset_grown, ALGORITHMS[name].reinit_when_same) == (reset, reinit), name


def test_grown_positions_on_hand_made_masks():
    before = torch.tensor([True, True, True, False, False])
    pruned = torch.tensor([False, True, True, False, False])  # position 0 dropped
    after = torch.tensor([True, True, True, True, False])  # position 0 regrown, position 3 new
    result = UpdateResult([after], [pruned], [4], [1], [2])
    keep = SparseAlgorithm(reinit_when_same=False).grown_positions([before], result)[0]
    fresh = SparseAlgorithm(reinit_when_same=True).grown_positions([before], result)[0]
    assert keep.tolist() == [False, False, False, True, False]
    assert fresh.tolist() == [True, False, False, True, False]


def _grown_case(algorithm):
    """A 4 x 5 layer, 10 active, a momentum buffer of 1.0 everywhere (inactive positions too: masked weights get
    dense gradients), one update; returns the layer, optimizer, masks before and the update's result."""
    torch.manual_seed(1)
    values = torch.randn(4, 5)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[::2] = True
    mask = mask.view(4, 5)
    layer, opt = _linear(values, mask)
    sparsifier = _sparsifier_with_mask(layer, opt, values, mask, density=0.5, algorithm=algorithm)
    if algorithm == "dsr":
        sparsifier.algorithm_state["dsr_threshold"] = 0.5  # prune the active weights with |W| < 0.5
    _make_state(opt, layer.weight)
    opt.state[layer.weight]["momentum_buffer"].fill_(1.0)
    layer.weight.grad = torch.randn(4, 5)
    weights_before = layer.weight.detach().clone()
    report = sparsifier.update()
    return layer, opt, mask, weights_before, report.result


@pytest.mark.parametrize("algorithm", ["set", "dsr"])
def test_set_and_dsr_grown_weights_start_at_zero_without_momentum(algorithm):
    layer, opt, before, weights_before, result = _grown_case(algorithm)
    new, pruned = result.masks[0], result.pruned_masks[0]
    grown = new & ~pruned
    assert int(grown.sum()) == result.grown[0] > 0
    buf = opt.state[layer.weight]["momentum_buffer"]
    assert torch.all(layer.weight[grown] == 0) and torch.all(buf[grown] == 0)
    kept = pruned
    assert torch.equal(layer.weight.detach()[kept], weights_before[kept])
    assert torch.all(buf[kept] == 1.0)  # the kept weights' momentum is untouched


@pytest.mark.parametrize("reference", [False, True])
def test_sparse_momentum_grown_weights_start_at_zero_with_their_momentum_reset_unless_asked(reference):
    import dataclasses

    # the default resets the grown positions' momentum; reset_grown=False is the reference's: it keeps it
    reference_algorithm = dataclasses.replace(ALGORITHMS["sparse_momentum"], reset_grown=False)
    algorithm = reference_algorithm if reference else "sparse_momentum"
    layer, opt, before, weights_before, result = _grown_case(algorithm)
    new = result.masks[0]
    grown_new = new & ~before
    assert int(grown_new.sum()) > 0
    buf = opt.state[layer.weight]["momentum_buffer"]
    assert torch.all(layer.weight[grown_new] == 0)
    if reference:
        assert torch.all(buf == 1.0)  # sparse_learning never touches the optimizer state
    else:
        assert torch.all(buf[grown_new] == 0) and torch.all(buf[~grown_new] == 1.0)  # only the grown positions
    # a weight dropped and regrown in the same update keeps its value and state (the reference applies the mask
    # only after growth; reinit_when_same=False)
    regrown = new & before & ~result.pruned_masks[0]
    assert torch.equal(layer.weight.detach()[regrown], weights_before[regrown]) and torch.all(buf[regrown] == 1.0)


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_grown_weights_start_on_the_local_shards_under_fsdp2(single_process_group, algorithm):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(
        model, optimizer, density=0.5, algorithm=algorithm, init="uniform", seed=0, mask_kernel="torch",
        total_steps=100, update_interval=50,
    )  # fmt: skip
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        sparsifier.step()
    params = dict(model.named_parameters())
    assert all(isinstance(params[name], DTensor) for name in sparsifier.names)
    before = {name: mask.clone() for name, mask in sparsifier.masks.items()}
    weights = {name: params[name].to_local().detach().clone() for name in before}
    buffers = {name: optimizer.state[params[name]]["momentum_buffer"].to_local().clone() for name in before}
    assert all(bool((buffers[name][~before[name]] != 0).any()) for name in before)  # dense gradients: state built up
    report = sparsifier.update()
    grown_total = 0
    for i, (name, mask) in enumerate(sparsifier.masks.items()):
        weight = params[name].to_local().detach()
        buf = optimizer.state[params[name]]["momentum_buffer"].to_local()
        fresh = mask & ~(report.result.pruned_masks[i] if algorithm == "set" else before[name])
        kept = mask & ~fresh
        grown_total += int(fresh.sum())
        assert torch.all(weight[fresh] == 0) and torch.all(buf[fresh] == 0)
        assert torch.equal(weight[kept], weights[name][kept]) and torch.equal(buf[kept], buffers[name][kept])
    assert grown_total > 0
