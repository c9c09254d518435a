"""Issue 13: every documented metric at every documented moment, for every method, read back from a
CSVLogger; update metrics at the step of the update (not at `log_every_n_steps` multiples)."""

from __future__ import annotations

import csv

import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import SparseTrainingCallback
from tests.helpers import DigitsMLP, digits_loader, trainer

LAYERS = ("net.0.weight", "net.2.weight", "net.4.weight")
PER_LAYER = [f"sparse/{kind}/{name}" for kind in ("density", "empty_in", "empty_out") for name in LAYERS]
DOCUMENTED = ["sparse/density", *PER_LAYER, "sparse/speedup_dense_conv", "sparse/speedup_sparse_conv",
              "sparse/train_flops_ratio", "sparse/overhead"]  # fmt: skip


def _rows(tmp_path, callback, epochs=3, **kwargs):
    logger = CSVLogger(tmp_path, name="run")
    model = DigitsMLP(optimizer="adam") if callback.algorithm_name == "dsr" else DigitsMLP()
    t = trainer(max_epochs=epochs, callbacks=[callback], logger=logger, log_every_n_steps=50, **kwargs)
    t.fit(model, digits_loader())
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize("algorithm", ["sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp", "dst"])
def test_every_documented_metric_at_every_epoch_end(tmp_path, algorithm):
    cb = SparseTrainingCallback(algorithm=algorithm, seed=0, figure=False,
                                **({} if algorithm == "dst" else {"density": 0.2}))  # fmt: skip
    rows = _rows(tmp_path, cb)
    epoch_rows = [r for r in rows if "sparse/prune_rate" not in r and "sparse/density" in r]
    assert [int(r["epoch"]) for r in epoch_rows] == [0, 1, 2], algorithm
    for epoch, row in enumerate(epoch_rows):
        missing = [m for m in DOCUMENTED if m not in row]
        assert not missing, (algorithm, epoch, missing)
        assert int(row["step"]) == 12 * (epoch + 1) - 1  # Lightning writes epoch metrics at the epoch's last step


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
    # the boundary update of epoch e runs before epoch e + 1's first step: logged on the epoch's last step
    assert [int(r["step"]) for r in rows if "sparse/prune_rate" in r] == [11, 23, 35]
