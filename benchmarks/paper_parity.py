"""Our figures next to the published ones: ResNet-50 inference and training FLOPs (RigL), and every method's test
error on Fashion-MNIST LeNets.

    python benchmarks/paper_parity.py --parts a b                       # FLOPs only, about 20 s
    python benchmarks/paper_parity.py --parts c --nets lenet300 --seeds 0 1 2 --epochs 20

(a) Inference FLOPs of torchvision's ResNet-50 (random init, 224x224 input) at 80/90/95 % sparsity, ERK and
    uniform with a dense first conv, relative to dense, against the RigL README's tables
    (google-research/rigl: ERK 0.42x / 0.24x / 0.12x, uniform 0.23x / 0.13x / 0.08x). Each layer's dense forward
    FLOPs come from the library's cost model (``lightning_sparse.cost.CostModel``: ``torch.utils.flop_counter``,
    ``2 · MACs`` of every Conv2d and Linear, biases not counted); a sparse layer costs ``density × dense``, with
    the densities of ``lightning_sparse.functional.init.layer_active_counts``. Counted: the 53 convolutions and the
    fc layer, nothing else, as RigL does (``rigl/sparse_utils.py: get_stats`` counts only Conv2D/Dense layers with
    the MicroNet counter). MicroNet's counter also adds one bias addition and one ReLU per output element of every
    such layer (dense, whatever the sparsity); the second column adds those (from the layers' output shapes).
    Not counted by either: batch norm, pooling, the residual additions, the other ReLUs.
(b) Training FLOPs relative to dense over RigL's ResNet-50 ImageNet schedule (100 epochs, batch 4096, 32000
    steps, 320 a "epoch"), with ``lightning_sparse.cost.TrainFlops`` (what the callback logs as
    ``sparse/train_flops_ratio``) driven as ``SparseTrainingCallback`` drives it, by a ``Sparsifier`` bound to a
    real ResNet-50 (ERK masks) whose schedule says when updates run, without training: RigL (an update every 100
    steps until 75 % of training, each update step with dense weight gradients) and sparse momentum (dense
    weight gradients at every step) at 80 % and 90 % ERK, against the RigL paper's table 2 (RigL ERK 0.42x /
    0.24x; SNFS ERK 0.61x / 0.50x). The densities stay at ERK: updates keep each layer's count (RigL), and
    the simulation does not move weights between layers (sparse momentum's redistribution needs training; the
    RigL paper's SNFS runs without it).
(c) Real Fashion-MNIST (Debian's idx files, the loader and models of ``examples/fashion_mnist.py``: 54000 training
    images, the 6000 held out are unused, 10000 test): LeNet-300-100 and LeNet-5 (Caffe) at 5 % weights, every
    method and dense, SGD with Nesterov momentum 0.9, lr 0.1 divided by 10 at 1/2 and 3/4 of training, batch 100,
    weight decay 5e-4; a plain PyTorch loop with ``lightning_sparse.Sparsifier``, each method with its own
    defaults (DST learns its density). Test error of the last epoch, mean ± std over seeds; ``R_s``, the fraction
    of the masked positions ever active during the run (ITOP's in-time over-parameterization rate,
    ``Sparsifier.explored()``; 1 for runs that start dense); the training FLOPs of the run relative to dense
    training, counted as ``SparseTrainingCallback`` counts ``sparse/train_flops_ratio`` (``TrainFlops``: each
    step at the densities of the masks it trained with, dense weight gradients at every step for sparse momentum
    and DST, and at the update steps of gradient growth). ``--methods granet mest topkast`` adds the exploring
    methods (``lightning_sparse.methods.exploration``).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fashion_mnist import MODELS, FashionMNIST  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

from lightning_sparse import Sparsifier  # noqa: E402
from lightning_sparse.cost import CostModel, TrainFlops, layer_calls  # noqa: E402
from lightning_sparse.functional.init import layer_active_counts  # noqa: E402

# ----------------------------------------------------------------------------- published figures

RIGL_DENSE_FLOPS = 8.2e9  # RigL README, inference FLOPs of the dense ResNet-50
RIGL_INFERENCE = {  # sparsity -> {distribution: published inference FLOPs relative to dense} (README, 1x/5x tables)
    0.8: {"erk": 0.42, "uniform": 0.23},
    0.9: {"erk": 0.24, "uniform": 0.13},
    0.95: {"erk": 0.12, "uniform": 0.08},
}
RIGL_TRAINING = {  # (method, sparsity) -> published training FLOPs relative to dense (RigL paper, table 2; ERK)
    ("rigl", 0.8): 0.42,
    ("rigl", 0.9): 0.24,
    ("sparse_momentum", 0.8): 0.61,
    ("sparse_momentum", 0.9): 0.50,
}
SCHEDULE_STEPS, SCHEDULE_EPOCHS = 32000, 100  # RigL's ResNet-50: 100 epochs at batch 4096
RIGL_CODE_END_STEP = 25000  # rigl/imagenet_resnet/imagenet_train_eval.py: --maskupdate_end_step default

SPARSE_MOMENTUM_REFERENCE = 11.19  # % test error, LeNet-300-100 at 5 %, the reference implementation (mean)
PRUNING_REFERENCE = 10.69  # % test error, dense-to-sparse magnitude pruning under the same settings

METHODS = ["dense", "sparse_momentum", "rigl", "set", "dsr", "static", "snip", "gmp", "dst", "granet", "mest", "topkast"]
FROM_SCRATCH = ("sparse_momentum", "rigl", "set", "dsr", "static", "snip", "mest", "topkast")  # sparse from the first step
NEVER_DENSE = (*FROM_SCRATCH, "granet")  # granet starts at density 0.5 (its init_density) and never trains dense
# gmp prunes a dense network; dst's thresholds start at 0, so it starts dense too


def out(line: str = "") -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------- (a) inference FLOPs


def resnet50_costs() -> tuple[nn.Module, dict[str, int], dict[str, int], dict[str, tuple[int, ...]]]:
    """torchvision's ResNet-50 (random init), its layers' forward FLOPs for one 224x224 image (the library's cost
    model), the number of output elements of each layer, and the weight shapes, keyed by parameter name."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    x = torch.zeros(1, 3, 224, 224)
    cost = CostModel.build(model, "", x)
    names = list(cost.flops)
    calls = layer_calls(model, x, names)
    outputs = {n: sum(math.prod(c.output_shape) for c in calls[n]) for n in names}
    shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
    return model, cost.flops, outputs, shapes


