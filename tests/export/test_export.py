"""lightning_sparse.export: ``compact`` removes exactly the channels that do not change the output; ``to_sparse``
stores sparse Linear weights in CSR; ``to_condensed`` condenses constant-fan-in layers for the CPU;
``to_semi_structured`` makes 2:4 Linear weights semi-structured for CUDA. LeNet-5, a small VGG with BatchNorm,
torchvision's ResNet-50, small MLPs and 1x1 convolutions."""

import copy
import re

import pytest
import torch
import torchvision
from torch import nn

from lightning_sparse.export import (
    CondensedConv2d,
    CondensedLinear,
    SparseLinear,
    compact,
    compaction_report,
    semi_structured_layers,
    to_condensed,
    to_semi_structured,
    to_sparse,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one intra-op thread is faster, and far faster on a shared machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ models


def lenet() -> nn.Sequential:
    """LeNet-5 for 1x28x28: conv1 = [0], conv2 = [3], fc1 = [7] (800 = 50 channels x 16), fc2 = [9]."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )  # fmt: skip


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def vgg() -> nn.Sequential:
    """VGG-style for 3x16x16: blocks [0], [1], [3] (conv [i][0], bn [i][1]), fc1 = [6] (512 = 32 x 16), fc2 = [9]."""
    torch.manual_seed(0)
    model = nn.Sequential(
        _block(3, 16), _block(16, 16), nn.MaxPool2d(2), _block(16, 32), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10),
    )  # fmt: skip
    _randomize_batchnorm(model)
    return model


LENET_INPUT = (1, 1, 28, 28)
VGG_INPUT = (1, 3, 16, 16)
RESNET_INPUT = (1, 3, 64, 64)


@torch.no_grad()
def _randomize_batchnorm(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0, 0.1, generator=g)


@torch.no_grad()
def _random_zeros(module: nn.Module, fraction: float, seed: int = 2) -> None:
    """Unstructured sparsity: zero about ``fraction`` of every Conv/Linear weight in ``module``."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= fraction)


def _assert_same_function(masked: nn.Module, compacted: nn.Module, shape: tuple[int, ...], n: int = 3) -> None:
    masked = copy.deepcopy(masked).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(shape, generator=g)
            expected = masked(x)
            scale = max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(compacted(x), expected, atol=1e-4 * scale, rtol=1e-4)


def _snapshot(model: nn.Module) -> tuple[bool, dict[str, torch.Tensor]]:
    return model.training, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: tuple[bool, dict[str, torch.Tensor]]) -> None:
    training, state = snapshot
    assert model.training == training
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ compact


def test_compact_lenet_removes_exactly_the_unread_channels():
    model = lenet().train()
    _random_zeros(model[:8], 0.5)
    _random_zeros(model[9], 0.2)  # fc2 reads each hidden unit through 10 weights only: keep them mostly
    with torch.no_grad():
        model[3].weight[:, [1, 4, 7]] = 0  # conv1 channels 1, 4, 7: nothing reads them
        model[7].weight[:, 3 * 16 : 4 * 16] = 0  # conv2 channels 3, 10: fc1 reads none of their 16 features
        model[7].weight[:, 10 * 16 : 11 * 16] = 0
        model[7].weight[:, 20 * 16 : 20 * 16 + 15] = 0  # channel 20: 15 of 16 features unread -> kept
        model[9].weight[:, :100] = 0  # fc1 units 0..99
    before = _snapshot(model)

    small = compact(model, torch.randn(LENET_INPUT))

    assert (small[0].in_channels, small[0].out_channels) == (1, 17)
    assert (small[3].in_channels, small[3].out_channels) == (17, 48)
    assert (small[7].in_features, small[7].out_features) == (48 * 16, 400)
    assert (small[9].in_features, small[9].out_features) == (400, 10)
    assert compaction_report(model, small) == {"0": (20, 17), "3": (50, 48), "7": (500, 400)}
    assert not small.training
    _assert_same_function(model, small, LENET_INPUT)
    _assert_unchanged(model, before)


