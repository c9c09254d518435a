"""Wall-clock time per training step: dense training vs ``compute="dense"`` vs ``compute="condensed"`` (issue 21).

A step is forward, backward, optimizer step, masking and mask updates (RigL, ``pattern="fan_in"``; updates every
``--interval`` steps, amortized over the timed steps), on the CPU, at 1 and 2 threads:

The synthetic parts time single steps of every configuration (dense, and each density in each compute mode), all
models alive at once, in rounds of ``--steps`` timed steps per configuration in a rotating order (see
:func:`synthetic`): the median plain step plus the extra time of the update steps (the dense-gradient backward and
the update) divided by ``--interval`` (RigL's 100). Updates run in ``functional/selection.py``, whose speed is
issue 21's item 3.

* ``mlp``: an MLP 3072-3072-3072-10 (ReLU) at batch 256 and 1, random data, SGD with momentum (``--optimizer
  sgd-fused``: ``fused=True``; the SGD step over the dense weights is paid in every mode, and torch's
  default implementation, on the CPU one loop of ops per tensor, spends about three times as long on it as the fused
  one);
* ``lenet``: LeNet-300-100 on Fashion-MNIST, one whole epoch at batch 128 (the time of the epoch and the test
  error after it: accuracy is unchanged by the compute mode), read as ``examples/fashion_mnist.py`` reads it;
* ``vit``: the MLP blocks of ``examples/vit_fashion_mnist.py`` (4 blocks 64-128-64, GELU, residual) on the
  17 tokens of 128 images (2176 rows).

The LeNet epochs alternate the modes, ``--repeats`` epochs each, and take medians (the machine may be shared). The
dense column has no Sparsifier at all.

    python benchmarks/training_speed.py                       # everything (a few minutes)
    python benchmarks/training_speed.py --parts mlp --threads 2 --densities 0.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_sparse import Sparsifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

MODES = ("dense", "compute=dense", "compute=condensed")
OPTIMIZER: dict[str, bool] = {}  # torch.optim.SGD's implementation flags, from --optimizer (the same in every mode)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 10))


def lenet() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class VitMLPs(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 128, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(depth)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def trainer_for(make, mode: str, density: float, total: int, interval: int):
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **OPTIMIZER)
    sparsifier = None
    if mode != "dense":
        sparsifier = Sparsifier(model, optimizer, total_steps=total, algorithm="rigl", density=density, pattern="fan_in",
                                update_interval=interval, seed=0, compute=mode.split("=")[1])  # fmt: skip

    def step(x: torch.Tensor, y: torch.Tensor) -> bool:
        nn.functional.cross_entropy(model(x), y).backward()
        if sparsifier is not None:
            sparsifier.before_optimizer_step()
        optimizer.step()
        updated = sparsifier is not None and sparsifier.step() is not None
        optimizer.zero_grad()
        return updated

    return model, step


def synthetic(name, make, shape, densities, steps, interval, repeats) -> None:
    """Every configuration (dense, and each density in each compute mode) trains its own model, all alive at once,
    in rounds: per round each configuration runs one untimed step (its data back in the caches) and ``steps`` timed
    ones, the configurations in a rotating order. A machine whose speed drifts (shared CPUs: figures drifted by
    1.5x between runs minutes apart) then slows every configuration alike. Per configuration: the median plain step,
    plus the extra time of its update steps (RigL's dense gradient and the update; one per round) divided by
    ``interval``."""
    print(f"\n{name}: ms per training step (RigL fan_in, update every {interval} steps), speed-up over dense")
    print(f"{'density':>8} | " + " | ".join(f"{m:>17}" for m in MODES) + " | condensed/dense")
    configs = [("dense", 1.0)] + [(m, d) for d in densities for m in MODES[1:]]
    block = steps + 1
    total = 10 * block * (repeats + 2)  # RigL stops updating at 75 % of its steps: updates in every round
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(*shape, generator=gen), torch.randint(0, 10, shape[:-1], generator=gen)
    trainers = {c: trainer_for(make, c[0], c[1], total, block)[1] for c in configs}
    for step in trainers.values():  # the first update runs at step `block`: before the timed rounds
        for _ in range(block):
            step(x, y)
    plain: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    updates: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    for r in range(repeats):
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            step = trainers[c]
            for i in range(block):
                start = time.perf_counter()
                updated = step(x, y)
                elapsed = time.perf_counter() - start
                if updated:
                    updates[c].append(elapsed)
                elif i:
                    plain[c].append(elapsed)
    seconds = {}
    for c in configs:
        base = statistics.median(plain[c])
        seconds[c] = base + (statistics.mean(updates[c]) - base) / interval if updates[c] and c[0] != "dense" else base
    base = seconds[("dense", 1.0)] * 1e3
    for d in densities:
        cells = [base] + [seconds[(m, d)] * 1e3 for m in MODES[1:]]
        print(f"{d:>8} | " + " | ".join(f"{c:>17.2f}" for c in cells) + f" | {base / cells[2]:.2f}x")


def lenet_epochs(densities, repeats) -> None:
    """Per density and repetition, one model per mode trains one epoch on the same batches: each batch is read once
    and the three modes take their step on it one after the other (in a rotating order), so that a drift of the
    machine's speed slows every mode alike. An epoch's time is the sum of its steps (reading the data, the same in
    every mode, is printed apart); medians over the repetitions."""
    from fashion_mnist import load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    xt, yt = test.tensors
    print("\nLeNet-300-100 on Fashion-MNIST: one epoch (batch 128, RigL fan_in, update every 100 steps): s, test error")
    for d in densities:
        times: dict[str, list[float]] = {m: [] for m in MODES}
        reading: list[float] = []
        errors: dict[str, float] = {}
        for _ in range(repeats):  # every repetition sees the same data order
            loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
            trainers = {mode: trainer_for(lenet, mode, d, len(loader), 100) for mode in MODES}
            spent = dict.fromkeys(MODES, 0.0)
            read = 0.0
            batches = iter(loader)
            for i in range(len(loader)):
                start = time.perf_counter()
                x, y = next(batches)
                x = x.float()
                read += time.perf_counter() - start
                for mode in MODES[i % len(MODES) :] + MODES[: i % len(MODES)]:
                    start = time.perf_counter()
                    trainers[mode][1](x, y)
                    spent[mode] += time.perf_counter() - start
            reading.append(read)
            for mode, (model, _) in trainers.items():
                times[mode].append(spent[mode])
                with torch.no_grad():
                    errors[mode] = float((model(xt.float()).argmax(1) != yt).float().mean())
        for mode in MODES:
            print(f"  density {d:<5} {mode:>18}: {statistics.median(times[mode]):6.3f} s/epoch,"
                  f" test error {100 * errors[mode]:.2f} %")  # fmt: skip
        dense = statistics.median(times["dense"])
        condensed = statistics.median(times["compute=condensed"])
        print(f"  condensed/dense {dense / condensed:.2f}x; reading the data: {statistics.median(reading):.3f} s/epoch"
              " (not in the figures above)")


def warm_kernels() -> None:
    """Build (or load) the C++ kernels before anything is timed: a first build takes seconds."""
    from lightning_sparse import kernels

    for build in (kernels.cpu_masked_zero, kernels.cpu_select, kernels.cpu_condensed_linear, kernels.cpu_condensed_train):
        build("auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["mlp", "lenet", "vit"], choices=["mlp", "lenet", "vit"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.2, 0.1, 0.05])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    parser.add_argument("--interval", type=int, default=100, help="RigL update interval (amortized in the timing)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (synthetic parts) or epochs per mode (lenet)")
    parser.add_argument(
        "--optimizer", choices=["sgd", "sgd-fused"], default="sgd",
        help="torch.optim.SGD as it defaults (on the CPU: a loop of ops per tensor), or fused=True (one C++ pass per tensor)",
    )  # fmt: skip
    args = parser.parse_args()
    OPTIMIZER.update({"fused": True} if args.optimizer == "sgd-fused" else {})
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; optimizer: SGD momentum 0.9 ({args.optimizer})")
    warm_kernels()
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n===== {threads} thread(s) =====")
        if "mlp" in args.parts:
            for batch in (256, 1):
                synthetic(f"MLP 3072-3072-3072-10, batch {batch}", mlp, (batch, 3072), args.densities, args.steps,
                          args.interval, args.repeats)  # fmt: skip
        if "vit" in args.parts:
            synthetic("ViT MLP blocks (4 x 64-128-64, 2176 rows)", VitMLPs, (2176, 64), args.densities, args.steps,
                      args.interval, args.repeats)  # fmt: skip
        if "lenet" in args.parts:
            lenet_epochs(args.densities, args.repeats)


if __name__ == "__main__":
    main()
