"""What sparse training costs on top of dense training, on the CPU: mask application, mask updates, memory,
training throughput, and how the update time grows with the model.

    python benchmarks/overhead_resnet.py                          # every section (3.5 min with 1 thread)
    python benchmarks/overhead_resnet.py --sections apply update  # Lightning-free tensor math only (~1 min)
    python benchmarks/overhead_resnet.py --sections throughput --steps 8 --repeats 5
    python benchmarks/overhead_resnet.py --sections scaling --models resnet18 resnet34 resnet50 resnet101
    python benchmarks/overhead_resnet.py --threads 1              # on a machine shared with other jobs

Sections (``--sections``, default all):

* ``apply``: ``Masking.apply_()`` (the per-step mask application, with the C++ kernel of
  ``lightning_sparse.kernels``) against one ``optimizer.step()`` of SGD with momentum and weight decay, on
  torchvision ResNet-50 at density 0.1, alternating repetitions; for context, other ways to apply the same
  masks (torch's ``_foreach_mul_`` with the bool masks, with float masks; their bytes per weight are printed)
  and the read+write of the weights alone, the floor of any kernel that runs after the optimizer.
* ``update``: one sparse momentum update and one RigL update (with its optimizer-state reset) on ResNet-50,
  Lightning-free (``Sparsifier.update()``, one sparsifier per method), alternating; against the memory floor (one
  read of every masked weight, its growth score and its mask); host synchronizations per update; peak extra
  memory (resident set) during an update.
* ``callback``: a short real ``Trainer`` fit of ResNet-50 (small images) with ``SparseTrainingCallback``:
  tensor bytes the callback holds, host synchronizations of its step hook with and without an update.
* ``throughput``: ``Trainer`` fits with and without the callback, alternating in this process: ResNet-50 at
  224x224, batch 16 (per-step times; one mask update per fit, amortized over ``--amortize`` steps), and
  LeNet-5 on Fashion-MNIST, batch 100 (epochs of ``--lenet-steps`` steps, a mask update at every epoch end;
  also fits with a callback that does nothing, for what Lightning's calls of one more callback's hooks cost).
* ``scaling``: sparse momentum and RigL ``Sparsifier.update()`` times on ResNet-18/34/50/101 against their masked
  weights.

Times are medians over alternating repetitions. Nothing is asserted. On a shared machine, PyTorch's
multi-threaded kernels can stall for whole scheduler slices when another process holds a core (a 10 ms
optimizer step then takes 1 s); ``--threads 1`` gives stable, if slower, figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import SparseTrainingCallback, Sparsifier
from lightning_sparse.kernels import cpu_masked_zero

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

SECTIONS = ("apply", "update", "callback", "throughput", "scaling")
UPDATES = (("sparse_momentum", 0.5), ("rigl", 0.3))  # method and its initial pruning rate (drop fraction)


# ----------------------------------------------------------------------------- helpers
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def build_model(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


class SparseSetup:
    """A model sparsified by the library: a ``Sparsifier`` of ``method`` (initial pruning rate ``rate``) at
    ``density`` (uniform), SGD with momentum, and real dense gradients and momentum buffers from two small training
    steps (112x112 images, batch 4)."""

    def __init__(self, arch: str, density: float, seed: int, method: str = "sparse_momentum", rate: float = 0.5) -> None:
        self.arch = arch
        self.density = density
        self.model = build_model(arch, seed)
        self.optimizer = sgd(self.model)
        self.sparsifier = Sparsifier(
            self.model, self.optimizer, density=density, algorithm=method, prune_rate=rate, init="uniform", seed=seed,
            total_steps=1000,  # any length: update() at step 0 uses the initial rate
        )
        self.masking = self.sparsifier.masking
        x, y = torch.randn(4, 3, 112, 112), torch.randint(0, 1000, (4,))
        for _ in range(2):
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
            self.sparsifier.step()

    @property
    def masked_weights(self) -> int:
        return sum(self.masking.sizes)

    def update(self) -> float:
        """Seconds of one ``Sparsifier.update()`` (the method's update, installing and applying the masks, the
        grown weights' start and optimizer-state reset, and its checks)."""
        return timed(self.sparsifier.update)

    def train_step(self) -> None:
        """Move the state on between updates (the gradients stay those of the last backward)."""
        self.optimizer.step()
        self.masking.apply_()


class SyncCounter(TorchFunctionMode):
    """Counts, by where they are made, the calls that make a GPU wait for the device: reading a tensor's
    values on the host (``reads``), and ops whose output size depends on the data (``shapes``: nonzero,
    boolean-mask indexing...). On the CPU they cost nothing; the count is what the same code path would pay
    on a GPU (a path taken only on the CPU is counted too)."""

    READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "equal"}
    SHAPES = {"nonzero", "masked_select", "unique"}

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = "read" if name in self.READS else "shape" if name in self.SHAPES else None
        if name in ("__getitem__", "__setitem__") and len(args) > 1:  # boolean-mask indexing needs nonzero
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index):
                kind = "shape"
        if kind is not None:
            self.sites[f"{name} in {_caller()}"] += 1
            self.kinds[kind] += 1
        return func(*args, **kwargs)

    @property
    def summary(self) -> str:
        return f"{self.kinds['read']} reads + {self.kinds['shape']} dyn. shapes"

    def describe(self) -> str:
        return ", ".join(f"{site} x{n}" for site, n in self.sites.most_common()) or "none"


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "torch/" not in path and "overhead_resnet" not in path:
            return f"{Path(path).parent.name}/{Path(path).name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _rss() -> dict[str, int]:
    """Current and peak resident set of this process (Linux), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def peak_extra_memory(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory above the starting point while ``fn`` runs (Linux; None elsewhere). Sees every
    allocation, including the kernels' own buffers (topk's), which the profiler does not."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _rss()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
        fn()
        return float(_rss()["VmHWM"] - before)
    except (OSError, KeyError):
        return None


def tensor_bytes_held(obj: Any, exclude: set[int]) -> tuple[int, Counter[str]]:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes, minus those in ``exclude``
    (data pointers of the model's parameters, buffers and optimizer state, which the callback only refers
    to). Modules, optimizers, trainers, classes and functions are not followed."""
    skip = (nn.Module, torch.optim.Optimizer, L.Trainer, type, types.ModuleType, types.FunctionType,
            types.MethodType, types.BuiltinFunctionType, partial)
    seen_objects: set[int] = set()
    seen_storages: set[int] = set()
    total = 0
    by_dtype: Counter[str] = Counter()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen_objects or isinstance(o, skip) or (o is not obj and isinstance(o, L.Callback)):
            continue
        seen_objects.add(id(o))
        if isinstance(o, Tensor):
            storage = o.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in exclude and ptr not in seen_storages:
                seen_storages.add(ptr)
                total += storage.nbytes()
                by_dtype[str(o.dtype).removeprefix("torch.")] += storage.nbytes()
        elif isinstance(o, dict) or isinstance(o, types.MappingProxyType):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
        elif hasattr(o, "__slots__"):
            stack.extend(getattr(o, s) for s in o.__slots__ if hasattr(o, s))
    return total, by_dtype


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def header(title: str) -> None:
    print(f"\n== {title}", flush=True)