def test_compact_folds_constant_channels_into_readers_that_do_not_zero_pad():
    # a zero filter leaves its channel at a constant (bias -> ReLU): LeNet's readers are a padding-0 conv and
    # Linears, which absorb the constant into their bias exactly
    model = lenet()
    _random_zeros(model, 0.3)
    with torch.no_grad():
        model[0].weight[2], model[0].bias[2] = 0, 0.7  # conv2 (padding 0) reads 0.7 everywhere: folded
        model[0].weight[5], model[0].bias[5] = 0, -0.3  # ReLU makes it exactly 0: dropped, nothing to fold
        model[3].weight[7], model[3].bias[7] = 0, 0.5  # pool -> flatten -> fc1 reads 16 x 0.5: folded
        model[7].weight[11], model[7].bias[11] = 0, 0.4  # fc2 reads 0.4: folded
        model[9].weight[3] = 0  # an output: never removed
    before = _snapshot(model)

    small = compact(model, torch.randn(LENET_INPUT))

    assert compaction_report(model, small) == {"0": (20, 18), "3": (50, 49), "7": (500, 499)}
    assert small[9].out_features == 10
    _assert_same_function(model, small, LENET_INPUT)
    _assert_unchanged(model, before)


def test_compact_vgg_batchnorm_rules():
    model = vgg()
    _random_zeros(model, 0.3)
    conv1, bn1, conv2, conv3, bn3, _fc1, fc2 = (
        model[0][0], model[0][1], model[1][0], model[3][0], model[3][1], model[6], model[9],
    )  # fmt: skip
    with torch.no_grad():
        conv2.weight[:, [0, 9]] = 0  # unread: conv1/bn1 channels 0 and 9 go
        conv3.weight[:, 2] = 0  # unread: conv2/bn2 channel 2 goes
        fc2.weight[:, 10:20] = 0  # unread: fc1 units 10..19 go
        # zero filter, BN maps 0 to (0 - 1) / 1 = -1, ReLU to exactly 0: dropped although conv2 zero-pads
        conv1.weight[3] = 0
        bn1.running_mean[3], bn1.running_var[3], bn1.weight[3], bn1.bias[3] = 1.0, 1.0 - bn1.eps, 1.0, 0.0
        # zero filter, constant 2 after BN and ReLU, read by the zero-padding conv2: kept (borders differ)
        conv1.weight[5] = 0
        bn1.running_mean[5], bn1.bias[5] = 0.0, 2.0
        # zero filter, constant 1.5 through ReLU, max pool and flatten into fc1: folded into fc1's bias
        conv3.weight[6] = 0
        bn3.running_mean[6], bn3.bias[6] = 0.0, 1.5
    before = _snapshot(model)

    small = compact(model, torch.randn(VGG_INPUT))

    assert compaction_report(model, small) == {
        "0.0": (16, 13), "0.1": (16, 13), "1.0": (16, 15), "1.1": (16, 15), "3.0": (32, 31), "3.1": (32, 31),
        "6": (64, 54),
    }  # fmt: skip
    assert small[0][0].in_channels == 3 and small[6].in_features == 31 * 16 and small[9].in_features == 54
    assert small[9].out_features == 10
    _assert_same_function(model, small, VGG_INPUT)
    _assert_unchanged(model, before)


def test_compact_with_nothing_removable_keeps_every_shape():
    model = vgg()
    _random_zeros(model, 0.3)
    small = compact(model, torch.randn(VGG_INPUT))
    assert _shapes(small) == _shapes(model)
    assert compaction_report(model, small) == {}
    _assert_same_function(model, small, VGG_INPUT)


def test_compact_never_removes_model_inputs_or_outputs():
    model = vgg()
    with torch.no_grad():
        model[0][0].weight[:, 1] = 0  # input channel 1 is unused
        model[9].weight[4], model[9].bias[4] = 0, 0  # output 4 is always zero
    small = compact(model, torch.randn(VGG_INPUT))
    assert _shapes(small) == _shapes(model)
    _assert_same_function(model, small, VGG_INPUT)


def test_compact_keeps_one_channel_of_a_group_nothing_reads():
    model = lenet()
    with torch.no_grad():
        model[9].weight.zero_()  # the output is fc2's bias: no fc1 unit is read
    small = compact(model, torch.randn(LENET_INPUT))
    assert (small[7].out_features, small[9].in_features) == (1, 1)
    assert (small[3].out_channels, small[7].in_features) == (50, 800)  # fc1 still reads conv2
    _assert_same_function(model, small, LENET_INPUT)


