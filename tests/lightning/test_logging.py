"""Issue 13: every documented metric at every documented moment, for every method, read back from a
CSVLogger; update metrics at the step of the update (not at `log_every_n_steps` multiples). Issue 23: one meaning
of `sparse/density` (the masks'), `sparse/nonzero_density` by its own name, one row per step, quiet options."""

from __future__ import annotations

import csv
import logging
from collections import Counter

import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import SparseTrainingCallback
from tests.helpers import DigitsCNN, DigitsMLP, digits_loader, trainer

LAYERS = ("net.0.weight", "net.2.weight", "net.4.weight")
KINDS = ("density", "nonzero_density", "explored", "empty_in", "empty_out")
PER_LAYER = [f"sparse/{kind}/{name}" for kind in KINDS for name in LAYERS]
DOCUMENTED = ["sparse/density", "sparse/nonzero_density", "sparse/explored", *PER_LAYER, "sparse/train_flops_ratio", "sparse/overhead"]
SPEEDUPS = ("sparse/speedup_dense_conv", "sparse/speedup_sparse_conv")


def _rows(tmp_path, callback, epochs=3, **kwargs):
    logger = CSVLogger(tmp_path, name="run")
    model = kwargs.pop("model", None) or (DigitsMLP(optimizer="adam") if callback.algorithm_name == "dsr" else DigitsMLP())
    loader = digits_loader(image=isinstance(model, DigitsCNN))
    t = trainer(max_epochs=epochs, callbacks=[callback], logger=logger, log_every_n_steps=50, **kwargs)
    t.fit(model, loader)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _sparse_rows(rows):
    return [r for r in rows if any(k.startswith("sparse/") for k in r)]


def _mask_density(masks, names=None):
    names = list(masks) if names is None else names
    return sum(int(masks[n].sum()) for n in names) / sum(masks[n].numel() for n in names)


@pytest.mark.parametrize("algorithm", ["sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp", "dst"])
def test_every_documented_metric_at_every_epoch_end(tmp_path, algorithm):
    cb = SparseTrainingCallback(algorithm=algorithm, seed=0, figure=False,
                                **({} if algorithm == "dst" else {"density": 0.2}))  # fmt: skip
    rows = _sparse_rows(_rows(tmp_path, cb))
    # one row per epoch end (an update at the same step shares it), at the epoch's last step, as Lightning's
    assert [int(r["step"]) for r in rows if int(r["step"]) % 12 == 11] == [11, 23, 35], algorithm
    assert [int(r["epoch"]) for r in rows if int(r["step"]) % 12 == 11] == [0, 1, 2], algorithm
    for row in rows:
        missing = [m for m in DOCUMENTED if m not in row]
        assert not missing, (algorithm, row["step"], missing)
        if "sparse/prune_rate" not in row:  # at an update: the weights before it (GMP prunes them then)
            assert float(row["sparse/nonzero_density"]) <= float(row["sparse/density"]), algorithm
        # the speedup estimates of a plain MLP mean something only once a layer has empty channels
        emptied = any(float(row[f"sparse/empty_{io}/{n}"]) > 0 for io in ("in", "out") for n in LAYERS)
        assert all((m in row) == emptied for m in SPEEDUPS), (algorithm, row["step"], emptied)
        # ITOP's R_s: every active position has been explored
        assert float(row["sparse/explored"]) >= float(row["sparse/density"]) - 1e-6, algorithm
    # ... and it never decreases
    explored = [float(r["sparse/explored"]) for r in rows]
    assert explored == sorted(explored), algorithm
    if algorithm in ("static", "snip"):  # fixed masks explore nothing beyond them
        assert explored[-1] == pytest.approx(float(rows[-1]["sparse/density"]), abs=1e-6)
    elif algorithm in ("set", "sparse_momentum"):  # the ones that update within these 36 steps
        assert explored[-1] > float(rows[-1]["sparse/density"]) + 0.01, algorithm


def test_step_updates_are_logged_at_their_steps(tmp_path):
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=5, seed=0, figure=False)
    rows = _rows(tmp_path, cb, epochs=2)
    steps = [int(r["step"]) for r in rows if "sparse/prune_rate" in r]
    # updates after optimizer steps 5, 10, 15, 20 (window 0.75 * 24 = 18: the one at 20 is the last), on
    # Lightning's step axis (the row of the training batch whose optimizer step triggered them)
    assert steps == [4, 9, 14, 19]
    update_rows = [r for r in rows if "sparse/prune_rate" in r]
    for row in update_rows:
        assert all(m in row for m in ("sparse/density", *(f"sparse/density/{n}" for n in LAYERS)))


def test_epoch_updates_are_logged_at_the_step_they_run(tmp_path):
    cb = SparseTrainingCallback(density=0.2, seed=0, figure=False)  # sparse momentum: at epoch boundaries
    rows = _rows(tmp_path, cb, epochs=4)
    # the boundary update of epoch e runs before epoch e + 1's first step: logged on the epoch's last step, in
    # that epoch's row
    assert [int(r["step"]) for r in rows if "sparse/prune_rate" in r] == [11, 23, 35]
    assert [int(r["step"]) for r in _sparse_rows(rows)] == [11, 23, 35, 47]
    assert [int(r["epoch"]) for r in _sparse_rows(rows)] == [0, 1, 2, 3]


