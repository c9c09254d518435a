"""A small Vision Transformer on Fashion-MNIST: dense vs RigL vs sparse momentum, with density groups.

timm's ``VisionTransformer`` (random init): 28x28 images cut into 7x7 patches (16 tokens and a class token),
embedding 64, 4 blocks of 4 heads, MLP ratio 2. Every block has as many attention weights (``qkv`` 64x192 and
``proj`` 64x64) as MLP weights (``fc1`` 64x128 and ``fc2`` 128x64), so attention at 15% and the MLPs at 5% (the
defaults) make 10% of the masked weights overall. The callback keeps each group's number of active weights exactly
and moves weights only within a group:

    SparseTrainingCallback(density={"*.attn.*": 0.15, "*": 0.05}, dense_layers=["*.patch_embed.*", "*.head"])

AdamW (lr 2e-3, weight decay 0.05, linear warm-up over 10% of the steps then cosine to zero), batch 128, 54000
training images (6000 held out for validation, as in ``fashion_mnist.py``), test error on the 10000 test images.
RigL and sparse momentum use their own defaults (RigL: ERK within each group, an update every 100 steps until
75% of training; sparse momentum: uniform within each group, an update at the end of every epoch but the last).
The data are read offline from Debian's ``dataset-fashion-mnist`` (see ``fashion_mnist.py``).

    python examples/vit_fashion_mnist.py --threads 1          # dense, rigl, sparse_momentum; 5 epochs each
    python examples/vit_fashion_mnist.py --methods rigl --attn-density 0.3 --mlp-density 0.1 --epochs 2

The model is small enough that a second CPU thread gains little (about 27 ms instead of 40 ms per step of 128
images), and on a machine whose cores other processes share, torch's two threads can be ten times slower than one:
``--threads 1`` there.

Each method logs to ``<out>/<method>/version_N/`` (a ``CSVLogger``: ``metrics.csv``, and the callback's
``sparsity.png``).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_sparse import ALGORITHMS, SparseTrainingCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DATA_DIR, ClassifierSteps, EpochTimer, FashionMNIST  # noqa: E402  (same data, steps, timer)

ATTENTION = "*.attn.*"  # timm's blocks.N.attn.qkv and blocks.N.attn.proj
REST = "*"  # what is left once the two layers below are dense: blocks.N.mlp.fc1 and blocks.N.mlp.fc2
# The patch embedding (a 7x7 conv, 1 -> 64 channels: 3136 weights) is the only path from the pixels, and the head
# (64 -> 10: 640 weights) the only path to the classes; together under 3% of the weights. Masking them to a few
# percent would cut whole patch features or classes off for almost no saving, so they stay dense, and they are named
# here rather than given their own group so that their weights do not count in the 10%. `dense_layers` refuses a pattern that matches no layer, so a renamed timm layer
# fails loudly instead of silently joining the "*" group.
DENSE_LAYERS = ["*.patch_embed.*", "*.head"]
METHODS = ["dense", *sorted(name for name in ALGORITHMS if name != "dst")]  # DST learns one density: no groups


def vit(patch_size: int = 7, embed_dim: int = 64, depth: int = 4, num_heads: int = 4) -> VisionTransformer:
    return VisionTransformer(
        img_size=28, patch_size=patch_size, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=2.0,
    )  # fmt: skip


class ViTClassifier(ClassifierSteps):
    """Cross-entropy ViT classifier: AdamW, linear warm-up then cosine decay per optimizer step."""

    def __init__(self, lr: float = 2e-3, weight_decay: float = 0.05, warmup_fraction: float = 0.1, **model: Any):
        super().__init__()
        self.save_hyperparameters()
        self.net = vit(**model)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # Decay the matrices only (not biases, LayerNorms, the class token or the position embedding). Sparse
        # momentum reads AdamW's exp_avg / (sqrt(exp_avg_sq) + eps) as its momentum; RigL needs no momentum.
        decay = [p for p in self.parameters() if p.dim() >= 2 and p is not self.net.pos_embed]
        ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in ids]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=hp.lr
        )
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(hp.warmup_fraction * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FashionMNISTOnce(FashionMNIST):
    """``fashion_mnist.FashionMNIST`` that reads the idx files once, not at every ``fit`` and ``test``."""

    def setup(self, stage: str) -> None:
        if not hasattr(self, "test_set"):
            super().setup(stage)


def group_of(name: str, groups: list[str]) -> str | None:
    """The callback's rule: the first glob that matches the parameter name or its module's name."""
    module = name.rsplit(".", 1)[0]
    return next((g for g in groups if fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(module, g)), None)


def group_densities(
    module: nn.Module, callback: SparseTrainingCallback | None, groups: list[str]
) -> dict[str, tuple[int, int]]:
    """Density group → (active, total) over its masked weights: from the callback's masks, or, for the dense
    run, from the non-zero weights of the layers the sparse runs mask."""
    counts = {g: [0, 0] for g in groups}
    if callback is not None:
        sparsifier = callback.sparsifier
        names = list(callback.masks)
        if getattr(sparsifier, "layer_groups", None) is not None:  # one group glob per masked weight
            labels = dict(zip(sparsifier.names, sparsifier.layer_groups))
        else:
            labels = {name: group_of(name, groups) for name in names}
        for name, mask in callback.masks.items():
            counts[labels[name]][0] += int(mask.sum())
            counts[labels[name]][1] += mask.numel()
    else:
        for layer_name, layer in module.named_modules():
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            if any(fnmatch.fnmatchcase(layer_name, p) for p in DENSE_LAYERS):
                continue
            group = group_of(f"{layer_name}.weight", groups)
            if group is not None:
                counts[group][0] += int(torch.count_nonzero(layer.weight))
                counts[group][1] += layer.weight.numel()
    return {g: (a, t) for g, (a, t) in counts.items()}


def empty_heads(trainer: L.Trainer) -> dict[str, float] | None:
    """The callback's ``sparse/empty_heads/<attention module>`` metrics at the end of training (the fraction of the
    module's heads whose Q, K or V rows of ``qkv`` are all masked out), if it logs them; ``None`` otherwise."""
    prefix = "sparse/empty_heads/"
    found = {k[len(prefix) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
    return found or None


def run(
    method: str = "rigl",
    attn_density: float = 0.15,
    mlp_density: float = 0.05,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    limit_train_batches: int | float = 1.0,
    limit_val_batches: int | float = 1.0,
    limit_test_batches: int | float = 1.0,
    out: Path = Path("runs/vit_fashion_mnist"),
    data_dir: Path = DATA_DIR,
    progress_bar: bool = False,
    data: FashionMNIST | None = None,
) -> dict[str, Any]:
    """Train one method (``"dense"``: no callback) and test it; returns the figures. ``data`` (a datamodule of
    ``batch_size``) can be shared between runs."""
    start = time.perf_counter()
    L.seed_everything(seed, workers=True)
    module = ViTClassifier(lr=lr)
    density = {ATTENTION: attn_density, REST: mlp_density}
    timer = EpochTimer()
    callbacks: list[L.Callback] = [timer]
    sparse = None
    if method != "dense":
        sparse = SparseTrainingCallback(density=density, algorithm=method, dense_layers=DENSE_LAYERS, seed=seed)
        callbacks.insert(0, sparse)
    logger = CSVLogger(save_dir=str(out), name=method)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_train_batches=limit_train_batches,
        limit_val_batches=limit_val_batches,
        limit_test_batches=limit_test_batches,
        deterministic=True,
        default_root_dir=str(out),
    )
    data = data if data is not None else FashionMNISTOnce(batch_size=batch_size, data_dir=data_dir)
    trainer.fit(module, data)
    fit_time = time.perf_counter() - start
    heads = empty_heads(trainer)  # read before `test`, which replaces the callback metrics
    test = trainer.test(module, data, verbose=False)[0]
    n_test = min(len(data.test_set), int(trainer.num_test_batches[0]) * 1000)
    return {
        "method": method,
        "test_error": 100.0 * (1.0 - test["test/acc"]),
        "test_images": n_test,
        "groups": group_densities(module, sparse, list(density)),
        "empty_heads": heads,
        "fit_time": fit_time,
        "epoch_time": statistics.median(timer.times),
        "run_time": time.perf_counter() - start,
        "log_dir": logger.log_dir,
    }


def report(result: dict[str, Any]) -> str:
    m = result["method"]
    lines = [f"{m}: test error {result['test_error']:.2f}% ({result['test_images']} test images)"]
    parts, active, total = [], 0, 0
    for glob, (a, t) in result["groups"].items():
        parts.append(f"{glob!r} {a / t:.4f} ({a}/{t})")
        active, total = active + a, total + t
    lines.append(f"{m}: density {', '.join(parts)}, overall {active / total:.4f} ({active}/{total})")
    heads = result["empty_heads"]
    if heads is None:
        lines.append(f"{m}: empty attention heads n/a")
    else:
        mean = sum(heads.values()) / len(heads)
        each = " ".join(f"{v:.2f}" for v in heads.values())
        lines.append(f"{m}: empty attention heads {mean:.3f} (mean over {len(heads)} attention modules: {each})")
    lines.append(
        f"{m}: run time {result['run_time']:.1f} s (fit {result['fit_time']:.1f} s, median training epoch"
        f" {result['epoch_time']:.1f} s); logs in {result['log_dir']}"
    )
    return "\n".join(lines)


def batches(text: str) -> int | float:
    """Lightning's meaning: an integer is a number of batches ("1": one batch), a float a fraction ("1.0": all)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["dense", "rigl", "sparse_momentum"])
    parser.add_argument("--attn-density", type=float, default=0.15, help=f"density of the {ATTENTION!r} group")
    parser.add_argument("--mlp-density", type=float, default=0.05, help="density of the other blocks' layers (MLPs)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train-batches", type=batches, default=1.0, help="batches (3) or a fraction (0.5)")
    parser.add_argument("--limit-val-batches", type=batches, default=1.0, help="batches (3) or a fraction (0.5)")
    parser.add_argument("--limit-test-batches", type=batches, default=1.0, help="batches (3) or a fraction (0.5)")
    parser.add_argument("--out", type=Path, default=Path("runs/vit_fashion_mnist"), help="CSV logs: <out>/<method>/")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"ViT (patch 7, dim 64, depth 4, 4 heads, MLP ratio 2) on Fashion-MNIST, {args.epochs} epochs, batch"
        f" {args.batch_size}, seed {args.seed}; sparse: {ATTENTION!r} at {args.attn_density}, {REST!r} (the MLPs) at"
        f" {args.mlp_density}, {' and '.join(DENSE_LAYERS)} dense; {torch.get_num_threads()} CPU thread(s)"
    )
    results = []
    data = FashionMNISTOnce(batch_size=args.batch_size, data_dir=args.data_dir)
    for method in args.methods:
        result = run(
            method=method,
            attn_density=args.attn_density,
            mlp_density=args.mlp_density,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            limit_test_batches=args.limit_test_batches,
            out=args.out,
            data_dir=args.data_dir,
            progress_bar=sys.stdout.isatty(),
            data=data,
        )
        print(report(result), flush=True)
        results.append(result)
    print("method            test error  density  run time")
    for r in results:
        active = sum(a for a, _ in r["groups"].values())
        total = sum(t for _, t in r["groups"].values())
        print(f"{r['method']:<17} {r['test_error']:>9.2f}%  {active / total:>7.4f}  {r['run_time']:>7.1f} s")


if __name__ == "__main__":
    main()
