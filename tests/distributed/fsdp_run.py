"""Run by tests/distributed/test_fsdp.py: short FSDP2 fits (Lightning's ModelParallelStrategy, 2 CPU processes, gloo) that
save, per rank, what the test checks. Lightning's launcher starts this script again for rank 1, so everything
below runs in both processes; several fits run one after the other in the same two processes.

    python tests/distributed/fsdp_run.py --out DIR --algorithms set rigl
    python tests/distributed/fsdp_run.py --out DIR --resume     # uninterrupted vs checkpoint-and-resume, sparse momentum

The model builds its layers in ``configure_model`` and shards each Linear and the whole network with
``fully_shard``, as Lightning's FSDP2 guide does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_sparse import DST, SparseTrainingCallback, attach_dst_thresholds  # noqa: E402
from tests.helpers import digits_loader  # noqa: E402
from tests.helpers import trainer as quiet_trainer

STEP_ALGORITHMS = {"rigl": 2, "dsr": 2, "gmp": 2}
DENSITY = 0.2


class ShardedMLP(L.LightningModule):
    """64-31-16-10 MLP built in ``configure_model`` (31 rows: an uneven split over 2 processes) and sharded."""

    def __init__(self, optimizer: str = "sgd", dst: bool = False) -> None:
        super().__init__()
        self.net: nn.Module | None = None
        self.optimizer = optimizer
        self.dst = dst

    def configure_model(self) -> None:
        if self.net is not None:
            return
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 31), nn.ReLU(), nn.Linear(31, 16), nn.ReLU(), nn.Linear(16, 10))
        if self.dst:  # DST's thresholds go on before `fully_shard`, which shards them like their weights' rows
            attach_dst_thresholds(self.net)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Checks(L.Callback):
    """After every optimizer step: masked-out local weights are zero; records local masks and global counts."""

    def __init__(self, sparse: SparseTrainingCallback) -> None:
        self.sparse = sparse
        self.masks: list[dict[str, torch.Tensor]] = []
        self.counts: list[dict[str, int]] = []
        self.leaks = 0
        self.sharded = 0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        counts = {}
        for name, mask in self.sparse.masks.items():
            weight = _raw_weight(pl_module, name)
            self.sharded += isinstance(weight, DTensor)
            local = weight.to_local() if isinstance(weight, DTensor) else weight
            assert mask.shape == local.shape, (name, mask.shape, local.shape)
            if not isinstance(self.sparse.options.algorithm, DST):  # DST keeps raw weights outside its masks
                self.leaks += int((local.detach()[~mask] != 0).sum())
            count = mask.sum().reshape(1)
            torch.distributed.all_reduce(count)
            counts[name] = int(count)
        self.counts.append(counts)
        self.masks.append({k: v.detach().cpu().clone() for k, v in self.sparse.masks.items()})


def _raw_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter behind mask ``name``: the weight, or DST's raw weight under its parametrization."""
    module = model.get_submodule(name.removesuffix(".weight"))
    return module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _Forbidden:
    """Counts calls of DTensor methods that materialize or redistribute a full tensor."""

    def __init__(self) -> None:
        self.calls = {"full_tensor": 0, "redistribute": 0}
        self._saved = {name: getattr(DTensor, name) for name in self.calls}

    def __enter__(self) -> _Forbidden:
        for name, original in self._saved.items():
            def counting(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)
            setattr(DTensor, name, counting)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(DTensor, name, original)


def _trainer(out: Path, callbacks: list, epochs: int, **kwargs: Any) -> L.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return quiet_trainer(devices=2, strategy=strategy, max_epochs=epochs, callbacks=callbacks, default_root_dir=out,
                         **kwargs)  # fmt: skip


def run_algorithm(out: Path, algorithm: str) -> None:
    if algorithm == "dst":
        sparse = SparseTrainingCallback(algorithm=DST(alpha=0.05), seed=7, figure=False)
    else:
        sparse = SparseTrainingCallback(
            density=DENSITY, algorithm=algorithm, update_interval=STEP_ALGORITHMS.get(algorithm), seed=7, figure=False
        )
    checks = Checks(sparse)
    model = ShardedMLP(optimizer="adam" if algorithm == "dsr" else "sgd", dst=algorithm == "dst")
    trainer = _trainer(out, [sparse, checks], epochs=3)
    with _Forbidden() as forbidden:
        trainer.fit(model, digits_loader(n=400))
    state = sparse.state_dict()  # full masks, gathered from both processes
    weights = _full_weights(model)
    if algorithm == "dst":  # DST's masks live in the model: gather the local ones
        thresholds = {n: p for n, p in model.named_parameters() if n.endswith("threshold")}
        state["masks"] = {}
        for name, mask in sparse.masks.items():
            parts = [torch.zeros(0)] * trainer.world_size
            torch.distributed.all_gather_object(parts, mask.cpu())
            state["masks"][name] = torch.cat(parts)
        state["thresholds_sharded"] = all(isinstance(t, DTensor) for t in thresholds.values()) and len(thresholds) == 3
        state["optimized_thresholds"] = sum(
            any(p is t for g in trainer.optimizers[0].param_groups for p in g["params"]) for t in thresholds.values()
        )
        state["final_local_leaks"] = sum(
            int((_raw_weight(model, n).to_local().detach()[~m] != 0).sum()) for n, m in sparse.masks.items()
        )
    result = {
        "state": {k: v for k, v in state.items() if k in ("thresholds_sharded", "optimized_thresholds",
                                                          "final_local_leaks")},  # fmt: skip
        "leaks": checks.leaks,
        "sharded": checks.sharded,
        "counts": checks.counts,
        "local_masks": checks.masks,
        "full_masks": state["masks"],
        "num_updates": state.get("num_updates", 0),
        "forbidden_calls": forbidden.calls,
        "weights": weights,
        "shapes": {k: tuple(v.shape) for k, v in weights.items()},
    }
    torch.save(result, out / f"{algorithm}_rank{trainer.global_rank}.pt")


def run_resume(out: Path) -> None:
    def fit(tag: str, epochs: int, ckpt_path: str | None = None) -> tuple[SparseTrainingCallback, ShardedMLP, int]:
        sparse = SparseTrainingCallback(density=DENSITY, seed=7, figure=False)
        checkpoint = ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1)
        model = ShardedMLP()
        trainer = _trainer(out / tag, [sparse, checkpoint], epochs=epochs, enable_checkpointing=True)
        trainer.fit(model, digits_loader(n=400), ckpt_path=ckpt_path)
        return sparse, model, trainer.global_rank

    full, model_full, rank = fit("full", 3)
    resumed, model_resumed, _ = fit("resumed", 3, ckpt_path=str(out / "ckpt" / "epoch=0.ckpt"))
    torch.save(
        {
            "full": {"state": full.state_dict(), "weights": _full_weights(model_full)},
            "resumed": {"state": resumed.state_dict(), "weights": _full_weights(model_resumed)},
        },
        out / f"resume_rank{rank}.pt",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--algorithms", nargs="*", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    for i, algorithm in enumerate(args.algorithms):
        run_algorithm(args.out, algorithm)
        os.environ["LOCAL_RANK"] = os.environ.get("LOCAL_RANK", "0")  # later fits run in these two processes
    if args.resume:
        run_resume(args.out)


if __name__ == "__main__":
    main()