def layer_densities(shapes: Mapping[str, Sequence[int]], density: float, distribution: str) -> dict[str, float]:
    """Per-layer densities: ``"erk"`` over every layer, or ``"uniform"`` with the first layer dense and every
    other layer (the fc included) at ``density``, as RigL's uniform."""
    names, sizes = list(shapes), [math.prod(s) for s in shapes.values()]
    if distribution == "erk":
        counts = layer_active_counts(list(shapes.values()), density, "erk")
    else:
        counts = [sizes[0], *layer_active_counts([shapes[n] for n in names[1:]], density, "uniform")]
    return {n: c / s for n, c, s in zip(names, counts, sizes)}


def part_a(flops: Mapping[str, int], outputs: Mapping[str, int], shapes: Mapping[str, Sequence[int]]) -> None:
    dense = sum(flops.values())
    dense_micronet = dense + sum(outputs.values())
    out("\n## (a) ResNet-50 inference FLOPs relative to dense (224x224)\n")
    out(f"Dense: {dense / 1e9:.3f} GFLOPs in the cost model ({len(flops)} conv/fc layers, 2·MACs),"
        f" {dense_micronet / 1e9:.3f} G with MicroNet's per-output bias and ReLU; RigL's README: {RIGL_DENSE_FLOPS / 1e9:.1f} G.\n")  # fmt: skip
    out("| distribution | sparsity | ours: Σ d·f / Σ f | ours + MicroNet's bias/ReLU per output | RigL README |")
    out("|---|---|---|---|---|")
    first, last = next(iter(flops)), list(flops)[-1]
    for distribution, label in (("erk", "ERK"), ("uniform", "uniform, first conv dense")):
        for sparsity, published in RIGL_INFERENCE.items():
            d = layer_densities(shapes, 1.0 - sparsity, distribution)
            sparse = sum(f * d[n] for n, f in flops.items())
            micronet = sparse + sum(outputs.values())
            out(f"| {label} | {sparsity:.2f} | {sparse / dense:.3f}x | {micronet / dense_micronet:.3f}x"
                f" | {published[distribution]:.2f}x |")  # fmt: skip
    erk = {s: layer_densities(shapes, 1.0 - s, "erk") for s in RIGL_INFERENCE}
    out(
        f"\nERK densities of the first conv ({first}) / the fc ({last}): "
        + ", ".join(f"{erk[s][first]:.3f} / {erk[s][last]:.3f} at {s:.2f}" for s in RIGL_INFERENCE)
    )


