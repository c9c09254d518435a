"""The Lightning side of :class:`~lightning_sparse.SparseTrainingCallback`: what it needs from the trainer and
the other callbacks (the length of training, weight averaging, SNIP's first batch, several sparse callbacks,
checkpoint keys).
The method itself is in :mod:`lightning_sparse.core.sparsifier`, which has no Lightning import."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging, WeightAveraging

from lightning_sparse.core.selection import select_layers
from lightning_sparse.core.sparsifier import Sparsifier
from lightning_sparse.methods.dst_sparsifier import copy_dst_thresholds, dst_modules
from lightning_sparse.options import SparseOptions


def snip_on_first_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, sparsifier: Sparsifier) -> None:
    """SNIP's masks from the loss of the first training batch; the module's buffers (BatchNorm statistics) are
    restored afterwards and its ``self.log`` calls dropped."""
    batch = trainer.strategy.batch_to_device(next(iter(trainer.train_dataloader)))
    buffers = {name: b.clone() for name, b in pl_module.named_buffers()}
    with logging_disabled(pl_module):
        output = pl_module.training_step(batch, 0)
    sparsifier.snip(output["loss"] if isinstance(output, Mapping) else output)
    with torch.no_grad():
        for name, b in pl_module.named_buffers():
            b.copy_(buffers[name])


@contextmanager
def logging_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run a ``training_step`` outside Lightning's loop: its ``self.log`` calls are dropped."""
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log
        del pl_module.log_dict


def total_steps(trainer: pl.Trainer) -> float:
    """Optimizer steps of the whole run (``inf`` when unknown). With a ``GradientAccumulationScheduler``, the sum
    over epochs of ``ceil(batches / accumulation)`` (Lightning's own estimate takes the first epoch's factor)."""
    total = float(trainer.estimated_stepping_batches)
    if not 0 < total < math.inf:
        return math.inf
    scheduler = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
    batches = trainer.num_training_batches
    if scheduler is not None and trainer.max_epochs not in (None, -1) and 0 < batches < math.inf:
        steps = sum(math.ceil(batches / scheduler.get_accumulate_grad_batches(e)) for e in range(trainer.max_epochs))
        total = float(min(steps, trainer.max_steps) if trainer.max_steps > 0 else steps)
    return total


def mask_weight_averages(trainer: pl.Trainer, sparsifier: Sparsifier) -> None:
    """Keep the averaged models of Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) and
    ``StochasticWeightAveraging`` within the current masks: each averaging step is followed by masking the
    average, whatever the order of the callbacks. (An average of weights whose masks changed is otherwise
    non-zero wherever any of those masks was: validation, checkpoints and the final model would be denser
    than asked.)"""
    if sparsifier.learns_every_step:  # DST's parametrization masks the averaged raw weights itself
        return

    def mask(module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, m in sparsifier.masks.items():
                for key in (name, f"module.{name}"):
                    if key in params:
                        params[key].mul_(m.to(params[key].device))

    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and callback._average_model is not None:
            after(callback._average_model, lambda average, *args: mask(average.module), id(sparsifier.options))
            mask(callback._average_model.module)
        elif isinstance(callback, StochasticWeightAveraging):
            after(callback, lambda callback, average, *args: mask(average), id(sparsifier.options))


def share_dst_thresholds(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Give the averaged models of Lightning's ``WeightAveraging`` (``EMAWeightAveraging``) and
    ``StochasticWeightAveraging`` the DST thresholds that ``pl_module`` got after they copied it (a weight
    averaging callback listed before the sparse one copies the model in its own ``setup``): averaging pairs the
    two models' parameters in order, so both must list the same ones."""
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and callback._average_model is not None:
            copy_dst_thresholds(callback._average_model.module, pl_module)
        elif isinstance(callback, StochasticWeightAveraging) and callback._average_model is not None:
            copy_dst_thresholds(callback._average_model, pl_module)


def after_configure_model(pl_module: pl.LightningModule, then: Callable[[], None]) -> Callable[[], None]:
    """Make the next ``pl_module.configure_model()`` call ``then()`` after itself (once), so that what is done to
    the layers built there happens before the strategy wraps the model (DDP) and before
    ``configure_optimizers``. Returns the function that takes the patch off (also done by the call itself)."""
    original = pl_module.configure_model

    def undo() -> None:
        if vars(pl_module).get("configure_model") is configure_model:
            del pl_module.configure_model

    def configure_model() -> None:
        original()
        undo()
        then()

    pl_module.configure_model = configure_model  # type: ignore[method-assign]
    return undo


def after(owner: Any, then: Callable[..., None], key: Any) -> None:
    """Make ``owner.update_parameters(*args)`` call ``then(owner, *args)`` after itself. One ``then`` per
    ``key`` (each sparse callback's options): a later call with the same key replaces it (the callback fitted
    again), other keys add theirs (several sparse callbacks)."""
    state = vars(owner)
    if "_lightning_sparse_update" not in state:
        original = owner.update_parameters
        thens: dict[Any, Callable[..., None]] = {}

        def update_parameters(*args: Any) -> None:
            original(*args)
            for hook in list(thens.values()):
                hook(owner, *args)

        state["_lightning_sparse_update"] = thens
        state["update_parameters"] = update_parameters
    state["_lightning_sparse_update"][key] = then


def refuse_overlap(options: SparseOptions, others: Sequence[SparseOptions], pl_module: pl.LightningModule) -> None:
    """Several sparse callbacks must mask disjoint sets of weights; checked before any of them binds."""
    if not others:
        return
    mine = set(select_layers(pl_module, options, dst_modules(pl_module)).masked)
    for other in others:
        shared = mine & set(select_layers(pl_module, other, dst_modules(pl_module)).masked)
        if shared:
            raise ValueError(
                f"two SparseTrainingCallbacks mask the same weights {sorted(shared)}: give each callback its own"
                " layers (`density` groups without a '*' entry, `dense_layers`)"
            )


def claim_checkpoint_state(states: dict[str, Any], key: str, sparse_callbacks: int) -> None:
    """Make ``states[key]`` the sparse state of a checkpoint written under another key (0.1's
    ``"SparseTrainingCallback"``, or other options: refused with both values when the state is loaded) when it is
    the only sparse state and ``sparse_callbacks``, the trainer's count, is 1; refuse several states none of which
    is ``key``'s."""
    if key in states:
        return
    ours = [k for k in states if isinstance(k, str) and k.startswith("SparseTrainingCallback")]
    if len(ours) == 1 and sparse_callbacks == 1:
        states[key] = states[ours[0]]
    elif ours:
        raise ValueError(
            f"the checkpoint holds the sparse states {ours}, none of them for this callback ({key}):"
            " resume with the callbacks' original options"
        )
