"""Test error and time per epoch of LeNet-300-100 on Fashion-MNIST: dense vs sparse momentum at 5% weights.

Runs alternate (dense, sparse, dense, sparse, ...) over the seeds in one process, so both see the same
machine state. Time per epoch is the training part only (validation excluded); the dense run has no
callback, so the ratio of the medians is the callback's cost.

    python benchmarks/fashion_mnist_lenet300.py --epochs 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fashion_mnist import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--model", default="lenet300")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {"dense": [], "sparse": []}
    for seed in args.seeds:
        for kind in ("dense", "sparse"):
            algorithm = None if kind == "dense" else "sparse_momentum"
            r = run(model=args.model, algorithm=algorithm, density=args.density, epochs=args.epochs, seed=seed)
            results[kind].append(r)
            print(
                f"seed {seed} {kind:6s}: test error {r['test_error']:.2f}%  density {r['final_density']:.4f}"
                f"  median epoch {statistics.median(r['epoch_times']):.3f} s",
                flush=True,
            )

    print(f"\n{args.model} on Fashion-MNIST, {args.epochs} epochs, seeds {args.seeds} (mean ± std over seeds)")
    print(f"{'run':<22} {'test error %':>14} {'final density':>14} {'s/epoch (median)':>17}")
    times = {}
    for kind, rs in results.items():
        errors = [r["test_error"] for r in rs]
        std = statistics.stdev(errors) if len(errors) > 1 else 0.0
        times[kind] = statistics.median(t for r in rs for t in r["epoch_times"])
        label = "dense" if kind == "dense" else f"sparse momentum d={args.density}"
        density = statistics.mean(r["final_density"] for r in rs)
        print(f"{label:<22} {statistics.mean(errors):>8.2f} ± {std:<4.2f} {density:>14.4f} {times[kind]:>17.3f}")
    print(f"speed with the callback: {times['dense'] / times['sparse']:.3f}x of dense (epoch-time ratio of medians)")


if __name__ == "__main__":
    main()