# ----------------------------------------------------------------------------- (b) training FLOPs


def simulate_train_flops(
    model: nn.Module, flops: Mapping[str, int], algorithm: str, density: float, stop_at: float | None = None
) -> tuple[float, int, float]:
    """Drive ``TrainFlops`` over RigL's ImageNet schedule as ``SparseTrainingCallback`` does, with a ``Sparsifier``
    bound to ``model`` (ERK masks) whose schedule decides the update steps; no training, no update runs (the
    masks, and so the densities, stay). Returns the final ratio, the number of updates and the ratio the RigL
    paper's formula gives for the same update count."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, density=density, algorithm=algorithm, init="erk", seed=0,
                            total_steps=SCHEDULE_STEPS, mask_kernel="torch", stop_at=stop_at)  # fmt: skip
    train_flops = TrainFlops()
    densities = sparsifier.densities()
    dense_gradients, gradient_growth = sparsifier.needs_dense_gradients, sparsifier.uses_gradient_growth

    def log_update() -> None:  # SparseTrainingCallback._log_update (the update itself keeps every layer's count)
        train_flops.mask_update(step, flops, densities, dense_gradients, gradient_growth)

    schedule, last, updates = sparsifier.schedule, -1, 0
    per_epoch = SCHEDULE_STEPS // SCHEDULE_EPOCHS
    train_flops.set_step_flops(flops, densities, dense_gradients)  # after the first batch, when the cost model exists
    step = 0
    for _ in range(SCHEDULE_EPOCHS):
        pending = step > 0  # the previous epoch's end update runs at this epoch's first step
        if pending and schedule.due(step, last, SCHEDULE_STEPS, True):
            last, updates = step, updates + 1
            log_update()
        for _ in range(per_epoch):
            step += 1
            train_flops.advance(step)  # on_train_batch_end
            if schedule.due(step, last, SCHEDULE_STEPS, False):
                last, updates = step, updates + 1
                log_update()
        train_flops.advance(step)  # on_train_epoch_end
    f_dense = float(sum(flops.values()))
    f_sparse = sum(f * densities[n] for n, f in flops.items())
    if sparsifier.needs_dense_gradients:
        formula = (2 * f_sparse + f_dense) / (3 * f_dense)
    else:
        extra = updates * (f_dense - f_sparse) if sparsifier.uses_gradient_growth else 0.0
        formula = (3 * f_sparse * SCHEDULE_STEPS + extra) / (3 * f_dense * SCHEDULE_STEPS)
    assert train_flops.step == SCHEDULE_STEPS
    return float(train_flops.ratio), updates, formula


def part_b(model: nn.Module, flops: Mapping[str, int]) -> None:
    out(
        f"\n## (b) ResNet-50 training FLOPs relative to dense, {SCHEDULE_EPOCHS} epochs / {SCHEDULE_STEPS} steps, ERK\n"
    )
    out("| method | sparsity | mask updates | ours (`TrainFlops`, `sparse/train_flops_ratio`) | RigL paper's formula |"
        " RigL paper (table 2) |")  # fmt: skip
    out("|---|---|---|---|---|---|")
    labels = {"rigl": "RigL (ΔT=100, until 75 %)", "sparse_momentum": "sparse momentum (SNFS)"}
    for algorithm in ("rigl", "sparse_momentum"):
        for sparsity in (0.8, 0.9):
            ratio, updates, formula = simulate_train_flops(model, flops, algorithm, 1.0 - sparsity)
            published = RIGL_TRAINING[(algorithm, sparsity)]
            out(
                f"| {labels[algorithm]} | {sparsity:.1f} | {updates} | {ratio:.4f}x | {formula:.4f}x | {published:.2f}x |"
            )
    for sparsity in (0.8, 0.9):
        ratio, updates, _ = simulate_train_flops(
            model, flops, "rigl", 1.0 - sparsity, RIGL_CODE_END_STEP / SCHEDULE_STEPS
        )
        out(f"| RigL, updates until step {RIGL_CODE_END_STEP} (RigL's code) | {sparsity:.1f} | {updates} | {ratio:.4f}x"
            f" | | {RIGL_TRAINING[('rigl', sparsity)]:.2f}x |")  # fmt: skip
    out("\nSparse momentum's FLOPs count dense weight gradients at every step, (2 f_S + f_D) / 3 f_D; its updates"
        " (at epoch ends, the paper's setting) add nothing. RigL's update steps cost 2 f_S + f_D instead of 3 f_S.")  # fmt: skip


# ----------------------------------------------------------------------------- (c) Fashion-MNIST


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The example's split: 54000 training images (its fixed random split, seed 0) and the 10000 test images."""
    data = FashionMNIST()
    data.setup("fit")
    full, indices = data.train_set.dataset, torch.as_tensor(data.train_set.indices)
    x, y = full.tensors[0][indices].contiguous(), full.tensors[1][indices].contiguous()
    return x, y, data.test_set.tensors[0], data.test_set.tensors[1]


