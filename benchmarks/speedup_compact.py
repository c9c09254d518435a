"""Estimated vs measured inference speedup of LeNet-5 trained sparse on Fashion-MNIST, momentum vs random growth.

Trains LeNet-5 twice at the same density, seed and epochs (the paper's optimizer settings, batch 100; data
read offline from /usr/share/datasets/fashion-mnist):

* **momentum growth**: ``algorithm="sparse_momentum"`` (momentum redistribution, momentum growth);
* **random growth**: ``SparseAlgorithm(prune="magnitude", grow="random", redistribute="momentum",
  nearly_dense_edge_case=True)``, the paper's ablation.

For each trained network it prints the test error, the per-layer empty input/output channels (the
callback's ``sparse/empty_in|out/<param>``), and the callback's speedup estimates
(``sparse/speedup_dense_conv`` and ``sparse/speedup_sparse_conv``, FLOP-based), plus the dense-conv
estimate recomputed with measured per-layer forward+backward times (what ``speedup_timing="measure"``
would use) and from the non-zero weights instead of the masks. It then runs
``lightning_sparse.export.compact`` on the trained network and measures the inference time of the masked
dense network vs the compacted one on this CPU, at batch 1 and batch 64: ``torch.inference_mode``, eval
mode, warm-up, then alternating runs (dense, compact, dense, compact, ...), each run ``--run-time`` seconds
of forward calls; the median time per forward of each and the ratio of the medians. The thread count is set
with ``torch.set_num_threads`` and fixed during each set of timings (``--threads``, 1 then 2 by default;
1 thread is the stable figure on a busy machine). All timings happen after both trainings. Training runs
on ``--train-threads`` (1 by default: on a 2-core machine shared with other work, 2 intra-op threads made a
training step ~18x slower than 1 thread).

Full run (about 3-5 min on a 2-core CPU: ~2.5 min of training, the rest timings):

    python benchmarks/speedup_compact.py --epochs 5 --density 0.05 --seed 0 --repeats 21 --threads 1 2

Smoke run (under a minute; the networks do not learn in 40 steps, so its numbers mean nothing):

    python benchmarks/speedup_compact.py --epochs 2 --limit-train-batches 20 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fashion_mnist import DATA_DIR, Classifier, EpochTimer, FashionMNIST, load_fashion_mnist  # noqa: E402

from lightning_sparse import SparseAlgorithm, SparseTrainingCallback  # noqa: E402
from lightning_sparse.cost import LAYER_TYPES, CostModel, SparsityReport, layer_times  # noqa: E402
from lightning_sparse.export import compact, compaction_report  # noqa: E402

GROWTH: dict[str, Any] = {
    "momentum": "sparse_momentum",
    "random": SparseAlgorithm(prune="magnitude", grow="random", redistribute="momentum", nearly_dense_edge_case=True),
}
BATCHES = (1, 64)

NOTE = """\
What the numbers are:
* est. dense-conv (FLOPs): the callback's sparse/speedup_dense_conv at the end of training (speedup_timing=
  "flops"): sum_l F_l / sum_l F_l*(1-empty_in_l)*(1-empty_out_l), F_l = forward FLOPs of Conv/Linear layer
  l, empty channels read from the callback's masks. A layer's empty inputs include those fed by an empty
  output channel of the previous layer along a plain chain (conv -> ReLU -> pool -> conv, conv -> flatten ->
  linear; LeNet-5 is one), but not the reverse: an output channel the next layer never reads still counts
  as work. ReLU, pooling, flatten, biases and per-op overhead cost nothing in it; an empty output of the
  last layer (a class) counts although the network's output cannot shrink.
* est. sparse-conv (FLOPs): the callback's sum_l F_l / sum_l F_l*density_l (an ideal sparse kernel; not
  measured here).
* est. dense-conv (layer times): the same formula with each layer's measured forward+backward time at
  the training batch (100) instead of its FLOPs, as speedup_timing="measure" would count it.