def row(label: str, value: str) -> None:
    print(f"  {label:<54} {value}", flush=True)


# ----------------------------------------------------------------------------- apply
def section_apply(args: argparse.Namespace) -> None:
    s = SparseSetup(args.model, args.density, args.seed)
    masking, optimizer = s.masking, s.optimizer
    n = s.masked_weights
    params = masking.weights
    bool_masks = masking.masks
    float_masks = [m.float() for m in bool_masks]

    def data() -> list[Tensor]:
        return [w.data for w in params]

    def reference_float_loop() -> None:  # TimDettmers/sparse_learning: `tensor.data = tensor.data * mask`
        for w, m in zip(params, float_masks):
            w.data = w.data * m

    mask_bytes = sum(m.numel() * m.element_size() for m in bool_masks)
    cpp_ok = cpu_masked_zero("auto") is not None
    library = "C++ kernel" if cpp_ok else "C++ kernel did not build: _foreach_mul_"
    candidates: list[tuple[str, float, Callable[[], None]]] = [
        (f"Masking.apply_() (the library: {library}, bool masks)", mask_bytes / n, masking.apply_),
        (
            "Masking.apply_(kernel='torch') (_foreach_mul_, bool masks as uint8)",
            mask_bytes / n,
            partial(masking.apply_, kernel="torch"),
        ),
        ("_foreach_mul_ with float32 masks", 4.0, lambda: torch._foreach_mul_(data(), float_masks)),
        ("reference: float loop `w.data = w.data * mask`", 4.0, reference_float_loop),
        ("floor: read+write of the weights alone (_foreach_mul_ by 1.0)", 0.0, lambda: torch._foreach_mul_(data(), 1.0)),
    ]
    step_times: list[float] = []
    times: dict[str, list[float]] = {label: [] for label, _, _ in candidates}
    for _ in range(args.apply_repeats):
        for label, _, fn in candidates:
            step_times.append(timed(optimizer.step))
            times[label].append(timed(fn))
    masking.apply_()
    step = median(step_times)
    header(
        f"apply: {args.model}, {n / 1e6:.1f}M masked weights at density {args.density},"
        f" {args.apply_repeats} alternating repetitions"
    )
    print(f"  optimizer.step() (SGD momentum 0.9, weight decay 1e-4): {step * 1e3:.1f} ms")
    print(f"  {'way of applying the masks':<68} {'ms':>7} {'x step':>7} {'mask B/weight':>14}")
    for label, bytes_per_weight, _ in candidates:
        t = median(times[label])
        print(f"  {label:<68} {t * 1e3:>7.2f} {t / step:>7.3f} {bytes_per_weight:>14.0f}")
    library_time, torch_time, floor = (median(times[candidates[i][0]]) for i in (0, 1, -1))
    if not cpp_ok:
        print(
            "  the C++ kernel could not be built here, so the first two rows are the same path; see why with"
            " python -c \"from lightning_sparse.kernels import cpu_masked_zero; cpu_masked_zero('cpp')\""
        )
        return
    print(
        f"  the C++ kernel moves 9 B/weight (4 read + 4 written + 1 mask byte), torch's bool-mask multiply about"
        f" 17 (it first converts each mask to a float temporary): {torch_time / library_time:.2f}x faster"
        f" here. Fused into the optimizer's own weight update, the masks would add only their read: about"
        f" {floor / 8 / step:.2f}x of a step"
    )