def train_model(
    net: str,
    method: str,
    seed: int,
    epochs: int,
    density: float | None,
    data: Sequence[torch.Tensor],
    batch_size: int = 100,
    flops: TrainFlops | None = None,
    **sparse_options: object,
) -> tuple[nn.Module, Sparsifier | None, float]:
    """One training run of part (c)'s setting: the trained model (masks applied), its ``Sparsifier`` (``None``
    for dense) and the training time in seconds. ``sparse_options`` go to the ``Sparsifier`` (``pattern=``,
    ``dense_layers=``, as ``benchmarks/structured.py`` uses them). ``flops``: counts the run's training FLOPs as
    the callback does (see :func:`count_flops`)."""
    x_train, y_train = data[0], data[1]
    torch.manual_seed(seed)
    model = MODELS[net]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sparsifier = None
    if method != "dense":
        sparsifier = Sparsifier(model, optimizer, density=None if method == "dst" else density, algorithm=method,
                                seed=seed, total_steps=total, **sparse_options)  # fmt: skip
    # made after the Sparsifier: DST adds its thresholds to the optimizer as a new parameter group
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[total // 2, 3 * total // 4], gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    counted = count_flops(flops, model, sparsifier, x_train[:1])
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * batch_size : (i + 1) * batch_size]
            x, y = x_train[batch], y_train[batch]
            if sparsifier is not None and sparsifier.needs_snip:
                sparsifier.snip(F.cross_entropy(model(x), y))
            F.cross_entropy(model(x), y).backward()
            if sparsifier is not None:
                sparsifier.before_optimizer_step()
            optimizer.step()
            if sparsifier is not None:
                counted(sparsifier.step())
            optimizer.zero_grad()
            scheduler.step()
        if sparsifier is not None:
            counted(sparsifier.epoch_end(), epoch_end=True)
    if sparsifier is not None:
        sparsifier.finish()
    counted(None, final=True)
    return model.eval(), sparsifier, time.perf_counter() - start


def count_flops(flops: TrainFlops | None, model: nn.Module, sparsifier: Sparsifier | None, example: torch.Tensor):
    """A function to call after every ``sparsifier.step()`` and ``epoch_end()`` with what they return, and once at
    the end (``final``): it drives ``flops`` as ``SparseTrainingCallback`` does (the layers' forward FLOPs from the
    cost model, each update counted at its step with the new masks' densities; DST, whose masks change at every
    step, at each epoch end). Does nothing without ``flops``; a dense run counts ratio 1."""
    if flops is None:
        return lambda *args, **kwargs: None
    cost = CostModel.build(model, "", example).flops
    densities = sparsifier.densities() if sparsifier is not None else {}
    dense_gradients = sparsifier is not None and sparsifier.needs_dense_gradients
    growth = sparsifier is not None and sparsifier.uses_gradient_growth
    flops.set_step_flops(cost, densities, dense_gradients)
    steps = [0]

    def counted(report: object, epoch_end: bool = False, final: bool = False) -> None:
        if not epoch_end and not final:
            steps[0] += 1
            flops.advance(steps[0])
        if sparsifier is not None and (report is not None or (epoch_end and sparsifier.learns_every_step)):
            flops.mask_update(steps[0], cost, sparsifier.densities(), dense_gradients, growth and report is not None)

    return counted