class _Unprovable(nn.Module):
    """x (6 channels) -> conv a -> ReLU -> ``mode`` -> conv c, which reads none of channels 0 and 1 (nor 3, 4 when
    grouped). Removing them would change the output (or need a channel torch-pruning cannot cut)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 1, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 3, padding=1, groups=2 if mode == "grouped" else 1)
        with torch.no_grad():
            self.c.weight[:, :2] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "broadcast":
            return self.c(torch.relu(self.a(x) + self.b(x)))  # b's one channel is added to all six
        h = torch.relu(self.a(x))
        if self.mode == "input residual":
            h = h + x  # the model input's channels cannot be removed
        elif self.mode == "channel mean":
            h = h + h.mean(1, keepdim=True)  # every channel feeds every other
        return self.c(h)


@pytest.mark.parametrize("mode", ["input residual", "broadcast", "channel mean", "grouped"])
def test_compact_keeps_groups_it_cannot_prove_exact(mode):
    model = _Unprovable(mode)
    small = compact(model, torch.randn(1, 6, 8, 8))
    assert _shapes(small) == _shapes(model)
    _assert_same_function(model, small, (1, 6, 8, 8))


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc1(x)
        return h, self.fc2(torch.relu(h))


def test_compact_keeps_channels_that_are_also_model_outputs():
    model = _TwoOutputs()
    with torch.no_grad():
        model.fc2.weight[:, :2] = 0  # fc2 does not read units 0, 1, but the model returns them
    small = compact(model, torch.randn(2, 8))
    assert _shapes(small) == _shapes(model)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_compact_applies_masks_to_the_copy_only():
    model = lenet()
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if "weight" in name}
    masks["3.weight"][:, :5] = False  # conv2 reads none of conv1's channels 0..4
    before = _snapshot(model)

    small = compact(model, torch.randn(LENET_INPUT), masks=masks)

    assert (small[0].out_channels, small[3].in_channels) == (15, 15)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[3].weight.mul_(masks["3.weight"])
    _assert_same_function(masked, small, LENET_INPUT)
    _assert_unchanged(model, before)


def test_compact_rejects_bad_arguments():
    model = lenet()
    with pytest.raises(ValueError, match="example_input"):
        compact(model, [1.0, 2.0])
    with pytest.raises(ValueError, match="names no parameter"):
        compact(model, torch.randn(LENET_INPUT), masks={"conv.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be torch.bool"):
        compact(model, torch.randn(LENET_INPUT), masks={"0.weight": torch.ones(20, 1, 5, 5)})


@pytest.fixture(scope="module")
def sparse_resnet50() -> nn.Module:
    """ResNet-50 at ~50% random sparsity with removable channels in the residual stream and inside blocks."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    _randomize_batchnorm(model)
    _random_zeros(model, 0.5)
    with torch.no_grad():
        # layer4's residual stream (2048 channels) is read by layer4.1.conv1, layer4.2.conv1 and fc
        for name in ("layer4.1.conv1", "layer4.2.conv1", "fc"):
            model.get_submodule(name).weight[:, :100] = 0
        model.layer3[1].conv1.weight[:, :7] = 0  # layer3's stream: read by other blocks too -> kept
        model.layer1[0].conv2.weight[:, :10] = 0  # inside a block: layer1.0.conv1/bn1 lose 10 channels
        model.layer2[1].conv1.weight[5] = 0  # zero filter, BN and ReLU give exactly 0: dropped
        bn = model.layer2[1].bn1
        bn.running_mean[5], bn.running_var[5], bn.weight[5], bn.bias[5] = 1.0, 1.0, 1.0, 0.0
    return model.eval()


def test_compact_resnet50(sparse_resnet50):
    model = sparse_resnet50
    before = _snapshot(model)

    small = compact(model, torch.randn(RESNET_INPUT))

    stream = ["layer4.0.conv3", "layer4.0.bn3", "layer4.0.downsample.0", "layer4.0.downsample.1"]
    stream += ["layer4.1.conv3", "layer4.1.bn3", "layer4.2.conv3", "layer4.2.bn3"]
    expected = {name: (2048, 1948) for name in stream}
    expected |= {"layer1.0.conv1": (64, 54), "layer1.0.bn1": (64, 54)}
    expected |= {"layer2.1.conv1": (128, 127), "layer2.1.bn1": (128, 127)}
    assert compaction_report(model, small) == expected
    assert (small.conv1.in_channels, small.fc.in_features, small.fc.out_features) == (3, 1948, 1000)
    assert _n_params(small) < _n_params(model)
    _assert_same_function(model, small, RESNET_INPUT, n=2)
    _assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------- to_sparse


