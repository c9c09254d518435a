"""Sparse training from scratch with Hugging Face ``transformers.Trainer``: :class:`SparseTrainerCallback`.

A ``transformers.TrainerCallback`` driving the Lightning-free :class:`~lightning_sparse.Sparsifier` at the points of
the Trainer's loop that the Sparsifier's call order asks for (:data:`lightning_sparse.core.loop_checks.ORDER`)::

    on_train_begin        bind the Sparsifier (masks drawn, or loaded from the checkpoint the Trainer resumes)
    on_step_begin         the epoch-end update of the epoch before, if one is due (as SparseTrainingCallback)
    on_pre_optimizer_step sparsifier.before_optimizer_step()   (after clipping, before optimizer.step())
    on_optimizer_step     sparsifier.step()  (after optimizer.step(), before the scheduler and zero_grad:
                          the masks are applied again; RigL grows where this step's gradients are largest)
    on_epoch_end          the epoch-end update is due (run at the next epoch's first step, never after the last)
    on_log                the update's metrics join the Trainer's log row (``trainer.state.log_history``)
    on_save               the Sparsifier's state, ``sparse_trainer_state.pt`` in the checkpoint folder
    on_train_end          sparsifier.finish()

Requires ``transformers`` and ``accelerate`` (which ``transformers.Trainer`` needs):
``pip install transformers accelerate`` (or ``pip install "lightning-sparse[hf]"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_sparse.core.sparsifier import Sparsifier, UpdateReport
from lightning_sparse.methods import ALGORITHMS
from lightning_sparse.options import SparseOptions

STATE_FILE = "sparse_trainer_state.pt"
"""The name of the Sparsifier's state in each checkpoint folder (``<output_dir>/checkpoint-<step>/``)."""

