"""lightning_sparse.export: ``compact`` removes exactly the channels that do not change the output; ``to_sparse``
stores sparse Linear weights in CSR. LeNet-5, a small VGG with BatchNorm, and torchvision's ResNet-50."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from lightning_sparse.export import SparseLinear, compact, compaction_report, to_sparse


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
