"""FSDP2 vs DDP: what one mask update costs per process when the model is sharded over 2 processes.

Two CPU processes (gloo) hold the same MLP twice: once sharded with FSDP2's ``fully_shard`` (each process keeps
half the rows of every weight, its mask and its optimizer state) and once whole under DDP. After one training step
(so momentum and gradients exist) each process runs ``Sparsifier.update()`` on both, alternating, and reports:

* the update's peak extra memory per process: the largest number of bytes held by tensors allocated during the
  update and still alive at the same time (counted with a ``TorchDispatchMode`` that sees every tensor torch
  creates), relative to the bytes of the process's local shard of the masked weights;
* the update time, median over alternating repeats, FSDP2 against DDP on the same model.

    python benchmarks/fsdp_update.py [--width 2048] [--layers 4] [--repeats 5] [--algorithms sparse_momentum rigl set]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sparse import Sparsifier  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and alive at the same time (storages counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key == 0 or key in self._storages:
            return
        size = storage.nbytes()
        self._storages.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        if key in self._storages:
            self._storages.discard(key)
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t)
        return out


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)])


def _worker(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(32, args.width, generator=torch.Generator().manual_seed(rank))
    results = {}
    for algorithm in args.algorithms:
        runs = {}
        for kind in ("fsdp2", "ddp"):
            model = _model(args.width, args.layers)
            if kind == "fsdp2":
                for block in model:
                    fully_shard(block[0], mesh=mesh)
                fully_shard(model, mesh=mesh)
                wrapped = model
            else:
                wrapped = DistributedDataParallel(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            sparsifier = Sparsifier(model, optimizer, density=0.1, algorithm=algorithm, total_steps=1000, seed=0,
                                    update_interval=1000)  # fmt: skip
            wrapped(x).square().mean().backward()
            optimizer.step()
            sparsifier.step()
            local_bytes = sum(w.numel() * w.element_size() for w in sparsifier.masking.local_weights())
            runs[kind] = (sparsifier, local_bytes)
        times = {"fsdp2": [], "ddp": []}
        peaks = {"fsdp2": 0, "ddp": 0}
        for _ in range(args.repeats):
            for kind in ("fsdp2", "ddp"):
                sparsifier, _ = runs[kind]
                dist.barrier()
                with LiveBytes() as meter:
                    start = time.perf_counter()
                    sparsifier.update()
                    times[kind].append(time.perf_counter() - start)
                peaks[kind] = max(peaks[kind], meter.peak)
        results[algorithm] = {
            kind: {
                "median_s": statistics.median(times[kind]),
                "peak_bytes": peaks[kind],
                "local_weight_bytes": runs[kind][1],
            }
            for kind in times
        }
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--algorithms", nargs="+", default=["sparse_momentum", "rigl", "set"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(port, args, queue), nprocs=2, join=True)
    results = queue.get()
    weights = args.layers * args.width * args.width
    print(f"MLP {args.layers} x Linear({args.width}, {args.width}): {weights / 1e6:.1f}M masked weights, density 0.1,")
    print(f"2 CPU processes (gloo), 1 thread each, rank 0's figures, median of {args.repeats} alternating updates\n")
    print("| algorithm | layout | local weights MB | update peak extra MB | peak / local shard | update s | vs DDP |")
    print("|---|---|---|---|---|---|---|")
    for algorithm, kinds in results.items():
        for kind, r in kinds.items():
            ratio = r["peak_bytes"] / r["local_weight_bytes"]
            speed = r["median_s"] / kinds["ddp"]["median_s"]
            print(f"| {algorithm} | {kind} | {r['local_weight_bytes'] / 1e6:.1f} | {r['peak_bytes'] / 1e6:.1f} |"
                  f" {ratio:.2f}x | {r['median_s']:.3f} | {speed:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