def test_rigl_one_row_per_step_and_density_is_the_masks(tmp_path):
    """Issue 23: RigL updating at an epoch's last step wrote two rows (0.09999 and 0.08478: the non-zero density
    before the update, and after it, grown weights at zero); now one row with the masks' density."""
    cb = SparseTrainingCallback(density=0.1, algorithm="rigl", update_interval=12, seed=0, figure=False)
    rows = _sparse_rows(_rows(tmp_path, cb, epochs=4))
    steps = [int(r["step"]) for r in rows]
    assert steps == [11, 23, 35, 47] and max(Counter(steps).values()) == 1
    assert ["sparse/prune_rate" in r for r in rows] == [True, True, True, False]
    masks = {k: v.cpu() for k, v in cb.masks.items()}
    for row in rows:  # RigL moves weights, never changes the masks' counts: every row is the final masks'
        assert float(row["sparse/density"]) == _mask_density(masks)
        for name in LAYERS:
            assert float(row[f"sparse/density/{name}"]) == _mask_density(masks, [name])
        assert float(row["sparse/nonzero_density"]) <= float(row["sparse/density"])
    # grown weights start at zero: right after the first update, not every active weight is non-zero
    assert float(rows[0]["sparse/nonzero_density"]) > 0.09  # the weights as trained, before the update
    assert cb.sparsifier.last_update is not None


def test_gmp_density_is_the_masks_after_each_update(tmp_path):
    """A method that changes the counts: each update's row holds the masks' density after the update, the last
    one the final masks'."""
    cb = SparseTrainingCallback(density=0.2, algorithm="gmp", update_interval=4, seed=0, figure=False)
    rows = _sparse_rows(_rows(tmp_path, cb, epochs=3))
    densities = [float(r["sparse/density"]) for r in rows]
    assert densities == sorted(densities, reverse=True) and densities[0] < 1.0
    assert densities[-1] == _mask_density({k: v.cpu() for k, v in cb.masks.items()})
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps))


def test_update_report_repr_is_one_line(tmp_path):
    cb = SparseTrainingCallback(density=0.1, algorithm="rigl", update_interval=12, seed=0, figure=False)
    _rows(tmp_path, cb, epochs=2)
    text = repr(cb.sparsifier.last_update)
    assert text.startswith("UpdateReport(step=12, rate=") and "\n" not in text and len(text) < 200
    assert "3 layers, active=272" in text and "tensor" not in text


def test_per_layer_metrics_off_and_no_table(tmp_path, caplog):
    cb = SparseTrainingCallback(density=0.2, algorithm="rigl", update_interval=5, seed=0, figure=False,
                                table=False, per_layer_metrics=False)  # fmt: skip
    with caplog.at_level(logging.INFO):
        rows = _sparse_rows(_rows(tmp_path, cb, epochs=2))
    keys = {k for r in rows for k in r if k.startswith("sparse/")}
    assert {"sparse/density", "sparse/nonzero_density", "sparse/prune_rate", "sparse/overhead"} <= keys
    assert not [k for k in keys if k.count("/") > 1], keys  # no sparse/<metric>/<layer>
    assert "final masks" not in caplog.text and "FLOPs share" not in caplog.text
    quiet = SparseTrainingCallback(density=0.2, seed=0, figure=False)
    with caplog.at_level(logging.INFO):
        _rows(tmp_path / "loud", quiet, epochs=1)
    assert "FLOPs share" in caplog.text  # the table by default


@pytest.mark.parametrize("option", ["table", "per_layer_metrics"])
def test_quiet_options_are_booleans(option):
    with pytest.raises(ValueError, match=rf"`{option}` must be True or False, got 'no' \(str\)"):
        SparseTrainingCallback(density=0.2, **{option: "no"})


def test_speedups_of_a_plain_mlp_without_empty_channels_are_not_logged(tmp_path):
    cb = SparseTrainingCallback(density=0.9, algorithm="static", seed=0, figure=False)
    rows = _sparse_rows(_rows(tmp_path, cb, epochs=1))
    assert rows and all(float(r[f"sparse/empty_in/{n}"]) == 0 for r in rows for n in LAYERS)
    assert not [m for r in rows for m in SPEEDUPS if m in r]
    assert "estimated speedup" not in cb.summary()
    conv = SparseTrainingCallback(density=0.9, algorithm="static", seed=0, figure=False)
    rows = _sparse_rows(_rows(tmp_path / "cnn", conv, epochs=1, model=DigitsCNN()))
    assert rows and all(m in r for r in rows for m in SPEEDUPS)  # a convolution: the estimates apply


def test_the_figure_names_the_network_not_the_lightningmodule():
    import torch
    from torch import nn

    from lightning_sparse.lightning.loggers import network_name

    class LeNet(nn.Sequential):  # a named network built as a Sequential (the examples' LeNets)
        pass

    class Module(nn.Module):  # stands for a LightningModule
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

    named = Module(LeNet(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    assert network_name(named, ["net.0.weight", "net.2.weight"]) == "LeNet"
    assert network_name(Module(torch.compile(LeNet(nn.Linear(4, 2)))), ["net.0.weight"]) == "LeNet"
    # a plain container says nothing: the LightningModule's class; so do layers of the module itself
    assert network_name(Module(nn.Sequential(nn.Linear(4, 2))), ["net.0.weight"]) == "Module"
    assert network_name(Module(nn.ModuleList([nn.Linear(4, 2)])), ["net.0.weight"]) == "Module"
    assert network_name(Module(nn.Linear(4, 2)), ["net.weight", "head.weight"]) == "Module"