* est. dense-conv (FLOPs, non-zero weights): the same with empty channels read from the weights instead
  of the masks. An active weight can be exactly zero (grown at zero and never moved, e.g. into a channel
  whose ReLU is dead), so this is what compact can see.
* compact FLOPs: forward FLOPs of the masked dense network / of the compacted one (FlopCounterMode), i.e.
  what compact actually removed, in the estimate's units.
* measured b=N: median time per forward of the masked dense network / of the compacted one, same thread
  count, alternating runs, torch.inference_mode. compact removes only the exactly removable channels
  (export.py), judged from the weights: channels that no later layer reads (all reading weights zero,
  which also removes the producer's output channel), and constant channels (zero filter) whose value it
  can fold into the reader's bias (LeNet-5's convs do not pad, so it can). It never removes the model's
  input channels or output features, and the weights that remain stay dense: the compacted network is
  still a dense network. At batch 1 LeNet-5's forward is mostly per-op overhead, which no estimate
  counts."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.05, help="fraction of weights kept (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, masks and data order")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per network and batch size")
    parser.add_argument("--run-time", type=float, default=0.1, help="seconds of forward calls per timed run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads for the timings")
    parser.add_argument(
        "--train-threads", type=int, default=1, help="torch threads for training (default 1: fast on a busy machine,"
        " and a thread count that does not depend on the machine)"
    )  # fmt: skip
    parser.add_argument(
        "--limit-train-batches", type=float, default=1.0, help="fraction (<=1) or number of training batches"
    )
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--root-dir", type=Path, default=None, help="Trainer default_root_dir (default: a /tmp dir)")
    args = parser.parse_args()
    if args.limit_train_batches > 1:
        args.limit_train_batches = int(args.limit_train_batches)
    if args.repeats < 1 or args.train_threads < 1 or any(t < 1 for t in args.threads):
        parser.error("--repeats, --threads and --train-threads must be >= 1")
    return args


