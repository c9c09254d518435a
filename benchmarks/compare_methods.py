"""Every method on LeNet-300-100 / Fashion-MNIST at the same density, epochs and seeds: test error and
final density (DST at the density it learns).

    python benchmarks/compare_methods.py --epochs 20 --seeds 0 1 --density 0.05

The paper's optimizer settings (SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 100); each
method uses its own defaults (see README). Runs alternate methods within each seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fashion_mnist import run  # noqa: E402

METHODS = ["dense", "sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp", "dst"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--model", default="lenet300")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            algorithm = None if method == "dense" else method
            r = run(model=args.model, algorithm=algorithm, density=args.density, epochs=args.epochs, seed=seed)
            results[method].append(r)
            print(f"seed {seed} {method:16s} test error {r['test_error']:6.2f}%  density {r['final_density']:.4f}", flush=True)

    print(
        f"\n{args.model} on Fashion-MNIST, density {args.density}, {args.epochs} epochs, seeds {args.seeds}"
        " (mean ± std over seeds)"
    )
    print("| method | test error % | final density |\n|---|---|---|")
    for method, rs in results.items():
        errors = [r["test_error"] for r in rs]
        std = statistics.stdev(errors) if len(errors) > 1 else 0.0
        density = statistics.mean(r["final_density"] for r in rs)
        print(f"| {method} | {statistics.mean(errors):.2f} ± {std:.2f} | {density:.4f} |")


if __name__ == "__main__":
    main()
