"""Structured sparsity at inference time (issue 14). Part (a): kernel figures of the condensed CPU export.

Part (a) times one Linear layer with a constant fan-in (every output row reads the same number ``k`` of inputs,
as after training with ``pattern="fan_in"``): 768 -> 3072 and 3072 -> 768 (a transformer MLP's two layers) at
80, 90 and 95 % sparsity (``k = round((1 - sparsity) * in)``, random positions and values), batch 1 and 256,
on 1 and 2 threads (``torch.set_num_threads``), float32, ``torch.inference_mode``, three implementations:

* **dense**: ``nn.Linear`` with the zeros stored (``F.linear``: MKL/oneDNN sgemm);
* **CSR**: ``torch.sparse.mm(weight.to_sparse_csr(), x.T)`` (no bias, and the ``[out, batch]`` result not
  transposed back: the cheapest form of the CSR product, so its figures are a lower bound);
* **condensed**: :class:`lightning_sparse.export.CondensedLinear` (int32 indices, the C++ kernel of
  ``lightning_sparse/csrc/condensed_linear.cpp``), bias included.

Each configuration is warmed up, then timed in ``--repeats`` repetitions that alternate the implementations
(dense, CSR, condensed, dense, ...); one sample is ``n`` back-to-back calls of about ``--sample-ms`` in all, ``n``
fixed per implementation after the warm-up. The table gives the median time per call and the ratios of the
medians. Targets (issue 14) are checked at the end: at 90 % sparsity and batch 1, condensed at least 3.4x faster
than dense and 2.5x faster than CSR; at batch 256, faster than dense. The load average and whether another
benchmark (``benchmarks/paper_parity.py``) was running are printed before and after: timings taken on a busy
machine are not comparable.

    python benchmarks/structured.py --parts a                  # about 1-2 min on a 2-core CPU

Parts (b) (accuracy of ``pattern="fan_in"`` / ``"2:4"`` training) and (c) (end-to-end inference of a trained
model) of issue 14 are not implemented yet: ``--parts b`` or ``c`` says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_sparse import kernels
from lightning_sparse.export import CondensedLinear

SHAPES = [(768, 3072), (3072, 768)]
TARGET_DENSE_BATCH1 = 3.4
TARGET_CSR_BATCH1 = 2.5


@dataclass
class Row:
    shape: tuple[int, int]
    sparsity: float
    k: int
    batch: int
    threads: int
    times: dict[str, float]  # median seconds per call

    def ratio(self, other: str) -> float:
        return self.times[other] / self.times["condensed"]


def constant_fan_in_layer(inputs: int, outputs: int, sparsity: float, seed: int) -> nn.Linear:
    """A Linear whose rows each hold ``round((1 - sparsity) * inputs)`` non-zero weights at random positions."""
    g = torch.Generator().manual_seed(seed)
    k = round((1.0 - sparsity) * inputs)
    layer = nn.Linear(inputs, outputs)
    with torch.no_grad():
        keep = torch.rand(outputs, inputs, generator=g).argsort(1)[:, :k]
        mask = torch.zeros(outputs, inputs, dtype=torch.bool).scatter_(1, keep, True)
        layer.weight.copy_(torch.randn(outputs, inputs, generator=g) * (2.0 / k) ** 0.5 * mask)
        layer.bias.copy_(torch.randn(outputs, generator=g) * 0.1)
    return layer.eval().requires_grad_(False)


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(fns: dict[str, Callable[[], object]], repeats: int, sample_s: float) -> dict[str, float]:
    """Median seconds per call of each function over ``repeats`` alternating samples (after a warm-up)."""
    calls = {}
    for name, fn in fns.items():  # warm-up, and the number of calls per sample
        for _ in range(3):
            fn()
        single = min(per_call(fn, 1) for _ in range(5))
        calls[name] = max(1, round(sample_s / max(single, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(per_call(fn, calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def other_benchmarks() -> str:
    """The command lines of running ``paper_parity`` benchmarks (``pgrep -af``), or ``"none"``."""
    try:
        found = subprocess.run(["pgrep", "-af", "paper_parity"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown (no pgrep)"
    lines = [line for line in found.splitlines() if str(os.getpid()) not in line.split()[:1] and "pgrep" not in line]
    return "; ".join(lines) if lines else "none"


def machine_state(when: str) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"- {when}: load average {load} (1, 5, 15 min); paper_parity running: {other_benchmarks()}")


def part_a(args: argparse.Namespace) -> list[Row]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for inputs, outputs in SHAPES:
            for sparsity in args.sparsities:
                layer = constant_fan_in_layer(inputs, outputs, sparsity, seed=0)
                condensed = CondensedLinear.from_linear(layer, kernel="cpp")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # CSR support is in beta
                    csr = layer.weight.to_sparse_csr()
                for batch in args.batches:
                    x = torch.randn(batch, inputs, generator=torch.Generator().manual_seed(1))
                    xt = x.t()
                    with torch.inference_mode():
                        expected = layer(x)
                        torch.testing.assert_close(condensed(x), expected, atol=1e-4, rtol=1e-4)
                        torch.testing.assert_close(
                            torch.sparse.mm(csr, xt).t() + layer.bias, expected, atol=1e-4, rtol=1e-4
                        )
                        fns = {
                            "dense": lambda: layer(x),
                            "csr": lambda: torch.sparse.mm(csr, xt),
                            "condensed": lambda: condensed(x),
                        }
                        times = measure(fns, args.repeats, args.sample_ms / 1e3)
                    row = Row((inputs, outputs), sparsity, condensed.k, batch, threads, times)
                    rows.append(row)
                    print(
                        f"  {inputs}->{outputs} {sparsity:.0%} batch {batch:3d} {threads} thr: "
                        + ", ".join(f"{n} {t * 1e3:.4f} ms" for n, t in times.items()),
                        flush=True,
                    )
    return rows


def print_table(rows: list[Row]) -> None:
    print()
    print(
        "| layer | sparsity | k | batch | threads | dense ms | CSR ms | condensed ms | dense / condensed | CSR / condensed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r.times
        print(
            f"| {r.shape[0]}→{r.shape[1]} | {r.sparsity:.0%} | {r.k} | {r.batch} | {r.threads} | {t['dense'] * 1e3:.3f}"
            f" | {t['csr'] * 1e3:.3f} | {t['condensed'] * 1e3:.3f} | {r.ratio('dense'):.2f}x | {r.ratio('csr'):.2f}x |"
        )


def print_targets(rows: list[Row]) -> bool:
    print()
    print("Targets (issue 14), at 90 % sparsity:")
    met = True
    for r in rows:
        if abs(r.sparsity - 0.9) > 1e-9:
            continue
        where = f"{r.shape[0]}→{r.shape[1]}, {r.threads} thread{'s' if r.threads > 1 else ''}"
        if r.batch == 1:
            ok = r.ratio("dense") >= TARGET_DENSE_BATCH1 and r.ratio("csr") >= TARGET_CSR_BATCH1
            print(
                f"- batch 1, {where}: condensed {r.ratio('dense'):.2f}x dense (target >= {TARGET_DENSE_BATCH1}x),"
                f" {r.ratio('csr'):.2f}x CSR (target >= {TARGET_CSR_BATCH1}x): {'met' if ok else 'NOT met'}"
            )
        elif r.batch == 256:
            ok = r.ratio("dense") > 1.0
            print(
                f"- batch 256, {where}: condensed {r.ratio('dense'):.2f}x dense (target > 1x): {'met' if ok else 'NOT met'}"
            )
        else:
            continue
        met &= ok
    print(f"All targets met: {'yes' if met else 'no'}")
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=["a", "b", "c"], default=["a"],
        help="(a) kernel figures [implemented]; (b) accuracy, (c) end-to-end [not implemented yet]",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=30, help="alternating samples per implementation")
    parser.add_argument("--sample-ms", type=float, default=5.0, help="length of one sample (back-to-back calls)")
    args = parser.parse_args()
    missing = [p for p in args.parts if p != "a"]
    if missing:
        print(
            f"part(s) {', '.join(missing)} of issue 14 ((b) accuracy, (c) end-to-end) are not implemented yet;"
            " only part (a), the kernel figures, is",
            file=sys.stderr,
        )
        sys.exit(2)

    op = kernels.cpu_condensed_linear("cpp")  # build (or load) the kernel before timing anything
    assert op is not None
    print("## Part (a): condensed constant-fan-in Linear vs dense vs CSR (float32, CPU)")
    print()
    print(
        f"- torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
        f" condensed kernel variant: {torch.ops.lightning_sparse.condensed_isa()}"
    )
    print(f"- {args.repeats} alternating samples of ~{args.sample_ms:g} ms per implementation, medians")
    machine_state("before")
    rows = part_a(args)
    machine_state("after")
    print_table(rows)
    print_targets(rows)


if __name__ == "__main__":
    main()
