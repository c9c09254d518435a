"""Run by tests/distributed/test_spawn.py: one ``ddp_spawn`` fit (2 CPU processes) per algorithm, one after the other
in this one launch. The main process then saves what came back: the trained weights and the callback's masks.

    python tests/distributed/spawn_run.py --out DIR --algorithms set dst
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_sparse import SparseTrainingCallback  # noqa: E402
from tests.helpers import DigitsMLP, digits_loader  # noqa: E402
from tests.helpers import trainer as quiet_trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--algorithms", nargs="+", default=["set"])
    args = parser.parse_args()
    for algorithm in args.algorithms:
        dst = algorithm == "dst"
        sparse = SparseTrainingCallback(density=None if dst else 0.2, algorithm=algorithm, seed=1, figure=False)
        model = DigitsMLP(optimizer="adam" if dst else "sgd")
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = quiet_trainer(devices=2, strategy="ddp_spawn", max_epochs=2, callbacks=[sparse])
        trainer.fit(model, digits_loader(n=400))
        result = {"masks": dict(sparse.masks), "state": sparse.state_dict(), "weights": model.state_dict()}
        torch.save({**result, "initial": initial}, args.out / f"{algorithm}.pt")


if __name__ == "__main__":
    main()
