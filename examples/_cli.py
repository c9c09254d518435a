"""The command line the three examples share: ``ExampleCLI``, a ``LightningCLI`` with ``fit``, ``validate``,
``test`` (and ``predict``) subcommands, a ``--threads`` option, and one run directory per set of options.

**Threads.** ``--threads N`` calls ``torch.set_num_threads(N)`` before anything is built (and sets
``OMP_NUM_THREADS``, so the processes of a CPU DDP run keep it). Without it: one thread when the process may use at
most 2 CPU cores (a small, often shared machine, where torch's default of one thread per core was up to 14x slower
than one thread), torch's own choice otherwise (or ``OMP_NUM_THREADS`` when it is set).

**Run directories.** Unless ``--trainer.logger`` names a logger, each run logs (TensorBoard, CSV files without
tensorboard) to ``<default_root_dir>/<model>_<method>/seed_<seed>-<hash>/``: ``<model>`` and ``<method>`` say what
is trained (``lenet300_rigl_0.05``, ``resnet50_sparse_momentum_0.1_partially_dense``, ``lenet5_dense``), and
``<hash>`` is the first 8 hex digits of the SHA-1 of every other option, so two runs whose options differ never share
a directory, and the same options always find the same one (``--ckpt_path last`` resumes that run, and no other).
The options that do not change what is trained are left out of the hash: ``IGNORED``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.tensorboard import _TENSORBOARD_AVAILABLE

from lightning_sparse import SparseTrainingCallback


def available_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """torch's CPU threads without ``--threads``: ``OMP_NUM_THREADS`` when set, else 1 on at most 2 cores, else
    torch's default."""
    if "OMP_NUM_THREADS" not in os.environ and available_cores() <= 2:
        return 1
    return torch.get_num_threads()


def sparse_callbacks(callbacks: Iterable[Any]) -> list[SparseTrainingCallback]:
    return [c for c in callbacks if isinstance(c, SparseTrainingCallback)]


def method_name(callbacks: Iterable[Any]) -> str:
    """``"dense"`` without a sparse callback, else ``"<algorithm>_<density>"`` (``"dst_learned"``; density groups:
    ``"<algorithm>_groups"``; ``"_<pattern>"`` appended for a pattern, ``"2:4"`` as ``"2of4"``;
    ``"_partially_dense"`` with ``dense_layers``), several joined by ``+``."""
    names = []
    for cb in sparse_callbacks(callbacks):
        density = cb.density
        if density is None:
            label = "learned"
        elif isinstance(density, (int, float)):
            label = f"{density:g}"
        else:
            label = "groups"
        name = f"{cb.algorithm_name}_{label}"
        if cb.pattern != "unstructured":
            name += "_" + str(cb.pattern).replace(":", "of")
        names.append(name + ("_partially_dense" if cb.dense_layers else ""))
    return "+".join(names) or "dense"


def default_logger(save_dir: str | Path, name: str, version: str | int | None = None) -> Logger:
    """TensorBoard's logger when tensorboard is installed, else CSV files; ``<save_dir>/<name>/<version>``
    (``version_N``, the next free one, when ``version`` is ``None``)."""
    if _TENSORBOARD_AVAILABLE:
        return TensorBoardLogger(save_dir, name=name, version=version)
    return CSVLogger(save_dir, name=name, version=version)


def options_hash(options: dict[str, Any], ignored: Iterable[str] = ()) -> str:
    """8 hex digits of the SHA-1 of ``options`` (nested dicts) without the ``ignored`` dotted keys."""
    options = json.loads(json.dumps(options, default=str))  # a deep copy, paths and the like as strings
    for key in ignored:
        *parents, last = key.split(".")
        node = options
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


class ExampleCLI(LightningCLI):
    """The examples' ``LightningCLI``: ``--threads``, and the default logger writes to this run's own directory,
    ``<default_root_dir>/<run_name()>/seed_<seed>-<hash>/``, which also becomes the Trainer's ``default_root_dir``
    (SLURM's ``hpc_ckpt_N.ckpt`` go there). A subclass names the model (``model_name``)."""

    # options that do not change what is trained: left out of the directory's hash
    IGNORED = (
        "config", "ckpt_path", "verbose", "threads", "trainer.default_root_dir", "trainer.logger",
        "trainer.enable_progress_bar", "trainer.enable_model_summary",
    )  # fmt: skip

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # the same options again: the same directory
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch's CPU threads (torch.set_num_threads); default: 1 on a machine with at most 2 cores, torch's"
            " own choice otherwise",
        )

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        threads = self._subconfig().get("threads")
        if threads is not None:
            if threads < 1:
                self.parser.error(f"--threads must be at least 1, got {threads}")
            os.environ["OMP_NUM_THREADS"] = str(threads)  # DDP's processes keep it (Lightning would set its own)
        torch.set_num_threads(threads if threads is not None else default_threads())

    def model_name(self) -> str:
        """The model's part of the run's name (``lenet300``, ``resnet50``)."""
        return type(self.model).__name__.lower()

    def run_callbacks(self) -> list[Any]:
        """The callbacks of the command line and the model's own (``configure_callbacks``)."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        own = self.model.configure_callbacks() if isinstance(self.model, L.LightningModule) else []
        own = list(own) if isinstance(own, (list, tuple)) else [own]
        replaced = {type(c) for c in own}  # Lightning replaces the trainer's callbacks of these types
        return [c for c in callbacks if type(c) not in replaced] + own

    def run_name(self) -> str:
        """``<model>_<method>``: the directory of this kind of run."""
        return f"{self.model_name()}_{method_name(self.run_callbacks())}"

    def run_version(self) -> str:
        """``seed_<seed>-<hash>``: this run's directory, from its seed and the hash of its options."""
        config = self._subconfig()
        return f"seed_{config.get('seed_everything')}-{options_hash(config.as_dict(), self.IGNORED)}"

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # the default logger: this run's own directory
            root = config.get("default_root_dir") or "."
            logger = default_logger(root, self.run_name(), self.run_version())
            kwargs["logger"] = logger
            kwargs["default_root_dir"] = logger.log_dir
        return super().instantiate_trainer(**kwargs)
