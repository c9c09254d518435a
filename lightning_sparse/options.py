"""When masks are updated and with which pruning rate, and the checked options of a sparse run. No Lightning.

:class:`SparseOptions` is the one place where the arguments shared by :class:`~lightning_sparse.Sparsifier` and
:class:`~lightning_sparse.SparseTrainingCallback` are checked and the algorithm's defaults filled in;
:class:`UpdateSchedule` decides, from the optimizer step alone, whether an update is due and at which rate, so
a resumed run cannot drift.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.patterns import Pattern, parse_pattern
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES
from lightning_sparse.kernels import check_mask_kernel
from lightning_sparse.methods import SparseAlgorithm, check_ablation, get_algorithm, window_progress
from lightning_sparse.methods.dst import DST

REAL = "a real number (int, float, numpy scalar or one-element tensor; not a bool)"
INTEGER = "an integer (int, numpy integer or one-element integer tensor; not a bool or float)"


def _scalar(value: Any) -> Any:
    """A one-element tensor or numpy scalar/array as a Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    if not isinstance(value, (bool, int, float, str)) and hasattr(value, "item") and getattr(value, "size", 0) == 1:
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def as_real(value: Any) -> float | None:
    """``value`` as a Python float if it is a real number (Python, numpy, one-element tensor), else ``None``.
    Bools are not numbers here."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_integer(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (Python, numpy, one-element integer tensor), else ``None``."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _refuse(name: str, allowed: str, value: Any, kind: str) -> ValueError:
    return ValueError(f"`{name}` must be {allowed}, got {value!r} ({type(value).__name__}); {kind}")


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


@dataclass(frozen=True)
class SparseOptions:
    """The checked options of a sparse run (see :class:`~lightning_sparse.SparseTrainingCallback` for their
    meaning); build it with :meth:`resolve`, which fills in the algorithm's defaults."""

    density: float | dict[str, float] | None
    algorithm: SparseAlgorithm | DST
    algorithm_name: str
    init: str
    dense_layers: tuple[str, ...]
    schedule: UpdateSchedule
    seed: int | None
    mask_kernel: str
    mask_frozen: bool = False
    layer_types: tuple[type | str, ...] | None = None
    include: tuple[str, ...] = ()
    mask_embeddings: bool = False
    pattern: str = "unstructured"
    neuron_ablation: float | None = None
    keep_neurons: tuple[str, ...] | None = None

    @property
    def is_dst(self) -> bool:
        return isinstance(self.algorithm, DST)

    @property
    def parsed_pattern(self) -> Pattern:
        """:attr:`pattern` as a :class:`~lightning_sparse.functional.patterns.Pattern`."""
        return parse_pattern(self.pattern)

    @property
    def groups(self) -> list[tuple[str, float]]:
        """``(name glob, density)`` per density group, first match wins: ``[("*", density)]`` for one density,
        ``[]`` for DST."""
        if self.density is None:
            return []
        if isinstance(self.density, dict):
            return list(self.density.items())
        return [("*", self.density)]

    @classmethod
    def resolve(
        cls,
        density: float | Mapping[str, float] | None = None,
        algorithm: str | SparseAlgorithm | DST = "sparse_momentum",
        prune_rate: float | None = None,
        prune_rate_schedule: str | Callable[[float], float] | None = None,
        init: str | None = None,
        dense_layers: Sequence[str] | str = (),
        update_interval: int | Literal["epoch"] | None = None,
        stop_at: float | None = None,
        seed: int | None = None,
        mask_kernel: str = "auto",
        mask_frozen: bool = False,
        layer_types: Sequence[type | str] | None = None,
        include: Sequence[str] | str = (),
        mask_embeddings: bool = False,
        pattern: str = "unstructured",
        neuron_ablation: float | None = None,
        keep_neurons: Sequence[str] | str | None = None,
    ) -> SparseOptions:
        """Check every argument (the error names the allowed values) and fill in the algorithm's defaults."""
        resolved = get_algorithm(algorithm)
        is_dst = isinstance(resolved, DST)
        parsed = parse_pattern(pattern)
        if parsed.structured:
            density = _pattern_density(parsed, density, resolved, algorithm)
        if is_dst:
            given = {"density": density, "prune_rate": prune_rate, "prune_rate_schedule": prune_rate_schedule,
                     "update_interval": update_interval, "stop_at": stop_at, "init": init}  # fmt: skip
            ignored = [f"`{name}`" for name, value in given.items() if value is not None]
            if ignored:
                raise ValueError(
                    f"algorithm {algorithm!r} learns its density and masks at every step; it does not use"
                    f" {', '.join(ignored)}: leave {'it' if len(ignored) == 1 else 'them'} unset (DST's options are"
                    " `DST(alpha=..., collapse_density=...)`)"
                )
        if density is None and not is_dst:
            raise ValueError(f"`density` is required for algorithm {algorithm!r} (only 'dst' learns its density)")
        if isinstance(density, Mapping):
            density = _density_groups(density)
        elif density is not None:
            value = as_real(density)
            if value is None or not 0.0 < value <= 1.0:
                raise _refuse("density", "a number in (0, 1]", density, f"{REAL}; or a mapping {{name glob: density}}")
            density = value
        defaults = resolved if isinstance(resolved, SparseAlgorithm) else SparseAlgorithm()
        rate = defaults.prune_rate if prune_rate is None else as_real(prune_rate)
        if rate is None or not 0.0 <= rate <= 1.0:
            raise _refuse("prune_rate", "in [0, 1]", prune_rate, f"{REAL}, or None for the algorithm's default")
        prune_rate = rate
        schedule = defaults.schedule if prune_rate_schedule is None else prune_rate_schedule
        if not callable(schedule) and not (isinstance(schedule, str) and schedule in PRUNE_RATE_SCHEDULES):
            raise ValueError(
                f"`prune_rate_schedule` can be {', '.join(PRUNE_RATE_SCHEDULES)} or a function of progress,"
                f" got {schedule!r}"
            )
        if callable(schedule):  # fail now, not at the first update
            for progress in (0.0, 0.5, 1.0):
                checked_rate(schedule(progress), progress)
        if init is not None and not (isinstance(init, str) and init in INIT_METHODS):
            raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {init!r}")
        if update_interval is None:
            interval = defaults.update_interval
        elif isinstance(update_interval, str) and update_interval == "epoch":
            interval = None
        else:
            interval = as_integer(update_interval)
            if interval is None or interval < 1:
                raise _refuse("update_interval", "'epoch', an int >= 1, or None", update_interval, INTEGER)
        value = defaults.stop_at if stop_at is None else as_real(stop_at)
        if value is None or not 0.0 < value <= 1.0:
            raise _refuse("stop_at", "in (0, 1]", stop_at, f"{REAL}, or None for the algorithm's default")
        stop_at = value
        if seed is not None:
            value = as_integer(seed)
            if value is None or not 0 <= value < 2**63:
                raise _refuse("seed", "an int in [0, 2**63) or None", seed, INTEGER)
            seed = value
        check_mask_kernel(mask_kernel)
        for flag, value in (("mask_embeddings", mask_embeddings),):
            if not isinstance(value, bool):
                raise ValueError(f"`{flag}` must be True or False, got {value!r} ({type(value).__name__})")
        if isinstance(include, str):
            include = (include,)
        if not isinstance(include, Iterable):
            raise ValueError(f"`include` must be parameter-name globs (str), got {include!r}")
        include = tuple(include)
        if not all(isinstance(i, str) for i in include):
            raise ValueError(f"`include` must be parameter-name globs (str), got {include!r}")
        if layer_types is not None:
            if isinstance(layer_types, (str, type)):
                layer_types = (layer_types,)
            layer_types = tuple(layer_types)
            if not layer_types or not all(isinstance(t, (str, type)) for t in layer_types):
                raise ValueError(f"`layer_types` must be module types or class names, got {layer_types!r}")
        if not isinstance(mask_frozen, bool):
            raise ValueError(f"`mask_frozen` must be True or False, got {mask_frozen!r} ({type(mask_frozen).__name__})")
        if isinstance(dense_layers, str):
            dense_layers = [dense_layers]
        if isinstance(dense_layers, Iterable):
            dense_layers = tuple(dense_layers)
        if not isinstance(dense_layers, tuple) or not all(isinstance(d, str) for d in dense_layers):
            raise ValueError(
                "`dense_layers` must be a name or glob pattern (str) or a sequence of them,"
                f" got {dense_layers!r} ({type(dense_layers).__name__})"
            )
        gamma = as_real(neuron_ablation) if neuron_ablation is not None else None  # numpy, one-element tensors too
        neuron_ablation = check_ablation(resolved, parsed, neuron_ablation if gamma is None else gamma)
        if isinstance(keep_neurons, str):
            keep_neurons = (keep_neurons,)
        if keep_neurons is not None:
            if not isinstance(keep_neurons, Iterable) or not all(isinstance(k, str) for k in keep_neurons):
                raise ValueError(
                    "`keep_neurons` must be module or parameter names or globs (str), or None for the last masked"
                    f" layer, got {keep_neurons!r}"
                )
            keep_neurons = tuple(keep_neurons)
            if neuron_ablation is None:
                raise ValueError("`keep_neurons` names the layers that neuron ablation leaves whole: give `neuron_ablation` too")
        return cls(
            neuron_ablation=neuron_ablation,
            keep_neurons=keep_neurons,
            pattern=str(parsed),
            density=density,
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
            mask_frozen=mask_frozen,
            layer_types=layer_types,
            include=include,
            mask_embeddings=mask_embeddings,
        )


