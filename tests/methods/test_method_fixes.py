"""Issue 13, item 1 "Method fixes": each method as its reference code does it, on small hand-made tensors.

1. RigL keeps a weight it drops and regrows in the same update (value and optimizer state), as
   google-research/rigl ``sparse_optimizers_base.py`` ``_get_update_op`` with ``reinit_when_same=False`` and
   rigl-torch ``RigLScheduler._rigl_step`` (``new_connections = (mask2 == 1) & (current_mask == 0)``).
2. Sparse momentum's first edge case (paper section 3.2; TimDettmers/sparse_learning ``sparselearning/core.py``
   ``calc_growth_redistribution``): the excess is handed out equally, a layer takes at most 99 % of its free
   positions.
3. DST's alpha is chosen for the network (reference: ``mnist/train_argument.py`` 5e-4, ``cifar/train_argument.py``
   1e-6).
4. How grown weights and their optimizer state start, per method.
"""

import logging
import math
import random

import pytest
import torch
from torch import nn

from lightning_sparse import ALGORITHMS, DST, LayerState, SparseAlgorithm, Sparsifier, UpdateContext, UpdateResult
from lightning_sparse.functional import allocate_regrowth, allocate_regrowth_equal
from lightning_sparse.methods.dst import ALPHA_LARGE, ALPHA_LENET, LENET_MAX_WEIGHTS, default_alpha


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


# ============================================================================ 1. RigL: dropped-and-regrown kept
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


# ============================================================================ 2. sparse momentum's excess rule
def reference_calc_growth_redistribution(shares, total_removed, zeros, removed):
    """TimDettmers/sparse_learning ``Masking.calc_growth_redistribution`` restated for plain lists (with
    ``adjusted_growth = 0``); returns the real-valued regrowth per layer, which the reference floors at growth.

    Each pass gives every layer the mean residual of the previous pass on top of its amount; a layer above
    ``0.99 * max_regrowth`` (``max_regrowth = num_zero + num_remove``: its free positions after pruning) is set to
    that cap and the rest goes to the residual, until a pass leaves no residual.
    """
    n = len(shares)
    regrowth = [None] * n
    residual, mean_residual, i = 9999, 0.0, 0
    while residual > 0 and i < 1000:
        residual = 0
        for layer in range(n):
            max_regrowth = zeros[layer] + removed[layer]
            amount = regrowth[layer] if regrowth[layer] is not None else math.ceil(shares[layer] * total_removed)
            amount += mean_residual
            if amount > 0.99 * max_regrowth:
                regrowth[layer] = 0.99 * max_regrowth
                residual += amount - regrowth[layer]
            else:
                regrowth[layer] = amount
        mean_residual = residual / n
        i += 1
    return regrowth


def test_equal_excess_matches_the_reference_with_a_cascade():
    # Four layers; free positions after pruning (capacity) 100, 100, 300, 1000 -> caps 0.99x: 99, 99, 297, 990.
    # 600 weights to regrow with shares 0.5, 0.1, 0.2, 0.2 -> first amounts 300, 60, 120, 120.
    # Reference, pass 1: layer 0: 300 > 99 -> 99, residual 201; the others are under their caps.
    #   mean residual 201 / 4 = 50.25.
    # Pass 2: layer 0: 99 + 50.25 > 99 -> residual 50.25; layer 1: 60 + 50.25 = 110.25 > 99 -> 99, residual
    #   + 11.25 = 61.5; layers 2, 3: 170.25. Mean 61.5 / 4 = 15.375.
    # Pass 3 on: layers 0 and 1 bounce back what they get, layers 2 and 3 each get half of every residual:
    #   15.375 * (1 + 1/2 + 1/4 + ...) = 30.75 more -> 201 each.  Result 99, 99, 201, 201 (sum 600).
    capacity = [100, 100, 300, 1000]
    shares = [0.5, 0.1, 0.2, 0.2]
    # (the reference's max_regrowth = num_zero + num_remove; here all of a layer's free positions as num_zero)
    reference = reference_calc_growth_redistribution(shares, 600, zeros=capacity, removed=[0] * 4)
    assert reference == pytest.approx([99, 99, 201, 201])
    assert allocate_regrowth_equal(600, shares, capacity) == [99, 99, 201, 201]
    # the proportional rule (kept as an option) fills layers 0 and 1 completely: 100, 100, then 200, 200
    assert allocate_regrowth(600, shares, capacity) == [100, 100, 200, 200]


def test_equal_excess_goes_to_every_other_layer_even_without_share():
    # Capacity 100, 500, 500 -> caps 99, 495, 495. 200 to regrow with shares 0.9, 0.1, 0.0 -> 180, 20, 0.
    # Layer 0 keeps 99; its excess 81 is split equally: 40.5 each -> 60.5 and 40.5.
    # The reference floors these at growth (99 + 60 + 40 = 199, one weight short, made up later by its smoothing);
    # here the total is exact: the tie of the two .5 remainders goes to the lower index -> 99, 61, 40.
    reference = reference_calc_growth_redistribution([0.9, 0.1, 0.0], 200, [100, 500, 500], [0] * 3)
    assert reference == pytest.approx([99, 60.5, 40.5])
    assert [math.floor(r) for r in reference] == [99, 60, 40]
    assert allocate_regrowth_equal(200, [0.9, 0.1, 0.0], [100, 500, 500]) == [99, 61, 40]
    # proportional: the layer without share gets nothing, layer 0 is filled to 100
    assert allocate_regrowth(200, [0.9, 0.1, 0.0], [100, 500, 500]) == [100, 100, 0]