@pytest.mark.parametrize("build, shape, fc1", [(lenet, LENET_INPUT, "7"), (vgg, VGG_INPUT, "6")], ids=["lenet", "vgg"])
def test_to_sparse_replaces_only_sparse_linears(build, shape, fc1):
    model = build().eval()
    _random_zeros(model, 0.3)
    _random_zeros(model.get_submodule(fc1), 0.9)  # 93% zeros -> CSR; fc2 (30%) and the convs stay dense
    before = _snapshot(model)

    fast = to_sparse(model, min_sparsity=0.5)

    linears = {name: type(fast.get_submodule(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {fc1: SparseLinear, "9": nn.Linear}  # fc2 is [9] in both models
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (2 if build is lenet else 3)
    assert all(type(fast.get_submodule(name)) is nn.Conv2d for name in convs)
    sparse_fc1 = fast.get_submodule(fc1)
    assert sparse_fc1.weight.layout == torch.sparse_csr
    assert sparse_fc1.values.numel() == int(torch.count_nonzero(model.get_submodule(fc1).weight))
    _assert_same_function(model, fast, shape)
    with torch.inference_mode():
        x = torch.randn(shape)
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    _assert_unchanged(model, before)


def test_to_sparse_resnet50(sparse_resnet50):
    fast = to_sparse(sparse_resnet50)  # fc is 50% sparse (plus 100 zero columns)
    assert isinstance(fast.fc, SparseLinear) and isinstance(sparse_resnet50.fc, nn.Linear)
    assert type(fast.conv1) is nn.Conv2d and type(fast.layer4[2].conv3) is nn.Conv2d
    _assert_same_function(sparse_resnet50, fast, RESNET_INPUT, n=1)


def test_sparse_linear_shapes_no_bias_copy_and_state_dict():
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(dense.weight.shape, generator=g) < 0.3)
    sparse = SparseLinear.from_linear(dense)
    x = torch.randn(2, 3, 12, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))
        torch.testing.assert_close(sparse(x[0, 0]), dense(x[0, 0]))  # 1-D input
        torch.testing.assert_close(copy.deepcopy(sparse)(x), dense(x))
        reloaded = SparseLinear.from_linear(dense)
        reloaded.load_state_dict(sparse.state_dict())
        torch.testing.assert_close(reloaded(x), dense(x))
        torch.testing.assert_close(sparse.double()(x.double()), dense.double()(x.double()))
    assert sparse.weight.shape == (5, 12) and sparse.bias is None
    assert list(sparse.parameters()) == []
    assert isinstance(to_sparse(dense, min_sparsity=0.0), SparseLinear)  # a bare Linear is replaced itself


def test_to_sparse_threshold_and_validation():
    model = lenet()
    assert not any(isinstance(m, SparseLinear) for m in to_sparse(model).modules())  # dense: nothing to do
    assert sum(isinstance(m, SparseLinear) for m in to_sparse(model, min_sparsity=0.0).modules()) == 2
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse(model, min_sparsity=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_sparse_refuses_half_precision_weights_on_the_cpu_naming_the_dtypes(dtype):
    # torch's CSR product has no bfloat16/float16 CPU kernel: refused at export, not at the first inference
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)
    with torch.no_grad():
        model[0].weight[:, 4:] = 0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"layer '0'.*{dtype} weights on the CPU.*float32, float64.*model\.float\(\)"):
        to_sparse(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, SparseLinear) for m in to_sparse(model, min_sparsity=0.6).modules())  # none sparse
    exported = to_sparse(model.float())  # the way out the message gives: float32 works and is exact
    x = torch.randn(3, 8)
    torch.testing.assert_close(exported(x), model.float()(x))
    with pytest.raises(ValueError, match=rf"{dtype} weights on the CPU"):  # cast after export
        exported.to(dtype)(x.to(dtype))


# ------------------------------------------------------------------------------------------- to_condensed


@torch.no_grad()
def _fan_in_(layer: nn.Module, k: int, seed: int = 0) -> torch.Tensor:
    """Keep ``k`` random weights in every output row of a Linear/Conv (the rest zeroed); the mask."""
    g = torch.Generator().manual_seed(seed)
    rows = layer.weight.view(layer.weight.shape[0], -1)
    keep = torch.rand(rows.shape, generator=g).argsort(1)[:, :k]
    mask = torch.zeros(rows.shape, dtype=torch.bool).scatter_(1, keep, True)
    rows.mul_(mask)
    return mask.view_as(layer.weight)