# ----------------------------------------------------------------------------- update
def read_once(tensors: Sequence[Tensor]) -> None:
    """Read every byte of ``tensors`` once: a sum over each (bool masks as 8-byte words, so that the read, not the
    add, sets the time)."""
    for t in tensors:
        if t.dtype == torch.bool:
            flat = t.reshape(-1).view(torch.uint8)
            whole = flat.numel() // 8 * 8
            flat[:whole].view(torch.int64).sum()
            flat[whole:].sum()
        else:
            t.sum()


def update_reads(s: SparseSetup, method: str) -> list[Tensor]:
    """What one update must read at least once: every masked weight, its mask and its growth score (the momentum
    buffer for sparse momentum, the gradient for RigL)."""
    weights = [w.detach() for w in s.masking.weights]
    if method == "rigl":
        scores = [w.grad for w in s.masking.weights]
    else:
        scores = [s.optimizer.state[w]["momentum_buffer"] for w in s.masking.weights]
    return weights + scores + list(s.masking.masks)


def section_update(args: argparse.Namespace) -> None:
    setups = {method: SparseSetup(args.model, args.density, args.seed, method, rate) for method, rate in UPDATES}
    times: dict[str, list[float]] = {method: [] for method, _ in UPDATES}
    floors: dict[str, list[float]] = {method: [] for method, _ in UPDATES}
    for _ in range(args.update_repeats):
        for method, s in setups.items():
            s.train_step()
            floors[method].append(timed(partial(read_once, update_reads(s, method))))
            times[method].append(s.update())
    s = setups[UPDATES[0][0]]
    header(
        f"update: {args.model}, {s.masked_weights / 1e6:.1f}M masked weights at density {args.density},"
        f" {args.update_repeats} alternating repetitions of Sparsifier.update() (Lightning-free)"
    )
    print(f"  {'method (rate)':<22} {'total s':>8} {'floor s':>8} {'x floor':>8}  {'host syncs (GPU)':<28} peak extra memory")
    for method, rate in UPDATES:
        s = setups[method]
        s.train_step()
        with SyncCounter() as counter:
            s.update()
        s.train_step()
        peak = peak_extra_memory(s.update)
        peak_text = "n/a" if peak is None else f"{fmt_bytes(peak)} ({peak / s.masked_weights:.2f} B/weight)"
        t, floor = median(times[method]), median(floors[method])
        print(
            f"  {method + f' ({rate})':<22} {t:>8.3f} {floor:>8.3f} {t / floor:>8.1f}  {counter.summary:<28} {peak_text}"
        )
        print(f"  {'':<22} syncs: {counter.describe()}")
    print(
        "  floor: one read of every masked weight, its growth score (momentum buffer / gradient) and its mask"
        " (a sum over each), timed before each update; x floor = update / floor"
    )
    if args.profile:
        from torch.profiler import profile

        for method, s in setups.items():
            s.train_step()
            with profile() as prof:
                s.update()
            print(f"\n  profile of one {method} update (top operators by self time):")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
            print("\n".join("    " + line for line in table.splitlines()))


