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

On LightningCLI, with the command line the three examples share (``examples/_cli.py``): ``fit`` trains one method
(``--model.method``: ``dense``, ``rigl`` (the default), ``sparse_momentum``, ``set``, ...), then tests the final model
and prints the test error, each group's density, the empty attention heads and the run time; ``--model.attn_density``,
``--model.mlp_density``, ``--model.lr``, ``--data.batch_size``, ``--trainer.max_epochs`` (5), ``--seed_everything``,
``--trainer.limit_{train,val,test}_batches``, ``--trainer.default_root_dir`` and ``--data.data_dir`` are the former
``--methods``, ``--attn-density``, ``--mlp-density``, ``--lr``, ``--batch-size``, ``--epochs``, ``--seed``,
``--limit-*-batches``, ``--out`` and ``--data-dir``.

    for m in dense rigl sparse_momentum; do python examples/vit_fashion_mnist.py fit --model.method $m; done
    python examples/vit_fashion_mnist.py fit --model.method rigl --model.attn_density 0.3 --model.mlp_density 0.1 \\
        --trainer.max_epochs 2 --threads 2

The model is small enough that a second CPU thread gains little (about 27 ms instead of 40 ms per step of 128
images), and on a machine whose cores other processes share, torch's two threads can be ten times slower than one:
``--threads`` defaults to 1 on a machine with at most 2 cores.