def _fan_in_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40, bias=False), nn.ReLU(), nn.Linear(40, 10))
    _fan_in_(model[0], 5)
    _fan_in_(model[2], 13, seed=1)
    _fan_in_(model[4], 40 // 2, seed=2)
    return model.eval()


@pytest.mark.parametrize("kernel", ["cpp", "torch"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("batch", [1, 2, 7, 256])
def test_to_condensed_computes_the_same_function(batch, index_dtype, kernel):
    model = _fan_in_mlp()
    before = _snapshot(model)
    fast = to_condensed(model, index_dtype=index_dtype, kernel=kernel)
    assert [type(m) for m in fast] == [CondensedLinear, nn.ReLU, CondensedLinear, nn.ReLU, CondensedLinear]
    assert [fast[i].k for i in (0, 2, 4)] == [5, 13, 20]
    assert fast[0].values.shape == fast[0].indices.shape == (64, 5) and fast[0].indices.dtype == index_dtype
    assert bool((fast[2].indices[:, 1:] > fast[2].indices[:, :-1]).all())  # sorted along each row
    assert fast[2].bias is None and not any(p.requires_grad for p in fast.parameters())
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 48, generator=g)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(fast(x), expected)  # a frozen copy: no torch.no_grad() needed
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), expected)
    x3 = torch.randn(3, batch, 48, generator=g)  # any leading shape
    with torch.no_grad():
        torch.testing.assert_close(fast(x3), model(x3))
        torch.testing.assert_close(fast(x3[0, 0]), model(x3[0, 0]))  # 1-D input
        torch.testing.assert_close(fast(x.t().contiguous().t()), expected)  # a non-contiguous input
    _assert_unchanged(model, before)


def test_condensed_float64_and_thread_count_independence():
    model = _fan_in_mlp()
    fast = to_condensed(model)
    x = torch.randn(256, 48)
    with torch.no_grad():
        double = copy.deepcopy(model).double()
        torch.testing.assert_close(to_condensed(double)(x.double()), double(x.double()))  # torch's path
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([fast(x[:b]) for b in (1, 7, 256)])
        torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*results))  # every output summed by one thread, in one order