# ----------------------------------------------------------------------------- Lightning runs
class ImageClassifier(L.LightningModule):
    def __init__(self, arch: str, seed: int) -> None:
        super().__init__()
        self.net = build_model(arch, seed)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return sgd(self)


class Recorder:
    """Two callbacks, put first and last in the list: step and epoch wall times, and the time spent in the
    callbacks between them in ``on_train_batch_end`` (there, the sparse callback's mask application and
    step-level updates) and in ``on_train_epoch_end`` (epoch-level updates). Optionally counts host
    synchronizations in the batch hook at given steps."""

    def __init__(self, count_syncs_at: Sequence[int] = ()) -> None:
        self.batch_starts: list[float] = []
        self.batch_ends: list[float] = []
        self.hook_times: list[float] = []
        self.epoch_starts: list[float] = []
        self.epoch_times: list[float] = []
        self.epoch_hook_times: list[float] = []
        self.count_syncs_at = set(count_syncs_at)
        self.syncs: dict[int, SyncCounter] = {}
        self._hook_start = 0.0
        self._counter: SyncCounter | None = None
        recorder = self

        class First(L.Callback):
            def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                recorder.epoch_starts.append(time.perf_counter())

            def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
                recorder.batch_starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
                if trainer.global_step in recorder.count_syncs_at:
                    recorder._counter = SyncCounter()
                    recorder._counter.__enter__()
                recorder._hook_start = time.perf_counter()

            def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                recorder._hook_start = time.perf_counter()

        class Last(L.Callback):
            def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
                now = time.perf_counter()
                recorder.hook_times.append(now - recorder._hook_start)
                recorder.batch_ends.append(now)
                if recorder._counter is not None:
                    recorder._counter.__exit__(None, None, None)
                    recorder.syncs[trainer.global_step] = recorder._counter
                    recorder._counter = None

            def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                now = time.perf_counter()
                recorder.epoch_hook_times.append(now - recorder._hook_start)
                recorder.epoch_times.append(now - recorder.epoch_starts[-1])

        self.first, self.last = First(), Last()

    def wrap(self, callbacks: Sequence[L.Callback]) -> list[L.Callback]:
        return [self.first, *callbacks, self.last]

    def step_times(self) -> list[float]:
        """Wall time of each training step, from one step's start to the next (the last: to its hook's end)."""
        starts = self.batch_starts
        return [b - a for a, b in zip(starts, starts[1:])] + [self.batch_ends[-1] - starts[-1]]


def fit(
    module: L.LightningModule, data: Any, callbacks: list[L.Callback], root: str, **trainer_kwargs: Any
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        **trainer_kwargs,
    )
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=data)
    return trainer