def test_equal_excess_fills_beyond_the_cap_only_when_it_must():
    # Capacity 10 and 20 -> caps 9 and 19 (28 in all); 29 to regrow must use one position beyond the caps.
    assert allocate_regrowth_equal(29, [0.5, 0.5], [10, 20]) == [10, 19]
    assert allocate_regrowth_equal(28, [0.5, 0.5], [10, 20]) == [9, 19]
    # a single dense layer (its only free positions are the ones just pruned) regrows all of them
    assert allocate_regrowth_equal(7, [1.0], [7]) == [7]
    with pytest.raises(ValueError):
        allocate_regrowth_equal(31, [0.5, 0.5], [10, 20])


def test_equal_excess_exact_total_and_cap_on_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 6)
        capacity = [rng.randint(0, 400) for _ in range(n)]
        shares = [rng.random() ** 3 for _ in range(n)]
        total = rng.randint(0, sum(capacity))
        grown = allocate_regrowth_equal(total, shares, capacity)
        assert sum(grown) == total
        assert all(0 <= g <= c for g, c in zip(grown, capacity))
        caps = [math.floor(0.99 * c + 1e-7) for c in capacity]
        if sum(caps) >= total:  # the capacity exists: no layer takes more than 99 % of its free positions
            assert all(g <= cap for g, cap in zip(grown, caps))
        assert grown == allocate_regrowth_equal(total, shares, capacity)  # deterministic


def _momentum_layers(active_b):
    # layer a: 100 positions, 10 active (|W| 1..10), |M| 1 everywhere.
    # layer b: 10 positions, `active_b` active (|W| 1..), |M| 9 everywhere: share 9 / (1 + 9) = 0.9.
    wa = torch.zeros(100)
    ma = torch.zeros(100, dtype=torch.bool)
    ma[:10] = True
    wa[:10] = torch.arange(1, 11, dtype=torch.float32)
    wb = torch.zeros(10)
    mb = torch.zeros(10, dtype=torch.bool)
    mb[:active_b] = True
    wb[:active_b] = torch.arange(1, active_b + 1, dtype=torch.float32)
    return [
        LayerState("a", wa, ma, lambda: torch.ones(100)),
        LayerState("b", wb, mb, lambda: torch.full((10,), 9.0)),
    ]


def test_sparse_momentum_never_fills_a_layer_and_keeps_pruning_it():
    # Rate 0.5: a prunes ceil(5) = 5, b (8 active, density 0.8: not above 0.8, no rate cut) prunes ceil(4) = 4.
    # R = 9; a's free positions after pruning 95 (cap 94), b's 6 (cap floor(5.94) = 5).
    # Shares 0.1, 0.9 -> 0.9 and 8.1. b is capped at 5; its excess 3.1 goes (equally) to the only other layer:
    # a gets 4.0 -> grown 4 and 5; a ends at 9 active, b at 9 of 10.
    ctx = UpdateContext(0.5, generator=torch.Generator().manual_seed(0))
    result = ALGORITHMS["sparse_momentum"].update(_momentum_layers(8), [10, 8], ctx)
    assert result.pruned == [5, 4] and result.grown == [4, 5] and result.active == [9, 9]
    # the proportional rule fills b: grown 3 and 6, b at 10 of 10
    proportional = SparseAlgorithm(nearly_dense_edge_case=True, excess="proportional")
    result_p = proportional.update(_momentum_layers(8), [10, 8], ctx)
    assert result_p.grown == [3, 6] and result_p.active == [8, 10]
    # Next update. Equal: b at 9 of 10 (density 0.9 > 0.8, share 0.9 > 1/2) prunes at rate min(0.5, 0.1):
    # ceil(0.1 * 9) = 1. Proportional: b is dense, its rate is min(0.5, 0) = 0 and it never prunes again.
    assert ALGORITHMS["sparse_momentum"].update(_momentum_layers(9), [10, 9], ctx).pruned[1] == 1
    assert proportional.update(_momentum_layers(10), [10, 10], ctx).pruned[1] == 0


def test_excess_rule_defaults_and_validation():
    assert SparseAlgorithm().excess == "equal"
    assert ALGORITHMS["sparse_momentum"].excess == "equal"
    assert ALGORITHMS["dsr"].excess == "proportional"  # DSR's reference re-shares by the same proportions
    with pytest.raises(ValueError, match="`excess` can be equal, proportional"):
        SparseAlgorithm(excess="uniform")


# ============================================================================ 3. DST's alpha
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
    with caplog.at_level(logging.INFO, logger="lightning_sparse.core.sparsifier"):
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


# ============================================================================ 4. how grown weights start
def test_start_flags_per_method():
    # method: (reset_grown: optimizer state zeroed at grown positions, reinit_when_same: dropped-and-regrown
    # counts as grown). RigL: rigl sparse_optimizers_base.py reset_momentum / reinit_when_same=False.
    # SET: Mocanu's weightsEvolution (pdw of a new connection = 0; every regrown position is a new connection).
    # DSR: Intel's parameterized_tensors.py (gradients masked, unused weights zeroed before growth).
    # Sparse momentum: sparse_learning never touches the optimizer state (momentum_growth reads it).
    expected = {
        "sparse_momentum": (False, False),
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


def test_sparse_momentum_grown_weights_start_at_zero_and_keep_their_momentum():
    layer, opt, before, weights_before, result = _grown_case("sparse_momentum")
    new = result.masks[0]
    grown_new = new & ~before
    assert int(grown_new.sum()) > 0
    buf = opt.state[layer.weight]["momentum_buffer"]
    assert torch.all(layer.weight[grown_new] == 0)
    assert torch.all(buf == 1.0)  # sparse_learning never touches the optimizer state
    # a weight dropped and regrown in the same update keeps its value (the reference applies the mask only after
    # growth)
    regrown = new & before & ~result.pruned_masks[0]
    assert torch.equal(layer.weight.detach()[regrown], weights_before[regrown])


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