def _train_fan_in(algorithm: str, steps: int = 6) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An MLP trained a few steps on random data with ``pattern="fan_in"``; its masks."""
    from lightning_sparse import Sparsifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=0.1, algorithm=algorithm, pattern="fan_in", seed=0,
                            update_interval=2, total_steps=8)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    return model.eval(), {k: v.clone() for k, v in sparsifier.masks.items()}


def _check_trained(model: nn.Module, fast: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    ks = {name: int(mask.sum(1)[0]) for name, mask in masks.items()}
    assert all(bool((mask.sum(1) == ks[name]).all()) for name, mask in masks.items())  # the pattern held
    assert {f"{i}.weight": fast[i].k for i in (0, 2, 4)} == ks
    g = torch.Generator().manual_seed(1)
    for batch in (1, 2, 7, 256):
        x = torch.randn(batch, 64, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x))


def test_to_condensed_model_trained_with_fan_in_pattern():
    model, masks = _train_fan_in("rigl")  # a mask update at step 6: RigL's regrown weights start at zero
    with pytest.raises(ValueError, match=r"to_condensed: .*'0' \(rows with \d+ to \d+ non-zero weights\).*masks="):
        to_condensed(model)  # ... so the weights alone do not show the constant fan-in: the masks do
    _check_trained(model, to_condensed(model, masks=masks), masks)
    model, masks = _train_fan_in("static")  # no growth: every kept weight is non-zero
    _check_trained(model, to_condensed(model), masks)


def test_to_condensed_refuses_or_skips_layers_without_constant_fan_in():
    model = _fan_in_mlp()
    with torch.no_grad():
        model[2].weight[0, :] = 0.5  # row 0 now holds 64 non-zero weights, the others 13
    with pytest.raises(ValueError, match=r"'2' \(rows with 13 to 64 non-zero weights\)"):
        to_condensed(model)
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) without a constant fan-in as they are: '2'"):
        fast = to_condensed(model, skip_unstructured=True)
    assert [type(m) for m in fast] == [CondensedLinear, nn.ReLU, nn.Linear, nn.ReLU, CondensedLinear]
    x = torch.randn(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    # masks decide instead of the weights: a kept weight that is exactly zero counts
    model = _fan_in_mlp()
    masks = {"0.weight": model[0].weight != 0}
    with torch.no_grad():
        model[0].weight[3, model[0].weight[3].nonzero()[0]] = 0.0
    with pytest.raises(ValueError, match=r"'0' \(rows with 4 to 5 non-zero weights\)"):
        to_condensed(model)
    fast = to_condensed(model, masks=masks)
    assert fast[0].k == 5
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    bad_mask = masks["0.weight"].clone()
    bad_mask[0, :] = True
    with pytest.raises(ValueError, match=r"'0' \(rows with 5 to 48 mask entries\)"):
        to_condensed(model, masks={"0.weight": bad_mask})
    with pytest.raises(ValueError, match=r"mask 'nope.weight' names no parameter"):
        to_condensed(model, masks={"nope.weight": bad_mask})


def test_to_condensed_leaves_dense_and_other_layers_and_shares_modules():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    _fan_in_(shared, 3)
    model = nn.Sequential(nn.Linear(8, 16), shared, nn.ReLU(), shared, nn.LayerNorm(16))  # [0] is dense
    fast = to_condensed(model)
    assert type(fast[0]) is nn.Linear and type(fast[4]) is nn.LayerNorm
    assert isinstance(fast[1], CondensedLinear) and fast[1] is fast[3]
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    bare = to_condensed(shared)  # a bare Linear is replaced itself
    assert isinstance(bare, CondensedLinear) and bare.k == 3
    with pytest.raises(ValueError, match=r"`kernel` can be 'auto', 'cpp', 'torch', got 'gpu'"):
        to_condensed(model, kernel="gpu")
    with pytest.raises(ValueError, match="index_dtype"):
        to_condensed(model, index_dtype=torch.int16)


def test_condensed_conv1x1():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 24, 1, stride=2, bias=False), nn.ReLU(),
        nn.Conv2d(24, 8, 3, padding=1), nn.Conv2d(8, 8, 1, padding=1),
    ).eval()  # fmt: skip
    _fan_in_(model[0], 3)
    _fan_in_(model[2], 7)
    _random_zeros(model[4], 0.5)  # a 3x3 and a padded 1x1 convolution are not channel-wise Linears: left as they are
    _random_zeros(model[5], 0.5)
    fast = to_condensed(model)
    assert [type(m) for m in fast] == [CondensedConv2d, nn.ReLU, CondensedConv2d, nn.ReLU, nn.Conv2d, nn.Conv2d]
    assert fast[2].stride == (2, 2) and (fast[2].in_channels, fast[2].out_channels, fast[2].k) == (32, 24, 7)
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 16, 9, 9), (1, 16, 2, 3), (16, 5, 5), (3, 16, 24, 24)]:
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(fast(x), expected)
            torch.testing.assert_close(to_condensed(model, kernel="torch")(x), expected)
            if x.dim() == 4:
                x_cl = x.contiguous(memory_format=torch.channels_last)
                y = fast[:4](x_cl)
                assert y.is_contiguous(memory_format=torch.channels_last)  # as the convolution returns it
                torch.testing.assert_close(y, model[:4](x_cl))
    with pytest.raises(ValueError, match=r"1x1 Conv2d with groups=1 and no padding: kernel \(3, 3\)"):
        CondensedConv2d.from_conv(model[4])


def test_condensed_linear_is_inference_only_and_checks_its_parts():
    layer = nn.Linear(12, 6)
    _fan_in_(layer, 4)
    condensed = CondensedLinear.from_linear(layer)
    x = torch.randn(3, 12, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"CondensedLinear is for inference only \(no autograd\).*torch.no_grad"):
        condensed(x)
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), layer(x))
    torch.testing.assert_close(condensed(x.detach()), layer(x).detach())
    torch.testing.assert_close(condensed.dense_weight(), layer.weight.detach())
    with pytest.raises(ValueError, match=r"expects 12 input features, got input of shape \(3, 11\)"):
        condensed(torch.randn(3, 11))
    with pytest.raises(RuntimeError, match=r"input dtype torch.float64 differs from the layer's torch.float32"):
        condensed(torch.randn(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"the rows hold 4 to 12 non-zero weights"):
        CondensedLinear.from_linear(_with_dense_row(layer))
    values, indices = condensed.values, condensed.indices
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 12\), got \[0, 12\]"):
        CondensedLinear(12, values, torch.where(indices == indices.max(), 12, indices))
    with pytest.raises(ValueError, match="indices must increase strictly along each row"):
        CondensedLinear(12, values, indices.flip(1))
    with pytest.raises(ValueError, match="indices must be int32 or int64"):
        CondensedLinear(12, values, indices.to(torch.int16))
    # state_dict round trip; loaded indices are checked (the kernel reads them unchecked)
    state = condensed.state_dict()
    assert set(state) == {"values", "indices", "bias"}
    reloaded = CondensedLinear(12, torch.zeros(6, 4), torch.arange(4, dtype=torch.int32).repeat(6, 1), torch.zeros(6))
    reloaded.load_state_dict(state)
    torch.testing.assert_close(reloaded(x.detach()), layer(x).detach())
    with pytest.raises(ValueError, match="indices must lie in"):
        reloaded.load_state_dict({**state, "indices": state["indices"] + 100})
    torch.testing.assert_close(copy.deepcopy(condensed)(x.detach()), layer(x).detach())


def test_condensed_linear_sees_its_buffers_change_after_a_call():
    """The kernel's packed copy of values/indices is cached: changing the buffers in place, replacing them or
    reloading them must give the new function, not the cached one."""
    layer = nn.Linear(40, 20)
    _fan_in_(layer, 5)
    condensed = CondensedLinear.from_linear(layer, kernel="cpp")
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), layer(x))
        condensed.values.mul_(2.0)  # in place
        expected = x @ condensed.dense_weight().t() + layer.bias
        torch.testing.assert_close(condensed(x), expected)
        condensed.values = condensed.values.clone().neg_()  # a new buffer object
        torch.testing.assert_close(condensed(x), x @ condensed.dense_weight().t() + layer.bias)
        condensed.indices.copy_(condensed.indices.flip(0))  # rows swapped in place
        torch.testing.assert_close(condensed(x), x @ condensed.dense_weight().t() + layer.bias)


def _with_dense_row(layer: nn.Linear) -> nn.Linear:
    dense_row = copy.deepcopy(layer)
    with torch.no_grad():
        dense_row.weight[0] = 1.0
    return dense_row


def test_condensed_layer_with_no_kept_weight_returns_the_bias():
    values, indices = torch.zeros(5, 0), torch.zeros(5, 0, dtype=torch.int32)
    for kernel in ("cpp", "torch"):
        layer = CondensedLinear(7, values, indices, torch.arange(5.0), kernel=kernel)
        torch.testing.assert_close(layer(torch.randn(2, 7)), torch.arange(5.0).expand(2, 5))
        torch.testing.assert_close(layer(torch.randn(300, 7)), torch.arange(5.0).expand(300, 5))


# ------------------------------------------------------------------------------------- to_semi_structured


@torch.no_grad()
def _two_four_(layer: nn.Linear, seed: int = 0) -> torch.Tensor:
    """Keep 2 random weights in every group of 4 consecutive inputs; the mask."""
    g = torch.Generator().manual_seed(seed)
    groups = layer.weight.view(-1, 4)
    keep = torch.rand(groups.shape, generator=g).argsort(1)[:, :2]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(1, keep.to(groups.device), True)
    groups.mul_(mask)
    return mask.view_as(layer.weight)


def _two_four_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    _two_four_(model[0])
    _two_four_(model[2], seed=1)  # [4] stays dense
    return model.eval()


def test_to_semi_structured_refuses_the_cpu():
    model = _two_four_mlp()
    with pytest.raises(RuntimeError, match=r"CUDA GPUs only.*'0', '2', '4' are on cpu.*to_condensed"):
        to_semi_structured(model)


def test_semi_structured_layer_selection():
    model = _two_four_mlp()
    half = copy.deepcopy(model).half()
    assert semi_structured_layers(half) == ["0", "2"]  # [4] is dense: left as it is
    assert semi_structured_layers(model, dtype=torch.bfloat16) == ["0", "2"]
    assert semi_structured_layers(model) == ["0", "2"]  # float32: the selection, judged for float16
    with pytest.raises(ValueError, match=r"`dtype` must be torch.float16 or torch.bfloat16 \(or None\), got torch.float32"):
        semi_structured_layers(model, dtype=torch.float32)
    with torch.no_grad():
        half[2].weight[5, :4] = 1.0  # one group of 4 with 4 non-zero weights
    with pytest.raises(ValueError, match=r"layers are not 2:4: '2' \(not 2:4: a group of 4 inputs"):
        semi_structured_layers(half)
    with pytest.warns(UserWarning, match=r"left 1 sparse Linear layer\(s\) dense: '2'"):
        assert semi_structured_layers(half, skip_unsupported=True) == ["0"]
    # fewer than 2 non-zero weights in a group is 2:4 from the weights, not from a mask
    sparse_group = _two_four_mlp().half()
    with torch.no_grad():
        sparse_group[0].weight[0, :4] = 0.0
    assert semi_structured_layers(sparse_group) == ["0", "2"]
    masks = {"0.weight": sparse_group[0].weight != 0}
    with pytest.raises(ValueError, match=r"'0' \(not 2:4: a group of 4 inputs holds more than 2 mask entries"):
        semi_structured_layers(sparse_group, masks)
    # shapes the backend does not take, and inputs not a multiple of 4
    odd = nn.Sequential(nn.Linear(64, 8), nn.Linear(30, 16)).half()
    _two_four_(odd[0])
    with torch.no_grad():
        odd[1].weight[:, ::2] = 0
    with pytest.raises(ValueError, match=r"layers are not 2:4: '1' \(not 2:4: 30 inputs"):
        semi_structured_layers(odd)
    with pytest.warns(UserWarning) as caught:
        assert semi_structured_layers(odd, skip_unsupported=True) == []
    said = [str(w.message) for w in caught]
    assert any(re.search(r"left 1 2:4 Linear layer\(s\) dense, their shape does not fit the semi-structured"
                         r" kernel: '0' \(shape \(8, 64\): .* multiple of 16", m) for m in said), said  # fmt: skip
    assert any("left 1 sparse Linear layer(s) dense: '1' (not 2:4: 30 inputs" in m for m in said), said


def test_semi_structured_layers_of_a_2_4_trained_float32_cpu_model():
    """Issue 23: a model trained with pattern='2:4' (float32, CPU) gets its selection, not advice to train with
    2:4; the 10-row output layer the pattern masks is left out (the kernel needs rows in multiples of 16 or 32),
    and said."""
    from lightning_sparse import Sparsifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, total_steps=6, algorithm="rigl", pattern="2:4", update_interval=2,
                            seed=0)  # fmt: skip
    for _ in range(6):
        x, y = torch.randn(16, 128), torch.randint(0, 10, (16,))
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    masks = {k: v.clone() for k, v in sparsifier.masks.items()}
    sparsifier.finish()
    assert sorted(masks) == ["0.weight", "2.weight", "4.weight"]  # the output layer is masked 2:4 too
    assert model[0].weight.dtype == torch.float32 and model[0].weight.device.type == "cpu"
    for given in (None, masks):
        with pytest.warns(UserWarning, match=r"left 1 2:4 Linear layer\(s\) dense, their shape does not fit .*"
                                             r"'4' \(shape \(10, 128\): .*rows a multiple of"):  # fmt: skip
            assert semi_structured_layers(model, given) == ["0", "2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparsity needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_semi_structured_on_cuda_matches_the_dense_model(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 semi-structured sparsity needs compute capability 8.0+")
    from torch.sparse import SparseSemiStructuredTensor

    model = _two_four_mlp().cuda().to(dtype)
    fast = to_semi_structured(model)
    assert isinstance(fast[0].weight, SparseSemiStructuredTensor)
    assert isinstance(fast[2].weight, SparseSemiStructuredTensor)
    assert not isinstance(fast[4].weight, SparseSemiStructuredTensor)  # dense
    assert not isinstance(model[0].weight, SparseSemiStructuredTensor)  # the model is not modified
    for batch in (1, 7, 64):
        x = torch.randn(batch, 128, device="cuda", dtype=dtype)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), model(x), atol=2e-2, rtol=2e-2)
    also = to_semi_structured(_two_four_mlp().cuda(), dtype=dtype)  # cast by to_semi_structured
    with torch.inference_mode():
        torch.testing.assert_close(also(x), model(x), atol=2e-2, rtol=2e-2)