def random_images(n: int, size: int, batch_size: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ----------------------------------------------------------------------------- callback
def section_callback(args: argparse.Namespace, root: str) -> None:
    steps, update_at = 4, 3  # step 1 also builds the cost model of the speedup estimates: count at 2 and 3
    module = ImageClassifier(args.model, args.seed)
    sparse = SparseTrainingCallback(density=args.density, update_interval=update_at, seed=args.seed, figure=False)
    recorder = Recorder(count_syncs_at=(update_at - 1, update_at))
    loader = random_images(steps * 4, 112, 4, args.seed)
    trainer = fit(module, loader, recorder.wrap([sparse]), root, max_steps=steps, limit_train_batches=steps)
    masks = dict(sparse.masks)
    n = sum(m.numel() for m in masks.values())
    mask_bytes = sum(m.numel() * m.element_size() for m in masks.values())
    state = [t for per_param in trainer.optimizers[0].state.values() for t in per_param.values()]
    model_tensors = [*module.parameters(), *module.buffers(), *(t for t in state if isinstance(t, Tensor))]
    exclude = {t.untyped_storage().data_ptr() for t in model_tensors}
    held, by_dtype = tensor_bytes_held(sparse, exclude)
    header(f"callback: {args.model} fit of {steps} steps (112x112, batch 4), update at step {update_at}")
    dtypes = ", ".join(sorted({str(m.dtype) for m in masks.values()}))
    print(f"  masked weights: {n} in {len(masks)} layers; masks {dtypes}")
    print(f"  mask bytes (numel x element_size): {mask_bytes} = {mask_bytes / n:.3f} B per masked weight")
    print(
        f"  tensor bytes held by the callback: {held} = {held / n:.3f} B per masked weight"
        f" ({', '.join(f'{k}: {v}' for k, v in by_dtype.items())}; sparse momentum keeps nothing else: the"
        " momentum is the optimizer's)"
    )
    for step, counter in sorted(recorder.syncs.items()):
        kind = "with a mask update" if step == update_at else "apply_ only"
        print(f"  host syncs (GPU) in the step hook at step {step} ({kind}): {counter.summary}")
        print(f"    {counter.describe()}")


# ----------------------------------------------------------------------------- throughput
def section_throughput(args: argparse.Namespace, root: str) -> None:
    resnet_throughput(args, root)
    lenet_throughput(args, root)


def resnet_throughput(args: argparse.Namespace, root: str) -> None:
    steps = args.steps
    update_at = max(2, steps // 2)  # step 1 is the warm-up (and the callback's one-time cost model)
    if steps < 3:
        raise SystemExit("--steps must be at least 3 (a warm-up step, the update step, a plain step)")
    loader = random_images(steps * args.batch_size, args.image_size, args.batch_size, args.seed)
    runs: dict[str, list[Recorder]] = {"dense": [], "sparse": []}
    began = time.perf_counter()
    for _ in range(args.repeats):
        for kind in ("dense", "sparse"):
            module = ImageClassifier(args.model, args.seed)
            recorder = Recorder()
            callbacks = []
            if kind == "sparse":
                sparse = SparseTrainingCallback(args.density, update_interval=update_at, seed=args.seed, figure=False)
                callbacks = [sparse]
            fit(module, loader, recorder.wrap(callbacks), root, max_steps=steps, limit_train_batches=steps)
            runs[kind].append(recorder)
            del module
            gc.collect()
    elapsed = time.perf_counter() - began

    u = update_at - 1  # index of the step whose hook runs the update (global_step == update_at there)
    dense_step = median([median(r.step_times()[1:]) for r in runs["dense"]])
    sparse_plain = [[t for i, t in enumerate(r.step_times()) if i >= 1 and i != u] for r in runs["sparse"]]
    sparse_step = median([median(ts) for ts in sparse_plain])
    update_extra = median([r.step_times()[u] - median(ts) for r, ts in zip(runs["sparse"], sparse_plain)])
    sparse_hooks = [[t for i, t in enumerate(r.hook_times) if i >= 1 and i != u] for r in runs["sparse"]]
    apply_hook = median([median(ts) for ts in sparse_hooks]) - median([median(r.hook_times[1:]) for r in runs["dense"]])
    update_hook = median([r.hook_times[u] for r in runs["sparse"]])
    first = {kind: median([r.step_times()[0] for r in rs]) for kind, rs in runs.items()}
    amortized = sparse_step + update_extra / args.amortize
    from_hooks = dense_step + apply_hook + update_hook / args.amortize

    header(
        f"throughput: {args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}, SGD momentum,"
        f" density {args.density}; {args.repeats} dense and {args.repeats} sparse fits of {steps} steps,"
        f" alternating ({elapsed:.0f} s)"
    )
    row("dense step (median)", f"{dense_step:8.3f} s   {1 / dense_step:.3f} steps/s")
    row("sparse step without update (median)", f"{sparse_step:8.3f} s")
    apply_share = apply_hook / dense_step
    row("callback per step: apply_ in on_train_batch_end", f"{apply_hook * 1e3:8.2f} ms ({apply_share:.2%} of a step)")
    row("mask update step: hook (update, statistics, logging)", f"{update_hook:8.3f} s   step +{update_extra:.3f} s")
    first_extra = first["sparse"] - first["dense"]
    row("first step, one-time (cost model of the estimates)", f"{first_extra:8.3f} s   (not amortized)")
    print(
        f"  throughput ratio, sparse/dense, an update every {args.amortize} steps: from median step times"
        f" {dense_step / amortized:.4f}x; from the callback's hook times {dense_step / from_hooks:.4f}x"
    )


def lenet_throughput(args: argparse.Namespace, root: str) -> None:
    try:
        from fashion_mnist import Classifier, FashionMNIST
    except ImportError as error:
        print(f"\n== throughput: LeNet-5 skipped ({error})")
        return

    class CachedFashionMNIST(FashionMNIST):
        """Reads the idx files once for all the fits of this benchmark."""

        def setup(self, stage: str) -> None:
            if not hasattr(self, "train_set"):
                super().setup(stage)

    data = CachedFashionMNIST(batch_size=100)
    try:
        data.setup("fit")
    except FileNotFoundError as error:
        print(f"\n== throughput: LeNet-5 skipped ({error})")
        return
    epochs, lenet_steps = args.lenet_epochs, args.lenet_steps
    # "noop": a callback that does nothing, for what Lightning's calls of one more callback's hooks cost
    runs: dict[str, list[Recorder]] = {"dense": [], "noop": [], "sparse": []}
    began = time.perf_counter()
    for repeat in range(args.repeats):
        for kind in runs:
            torch.manual_seed(args.seed + repeat)
            module = Classifier("lenet5")
            recorder = Recorder()
            callbacks: list[L.Callback] = []
            if kind == "sparse":
                callbacks = [SparseTrainingCallback(density=args.lenet_density, seed=args.seed, figure=False)]
            elif kind == "noop":
                callbacks = [L.Callback()]
            fit(module, data, recorder.wrap(callbacks), root, max_epochs=epochs, limit_train_batches=lenet_steps)
            runs[kind].append(recorder)
    elapsed = time.perf_counter() - began
    header(
        f"throughput: LeNet-5 / Fashion-MNIST, batch 100, SGD Nesterov momentum, density {args.lenet_density};"
        f" {args.repeats} dense, no-op-callback and sparse fits of {epochs} epochs of {args.lenet_steps} steps,"
        f" alternating ({elapsed:.0f} s)"
    )
    if epochs < 3:
        print("  --lenet-epochs must be at least 3 (a warm-up epoch, epochs ending with an update, the last epoch)")
        return
    measured = slice(1, epochs - 1)  # not the first (warm-up, cost model), not the last (no update)
    steps = args.lenet_steps

    def per_run(kind: str, values: Callable[[Recorder], list[float]]) -> float:
        return median([median(values(r)) for r in runs[kind]])

    dense_epoch = per_run("dense", lambda r: r.epoch_times[measured])
    sparse_epoch = per_run("sparse", lambda r: r.epoch_times[measured])
    dense_step = per_run("dense", lambda r: r.step_times()[steps:])
    sparse_step = per_run("sparse", lambda r: r.step_times()[steps:])
    apply_hook = per_run("sparse", lambda r: r.hook_times[steps:]) - per_run("dense", lambda r: r.hook_times[steps:])
    epoch_hook = per_run("sparse", lambda r: r.epoch_hook_times[measured])
    epoch_hook -= per_run("dense", lambda r: r.epoch_hook_times[measured])
    dispatch = per_run("noop", lambda r: r.step_times()[steps:]) - dense_step  # per step, from step medians
    rest = sparse_epoch - dense_epoch - steps * (apply_hook + dispatch) - epoch_hook
    row(
        "dense epoch (median)",
        f"{dense_epoch:8.3f} s   {steps / dense_epoch:.1f} steps/s, step {dense_step * 1e3:.2f} ms",
    )
    row(
        "sparse epoch, mask update at its end (median)",
        f"{sparse_epoch:8.3f} s   {steps / sparse_epoch:.1f} steps/s, step {sparse_step * 1e3:.2f} ms",
    )
    row(
        "callback per step: apply_ in on_train_batch_end",
        f"{apply_hook * 1e3:8.3f} ms ({steps * apply_hook / dense_epoch:.2%} of a dense epoch)",
    )
    epoch_share = epoch_hook / dense_epoch
    row("callback at epoch end: update, statistics, logging", f"{epoch_hook * 1e3:8.1f} ms ({epoch_share:.2%})")
    row(
        "one more callback in Lightning's loop (no-op), per step",
        f"{dispatch * 1e3:8.3f} ms ({steps * dispatch / dense_epoch:.2%}, from median step times)",
    )
    row("rest of the epoch difference (noise)", f"{rest * 1e3:8.1f} ms ({rest / dense_epoch:.2%})")
    print(
        f"  throughput ratio, sparse/dense (the paper: 0.973x): from epoch times {dense_epoch / sparse_epoch:.4f}x;"
        f" from median step times {dense_step / (sparse_step + epoch_hook / steps):.4f}x; from the callback's hook"
        f" times {dense_epoch / (dense_epoch + steps * apply_hook + epoch_hook):.4f}x"
    )


# ----------------------------------------------------------------------------- scaling
def section_scaling(args: argparse.Namespace) -> None:
    setups = {
        (arch, method): SparseSetup(arch, args.density, args.seed, method, rate)
        for arch in args.models
        for method, rate in UPDATES
    }
    times: dict[tuple[str, str], list[float]] = {key: [] for key in setups}
    for _ in range(args.scaling_repeats):
        for key, s in setups.items():
            s.train_step()
            times[key].append(s.update())
    header(
        f"scaling: update time against masked weights, density {args.density},"
        f" {args.scaling_repeats} alternating repetitions (Lightning-free)"
    )
    print(
        f"  {'model':<11} {'masked weights':>15} {'layers':>7} {'sparse momentum s':>18} {'RigL s':>8}"
        f" {'SM ms/M':>8} {'RigL ms/M':>10}"
    )
    for arch in args.models:
        s = setups[(arch, "sparse_momentum")]
        sm, rigl = median(times[(arch, "sparse_momentum")]), median(times[(arch, "rigl")])
        m = s.masked_weights / 1e6
        print(
            f"  {s.arch:<11} {s.masked_weights:>15} {len(s.masking.names):>7} {sm:>18.3f} {rigl:>8.3f}"
            f" {sm * 1e3 / m:>8.1f} {rigl * 1e3 / m:>10.1f}"
        )


def contention_check() -> None:
    """Warn when multi-threaded kernels stall: another process holds a core (see the module docstring)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return
    x = torch.ones(1 << 22)

    def timing(n: int) -> float:
        torch.set_num_threads(n)
        return median([timed(lambda: x.mul_(1.0)) for _ in range(15)])

    single, multi = timing(1), timing(threads)
    torch.set_num_threads(threads)
    if multi > 2 * single:
        print(
            f"WARNING: a multi-threaded kernel takes {multi * 1e3:.1f} ms on {threads} threads but"
            f" {single * 1e3:.1f} ms on 1: another process holds a core, and timings with {threads} threads"
            " will be erratic; rerun with --threads 1",
            flush=True,
        )


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--model", default="resnet50", help="torchvision model of apply/update/callback/throughput")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--apply-repeats", type=int, default=21)
    parser.add_argument("--update-repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one update")
    parser.add_argument("--steps", type=int, default=6, help="training steps per ResNet fit (first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="dense and sparse fits each, alternating")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amortize", type=int, default=100, help="steps per mask update (an epoch)")
    parser.add_argument("--lenet-epochs", type=int, default=4)
    parser.add_argument("--lenet-steps", type=int, default=100, help="steps per LeNet-5 epoch")
    parser.add_argument("--lenet-density", type=float, default=0.05)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--scaling-repeats", type=int, default=3)
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_sparse"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, torchvision {torchvision.__version__}, lightning {L.__version__};"
        f" {torch.get_num_threads()} threads; sections: {' '.join(args.sections)}",
        flush=True,
    )
    contention_check()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for section in SECTIONS:
            if section not in args.sections:
                continue
            if section == "apply":
                section_apply(args)
            elif section == "update":
                section_update(args)
            elif section == "callback":
                section_callback(args, root)
            elif section == "throughput":
                section_throughput(args, root)
            elif section == "scaling":
                section_scaling(args)
            gc.collect()
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