Each run logs (TensorBoard; CSV files without tensorboard; and the callback's ``sparsity.png``) to its own
directory, named by the options that distinguish it:
``runs/vit_fashion_mnist/vit_<method>_attn<attn_density>_mlp<mlp_density>/seed_<seed>-<hash>/`` (``vit_dense/...``
without a sparse callback), ``<hash>`` being that of every other option.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_sparse import ALGORITHMS, SparseTrainingCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ExampleCLI  # noqa: E402  (the examples' shared command line)
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
    """Cross-entropy ViT classifier: AdamW, linear warm-up then cosine decay per optimizer step; trained dense or
    with one sparse method, the attention and the MLPs at their own densities.

    Args:
        method: ``"dense"`` (no sparse callback) or a sparse method (``"rigl"``, ``"sparse_momentum"``, ``"set"``,
            ...): the model adds ``SparseTrainingCallback(density={"*.attn.*": attn_density, "*": mlp_density},
            algorithm=method, dense_layers=["*.patch_embed.*", "*.head"])`` (``configure_callbacks``).
        attn_density: density of the ``"*.attn.*"`` group (``qkv`` and ``proj`` of every block).
        mlp_density: density of the ``"*"`` group (the other masked layers: ``fc1`` and ``fc2`` of every block).
        lr: AdamW's peak learning rate.
        weight_decay: AdamW's weight decay (matrices only).
        warmup_fraction: the fraction of the optimizer steps of linear warm-up.
        patch_size, embed_dim, depth, num_heads: the ViT's.
    """

    def __init__(
        self,
        method: str = "rigl",
        attn_density: float = 0.15,
        mlp_density: float = 0.05,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        patch_size: int = 7,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"`method` can be {', '.join(METHODS)}, got {method!r}")
        self.save_hyperparameters()
        self.net = vit(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)

    @property
    def density(self) -> dict[str, float]:
        return {ATTENTION: self.hparams.attn_density, REST: self.hparams.mlp_density}

    def configure_callbacks(self) -> list[L.Callback]:
        fitting = self._trainer is None or self.trainer.state.fn == "fit"  # `test` keeps the masks fit left
        if self.hparams.method == "dense" or not fitting:
            return []
        seed = torch.initial_seed() % 2**63  # seed_everything's seed
        return [SparseTrainingCallback(self.density, algorithm=self.hparams.method, dense_layers=DENSE_LAYERS, seed=seed)]

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


def evaluate(
    trainer: L.Trainer, module: ViTClassifier, data: FashionMNIST, start: float, fit_time: float
) -> dict[str, Any]:
    """After ``fit``: test the final model and gather the figures ``report`` prints."""
    sparse = next((c for c in trainer.callbacks if isinstance(c, SparseTrainingCallback)), None)
    timer = next(c for c in trainer.callbacks if isinstance(c, EpochTimer))
    heads = empty_heads(trainer)  # read before `test`, which replaces the callback metrics
    test = trainer.test(module, data, verbose=False)[0]
    n_test = min(len(data.test_set), int(trainer.num_test_batches[0]) * 1000)
    return {
        "method": module.hparams.method,
        "test_error": 100.0 * (1.0 - test["test/acc"]),
        "test_images": n_test,
        "groups": group_densities(module, sparse, list(module.density)),
        "empty_heads": heads,
        "fit_time": fit_time,
        "epoch_time": statistics.median(timer.times) if timer.times else float("nan"),
        "run_time": time.perf_counter() - start,
        "log_dir": trainer.log_dir,
    }


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
    """Train one method (``"dense"``: no callback) from Python and test it, logging to ``<out>/<method>/version_N``;
    returns the figures. ``data`` (a datamodule of ``batch_size``) can be shared between runs."""
    start = time.perf_counter()
    L.seed_everything(seed, workers=True)
    module = ViTClassifier(method=method, attn_density=attn_density, mlp_density=mlp_density, lr=lr)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[EpochTimer()],
        logger=CSVLogger(save_dir=str(out), name=method),
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
    return evaluate(trainer, module, data, start, time.perf_counter() - start)


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


class ViTCLI(ExampleCLI):
    """The examples' CLI (``examples/_cli.py``: ``--threads``, one directory per set of options,
    ``<default_root_dir>/vit_<method>_attn<attn_density>_mlp<mlp_density>/seed_<seed>-<hash>/``); ``fit`` ends by
    testing the final model and printing ``report`` (``self.result`` holds the figures)."""

    result: dict[str, Any] | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults({"data.batch_size": 128})

    def model_name(self) -> str:
        return "vit"

    def run_name(self) -> str:
        hp = self.model.hparams
        if hp.method == "dense":
            return "vit_dense"
        return f"vit_{hp.method}_attn{hp.attn_density:g}_mlp{hp.mlp_density:g}"

    def before_fit(self) -> None:
        self._start = time.perf_counter()
        hp, config = self.model.hparams, self.config["fit"]
        sparse = (
            f"{ATTENTION!r} at {hp.attn_density}, {REST!r} (the MLPs) at {hp.mlp_density},"
            f" {' and '.join(DENSE_LAYERS)} dense"
            if hp.method != "dense"
            else "no sparse callback"
        )
        print(
            f"ViT (patch {hp.patch_size}, dim {hp.embed_dim}, depth {hp.depth}, {hp.num_heads} heads, MLP ratio 2) on"
            f" Fashion-MNIST, {hp.method}, {self.trainer.max_epochs} epochs, batch {self.datamodule.batch_size}, seed"
            f" {config['seed_everything']}; {sparse}; {torch.get_num_threads()} CPU thread(s)",
            flush=True,
        )

    def after_fit(self) -> None:
        fit_time = time.perf_counter() - self._start
        self.result = evaluate(self.trainer, self.model, self.datamodule, self._start, fit_time)
        print(report(self.result), flush=True)


def main(args: list[str] | None = None) -> ViTCLI:
    """Run the command line ``args`` (default: ``sys.argv``), e.g. ``["fit", "--model.method", "rigl"]``; after
    ``fit``, the returned CLI's ``result`` holds the figures printed."""
    return ViTCLI(
        ViTClassifier,
        FashionMNISTOnce,
        args=args,
        seed_everything_default=0,
        trainer_defaults={
            "max_epochs": 5,
            "deterministic": True,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": sys.stdout.isatty(),
            "default_root_dir": "runs/vit_fashion_mnist",
            "callbacks": [EpochTimer()],  # always there, not configurable
        },
        parser_kwargs={"description": "A small ViT on Fashion-MNIST, dense or sparse with density groups."},
    )


if __name__ == "__main__":
    main()
