"""When masks are updated and with which pruning rate, and the checked options of a sparse run. No Lightning.

:class:`SparseOptions` is the one place where the arguments shared by :class:`~lightning_sparse.Sparsifier` and
:class:`~lightning_sparse.SparseTrainingCallback` are checked and the algorithm's defaults filled in;
:class:`UpdateSchedule` decides, from the optimizer step alone, whether an update is due and at which rate, so
a resumed run cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_sparse.algorithms import SparseAlgorithm, get_algorithm, window_progress
from lightning_sparse.dst import DST
from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES
from lightning_sparse.kernels import check_mask_kernel


@dataclass(frozen=True)
class UpdateSchedule:
    """When a dynamic method updates its masks, and with which pruning rate.

    Attributes:
        prune_rate: the initial pruning rate ``p``.
        rate_schedule: ``"cosine"``, ``"linear"``, ``"constant"`` or a function of progress in [0, 1].
        interval: update every that many optimizer steps; ``None`` at the end of every epoch.
        stop_at: end of the update window as a fraction of training; the first update at or past it is the last.
        dynamic: ``False`` for methods whose masks never change after the start.
    """

    prune_rate: float
    rate_schedule: str | Callable[[float], float]
    interval: int | None
    stop_at: float
    dynamic: bool = True

    @property
    def needs_length(self) -> bool:
        """Whether the rate depends on the length of training (a decaying built-in schedule)."""
        return self.dynamic and not callable(self.rate_schedule) and self.rate_schedule != "constant"

    def rate_at(self, progress: float) -> float:
        """The pruning rate at ``progress`` in [0, 1] of the update window."""
        if callable(self.rate_schedule):
            rate = float(self.rate_schedule(progress))
        else:
            rate = PRUNE_RATE_SCHEDULES[self.rate_schedule](progress, self.prune_rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"`prune_rate_schedule` returned {rate} at progress {progress}; rates must be in [0, 1]")
        return rate

    def progress(self, step: int, total_steps: float) -> float:
        """Fraction of the update window done at optimizer step ``step``."""
        return window_progress(step, total_steps, self.stop_at)

    def due(self, step: int, last_update_step: int, total_steps: float, epoch_end: bool) -> bool:
        """Whether an update runs now: at an epoch end (``interval is None``) or every ``interval`` steps,
        never at or after the last step of training, and not after the first update at or past the window's
        end. With an unknown length (``total_steps`` infinite) updates run forever."""
        if not self.dynamic or step >= total_steps:
            return False
        if epoch_end != (self.interval is None):
            return False
        if self.interval is not None and (step <= 0 or step % self.interval):
            return False
        return window_progress(last_update_step, total_steps, self.stop_at) < 1.0


@dataclass(frozen=True)
class SparseOptions:
    """The checked options of a sparse run (see :class:`~lightning_sparse.SparseTrainingCallback` for their
    meaning); build it with :meth:`resolve`, which fills in the algorithm's defaults."""

    density: float | None
    algorithm: SparseAlgorithm | DST
    algorithm_name: str
    init: str
    dense_layers: tuple[str, ...]
    schedule: UpdateSchedule
    seed: int | None
    mask_kernel: str

    @property
    def is_dst(self) -> bool:
        return isinstance(self.algorithm, DST)

    @classmethod
    def resolve(
        cls,
        density: float | None = None,
        algorithm: str | SparseAlgorithm | DST = "sparse_momentum",
        prune_rate: float | None = None,
        prune_rate_schedule: str | Callable[[float], float] | None = None,
        init: str | None = None,
        dense_layers: Sequence[str] | str = (),
        update_interval: int | Literal["epoch"] | None = None,
        stop_at: float | None = None,
        seed: int | None = None,
        mask_kernel: str = "auto",
    ) -> SparseOptions:
        """Check every argument (the error names the allowed values) and fill in the algorithm's defaults."""
        resolved = get_algorithm(algorithm)
        is_dst = isinstance(resolved, DST)
        if density is None and not is_dst:
            raise ValueError(f"`density` is required for algorithm {algorithm!r} (only 'dst' learns its density)")
        if density is not None and (
            isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0
        ):
            raise ValueError(f"`density` must be a number in (0, 1], got {density!r}")
        defaults = resolved if isinstance(resolved, SparseAlgorithm) else SparseAlgorithm()
        prune_rate = defaults.prune_rate if prune_rate is None else prune_rate
        if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not 0.0 <= prune_rate <= 1.0:
            raise ValueError(f"`prune_rate` must be in [0, 1], got {prune_rate!r}")
        schedule = defaults.schedule if prune_rate_schedule is None else prune_rate_schedule
        if not callable(schedule) and schedule not in PRUNE_RATE_SCHEDULES:
            raise ValueError(
                f"`prune_rate_schedule` can be {', '.join(PRUNE_RATE_SCHEDULES)} or a function of progress,"
                f" got {schedule!r}"
            )
        if init is not None and init not in INIT_METHODS:
            raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {init!r}")
        if update_interval is None:
            interval = defaults.update_interval
        elif update_interval == "epoch":
            interval = None
        elif isinstance(update_interval, bool) or not isinstance(update_interval, int) or update_interval < 1:
            raise ValueError(f"`update_interval` must be 'epoch', an int >= 1, or None, got {update_interval!r}")
        else:
            interval = update_interval
        stop_at = defaults.stop_at if stop_at is None else stop_at
        if isinstance(stop_at, bool) or not isinstance(stop_at, (int, float)) or not 0.0 < stop_at <= 1.0:
            raise ValueError(f"`stop_at` must be in (0, 1], got {stop_at!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"`seed` must be an int in [0, 2**63) or None, got {seed!r}")
        check_mask_kernel(mask_kernel)
        if isinstance(dense_layers, str):
            dense_layers = [dense_layers]
        if not all(isinstance(d, str) for d in dense_layers):
            raise ValueError(f"`dense_layers` must be a sequence of names or glob patterns, got {dense_layers!r}")
        return cls(
            density=None if density is None else float(density),
            algorithm=resolved,
            algorithm_name=algorithm if isinstance(algorithm, str) else type(algorithm).__name__,
            init=init or defaults.init,
            dense_layers=tuple(dense_layers),
            schedule=UpdateSchedule(
                prune_rate=float(prune_rate),
                rate_schedule=schedule,
                interval=interval,
                stop_at=float(stop_at),
                dynamic=isinstance(resolved, SparseAlgorithm) and resolved.dynamic,
            ),
            seed=seed,
            mask_kernel=mask_kernel,
        )


def check_total_steps(schedule: UpdateSchedule, total_steps: float | None) -> float:
    """The number of optimizer steps of training as a float (``inf`` when unknown); raises if a decaying
    schedule needs it and it is unknown."""
    total = math.inf if total_steps is None else float(total_steps)
    if schedule.needs_length and not 0 < total < math.inf:
        raise ValueError(
            f"the {schedule.rate_schedule!r} prune-rate schedule needs the length of training (got {total_steps}):"
            " give the number of optimizer steps (`total_steps`; in Lightning `max_epochs` or `max_steps` with a"
            " dataloader that has a length), or use prune_rate_schedule='constant'"
        )
    return total
