"""Channel statistics, speedup estimates, training FLOPs and overhead logged by the callback; the end-of-fit
table and figure. The CNN tests share one fit (``cnn_fit``)."""

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_sparse import SparseTrainingCallback
from tests.helpers import DigitsCNN, DigitsMLP, digits_loader, trainer


class TwoLayer(DigitsMLP):
    def __init__(self, optimizer="sgd"):
        super().__init__(optimizer)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _fit(cb, model, **kwargs):
    t = trainer(callbacks=[cb], **kwargs)
    t.fit(model, digits_loader(image=isinstance(model, DigitsCNN)))
    return t


def test_logged_speedups_and_flops_ratio_equal_hand_computed_values():
    cb = SparseTrainingCallback(density=0.2, algorithm="static", seed=0)
    t = _fit(cb, TwoLayer(optimizer="plain_sgd"), max_epochs=1)
    masks = cb.masks
    a, b = masks["net.0.weight"], masks["net.2.weight"]
    # FLOPs of a batch of 50: 2*50*64*32 and 2*50*32*10
    f0, f2 = 2 * 50 * 64 * 32, 2 * 50 * 32 * 10
    empty_out0 = (~a.any(dim=1)).float()  # neurons of layer 0 with no weights idle inputs of layer 2
    ein0 = (~a.any(dim=0)).float().mean().item()
    eout0 = empty_out0.mean().item()
    ein2 = ((~b.any(dim=0)) | empty_out0.bool()).float().mean().item()
    eout2 = (~b.any(dim=1)).float().mean().item()
    d0, d2 = a.float().mean().item(), b.float().mean().item()
    dense_conv = (f0 + f2) / (f0 * (1 - ein0) * (1 - eout0) + f2 * (1 - ein2) * (1 - eout2))
    sparse_conv = (f0 + f2) / (f0 * d0 + f2 * d2)
    m = t.callback_metrics
    assert m["sparse/speedup_dense_conv"].item() == pytest.approx(dense_conv, rel=1e-6)
    assert m["sparse/speedup_sparse_conv"].item() == pytest.approx(sparse_conv, rel=1e-6)
    assert m["sparse/empty_in/net.2.weight"].item() == pytest.approx(ein2)
    assert m["sparse/empty_out/net.0.weight"].item() == pytest.approx(eout0)
    # static, no dense gradients: every step costs 3 f_S against 3 f_D
    assert m["sparse/train_flops_ratio"].item() == pytest.approx((f0 * d0 + f2 * d2) / (f0 + f2), rel=1e-6)
    assert 0.0 < m["sparse/overhead"].item() < 1.0


def test_sparse_momentum_pays_for_dense_weight_gradients():
    cb = SparseTrainingCallback(density=0.1, algorithm="sparse_momentum", seed=0)
    t = _fit(cb, TwoLayer(), max_epochs=1)  # one epoch: no mask update, densities constant
    d = {n: m.float().mean().item() for n, m in cb.masks.items()}
    f = {"net.0.weight": 2 * 50 * 64 * 32, "net.2.weight": 2 * 50 * 32 * 10}
    f_sparse, f_dense = sum(f[n] * d[n] for n in f), sum(f.values())
    ratio = t.callback_metrics["sparse/train_flops_ratio"].item()
    assert ratio == pytest.approx((2 * f_sparse + f_dense) / (3 * f_dense), rel=1e-6)


def test_rigl_counts_the_dense_gradient_of_update_steps():
    cb = SparseTrainingCallback(density=0.1, algorithm="rigl", update_interval=4, stop_at=1.0, seed=0)
    t = _fit(cb, TwoLayer(), max_epochs=1)  # 12 steps, updates at 4 and 8
    d = {n: m.float().mean().item() for n, m in cb.masks.items()}  # RigL keeps each layer's count
    f = {"net.0.weight": 2 * 50 * 64 * 32, "net.2.weight": 2 * 50 * 32 * 10}
    f_sparse, f_dense = sum(f[n] * d[n] for n in f), sum(f.values())
    expected = (12 * 3 * f_sparse + 2 * (f_dense - f_sparse)) / (12 * 3 * f_dense)
    assert t.callback_metrics["sparse/train_flops_ratio"].item() == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def cnn_fit(tmp_path_factory):
    """One fit shared by the tests of the callback's report on a CNN: density 0.2, ``net.0`` dense (counted but not
    masked), measured layer times, 2 epochs, a TensorBoard logger."""
    root = tmp_path_factory.mktemp("cnn")
    cb = SparseTrainingCallback(density=0.2, dense_layers=["net.0"], speedup_timing="measure", seed=0)
    logger = TensorBoardLogger(root, name="tb")
    t = _fit(cb, DigitsCNN(), max_epochs=2, logger=logger, default_root_dir=root)
    return cb, t, root


def test_conv_layers_channel_metrics_and_unmasked_layers_counted(cnn_fit):
    _, t, _ = cnn_fit
    m = t.callback_metrics
    for name in ("net.0.weight", "net.3.weight", "net.7.weight"):  # net.0 is dense but counted
        assert f"sparse/empty_in/{name}" in m and f"sparse/empty_out/{name}" in m
    assert m["sparse/empty_out/net.0.weight"].item() == 0.0
    assert m["sparse/speedup_sparse_conv"].item() > 1.0


def test_measured_timing_gives_speedups(cnn_fit):
    cb, t, _ = cnn_fit
    assert cb._report.cost_model.times is not None
    assert all(v > 0 for v in cb._report.cost_model.times.values())
    assert t.callback_metrics["sparse/speedup_sparse_conv"].item() > 1.0


def test_bad_timing_value():
    with pytest.raises(ValueError, match=r"`speedup_timing` can be flops, measure, got 'clock'"):
        SparseTrainingCallback(density=0.2, speedup_timing="clock")


def test_figure_is_a_png_and_tensorboard_gets_it(cnn_fit):
    _, _, tmp_path = cnn_fit
    png = tmp_path / "tb" / "version_0" / "sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
        assert image.size[0] > 500
    events = list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert events and any(b"sparse/summary" in e.read_bytes() for e in events)


def test_no_figure_when_disabled(tmp_path):
    cb = SparseTrainingCallback(density=0.2, figure=False, seed=0)
    _fit(cb, DigitsMLP(), max_epochs=1, default_root_dir=tmp_path)
    assert not list(tmp_path.rglob("sparsity.png"))


def test_summary_table_has_channels_and_flops_share(cnn_fit):
    cb, _, _ = cnn_fit
    table = cb.summary()
    assert "empty in" in table and "FLOPs share" in table and "estimated speedup" in table
    for name in cb.masks:
        assert name in table
    rows = [line.split() for line in table.splitlines() if line.startswith("net.")]
    shares = [float(row[-2]) for row in rows]
    assert sum(shares) == pytest.approx(1.0, abs=0.01)
    # the last column: the fraction of a masked layer's positions ever active (ITOP's R_s), at least its density
    explored = cb.sparsifier.explored()
    for row in rows:
        if row[0] in cb.masks:
            assert float(row[-1]) == pytest.approx(explored.layers[row[0]], abs=5e-5)
            assert float(row[-1]) >= float(row[2]) - 1e-4
        else:
            assert row[-1] == "-"
    assert f"explored (R_s): {explored.model:.4f} of the masked positions have been active" in table
