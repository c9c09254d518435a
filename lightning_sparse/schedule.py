"""When a dynamic method updates its masks, and with which pruning rate: decided from the optimizer step alone
(closed-form, like timm's schedulers), so a resumed run cannot drift. No Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_sparse.checks import REAL, as_real, refuse
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES


def window_progress(step: int, total: float, stop_at: float) -> float:
    """Progress through the update window: ``step / (stop_at * total)``, clipped to [0, 1]."""
    end = stop_at * total
    return min(max(step / end, 0.0), 1.0) if end > 0 and math.isfinite(end) else 0.0


def checked_rate(value: Any, progress: float) -> float:
    """A pruning rate given by a schedule at ``progress``, as a float; raises unless a real number in [0, 1]."""
    rate = as_real(value)
    if rate is None or not 0.0 <= rate <= 1.0:
        raise ValueError(f"`prune_rate_schedule` returned {value!r} at progress {progress}; rates must be in [0, 1]")
    return rate


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
            return checked_rate(self.rate_schedule(progress), progress)
        return checked_rate(PRUNE_RATE_SCHEDULES[self.rate_schedule](progress, self.prune_rate), progress)

    def progress(self, step: int, total_steps: float) -> float:
        """Fraction of the update window done at optimizer step ``step``."""
        return window_progress(step, total_steps, self.stop_at)

    def due(
        self, step: int, last_update_step: int, total_steps: float, epoch_end: bool, to_target: bool = False
    ) -> bool:
        """Whether an update runs now: at an epoch end (``interval is None``) or every ``interval`` steps,
        never at or after the last step of training, and not after the first update at or past the window's
        end. With an unknown length (``total_steps`` infinite) updates run forever.

        ``to_target`` (GMP, which prunes towards a final density): the update window's last step
        (``ceil(stop_at * total_steps)``) is always an update, also when it is the last step of training, so the
        target is reached exactly whatever the interval."""
        if not self.dynamic:
            return False
        if to_target and math.isfinite(total_steps) and self.window_end(total_steps) > last_update_step:
            if step == self.window_end(total_steps) or (epoch_end and step >= total_steps):
                return True
        if step >= total_steps or epoch_end != (self.interval is None):
            return False
        if self.interval is not None and (step <= 0 or step % self.interval):
            return False
        return window_progress(last_update_step, total_steps, self.stop_at) < 1.0

    def window_end(self, total_steps: float) -> int:
        """The optimizer step at which the update window ends (``ceil(stop_at * total_steps)``)."""
        return math.ceil(self.stop_at * total_steps - 1e-9)

    def count_updates(self, total_steps: float) -> int | None:
        """How many step-level updates a run of ``total_steps`` optimizer steps gets (``None``: epoch-level or
        unknown length)."""
        if self.interval is None or not math.isfinite(total_steps) or not self.dynamic:
            return None
        count, last = 0, -1
        for step in range(self.interval, int(total_steps), self.interval):
            if window_progress(last, total_steps, self.stop_at) >= 1.0:
                break
            count, last = count + 1, step
        return count


def check_total_steps(schedule: UpdateSchedule, total_steps: float | None, to_target: bool = False) -> float:
    """The number of optimizer steps of training as a float (``inf`` when unknown); raises if the schedule needs
    it (a decaying rate, an update window that ends before training does, GMP's target) and it is unknown."""
    total = math.inf if total_steps is None else as_real(total_steps)
    if total is None or math.isnan(total):
        raise refuse("total_steps", "a number of optimizer steps or None (unknown)", total_steps, REAL)
    if 0 < total < math.inf:
        return total
    needs = []
    if schedule.needs_length:
        needs.append(f"the {schedule.rate_schedule!r} prune-rate schedule")
    if schedule.dynamic and schedule.stop_at < 1.0:
        needs.append(f"the update window (stop_at={schedule.stop_at})")
    if to_target:
        needs.append("GMP's pruning schedule")
    if needs:
        raise ValueError(
            f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} the length of training, which is unknown (got {total_steps}): give the"
            " number of optimizer steps (`total_steps`; in Lightning: `max_steps`, or `max_epochs` with a train"
            " dataloader that has a `__len__`), or use prune_rate_schedule='constant' and stop_at=1.0"
        )
    return total
