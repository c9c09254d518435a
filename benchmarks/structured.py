"""Structured sparsity (issue 14): (a) kernel figures of the condensed CPU export, (b) accuracy of training with a
pattern, (c) end-to-end inference of condensed models.

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

Part (b) trains on real Fashion-MNIST in the setting of ``benchmarks/paper_parity.py`` part (c) (its loop, data and
models: SGD Nesterov 0.9, lr 0.1 divided by 10 at 1/2 and 3/4 of 20 epochs, batch 100, weight decay 5e-4, seeds
0 1 2) with sparse momentum and RigL, each pattern next to unstructured masks of the same density: ``fan_in`` at
5 % (the paper-parity density), ``1:4`` (25 %) and ``2:4`` (50 %). Test error of the last epoch, mean ± std over
seeds. On LeNet-5 the first conv (``0``: 25 inputs per row, not a multiple of 4) is kept dense in the N:M runs
and in the unstructured runs they are compared with. Target (issue 14): fan-in within 0.5 point of unstructured.

Part (c) times inference end to end, float32 on the CPU, dense model vs ``to_condensed`` copy (medians of
alternating samples, as in part (a)): the LeNet-300-100 trained by part (b) with sparse momentum and
``pattern="fan_in"`` at 5 % (seed 0; trained here if part (b) did not run), over the 10000 test images at batch 1
(the first 1000 images) and batch 256, after checking that both give the same predictions; and torchvision's
ResNet-50 (random init, ``pattern="fan_in"`` masks at 90 % sparsity from a ``Sparsifier``, not trained: speed does
not depend on the values), whose 1x1 convolutions and fc layer ``to_condensed`` converts (the 3x3 convolutions
and the stem stay dense kernels with zeros), on one 224x224 image and a batch of 16.

    python benchmarks/structured.py --parts a                  # about 1-2 min on a 2-core CPU
    python benchmarks/structured.py --parts b --nets lenet300  # 36 runs of ~45 s on one thread
    python benchmarks/structured.py --parts c                  # ~2 min (trains one LeNet-300-100 first)
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

from lightning_sparse import Sparsifier, kernels
from lightning_sparse.export import CondensedLinear, to_condensed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import paper_parity  # noqa: E402  (benchmarks/paper_parity.py: part (c)'s data, loop and models)
from _machine import cpu_model  # noqa: E402

SHAPES = [(768, 3072), (3072, 768)]
TARGET_DENSE_BATCH1 = 3.4  # SRigL's published figures (issue 21)
TARGET_CSR_BATCH1 = 2.5
TARGET_DENSE_BATCH256 = 2.0


@dataclass
class Row:
    shape: tuple[int, int]
    sparsity: float
    k: int
    batch: int
    threads: int
    times: dict[str, float]  # median seconds per call ("floor": reading the operands' bytes once)
    strategy: str = "-"  # batch < 6: CondensedLinear.kernel_strategy ("gather", "scalar"); larger: "axpy"

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
    """The command lines of other running benchmarks (``paper_parity``, another ``structured.py``), each marked
    "stopped" when paused (``kill -STOP``), or ``"none"``."""
    try:
        found = subprocess.run(["pgrep", "-af", "paper_parity|structured.py"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown (no pgrep)"
    lines = []
    for line in found.splitlines():
        pid = line.split()[0]
        if pid in (str(os.getpid()), str(os.getppid())) or "pgrep" in line:
            continue
        try:
            state = next(f.split()[1] for f in open(f"/proc/{pid}/status") if f.startswith("State:"))
        except (OSError, StopIteration):
            state = "?"
        lines.append(f"{line} ({'stopped' if state == 'T' else 'running'})")
    return "; ".join(lines) if lines else "none"


def machine_state(when: str) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"- {when}: load average {load} (1, 5, 15 min); other benchmarks: {other_benchmarks()}")


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
                    floor = torch.ones(floor_bytes(condensed, batch) // 4)  # read once: sum() of as many bytes
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
                            "floor": lambda: floor.sum(),
                        }
                        times = measure(fns, args.repeats, args.sample_ms / 1e3)
                    strategy = condensed.kernel_strategy if batch < 6 else "axpy"  # csrc/condensed_linear.cpp
                    row = Row((inputs, outputs), sparsity, condensed.k, batch, threads, times, strategy)
                    rows.append(row)
                    print(
                        f"  {inputs}->{outputs} {sparsity:.0%} batch {batch:3d} {threads} thr: "
                        + ", ".join(f"{n} {t * 1e3:.4f} ms" for n, t in times.items()),
                        flush=True,
                    )
    return rows


def floor_bytes(condensed: CondensedLinear, batch: int) -> int:
    """The fewest bytes a product must read: the values (float32), one 2-byte index per value (``uint16`` holds
    any column of a layer up to 65536 inputs wide), the bias and ``x``, each once."""
    values = condensed.values.numel()
    bias = 0 if condensed.bias is None else condensed.bias.numel()
    return 4 * values + 2 * values + 4 * bias + 4 * batch * condensed.in_features


def print_table(rows: list[Row]) -> None:
    print()
    print(
        "| layer | sparsity | k | batch | threads | strategy | dense ms | CSR ms | condensed ms | floor ms"
        " | dense / condensed | CSR / condensed | condensed / floor |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r.times
        print(
            f"| {r.shape[0]}→{r.shape[1]} | {r.sparsity:.0%} | {r.k} | {r.batch} | {r.threads} | {r.strategy}"
            f" | {t['dense'] * 1e3:.3f} | {t['csr'] * 1e3:.3f} | {t['condensed'] * 1e3:.3f} | {t['floor'] * 1e3:.3f}"
            f" | {r.ratio('dense'):.2f}x | {r.ratio('csr'):.2f}x | {t['condensed'] / t['floor']:.2f}x |"
        )


def print_targets(rows: list[Row]) -> bool:
    print()
    print("Targets (issue 21), at 90 % sparsity:")
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
            ok = r.ratio("dense") >= TARGET_DENSE_BATCH256
            print(
                f"- batch 256, {where}: condensed {r.ratio('dense'):.2f}x dense (target >= {TARGET_DENSE_BATCH256}x):"
                f" {'met' if ok else 'NOT met'}"
            )
        else:
            continue
        met &= ok
    print(f"All targets met: {'yes' if met else 'no'}")
    return met



# ----------------------------------------------------------------------------- (b) accuracy

METHODS_B = ("sparse_momentum", "rigl")
CONFIGS_B = {  # name: (pattern, density, neuron_ablation)
    "unstructured-0.05": ("unstructured", 0.05, None),
    "fan_in-0.05": ("fan_in", 0.05, None),
    "fan_in-ablation-0.05": ("fan_in", 0.05, 0.3),  # SRigL's neuron ablation with the reference's gamma_sal
    "unstructured-0.25": ("unstructured", 0.25, None),
    "1:4": ("1:4", 0.25, None),
    "unstructured-0.5": ("unstructured", 0.5, None),
    "2:4": ("2:4", 0.5, None),
}
TARGET_FAN_IN_POINTS = 0.5
N_M_FIRST_DENSE = {"lenet5": ["0"]}  # layers whose rows are not a multiple of M


def run_options(
    net: str, pattern: str, density: float, configs: list[str], ablation: float | None = None
) -> dict[str, object]:
    """The ``Sparsifier`` options of one configuration: the pattern, its neuron ablation, and on nets with layers
    that cannot hold N:M the same ``dense_layers`` for the N:M runs and the unstructured runs of the same
    density."""
    n_m_densities = {CONFIGS_B[c][1] for c in configs if ":" in CONFIGS_B[c][0]}
    dense = N_M_FIRST_DENSE.get(net, []) if (":" in pattern or density in n_m_densities) else []
    return {"pattern": pattern, "dense_layers": dense, "neuron_ablation": ablation}


def part_b(args: argparse.Namespace) -> dict[tuple[str, str, str], list[dict[str, float]]]:
    data = paper_parity.load_data()
    print(f"## Part (b): accuracy on Fashion-MNIST, {args.epochs} epochs, seeds {args.seeds}\n")
    print("SGD Nesterov 0.9, lr 0.1 (÷10 at 1/2 and 3/4 of training), batch 100, weight decay 5e-4 (paper_parity.py"
          " part (c)). One line per run as it finishes:\n", flush=True)  # fmt: skip
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for net in args.nets:
        for seed in args.seeds:
            for method in args.methods:
                for config in args.configs:
                    pattern, density, ablation = CONFIGS_B[config]
                    options = run_options(net, pattern, density, args.configs, ablation)
                    model, sparsifier, seconds = paper_parity.train_model(
                        net, method, seed, args.epochs, density, data, **options
                    )
                    r = {**paper_parity.test_error_and_density(model, sparsifier, data), "seconds": seconds}
                    results.setdefault((net, method, config), []).append(r)
                    if (net, method, seed) == ("lenet300", "sparse_momentum", args.seeds[0]) and config in MODELS_C.values():
                        TRAINED[config] = (model, sparsifier)
                    kept = f", dense {options['dense_layers']}" if options["dense_layers"] else ""
                    print(f"    {net} {method:16s} {config:18s} seed {seed}: test error {r['test_error']:6.2f} %,"
                          f" density {r['density']:.4f}{kept}, {seconds:6.1f} s", flush=True)  # fmt: skip
    print_accuracy(results, args.epochs)
    return results


TRAINED: dict[str, tuple[nn.Module, Sparsifier | None]] = {}  # part (b)'s LeNet-300-100 models for part (c), by config
MODELS_C = {  # part (c)'s LeNet-300-100 models (sparse momentum, 5 %, the first seed): label -> part (b) config
    "LeNet-300-100": "fan_in-0.05",
    "LeNet-300-100, ablation 0.3": "fan_in-ablation-0.05",
}


def print_accuracy(results: dict[tuple[str, str, str], list[dict[str, float]]], epochs: int) -> None:
    print(f"\n| net | method | pattern | density | test error % ({epochs} epochs) | per seed | vs unstructured |")
    print("|---|---|---|---:|---:|---|---:|")
    checks = []
    for (net, method, config), rs in results.items():
        pattern, density, ablation = CONFIGS_B[config]
        errors = [r["test_error"] for r in rs]
        mean, std = paper_parity.mean_std(errors)
        base = results.get((net, method, f"unstructured-{density:g}"))
        delta = ""
        if pattern != "unstructured" and base:
            diff = mean - statistics.mean(r["test_error"] for r in base)
            delta = f"{diff:+.2f}"
            if pattern == "fan_in":
                checks.append((net, method, config, diff))
        label = pattern if ablation is None else f"{pattern}, ablation {ablation:g}"
        print(f"| {net} | {method} | {label} | {density:g} | {mean:.2f} ± {std:.2f} |"
              f" {' / '.join(f'{e:.2f}' for e in errors)} | {delta} |")  # fmt: skip
    if checks:
        print(f"\nTarget (issue 14): fan-in within {TARGET_FAN_IN_POINTS} point of unstructured (mean over seeds):")
        for net, method, config, diff in checks:
            ok = diff <= TARGET_FAN_IN_POINTS
            print(f"- {net}, {method}, {config}: {diff:+.2f} points: {'met' if ok else 'NOT met'}")


# ----------------------------------------------------------------------------- (c) end to end


def time_models(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, float]:
    with torch.inference_mode():
        return measure(fns, args.repeats_c, args.sample_ms / 1e3)


def part_c(args: argparse.Namespace) -> None:
    print("\n## Part (c): end-to-end inference, dense vs to_condensed (float32, CPU)\n")
    machine_state("before")
    data = paper_parity.load_data()
    x_test = data[2]
    rows = []
    for name, config in MODELS_C.items():
        if config not in TRAINED:  # part (b) did not run it in this process: train it
            pattern, density, ablation = CONFIGS_B[config]
            model, sparsifier, _ = paper_parity.train_model(
                "lenet300", "sparse_momentum", args.seeds[0], args.epochs, density, data,
                **run_options("lenet300", pattern, density, [config], ablation),
            )  # fmt: skip
            TRAINED[config] = (model, sparsifier)
            print(f"- trained {name} (sparse momentum, {config}, seed {args.seeds[0]}, {args.epochs} epochs)")
        model, sparsifier = TRAINED[config]
        assert sparsifier is not None
        condensed = to_condensed(model, masks=sparsifier.masks)
        with torch.inference_mode():
            same = bool(torch.equal(model(x_test).argmax(1), condensed(x_test).argmax(1)))
            largest = float((model(x_test) - condensed(x_test)).abs().max())
        layers = {n: m for n, m in condensed.named_modules() if isinstance(m, CondensedLinear)}
        shapes = {n: f"k={m.k}, {m.values.shape[0]} of {m.out_features} rows" for n, m in layers.items()}
        print(f"- {name}: condensed layers {shapes}; same predictions on the 10000 test images: {same}"
              f" (largest logit difference {largest:.1e})")  # fmt: skip
        for threads in args.threads:
            torch.set_num_threads(threads)
            one = [x_test[i : i + 1] for i in range(1000)]
            big = [x_test[i : i + 256] for i in range(0, len(x_test), 256)]

            def over(net: nn.Module, batches: list[torch.Tensor]) -> Callable[[], object]:
                return lambda: [net(b) for b in batches]

            for label, batches in (("batch 1, 1000 images", one), ("batch 256, 10000 images", big)):
                times = time_models({"dense": over(model, batches), "condensed": over(condensed, batches)}, args)
                rows.append((name, label, threads, times))
    resnet, resnet_condensed, what = resnet50_pair()
    print(f"- ResNet-50: {what}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in (1, 16):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                torch.testing.assert_close(resnet_condensed(x), resnet(x), atol=1e-3, rtol=1e-3)
            times = time_models({"dense": lambda: resnet(x), "condensed": lambda: resnet_condensed(x)}, args)
            rows.append(("ResNet-50", f"batch {batch}", threads, times))
    machine_state("after")
    print("\n| model | input | threads | dense ms | condensed ms | dense / condensed |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, threads, t in rows:
        print(f"| {name} | {label} | {threads} | {t['dense'] * 1e3:.2f} | {t['condensed'] * 1e3:.2f} |"
              f" {t['dense'] / t['condensed']:.2f}x |")  # fmt: skip


def resnet50_pair() -> tuple[nn.Module, nn.Module, str]:
    """torchvision's ResNet-50 (random init, eval) with ``pattern="fan_in"`` masks at 10 % density applied, and
    its ``to_condensed`` copy; a line saying what was condensed."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50()
    sparsifier = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), density=0.1,
                            pattern="fan_in", dense_layers=["conv1"], seed=0, total_steps=1)  # fmt: skip
    model.eval()
    condensed = to_condensed(model, masks=sparsifier.masks)
    converted = [n for n, m in condensed.named_modules() if isinstance(m, CondensedLinear)]
    pointwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    share = sum(1 for n in converted if n in pointwise)
    density = sum(int(m.sum()) for m in sparsifier.masks.values()) / sum(m.numel() for m in sparsifier.masks.values())
    what = (f"{share} of {len(pointwise)} 1x1 convolutions and the fc layer condensed ({len(converted)} layers),"
            f" masks at density {density:.3f} (stem conv dense)")  # fmt: skip
    return model, condensed, what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=["a", "b", "c"], default=["a"],
        help="(a) kernel figures; (b) accuracy of structured training; (c) end-to-end inference",
    )  # fmt: skip
    parser.add_argument("--nets", nargs="+", choices=["lenet300", "lenet5"], default=["lenet300"], help="part (b)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS_B), default=list(METHODS_B), help="part (b)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS_B), default=list(CONFIGS_B), help="part (b)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="parts (b) and (c)")
    parser.add_argument("--epochs", type=int, default=20, help="parts (b) and (c)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=30, help="alternating samples per implementation")
    parser.add_argument("--repeats-c", type=int, default=10, help="part (c): alternating samples per model")
    parser.add_argument("--sample-ms", type=float, default=5.0, help="length of one sample (back-to-back calls)")
    args = parser.parse_args()
    op = kernels.cpu_condensed_linear("cpp")  # build (or load) the kernel before timing anything
    assert op is not None
    print(
        f"- CPU: {cpu_model()}; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs,"
        f" condensed kernel variant: {torch.ops.lightning_sparse.condensed_isa()}"
    )
    print(f"- {args.repeats} alternating samples of ~{args.sample_ms:g} ms per implementation, medians")
    if "a" in args.parts:
        print("\n## Part (a): condensed constant-fan-in Linear vs dense vs CSR (float32, CPU)\n")
        machine_state("before")
        rows = part_a(args)
        machine_state("after")
        print_table(rows)
        print_targets(rows)
    if "b" in args.parts:
        torch.set_num_threads(1)  # as paper_parity.py --threads 1
        part_b(args)
    if "c" in args.parts:
        part_c(args)


if __name__ == "__main__":
    main()