__all__ = ["STATE_FILE", "SparseTrainerCallback"]


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (the one whose steps are counted: its
    step post-hooks do not run when AMP's GradScaler skips a step)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


class SparseTrainerCallback(TrainerCallback):
    """Keep a ``transformers`` model sparse during the whole of ``Trainer.train()``, updating which weights are
    active: the :class:`~lightning_sparse.Sparsifier` of :class:`~lightning_sparse.SparseTrainingCallback`, driven
    by the Trainer's callback events.

    Args:
        density: fraction of the masked weights that are active, in (0, 1], or density groups ``{name glob:
            density}``. GPT-2's ``Conv1D``, ``nn.Linear`` and convolutions are masked; embeddings (and the output
            layer tied to them) stay dense unless ``mask_embeddings=True``.
        algorithm: a name of :data:`~lightning_sparse.ALGORITHMS` (``"sparse_momentum"``, ``"rigl"``, ``"set"``,
            ``"granet"``, ...) or a :class:`~lightning_sparse.SparseAlgorithm` (``"dst"`` is refused: its
            thresholds must join the optimizer before the Trainer makes it; use the Lightning callback or a plain
            loop).
        log_updates: log each mask update at its own step (sets ``control.should_log``), whatever
            ``logging_steps`` says; ``False``: the update's metrics wait for the next logging step.
        resume_from: the checkpoint folder holding ``sparse_trainer_state.pt`` when the Trainer resumes from a
            checkpoint outside ``args.output_dir``; ``None``: ``<args.output_dir>/checkpoint-<global step>``.
        **options: the other options of :class:`~lightning_sparse.SparseOptions` (``prune_rate``,
            ``prune_rate_schedule``, ``init``, ``dense_layers``, ``update_interval``, ``stop_at``, ``seed``,
            ``pattern``, ...), each described there. ``update_interval`` and ``stop_at`` count optimizer steps of
            the Trainer (``state.global_step``, ``args.max_steps`` or the epochs' total).

    Logged (to ``trainer.state.log_history`` and every reporting integration after this callback; see
    :meth:`attach`) at each mask update: ``sparse/density`` (active fraction of the masked weights, from the
    masks), ``sparse/prune_rate``, ``sparse/pruned``, ``sparse/grown`` (weights, all layers) and
    ``sparse/num_updates``.

    Example::

        sparse = SparseTrainerCallback(density=0.1, algorithm="rigl", update_interval=100)
        trainer = Trainer(model=model, args=args, train_dataset=train_set)
        sparse.attach(trainer)          # or Trainer(..., callbacks=[sparse])
        trainer.train()                 # trainer.train(resume_from_checkpoint=True) continues a run
    """

    def __init__(
        self,
        density: float | Mapping[str, float] | None = None,
        algorithm: Any = "sparse_momentum",
        *,
        log_updates: bool = True,
        resume_from: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        self.options = SparseOptions(density=density, algorithm=algorithm, **options)
        if self.options.is_dst:
            allowed = ", ".join(repr(name) for name in ALGORITHMS if name != "dst")
            raise ValueError(
                f"SparseTrainerCallback supports algorithm {allowed} or a SparseAlgorithm, not 'dst' (its thresholds"
                " must be in the optimizer the Trainer makes before any callback runs): train DST with"
                " SparseTrainingCallback or a plain loop"
            )
        if not isinstance(log_updates, bool):
            raise ValueError(f"`log_updates` must be True or False, got {log_updates!r}")
        self.log_updates = log_updates
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self.sparsifier: Sparsifier | None = None
        self._pending_epoch_end: int | None = None  # the step of an epoch-end update not run yet
        self._metrics: dict[str, float] = {}  # the last update's metrics, for the next log row

    # ------------------------------------------------------------------ read-only state
    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name (as in ``model.named_parameters()``) → ``torch.bool`` mask, True = active."""
        return self._require_sparsifier().masks

    def attach(self, trainer: Trainer) -> Trainer:
        """Put this callback first in ``trainer``'s callbacks (before the reporting integrations of
        ``args.report_to``, which ``Trainer`` places ahead of the callbacks it is given), so that TensorBoard,
        W&B, ... record its metrics too; returns ``trainer``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return trainer

    def state_dict(self) -> dict[str, Any]:
        """The Sparsifier's state (plain tensors and numbers) and the pending epoch-end update."""
        return {**self._require_sparsifier().state_dict(), "pending_epoch_end": self._pending_epoch_end}

    # ------------------------------------------------------------------ the Trainer's events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not isinstance(model, nn.Module) or optimizer is None:
            raise RuntimeError("SparseTrainerCallback needs the Trainer's model and optimizer at `on_train_begin`")
        loaded = self._load(args, state) if state.global_step > 0 else None
        total = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self.sparsifier = Sparsifier(
            model, _torch_optimizer(optimizer), options=self.options, state=loaded, total_steps=total
        )
        self._pending_epoch_end = None if loaded is None else loaded.get("pending_epoch_end")
        self._metrics = {}
        if self.sparsifier.needs_snip:
            self._snip(model, kwargs.get("train_dataloader"), args)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._pending_epoch_end is None:
            return
        step, self._pending_epoch_end = self._pending_epoch_end, None
        self._record(self._require_sparsifier().epoch_end(step))

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._require_sparsifier().before_optimizer_step()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # called after `optimizer.step()`, before the scheduler, `zero_grad()` and `global_step += 1`
        self._record(self._require_sparsifier().step(state.global_step + 1))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._metrics and self.log_updates:
            control.should_log = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._pending_epoch_end = state.global_step  # run at the next epoch's first step, if there is one

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._metrics or logs is None:
            return
        logs.update(self._metrics)  # the callbacks after this one (reporting integrations, printing) see them
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:  # the row Trainer.log just recorded
            history[-1].update(self._metrics)
        self._metrics = {}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        saved = self.state_dict()  # on every process (FSDP2 gathers the masks)
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(saved, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sparsifier is not None:
            self.sparsifier.finish()
        self._pending_epoch_end = None  # the run is over: no update after its last step

    # ------------------------------------------------------------------ helpers
    def _require_sparsifier(self) -> Sparsifier:
        if self.sparsifier is None:
            raise RuntimeError("SparseTrainerCallback has no masks yet: they are made when `Trainer.train()` begins")
        return self.sparsifier

    def _record(self, update: UpdateReport | None) -> None:
        if update is None:
            return
        sparsifier = self._require_sparsifier()
        result = update.result
        self._metrics = {
            "sparse/density": sum(result.active) / sum(sparsifier.sizes),
            "sparse/prune_rate": float(update.rate),
            "sparse/pruned": float(sum(result.pruned)),
            "sparse/grown": float(sum(result.grown)),
            "sparse/num_updates": float(sparsifier.num_updates),
        }

    def _load(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the Trainer resumes at step {state.global_step}, but {path} (the sparse masks and schedule saved"
                " with that checkpoint) does not exist: pass `resume_from=` the checkpoint folder the Trainer"
                " resumes from, or resume from a checkpoint saved with SparseTrainerCallback"
            )
        return torch.load(path, map_location="cpu", weights_only=True)

    def _snip(self, model: nn.Module, loader: Any, args: TrainingArguments) -> None:
        """SNIP's masks from the loss of the first training batch (``model(**batch).loss``)."""
        if loader is None:
            raise RuntimeError("algorithm='snip' needs the Trainer's training dataloader at `on_train_begin`")
        batch = next(iter(loader))
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise ValueError("algorithm='snip' scores the loss of one batch, but the model returned no `loss`:"
                             " give the batches labels")  # fmt: skip
        self._require_sparsifier().snip(loss)