def _pattern_density(pattern: Pattern, density: Any, resolved: SparseAlgorithm | DST, algorithm: Any) -> Any:
    """Check that ``pattern`` fits the method and the density; returns the density to use (``N/M`` for an N:M
    pattern when ``density`` is unset, or its groups with ``N/M`` exactly)."""
    if isinstance(resolved, DST):
        raise ValueError(
            f"algorithm {algorithm!r} learns per-neuron thresholds, so its masks cannot keep a pattern: `pattern`"
            f" must be 'unstructured' for DST, got {str(pattern)!r}"
        )
    if resolved.dynamic and resolved.grow == "none" and resolved.count != "gmp":
        raise ValueError(
            f"pattern={str(pattern)!r} needs a method that regrows what it prunes (or GMP's count='gmp'): the"
            " growth rule refills every unit of the pattern; this algorithm has grow='none'"
        )
    if pattern.kind != "nm":
        return density
    nm = pattern.n / pattern.m
    fits = f"pattern={str(pattern)!r} fixes every masked layer's density at {pattern.n}/{pattern.m} = {nm:g}"
    if density is None:
        return nm
    if isinstance(density, Mapping):
        groups = _density_groups(density)
        wrong = {g: d for g, d in groups.items() if d < 1.0 and not math.isclose(d, nm, rel_tol=1e-6)}
        if wrong:
            raise ValueError(
                f"{fits}: every `density` group must be {nm:g} (or 1.0 to keep it dense), got {wrong}"
            )
        return {g: (d if d >= 1.0 else nm) for g, d in groups.items()}
    value = as_real(density)
    if value is None or not math.isclose(value, nm, rel_tol=1e-6):
        raise ValueError(f"{fits}: give density={nm:g} or leave `density` unset, got {density!r}")
    return nm


def _density_groups(density: Mapping[Any, Any]) -> dict[str, float]:
    """A checked ``{name glob: density}`` mapping (first match wins; density 1.0 keeps a group dense)."""
    if not density:
        raise ValueError("`density` mapping is empty: give {name glob: density}, e.g. {'*.attn.*': 0.5, '*': 0.1}")
    groups: dict[str, float] = {}
    for pattern, value in density.items():
        real = as_real(value)
        if not isinstance(pattern, str):
            raise ValueError(f"`density` keys must be name globs (str), got {pattern!r} ({type(pattern).__name__})")
        if real is None or not 0.0 < real <= 1.0:
            raise _refuse(f"density[{pattern!r}]", "a number in (0, 1]", value, REAL)
        groups[pattern] = real
    return groups


def check_total_steps(schedule: UpdateSchedule, total_steps: float | None, to_target: bool = False) -> float:
    """The number of optimizer steps of training as a float (``inf`` when unknown); raises if the schedule needs
    it (a decaying rate, an update window that ends before training does, GMP's target) and it is unknown."""
    total = math.inf if total_steps is None else as_real(total_steps)
    if total is None or math.isnan(total):
        raise _refuse("total_steps", "a number of optimizer steps or None (unknown)", total_steps, REAL)
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