# ------------------------------------------------------------------------------------------- training
def train(name: str, algorithm: Any, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Train and test LeNet-5 with the callback; the module, callback, metrics after fit, and test error."""
    L.seed_everything(args.seed, workers=True)
    module = Classifier("lenet5")
    callback = SparseTrainingCallback(density=args.density, algorithm=algorithm, seed=args.seed, figure=False)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=args.limit_train_batches,
        deterministic=True,
        default_root_dir=str(root / name),
    )
    data = FashionMNIST(batch_size=100, data_dir=args.data_dir)
    began = time.perf_counter()
    trainer.fit(module, data)
    train_seconds = time.perf_counter() - began
    # read before `test`, which resets the trainer's metrics
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    test = trainer.test(module, data, verbose=False)[0]
    return {
        "module": module,
        "callback": callback,
        "metrics": metrics,
        "test_error": 100.0 * (1.0 - test["test/acc"]),
        "train_seconds": train_seconds,
        "steps": trainer.global_step,
        "epoch_times": timer.times,
        "batches_per_epoch": trainer.num_training_batches,
        "train_batch": next(iter(data.train_dataloader()))[0],
    }


# ------------------------------------------------------------------------------------------- estimates
def layer_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per masked layer: name, shape, size, mask density, non-zero weight density, and the callback's empty
    in/out channel fractions (from the masks)."""
    module, metrics = run["module"], run["metrics"]
    rows = []
    with torch.no_grad():
        for name, mask in run["callback"].masks.items():
            weight = module.get_parameter(name)
            rows.append(
                {
                    "name": name,
                    "shape": "x".join(map(str, weight.shape)),
                    "size": weight.numel(),
                    "mask_density": int(mask.sum()) / mask.numel(),
                    "nonzero_density": int(torch.count_nonzero(weight)) / weight.numel(),
                    "empty_in": metrics.get(f"sparse/empty_in/{name}", float("nan")),
                    "empty_out": metrics.get(f"sparse/empty_out/{name}", float("nan")),
                }
            )
    return rows


def recomputed_estimates(run: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The dense-conv estimate from FLOPs (a cross-check of the callback's) and from measured layer times."""
    module, callback = run["module"], run["callback"]
    net, batch = module.net, run["train_batch"]
    local = [f"{n}.weight" for n, m in net.named_modules() if isinstance(m, LAYER_TYPES)]
    cost_model = CostModel.build(net, "net", batch)
    layers = dict(callback.masks)
    for name in cost_model.flops:  # unmasked layers count with their weights (none in LeNet-5 by default)
        layers.setdefault(name, module.get_parameter(name).detach())
    flops_report = SparsityReport(cost_model=cost_model)
    stats = flops_report.measure(run["steps"], layers)
    from_flops = flops_report.speedups(stats)
    # the same, counting what compact sees: a weight is active when it is non-zero (not when its mask is on)
    weights = {name: module.get_parameter(name).detach() for name in layers}
    nonzero_stats = flops_report.measure(run["steps"], weights)
    from_nonzero = flops_report.speedups(nonzero_stats)
    times = layer_times(net, batch, local, repeats=max(repeats, 5), warmup=2)
    timed_model = copy.copy(cost_model)
    timed_model.times = {f"net.{n}": t for n, t in times.items()}
    from_times = SparsityReport(cost_model=timed_model).speedups(stats)
    return {
        "flops_dense_conv": from_flops["speedup_dense_conv"],
        "flops_sparse_conv": from_flops["speedup_sparse_conv"],
        "times_dense_conv": from_times["speedup_dense_conv"],
        "times_sparse_conv": from_times["speedup_sparse_conv"],
        "nonzero_dense_conv": from_nonzero["speedup_dense_conv"],
        "nonzero_sparse_conv": from_nonzero["speedup_sparse_conv"],
        "nonzero_empty": {n: (s.empty_in, s.empty_out) for n, s in nonzero_stats.items()},
        "layer_ms": {n: 1000.0 * t for n, t in times.items()},
    }


def forward_flops(net: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------- timing
def time_alternating(
    dense: nn.Module, small: nn.Module, x: torch.Tensor, repeats: int, run_time: float, warmup: int = 20
) -> dict[str, Any]:
    """Median seconds per forward of both networks, over ``repeats`` alternating runs (dense, compact, dense,
    ...). A run is as many forward calls as fit in ``run_time`` seconds (at least 3); its time per forward is
    its elapsed time over its calls, so a slow spell of a busy machine lengthens no run by more than one call."""
    times: dict[str, list[float]] = {"dense": [], "compact": []}
    calls: dict[str, list[int]] = {"dense": [], "compact": []}
    with torch.inference_mode():
        for net in (dense, small):  # warm-up: allocator, kernels, thread pool
            for _ in range(warmup):
                net(x)
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeats):
                for name, net in (("dense", dense), ("compact", small)):
                    n = 0
                    began = now = time.perf_counter()
                    while n < 3 or now - began < run_time:
                        net(x)
                        n += 1
                        now = time.perf_counter()
                    times[name].append((now - began) / n)
                    calls[name].append(n)
        finally:
            gc.enable()
    ratios = sorted(d / c for d, c in zip(times["dense"], times["compact"]))
    dense_median, compact_median = statistics.median(times["dense"]), statistics.median(times["compact"])
    return {
        "calls": (int(statistics.median(calls["dense"])), int(statistics.median(calls["compact"]))),
        "dense": dense_median,
        "compact": compact_median,
        "speedup": dense_median / compact_median,
        "pair_ratio_range": (ratios[0], ratios[-1]),
        "pair_ratio_quartiles": _quartiles(ratios),
    }


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return values[0], values[-1]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    started = time.perf_counter()
    root = args.root_dir or Path(tempfile.mkdtemp(prefix="speedup_compact_", dir="/tmp"))
    torch.set_num_threads(args.train_threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, os.cpu_count() = {os.cpu_count()},"
        f" training: torch.set_num_threads({args.train_threads}) -> {torch.get_num_threads()} threads;"
        f" LeNet-5 on Fashion-MNIST, density {args.density},"
        f" {args.epochs} epochs, seed {args.seed}, limit_train_batches {args.limit_train_batches},"
        f" root dir {root}",
        flush=True,
    )

    runs: dict[str, dict[str, Any]] = {}
    for growth, algorithm in GROWTH.items():
        print(f"\n=== training: {growth} growth ({algorithm!r})", flush=True)
        run = train(growth, algorithm, args, root)
        runs[growth] = run
        epoch_s = statistics.median(run["epoch_times"]) if run["epoch_times"] else float("nan")
        finite = all(bool(torch.isfinite(p).all()) for p in run["module"].parameters())
        print(
            f"{growth} growth: {run['steps']} optimizer steps, fit {run['train_seconds']:.1f} s (training epochs"
            f" {', '.join(f'{t:.2f}' for t in run['epoch_times'])} s, median {epoch_s:.2f} s for"
            f" {run['batches_per_epoch']} batches, validation excluded),"
            f" last train/loss {run['metrics'].get('train/loss', float('nan')):.4f}, parameters finite: {finite},"
            f" test error {run['test_error']:.2f}%",
            flush=True,
        )
        print(run["callback"].summary(), flush=True)

    test_x = load_fashion_mnist("test", args.data_dir).tensors[0]
    inputs = {b: test_x[:b].contiguous() for b in BATCHES}

    # estimates at the first timing thread count (layer times depend on it)
    torch.set_num_threads(args.threads[0])
    print(f"\n=== estimates and compaction (torch.set_num_threads({args.threads[0]}) ->"
          f" {torch.get_num_threads()} threads for the layer times)", flush=True)  # fmt: skip
    for growth, run in runs.items():
        rows = layer_table(run)
        run["density"] = sum(r["mask_density"] * r["size"] for r in rows) / sum(r["size"] for r in rows)
        run["nonzero_density"] = sum(r["nonzero_density"] * r["size"] for r in rows) / sum(r["size"] for r in rows)
        run["estimates"] = est = recomputed_estimates(run, args.repeats)
        net = copy.deepcopy(run["module"].net).eval()
        small = compact(net, inputs[64])
        run["dense_net"], run["compact_net"] = net, small
        report = compaction_report(net, small)
        params = (sum(p.numel() for p in net.parameters()), sum(p.numel() for p in small.parameters()))
        flops = (forward_flops(net, inputs[1]), forward_flops(small, inputs[1]))
        run["compact_flops_ratio"] = flops[0] / flops[1]
        m = run["metrics"]
        print(
            f"\n{growth} growth: test error {run['test_error']:.2f}%, density {run['density']:.4f} (masks),"
            f" {run['nonzero_density']:.4f} (non-zero weights)",
            flush=True,
        )
        print(f"  {'layer':<13} {'shape':<10} {'mask dens.':>10} {'nonzero dens.':>13} {'empty in':>9}"
              f" {'empty out':>9} {'nz empty in':>11} {'nz empty out':>12} {'fwd+bwd ms':>10}  compact out-width",
              flush=True)  # fmt: skip
        for r in rows:
            width = report.get(r["name"].removeprefix("net.").removesuffix(".weight"))
            width_text = f"{width[0]} -> {width[1]}" if width else "unchanged"
            layer_ms = est["layer_ms"].get(r["name"].removeprefix("net."), float("nan"))
            nz_in, nz_out = est["nonzero_empty"][r["name"]]
            print(f"  {r['name']:<13} {r['shape']:<10} {r['mask_density']:>10.4f} {r['nonzero_density']:>13.4f}"
                  f" {r['empty_in']:>9.3f} {r['empty_out']:>9.3f} {nz_in:>11.3f} {nz_out:>12.3f} {layer_ms:>10.3f}"
                  f"  {width_text}", flush=True)  # fmt: skip
        print(
            f"  (empty in/out: the callback's sparse/empty_in|out metrics, from the masks; nz: the same from the"
            f" non-zero weights; fwd+bwd ms: layer time at batch {run['train_batch'].shape[0]})",
            flush=True,
        )
        print(
            f"  callback metrics (FLOPs, masks): dense-conv {m.get('sparse/speedup_dense_conv', float('nan')):.3f}x,"
            f" sparse-conv {m.get('sparse/speedup_sparse_conv', float('nan')):.3f}x; recomputed from the final masks:"
            f" {est['flops_dense_conv']:.3f}x, {est['flops_sparse_conv']:.3f}x",
            flush=True,
        )
        print(
            f"  FLOPs, non-zero weights: dense-conv {est['nonzero_dense_conv']:.3f}x, sparse-conv"
            f" {est['nonzero_sparse_conv']:.3f}x; layer times, masks: dense-conv {est['times_dense_conv']:.3f}x,"
            f" sparse-conv {est['times_sparse_conv']:.3f}x",
            flush=True,
        )
        print(
            f"  compaction_report: {report}; parameters {params[0]} -> {params[1]};"
            f" forward FLOPs (batch 1) {flops[0]} -> {flops[1]} ({run['compact_flops_ratio']:.3f}x)",
            flush=True,
        )

    # measured inference speedups
    timings: dict[tuple[str, int, int], dict[str, Any]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n=== inference timing: torch.set_num_threads({threads}) -> {torch.get_num_threads()} threads,"
              f" {args.repeats} alternating runs of ~{args.run_time} s per network", flush=True)  # fmt: skip
        for growth, run in runs.items():
            for batch in BATCHES:
                t = time_alternating(run["dense_net"], run["compact_net"], inputs[batch], args.repeats, args.run_time)
                timings[(growth, threads, batch)] = t
                q1, q3 = t["pair_ratio_quartiles"]
                lo, hi = t["pair_ratio_range"]
                print(
                    f"  {growth:<8} batch {batch:>2}: dense {1e6 * t['dense']:9.1f} us, compact"
                    f" {1e6 * t['compact']:9.1f} us per forward (medians; calls/run {t['calls'][0]}, {t['calls'][1]})"
                    f" -> {t['speedup']:.3f}x; per-pair ratio quartiles {q1:.3f}-{q3:.3f}, range {lo:.3f}-{hi:.3f}",
                    flush=True,
                )

    print(
        f"\n=== LeNet-5, Fashion-MNIST, {args.epochs} epochs, seed {args.seed}, target density {args.density};"
        f" measured = median dense time / median compact time per forward",
        flush=True,
    )
    header = [
        "growth", "test error %", "density", "est. dense-conv (FLOPs)", "est. sparse-conv (FLOPs)",
        "est. dense-conv (layer times)", "est. dense-conv (FLOPs, non-zero weights)", "compact FLOPs",
    ] + [f"measured b={b} ({t} thr)" for t in args.threads for b in BATCHES]  # fmt: skip
    print("| " + " | ".join(header) + " |", flush=True)
    print("|" + "---|" * len(header), flush=True)
    for growth, run in runs.items():
        m, est = run["metrics"], run["estimates"]
        cells = [
            growth,
            f"{run['test_error']:.2f}",
            f"{run['density']:.4f}",
            f"{m.get('sparse/speedup_dense_conv', float('nan')):.3f}x",
            f"{m.get('sparse/speedup_sparse_conv', float('nan')):.3f}x",
            f"{est['times_dense_conv']:.3f}x",
            f"{est['nonzero_dense_conv']:.3f}x",
            f"{run['compact_flops_ratio']:.3f}x",
        ] + [f"{timings[(growth, t, b)]['speedup']:.3f}x" for t in args.threads for b in BATCHES]
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\n" + NOTE, flush=True)
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
