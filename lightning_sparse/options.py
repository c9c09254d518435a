"""The options of a sparse run: :class:`SparseOptions`, the one list of them, each checked when it is made (the
error names the allowed values) and the algorithm's defaults filled in. No Lightning.

:class:`~lightning_sparse.Sparsifier` and :class:`~lightning_sparse.SparseTrainingCallback` take the same keyword
arguments and pass them here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_sparse.checks import INTEGER, REAL, as_integer, as_real, refuse, refuse_sparsity
from lightning_sparse.functional.init import INIT_METHODS
from lightning_sparse.functional.patterns import Pattern, parse_pattern
from lightning_sparse.functional.schedules import PRUNE_RATE_SCHEDULES
from lightning_sparse.kernels import check_mask_kernel
from lightning_sparse.methods import SparseAlgorithm, check_ablation, get_algorithm
from lightning_sparse.methods.dst import DST
from lightning_sparse.methods.registry import did_you_mean
from lightning_sparse.schedule import UpdateSchedule, checked_rate


@dataclass(frozen=True)
class SparseOptions:
    """The options of a sparse run, checked when made; ``None`` takes the algorithm's default (filled in here).

    Attributes:
        density: fraction of the masked weights that are active, in (0, 1]. Required, except for
            ``algorithm="dst"``, whose density is learned (DST refuses ``density``, ``prune_rate``,
            ``prune_rate_schedule``, ``init``, ``update_interval`` and ``stop_at``). Numbers (here and for
            ``prune_rate``, ``stop_at``) may be Python, numpy or one-element tensors; they are stored as ``float``.
            A mapping ``{name glob: density}`` gives density groups, first match wins (``{"*.attn.*": 0.5,
            "*": 0.1}``): each group's total is kept exactly, weights move only within a group, ERK/ER distribute
            within each group; layers no glob matches (no ``"*"``), and groups of density 1.0, stay dense.
        algorithm: ``"sparse_momentum"`` (Dettmers & Zettlemoyer 2019), ``"rigl"`` (Evci et al. 2020),
            ``"set"``, ``"dsr"``, ``"static"``, ``"snip"``, ``"gmp"``, ``"dst"`` (Liu et al. 2020), a
            :class:`~lightning_sparse.SparseAlgorithm` or a :class:`~lightning_sparse.DST`. Held resolved (the
            method object); :attr:`algorithm_name` keeps the name given.
        prune_rate: initial pruning rate ``p`` (RigL's drop fraction ``α``, SET's ``ζ``, DSR's target
            fraction pruned), in [0, 1]; ``None``: the algorithm's default (0.5 sparse momentum, 0.3 RigL and
            SET, 0.1 DSR).
        prune_rate_schedule: ``"cosine"`` (to zero at the end of the update window), ``"linear"``, ``"constant"``,
            or a function of progress in [0, 1] returning the rate (checked at 0, 0.5 and 1 when the options are
            made). Progress is ``step / (stop_at * total_steps)``.
        init: ``"uniform"`` (every layer at ``density``), ``"erk"`` or ``"er"``.
        dense_layers: module or parameter names, or glob patterns (``"*.downsample.*"``), of layers kept dense.
        update_interval: ``"epoch"`` (end of every epoch but the last) or an int (every that many optimizer steps;
            numpy or one-element integer tensors too, not floats).
        stop_at: end of the update window as a fraction of training, in (0, 1].
        seed: seed of the initial masks and of random growth, an int in [0, 2**63); ``None`` draws one on rank
            zero and shares it.
        mask_kernel: ``"auto"``, ``"cpp"`` or ``"torch"``: how masks are applied to CPU weights, and how mask
            updates select on the CPU (the same masks on every path; :mod:`lightning_sparse.kernels`).
        mask_frozen: also mask frozen weights (``requires_grad=False``); by default they stay dense. Their
            weights never train, and the optimizer may leave them out (``SGD(p for p in model.parameters() if
            p.requires_grad)``). Per method: the dynamic and static ones (``"sparse_momentum"``, ``"rigl"``,
            ``"set"``, ``"dsr"``, ``"static"``, a ``SparseAlgorithm`` of your own unless its ``count`` is ``"gmp"``) draw their masks at the start
            and keep them fixed (updates move only the trained layers' weights, so they read no gradient, momentum
            or optimizer state of a frozen layer); ``"gmp"`` prunes them by ``|W|`` on its schedule like the
            others (it reads no gradient), so the run ends at the asked density; ``"snip"`` scores them by their
            own ``|g * w|`` like the others (they require gradients from the ``Sparsifier``'s construction until
            the scoring batch is read, then are frozen again); ``"dst"`` learns their masks with trainable
            thresholds like the others' (the frozen weights stay as they were; the thresholds train).
        layer_types: module types (or class names) whose ``weight`` is masked, instead of Linear and
            Conv1d/2d/3d; ``MultiheadAttention``'s input projections and ``transformers``' ``Conv1D`` are always
            recognized (:mod:`lightning_sparse.core.layers`).
        include: parameter-name globs of further weights to mask (any parameter of 2 or more dimensions).
        mask_embeddings: mask embedding tables (and the output layers tied to them) too.
        pattern: ``"unstructured"`` (default), ``"N:M"`` (``"2:4"``, ``"1:4"``, ``"4:8"``; ``1 <= N < M``: every
            group of ``M`` consecutive weights along a layer's input dimension has exactly ``N`` active, so every
            layer is at ``N/M`` and ``density`` must be ``N/M`` or unset; layers whose input dimension is not a
            multiple of ``M`` are refused by name unless kept dense) or ``"fan_in"`` (every output neuron has the
            same number of active inputs, ``round(density_l * fan_in)`` per layer). Every method but DST keeps
            the pattern at every update.
        neuron_ablation: with ``pattern="fan_in"``, SRigL's neuron ablation (Lasby et al. 2024): at every update, an
            output neuron with fewer salient weights (kept by ``|W|`` or wanted by the growth score) than this
            fraction ``gamma_sal`` of its layer's fan-in ``k`` is emptied, and its weights go to the layer's other
            neurons (``k`` grows). A number in (0, 1] (the reference uses 0.3) or ``None`` (no ablation); needs a
            method that grows by a score (RigL, sparse momentum). Rows then hold ``k_l`` weights or none.
        keep_neurons: names or globs of the layers whose neurons are never ablated; ``None``: the last masked
            layer (the output layer, whose neurons are the classes).
        algorithm_name: the name of the algorithm as given (filled in; checkpoints record it).
        compute: ``"dense"`` (default: masked layers multiply their dense, masked weights) or ``"condensed"``: with
            ``pattern="fan_in"``, every masked ``nn.Linear`` and 1x1 ``nn.Conv2d`` computes its forward and backward
            from its ``k`` active weights per row (:mod:`lightning_sparse.compute.condensed`); the optimizer still
            gets dense gradients, zero off the masks (RigL's dense gradient at its update steps only). Refused for
            the methods that read dense gradients or momentum at every step (sparse momentum, DST), for custom
            rules, for RigL with epoch-level updates, and without ``pattern="fan_in"``.

    Derived: :attr:`schedule` (the :class:`~lightning_sparse.schedule.UpdateSchedule` of the run),
    :attr:`parsed_pattern`, :attr:`groups`, :attr:`is_dst`.
    """

    density: float | Mapping[str, float] | None = None
    algorithm: str | SparseAlgorithm | DST = "sparse_momentum"
    prune_rate: float | None = None
    prune_rate_schedule: str | Callable[[float], float] | None = None
    init: str | None = None
    dense_layers: Sequence[str] | str = ()
    update_interval: int | Literal["epoch"] | None = None
    stop_at: float | None = None
    seed: int | None = None
    mask_kernel: str = "auto"
    mask_frozen: bool = False
    layer_types: Sequence[type | str] | None = None
    include: Sequence[str] | str = ()
    mask_embeddings: bool = False
    pattern: str = "unstructured"
    neuron_ablation: float | None = None
    keep_neurons: Sequence[str] | str | None = None
    algorithm_name: str | None = None
    compute: str = "dense"

    def __new__(cls, *args: Any, **kwargs: Any) -> SparseOptions:
        refuse_sparsity(kwargs)  # before the dataclass's TypeError for an unknown keyword
        return super().__new__(cls)

    def __post_init__(self) -> None:
        given = self.algorithm
        resolved = get_algorithm(given)
        parsed = parse_pattern(self.pattern)
        density = self.density
        if parsed.structured:
            density = _pattern_density(parsed, density, resolved, given)
        if isinstance(resolved, DST):
            _refuse_for_dst(given, density=density, prune_rate=self.prune_rate,
                            prune_rate_schedule=self.prune_rate_schedule, update_interval=self.update_interval,
                            stop_at=self.stop_at, init=self.init)  # fmt: skip
        defaults = resolved if isinstance(resolved, SparseAlgorithm) else SparseAlgorithm()
        values = {
            "density": _checked_density(density, resolved, given),
            "algorithm": resolved,
            "algorithm_name": self.algorithm_name or (given.lower() if isinstance(given, str) else type(given).__name__),
            "prune_rate": _checked_unit(self.prune_rate, defaults.prune_rate, "prune_rate", "in [0, 1]", closed=True),
            "prune_rate_schedule": _checked_schedule(self.prune_rate_schedule, defaults.schedule),
            "init": _checked_init(self.init) or defaults.init,
            "dense_layers": _checked_dense_layers(self.dense_layers),
            "update_interval": _checked_interval(self.update_interval, defaults.update_interval),
            "stop_at": _checked_unit(self.stop_at, defaults.stop_at, "stop_at", "in (0, 1]", closed=False),
            "seed": _checked_seed(self.seed),
            "mask_kernel": check_mask_kernel(self.mask_kernel),
            "mask_frozen": _checked_flag("mask_frozen", self.mask_frozen),
            "layer_types": _checked_layer_types(self.layer_types),
            "include": _checked_include(self.include),
            "mask_embeddings": _checked_flag("mask_embeddings", self.mask_embeddings),
            "pattern": str(parsed),
            "neuron_ablation": _checked_ablation(resolved, parsed, self.neuron_ablation),
        }
        values["keep_neurons"] = _checked_keep_neurons(self.keep_neurons, values["neuron_ablation"])
        values["compute"] = _checked_compute(self.compute, resolved, parsed, values["update_interval"], given)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def resolve(cls, *args: Any, **kwargs: Any) -> SparseOptions:
        """The same as ``SparseOptions(...)`` (kept for lightning-sparse 0.2 code)."""
        return cls(*args, **kwargs)

    @property
    def schedule(self) -> UpdateSchedule:
        """When updates run and with which rate."""
        algorithm = self.algorithm
        return UpdateSchedule(
            prune_rate=float(self.prune_rate),
            rate_schedule=self.prune_rate_schedule,
            interval=None if self.update_interval == "epoch" else self.update_interval,
            stop_at=float(self.stop_at),
            dynamic=isinstance(algorithm, SparseAlgorithm) and algorithm.dynamic,
        )

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


def _refuse_for_dst(algorithm: Any, **given: Any) -> None:
    ignored = [f"`{name}`" for name, value in given.items() if value is not None]
    if ignored:
        raise ValueError(
            f"algorithm {algorithm!r} learns its density and masks at every step; it does not use"
            f" {', '.join(ignored)}: leave {'it' if len(ignored) == 1 else 'them'} unset (DST's options are"
            " `DST(alpha=..., collapse_density=...)`)"
        )


COMPUTES = ("dense", "condensed")


def _checked_compute(compute: Any, resolved: SparseAlgorithm | DST, pattern: Pattern, interval: Any, given: Any) -> str:
    """``compute`` if allowed for this method and pattern; ``"condensed"`` refused with the reason."""
    if not isinstance(compute, str) or compute not in COMPUTES:
        raise ValueError(f"`compute` can be {', '.join(map(repr, COMPUTES))}, got {compute!r}")
    if compute == "dense":
        return compute
    why = None
    if isinstance(resolved, DST):
        why = "DST trains its masks' thresholds with the dense gradient of every weight at every step"
    elif resolved.needs_momentum:
        why = ("it grows (or redistributes) by the optimizer's momentum of every weight, which needs the dense"
               " gradient at every step")  # fmt: skip
    elif not all(isinstance(r, str) for r in (resolved.prune, resolved.grow, resolved.redistribute, resolved.count)):
        why = "a custom prune, growth, redistribution or count rule may read dense gradients or momentum at any step"
    elif resolved.needs_gradient and interval == "epoch":
        why = ("its epoch-end updates grow by the dense gradient of an epoch's last step, which the Sparsifier"
               " cannot foresee: give an int `update_interval`")  # fmt: skip
    elif pattern.kind != "fan_in":
        why = f"it needs pattern='fan_in' (every output row with the same number of active inputs), got {str(pattern)!r}"
    if why is not None:
        raise ValueError(f"compute='condensed' is refused for algorithm {_name(given)}: {why}. Use compute='dense'")
    return compute


def _name(given: Any) -> str:
    return repr(given) if isinstance(given, str) else type(given).__name__


def _checked_density(density: Any, resolved: SparseAlgorithm | DST, algorithm: Any) -> float | dict[str, float] | None:
    if density is None and not isinstance(resolved, DST):
        raise ValueError(f"`density` is required for algorithm {algorithm!r} (only 'dst' learns its density)")
    if isinstance(density, Mapping):
        return _density_groups(density)
    if density is None:
        return None
    value = as_real(density)
    if value is None or not 0.0 < value <= 1.0:
        raise refuse("density", "a number in (0, 1]", density, f"{REAL}; or a mapping {{name glob: density}}")
    if value == 1.0:
        raise ValueError(DENSE)
    return value


DENSE = (
    "density=1.0 keeps every weight: nothing would be masked or updated. For the dense point of a sweep, train"
    " without SparseTrainingCallback (or the Sparsifier); give a density below 1 to train sparse"
)


def _checked_unit(value: Any, default: float, name: str, allowed: str, closed: bool) -> float:
    """A number in [0, 1] (``closed``) or (0, 1]; ``None`` takes ``default``."""
    real = default if value is None else as_real(value)
    if real is None or not (0.0 <= real <= 1.0 if closed else 0.0 < real <= 1.0):
        raise refuse(name, allowed, value, f"{REAL}, or None for the algorithm's default")
    return real


def _checked_schedule(schedule: Any, default: str | Callable[[float], float]) -> str | Callable[[float], float]:
    schedule = default if schedule is None else schedule
    if not callable(schedule) and not (isinstance(schedule, str) and schedule in PRUNE_RATE_SCHEDULES):
        raise ValueError(
            f"`prune_rate_schedule` can be {', '.join(PRUNE_RATE_SCHEDULES)} or a function of progress,"
            f" got {schedule!r}"
        )
    if callable(schedule):  # fail now, not at the first update
        for progress in (0.0, 0.5, 1.0):
            try:
                rate = schedule(progress)
            except TypeError as error:
                raise ValueError(
                    "`prune_rate_schedule` must be a function of the progress in [0, 1] (one float) returning the"
                    f" rate; calling it with {progress} raised TypeError: {error}"
                ) from error
            checked_rate(rate, progress)
    return schedule


def _checked_init(init: Any) -> str | None:
    """``init`` in lower case (``"ERK"`` as the papers write it is ``"erk"``), or ``None``."""
    if init is not None and not (isinstance(init, str) and init.lower() in INIT_METHODS):
        raise ValueError(f"`init` can be {', '.join(INIT_METHODS)}, got {init!r}{did_you_mean(init, INIT_METHODS)}")
    return None if init is None else init.lower()


def _checked_interval(update_interval: Any, default: int | None) -> int | Literal["epoch"]:
    if update_interval is None:
        return "epoch" if default is None else default
    if isinstance(update_interval, str) and update_interval == "epoch":
        return "epoch"
    interval = as_integer(update_interval)
    if interval is None or interval < 1:
        raise refuse("update_interval", "'epoch', an int >= 1, or None", update_interval, INTEGER)
    return interval


def _checked_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    value = as_integer(seed)
    if value is None or not 0 <= value < 2**63:
        raise refuse("seed", "an int in [0, 2**63) or None", seed, INTEGER)
    return value


def _checked_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
    return value


def _checked_include(include: Any) -> tuple[str, ...]:
    if isinstance(include, str):
        include = (include,)
    if not isinstance(include, Iterable):
        raise ValueError(f"`include` must be parameter-name globs (str), got {include!r}")
    include = tuple(include)
    if not all(isinstance(i, str) for i in include):
        raise ValueError(f"`include` must be parameter-name globs (str), got {include!r}")
    return include


def _checked_layer_types(layer_types: Any) -> tuple[type | str, ...] | None:
    if layer_types is None:
        return None
    if isinstance(layer_types, (str, type)):
        layer_types = (layer_types,)
    layer_types = tuple(layer_types)
    if not layer_types or not all(isinstance(t, (str, type)) for t in layer_types):
        raise ValueError(f"`layer_types` must be module types or class names, got {layer_types!r}")
    return layer_types


def _checked_dense_layers(dense_layers: Any) -> tuple[str, ...]:
    if isinstance(dense_layers, str):
        dense_layers = [dense_layers]
    if isinstance(dense_layers, Iterable):
        dense_layers = tuple(dense_layers)
    if not isinstance(dense_layers, tuple) or not all(isinstance(d, str) for d in dense_layers):
        raise ValueError(
            "`dense_layers` must be a name or glob pattern (str) or a sequence of them,"
            f" got {dense_layers!r} ({type(dense_layers).__name__})"
        )
    return dense_layers


def _checked_ablation(resolved: SparseAlgorithm | DST, pattern: Pattern, neuron_ablation: Any) -> float | None:
    gamma = as_real(neuron_ablation) if neuron_ablation is not None else None  # numpy, one-element tensors too
    return check_ablation(resolved, pattern, neuron_ablation if gamma is None else gamma)


def _checked_keep_neurons(keep_neurons: Any, neuron_ablation: float | None) -> tuple[str, ...] | None:
    if isinstance(keep_neurons, str):
        keep_neurons = (keep_neurons,)
    if keep_neurons is None:
        return None
    if not isinstance(keep_neurons, Iterable) or not all(isinstance(k, str) for k in keep_neurons):
        raise ValueError(
            "`keep_neurons` must be module or parameter names or globs (str), or None for the last masked"
            f" layer, got {keep_neurons!r}"
        )
    if neuron_ablation is None:
        raise ValueError("`keep_neurons` names the layers that neuron ablation leaves whole: give `neuron_ablation` too")
    return tuple(keep_neurons)


def _pattern_density(pattern: Pattern, density: Any, resolved: SparseAlgorithm | DST, algorithm: Any) -> Any:
    """Check that ``pattern`` fits the method and the density; returns the density to use (``N/M`` for an N:M
    pattern when ``density`` is unset, or its groups with ``N/M`` exactly)."""
    if isinstance(resolved, DST):
        raise ValueError(
            f"algorithm {algorithm!r} learns per-neuron thresholds, so its masks cannot keep a pattern: `pattern`"
            f" must be 'unstructured' for DST, got {str(pattern)!r}"
        )
    if resolved.dynamic and not resolved.grows and not resolved.prunes_to_schedule:
        raise ValueError(
            f"pattern={str(pattern)!r} needs a method that regrows what it prunes (or GMP's count='gmp'): the"
            " growth rule refills every unit of the pattern; this algorithm has grow='none'"
        )
    if pattern.structured and not resolved.supports_patterns:
        raise ValueError(
            f"pattern={str(pattern)!r} is refused for algorithm {_name(algorithm)}: its count rule sets how many each"
            " layer grows (GraNet, MEST), which only an unstructured run follows; use pattern='unstructured'"
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
            raise refuse(f"density[{pattern!r}]", "a number in (0, 1]", value, REAL)
        groups[pattern] = real
    if all(value == 1.0 for value in groups.values()):
        raise ValueError(f"every `density` group is 1.0 ({groups}): {DENSE}")
    return groups