def test_error_and_density(model: nn.Module, sparsifier: Sparsifier | None, data: Sequence[torch.Tensor]) -> dict[str, float]:
    """Test error (%) of a trained model and the density of its masked weights (non-zeros; every Linear and
    Conv2d weight when dense)."""
    x_test, y_test = data[2], data[3]
    with torch.no_grad():
        correct = sum(
            int((model(x_test[i : i + 1000]).argmax(1) == y_test[i : i + 1000]).sum())
            for i in range(0, len(x_test), 1000)
        )
        if sparsifier is not None:
            weights = [model.get_parameter(n) for n in sparsifier.names]
        else:
            weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    return {"test_error": 100.0 * (1.0 - correct / len(x_test)), "density": nonzero / sum(w.numel() for w in weights)}


def train_once(
    net: str, method: str, seed: int, epochs: int, density: float, data: Sequence[torch.Tensor], batch_size: int = 100
) -> dict[str, float]:
    """One run; returns the test error (%), the final density of the masked weights, ``R_s`` (the fraction of masked
    positions ever active; 1 when dense), the training FLOPs relative to dense and the wall time."""
    flops = TrainFlops()
    model, sparsifier, seconds = train_model(net, method, seed, epochs, density, data, batch_size, flops=flops)
    explored = sparsifier.explored().model if sparsifier is not None else 1.0
    ratio = flops.ratio if flops.ratio is not None else 1.0
    return {**test_error_and_density(model, sparsifier, data), "explored": explored, "flops": ratio, "seconds": seconds}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


RUN_LINE = re.compile(
    r"^\s+(?P<net>\w+) (?P<method>\w+)\s+seed (?P<seed>\d+): test error\s+(?P<test_error>[\d.]+) %, density"
    r" (?P<density>[\d.]+),(?: R_s (?P<explored>[\d.]+), train FLOPs (?P<flops>[\d.]+)x,)?\s+(?P<seconds>[\d.]+) s$"
)
HEADER_LINE = re.compile(r"^## \(c\) Fashion-MNIST, density (?P<density>[\d.]+), (?P<epochs>\d+) epochs")


def part_c(nets: Sequence[str], methods: Sequence[str], seeds: Sequence[int], epochs: int, density: float) -> None:
    data = load_data()
    out(f"\n## (c) Fashion-MNIST, density {density}, {epochs} epochs, seeds {list(seeds)}\n")
    out(f"SGD Nesterov 0.9, lr 0.1 (÷10 at 1/2 and 3/4 of training), batch 100, weight decay 5e-4;"
        f" {len(data[0])} training / {len(data[2])} test images; CPU: {cpu_model()}, {torch.get_num_threads()}"
        " thread(s). One line per run as it finishes:\n")  # fmt: skip
    results: dict[str, dict[str, list[dict[str, float]]]] = {net: {m: [] for m in methods} for net in nets}
    for net in nets:
        for seed in seeds:
            for method in methods:
                r = train_once(net, method, seed, epochs, density, data)
                results[net][method].append({**r, "seed": seed})
                out(f"    {net} {method:16s} seed {seed}: test error {r['test_error']:6.2f} %, density"
                    f" {r['density']:.4f}, R_s {r['explored']:.4f}, train FLOPs {r['flops']:.4f}x,"
                    f" {r['seconds']:6.1f} s")  # fmt: skip
    print_tables(results, epochs, density)


