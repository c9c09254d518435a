"""Run by tests/distributed/test_distributed.py: short DDP fits (2 CPU processes, gloo) that save, per rank, the masks
after every optimizer step, the final weights and the warnings of ``lightning_sparse``. Lightning's DDP launcher
starts this script again for rank 1, so everything below runs in both processes; the fits run one after the other
in the same two processes.

    python tests/distributed/ddp_run.py --out DIR --runs set rigl:ablation sparse_momentum:diverge

A run is ``ALGORITHM`` or ``ALGORITHM:VARIANT``: ``ablation`` (``pattern="fan_in"``, ``neuron_ablation=1.0``),
``diverge`` (rank 1 moves one weight of its masks at the start of epoch 1), ``late`` (the layers built in
``configure_model``), ``fanin`` (``pattern="fan_in"``, seed 0) or ``condensed`` (the same with
``compute="condensed"``). Each saves ``<tag>_rank<r>.pt``, the
tag being ``ALGORITHM`` or ``ALGORITHM_VARIANT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_sparse import SparseTrainingCallback  # noqa: E402
from tests.helpers import DigitsMLP, digits_loader  # noqa: E402
from tests.helpers import trainer as quiet_trainer

STEP_ALGORITHMS = {"rigl": 2, "dsr": 2, "gmp": 2, "granet": 2, "mest": 2, "topkast": 2}  # update intervals short enough for a few updates


class BuiltLate(DigitsMLP):
    """The MLP built in ``configure_model`` (the ``late`` variant)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, 32),
                torch.nn.ReLU(),
                torch.nn.Linear(32, 16),
                torch.nn.ReLU(),
                torch.nn.Linear(16, 10),
            )


class Snapshots(L.Callback):
    """After every optimizer step and epoch end: a copy of the masks (and DST's thresholds)."""

    def __init__(self, sparse: SparseTrainingCallback, diverge: bool = False) -> None:
        self.sparse = sparse
        self.diverge = diverge
        self.masks: list[dict[str, torch.Tensor]] = []

    def _take(self) -> None:
        self.masks.append({k: v.detach().cpu().clone() for k, v in self.sparse.masks.items()})

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._take()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.diverge and trainer.global_rank == 1 and trainer.current_epoch == 1:
            mask = next(iter(self.sparse.masks.values()))  # a view of the callback's mask: flip a weight
            position = int(mask.view(-1).nonzero()[0])
            mask.view(-1)[position] = False
            mask.view(-1)[int((~mask).view(-1).nonzero()[-1])] = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._take()


class Warnings(logging.Handler):
    """The warnings ``lightning_sparse`` logs during one fit."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(out: Path, algorithm: str, variant: str, epochs: int) -> None:
    L.seed_everything(1234)
    structured = {"pattern": "fan_in", "neuron_ablation": 1.0} if variant == "ablation" else {}
    if variant in ("fanin", "condensed"):  # compute="dense" against compute="condensed", the same seed
        structured = {"pattern": "fan_in", "seed": 0, "compute": "dense" if variant == "fanin" else "condensed"}
    sparse = SparseTrainingCallback(
        density=None if algorithm == "dst" else 0.2,
        algorithm=algorithm,
        update_interval=STEP_ALGORITHMS.get(algorithm),
        **{"seed": None, **structured},  # seed None: drawn on rank zero and broadcast
    )
    snapshots = Snapshots(sparse, variant == "diverge")
    trainer = quiet_trainer(
        devices=2, strategy="ddp", max_epochs=epochs, callbacks=[sparse, snapshots], default_root_dir=out
    )
    model = (BuiltLate if variant == "late" else DigitsMLP)(optimizer="adam" if algorithm == "dst" else "sgd")
    warnings = Warnings()
    logging.getLogger("lightning_sparse").addHandler(warnings)
    try:
        trainer.fit(model, digits_loader())
    finally:
        logging.getLogger("lightning_sparse").removeHandler(warnings)
    state = {
        "masks": snapshots.masks,
        "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_updates": sparse.state_dict()["num_updates"],
        "world_size": trainer.world_size,
        "explored": dataclasses.asdict(sparse.sparsifier.explored()),
        "explored_state": sparse.state_dict().get("explored"),
        "warnings": warnings.messages,
    }
    tag = f"{algorithm}_{variant}" if variant else algorithm
    torch.save(state, out / f"{tag}_rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", default=["sparse_momentum"])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    for spec in args.runs:
        algorithm, _, variant = spec.partition(":")
        run(args.out, algorithm, variant, args.epochs)
        os.environ["LOCAL_RANK"] = os.environ.get("LOCAL_RANK", "0")  # later fits run in these two processes


if __name__ == "__main__":
    main()