def tables_from(logs: Sequence[str]) -> None:
    """Part (c)'s tables from the run lines of earlier logs of this script, one table per network and
    configuration (density, epochs); a run found twice counts once (the last one)."""
    found: dict[tuple[float, int, str, str, int], dict[str, float]] = {}
    for log in logs:
        setting = None
        for line in Path(log).read_text().splitlines():
            if header := HEADER_LINE.match(line):
                setting = (float(header["density"]), int(header["epochs"]))
            elif (run := RUN_LINE.match(line)) and setting is not None:
                values = {k: float(run[k]) for k in ("test_error", "density", "explored", "flops", "seconds") if run[k]}
                found[(*setting, run["net"], run["method"], int(run["seed"]))] = {**values, "seed": int(run["seed"])}
    first_seen = {key[:3]: i for i, key in reversed(list(enumerate(found)))}  # tables in the order of the logs
    order = sorted(found, key=lambda key: (first_seen[key[:3]], METHODS.index(key[3]), key[4]))
    groups: dict[tuple[float, int], dict[str, dict[str, list[dict[str, float]]]]] = {}
    for key in order:
        density, epochs, net, method, _ = key
        groups.setdefault((density, epochs), {}).setdefault(net, {}).setdefault(method, []).append(found[key])
    out(f"\n## (c) Fashion-MNIST, tables from {', '.join(logs)}")
    for (density, epochs), results in groups.items():
        print_tables(results, epochs, density)


def print_tables(
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]], epochs: int, density: float
) -> None:
    for net, by_method in results.items():
        seeds = sorted({int(r["seed"]) for rs in by_method.values() for r in rs})
        out(f"\n### {net}, density {density}, {epochs} epochs, seeds {seeds} (test error %, mean ± std)\n")
        out("| method | test error % | per seed | final density | R_s | train FLOPs | s per run |")
        out("|---|---|---|---|---|---|---|")
        means = {}
        for method, rs in by_method.items():
            if not rs:
                continue
            mean, std = mean_std([r["test_error"] for r in rs])
            means[method] = mean
            per_seed = ", ".join(f"{r['test_error']:.2f}" for r in rs)
            note = " (learned)" if method == "dst" else ""
            explored, flops = (_mean_of(rs, key) for key in ("explored", "flops"))
            out(f"| {method} | {mean:.2f} ± {std:.2f} | {per_seed} | {statistics.mean(r['density'] for r in rs):.4f}{note}"
                f" | {explored} | {flops} | {statistics.mean(r['seconds'] for r in rs):.1f} |")  # fmt: skip
        out("")
        if net == "lenet300" and "sparse_momentum" in means:
            m = means["sparse_momentum"]
            verdict = "at or below" if m <= SPARSE_MOMENTUM_REFERENCE else "ABOVE"
            out(
                f"- sparse momentum {m:.2f} %: {verdict} the reference implementation's {SPARSE_MOMENTUM_REFERENCE:.2f} %"
            )
        for label, group in (("from-scratch", FROM_SCRATCH), ("never-dense", NEVER_DENSE)):
            scratch = {m: v for m, v in means.items() if m in group}
            if not scratch or (label == "never-dense" and "granet" not in scratch):
                continue
            best = min(scratch, key=scratch.get)
            line = f"- best {label} method ({', '.join(group)}): {best} {scratch[best]:.2f} %"
            if "gmp" in means:
                verdict = "at or below" if scratch[best] <= means["gmp"] else "ABOVE"
                line += f": {verdict} gmp's {means['gmp']:.2f} % here"
            if net == "lenet300":
                verdict = "at or below" if scratch[best] <= PRUNING_REFERENCE else "ABOVE"
                line += f"; {verdict} {PRUNING_REFERENCE:.2f} % (dense-to-sparse magnitude pruning, same settings)"
            out(line)


def _mean_of(runs: Sequence[Mapping[str, float]], key: str) -> str:
    """The mean of ``key`` over the runs that have it (runs of logs from before it was printed do not), or ``-``."""
    values = [r[key] for r in runs if key in r]
    return f"{statistics.mean(values):.3f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--nets", nargs="+", choices=sorted(MODELS), default=["lenet300", "lenet5"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--density", type=float, default=0.05, help="density of part (c) (default 0.05)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--tables-from", nargs="+", metavar="LOG", help="print part (c)'s tables from the run lines"
                        " of earlier logs of this script, and run nothing")  # fmt: skip
    args = parser.parse_args()
    if args.tables_from:
        tables_from(args.tables_from)
        return
    torch.set_num_threads(args.threads)
    if "a" in args.parts or "b" in args.parts:
        model, flops, outputs, shapes = resnet50_costs()
        if "a" in args.parts:
            part_a(flops, outputs, shapes)
        if "b" in args.parts:
            part_b(model, flops)
    if "c" in args.parts:
        part_c(args.nets, args.methods, args.seeds, args.epochs, args.density)


if __name__ == "__main__":
    main()
