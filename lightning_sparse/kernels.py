"""The C++ CPU kernels: the fused mask kernel behind :meth:`~lightning_sparse.core.masking.Masking.apply_`, and the
condensed (constant fan-in) product behind :class:`~lightning_sparse.export.CondensedLinear`.

On the CPU, ``torch._foreach_mul_(weights, bool_masks)`` converts each mask to a float32 temporary before it
multiplies (torch's CPU kernels do not cast their inputs on the fly), so applying 1-byte masks moves about
17 bytes per weight. ``csrc/masked_zero.cpp`` reads the mask byte and clears the weight's bits where it is
False: 9 bytes per weight, the cost of reading and writing the weights once. On CUDA, torch's multiply casts
on the fly and is already fused, so the kernel is CPU-only.

The kernel is compiled on first use with :func:`torch.utils.cpp_extension.load` (a C++ compiler with OpenMP
and ``ninja``; about 5 s once, then cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). Which path applies the masks is chosen by name:

* ``"auto"``: the C++ kernel for CPU weights when it builds; if it cannot be built, a warning gives the reason
  and torch's ``_foreach_mul_`` is used instead;
* ``"cpp"``: the C++ kernel for CPU weights, and an error if it cannot be built;
* ``"torch"``: torch's ``_foreach_mul_`` only; nothing is compiled.

``csrc/condensed_linear.cpp`` computes ``y[b, o] = sum_j values[o, j] * x[b, indices[o, j]] + bias[o]`` for a
layer whose output rows all read the same number ``k`` of inputs (see the file for the loop orders). It is a
separate extension, built the same way on first use by :func:`cpu_condensed_linear` and chosen by the same
names (``"auto"`` falls back to torch's ``embedding_bag`` with a warning, ``"cpp"`` raises, ``"torch"`` builds
nothing).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MASK_KERNELS = ("auto", "cpp", "torch")
SOURCE = Path(__file__).with_name("csrc") / "masked_zero.cpp"
EXTENSION_NAME = "lightning_sparse_masked_zero"

CONDENSED_SOURCE = Path(__file__).with_name("csrc") / "condensed_linear.cpp"
CONDENSED_EXTENSION_NAME = "lightning_sparse_condensed_linear"

MaskedZero = Callable[[Sequence[Tensor], Sequence[Tensor]], None]
# condensed_linear(x, values, indices, bias, columns) -> y: see csrc/condensed_linear.cpp
CondensedOp = Callable[..., Tensor]
"""``(x, packed values, packed indices, bias, out_features, columns, rows) -> y`` (see ``csrc/condensed_linear.cpp``)."""


def check_mask_kernel(kernel: str) -> str:
    """Return ``kernel`` if it names a mask kernel, else raise ``ValueError`` listing the names."""
    if kernel not in MASK_KERNELS:
        raise ValueError(f"`mask_kernel` can be {', '.join(map(repr, MASK_KERNELS))}, got {kernel!r}")
    return kernel


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    # importing torch.utils.cpp_extension on a machine without CUDA logs a warning about CUDA_HOME
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


log = logging.getLogger(__name__)


def _build_directory(name: str) -> Path:
    """Where :func:`torch.utils.cpp_extension.load` builds the extension ``name`` (as torch chooses it:
    ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions/py<version>_<accelerator>``)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root) / name
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def _needs_build(name: str, source: Path) -> bool:
    """Whether loading the extension ``name`` compiles it: its library is missing, was built from another copy
    of ``source`` (``build.ninja`` names another path), or is older than ``source`` or a header next to it. An
    error while looking counts as built (nothing is announced)."""
    try:
        directory = _build_directory(name)
        library, ninja = directory / f"{name}.so", directory / "build.ninja"
        if not library.exists() or not ninja.exists() or str(source) not in ninja.read_text():
            return True
        newest = max(path.stat().st_mtime for path in [source, *source.parent.glob("*.h")])
        return library.stat().st_mtime < newest
    except Exception:
        return False


def _announce(message: str) -> None:
    """One line to the ``lightning_sparse.kernels`` logger when logging shows its INFO records (Lightning's
    ``rank_zero_info`` style), else to stderr: a first build is several seconds of silence otherwise."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _load(name: str, source: Path) -> None:
    """Compile (or take from the cache) and load one extension; it registers its ops under ``torch.ops``. A
    compilation (first use, or a changed source) is announced in one line (:func:`_announce`); a cached build is
    silent."""
    with _quiet("torch.utils.cpp_extension"):
        from torch.utils import cpp_extension

        if _needs_build(name, source):
            kernel = name.removeprefix("lightning_sparse_")
            _announce(
                f"lightning-sparse: compiling the C++ kernel {kernel} (first use, ~10 s; cached in"
                f" {_build_directory(name).parent})"
            )
        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )


def _load_op(name: str, source: Path, op: str) -> tuple[Any, str]:
    """Build and load one extension and return ``(torch.ops.lightning_sparse.<op>, "")``, or ``(None, why it
    failed)``: any failure to build or load lets the caller fall back to torch's ops (or raise for "cpp")."""
    try:
        _load(name, source)
        return getattr(torch.ops.lightning_sparse, op), ""
    except Exception as error:
        return None, f"{type(error).__name__}: {error}".strip()


@functools.cache
def _build() -> tuple[MaskedZero | None, str]:
    """Compile and load the mask kernel once per process: ``(op, "")``, or ``(None, why it failed)``."""
    return _load_op(EXTENSION_NAME, SOURCE, "masked_zero_")


@functools.cache
def _build_condensed() -> tuple[CondensedOp | None, str]:
    """Compile and load the condensed kernel once per process: ``(op, "")``, or ``(None, why it failed)``."""
    return _load_op(CONDENSED_EXTENSION_NAME, CONDENSED_SOURCE, "condensed_linear")


def cpu_masked_zero(kernel: str) -> MaskedZero | None:
    """The C++ ``masked_zero_(weights, masks)`` op for ``kernel`` ``"auto"`` or ``"cpp"``; ``None`` for
    ``"torch"``, or for ``"auto"`` when the kernel cannot be built (with a warning, once per process).

    Raises:
        RuntimeError: ``kernel="cpp"`` and the kernel cannot be built; the message holds the build error.
    """
    if check_mask_kernel(kernel) == "torch":
        return None
    return _op_or_fallback(
        kernel,
        _build(),
        "mask_kernel='cpp': the C++ mask kernel could not be built ({reason}). It needs a C++ compiler with OpenMP"
        " and ninja; use mask_kernel='auto' or 'torch' to apply the masks with torch's ops",
        "lightning-sparse: the C++ mask kernel could not be built, so the masks are applied with torch's"
        " _foreach_mul_, about 1.4-1.8x slower on the CPU (pass mask_kernel='torch' to skip the build).",
    )


def loaded_mask_passes() -> Any:
    """``torch.ops.lightning_sparse`` (with the passes of :mod:`lightning_sparse.functional.passes`) when the mask
    kernel has been built and loaded in this process (by :func:`cpu_masked_zero`), else None: nothing is compiled
    here, so ``mask_kernel="torch"`` stays free of C++."""
    if _build.cache_info().currsize == 0:
        return None
    op, _ = _build()
    return None if op is None else torch.ops.lightning_sparse


def _op_or_fallback(kernel: str, built: tuple[Any, str], cpp_error: str, fallback: str) -> Any:
    """The op of ``built`` (``(op, why it failed)`` from ``_build*``); when it failed, raise ``RuntimeError`` with
    ``cpp_error`` (``{reason}`` filled in) for ``kernel="cpp"``, else warn with ``fallback`` (what runs instead)
    and the first lines of the reason, once per process, and return None for the torch fallback."""
    op, reason = built
    if op is None:
        if kernel == "cpp":
            raise RuntimeError(cpp_error.format(reason=reason))
        _warn_once(fallback, reason)
    return op


@functools.cache
def _warn_once(fallback: str, reason: str) -> None:
    first_lines = "\n".join(reason.splitlines()[:3])
    warnings.warn(f"{fallback} {first_lines}", RuntimeWarning, stacklevel=5)


# ----------------------------------------------------------------------------- selection kernel
SELECT_SOURCE = Path(__file__).with_name("csrc") / "select.cpp"
SELECT_EXTENSION_NAME = "lightning_sparse_select"
SELECT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The value dtypes the C++ selection handles (compared as float32, as ``sortable_key`` does)."""

SelectOp = Callable[[Tensor, Tensor, int, bool, bool, bool, bool], Tensor]
"""``(values, mask, n, highest, magnitude, inactive, flip) -> bool tensor`` (see ``csrc/select.cpp``)."""


@functools.cache
def _build_select() -> tuple[SelectOp | None, str]:
    """Compile and load the selection kernel once per process: ``(op, "")``, or ``(None, why it failed)``."""
    return _load_op(SELECT_EXTENSION_NAME, SELECT_SOURCE, "select_in_mask")


def cpu_select(kernel: str) -> SelectOp | None:
    """The C++ ``select_in_mask`` op (exact top-n selection of one CPU tensor in two passes, see
    ``csrc/select.cpp``) for ``kernel`` ``"auto"`` or ``"cpp"``; ``None`` for ``"torch"``, or for ``"auto"`` when
    the kernel cannot be built (with a warning, once per process): the selection then runs torch's ops, which
    choose the same positions.

    Raises:
        RuntimeError: ``kernel="cpp"`` and the kernel cannot be built; the message holds the build error.
    """
    if check_mask_kernel(kernel) == "torch":
        return None
    return _op_or_fallback(
        kernel,
        _build_select(),
        "kernel='cpp': the C++ selection kernel could not be built ({reason}). It needs a C++ compiler with OpenMP"
        " and ninja; use kernel='auto' or 'torch' to select with torch's ops",
        "lightning-sparse: the C++ selection kernel could not be built, so mask updates select with torch's ops"
        " (the same masks, several times slower on the CPU; pass mask_kernel='torch' to skip the build).",
    )


UnitSelectOp = Callable[[Tensor, Tensor, Tensor, bool, bool, int, bool], Tensor]
"""``(values [units, size], mask bool [units, size], k int64 [units], largest, inactive, mode, flip) -> bool
tensor`` (see ``select_per_unit`` in ``csrc/select.cpp``)."""
UNIT_SELECT_DTYPES = (*SELECT_DTYPES, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
"""The value dtypes the C++ per-unit selection handles (floats compared as float32, integers exactly)."""


def cpu_select_per_unit(kernel: str) -> UnitSelectOp | None:
    """The C++ ``select_per_unit`` op (the exact top-k of every unit (row) of a CPU tensor, behind
    :func:`~lightning_sparse.functional.units.topk_per_unit`; the extension of :func:`cpu_select`) for ``kernel``
    ``"auto"`` or ``"cpp"``; ``None`` for ``"torch"``, or for ``"auto"`` when the kernel cannot be built (with a
    warning, once per process).

    Raises:
        RuntimeError: ``kernel="cpp"`` and the kernel cannot be built; the message holds the build error.
    """
    if cpu_select(kernel) is None:
        return None
    return torch.ops.lightning_sparse.select_per_unit


# ----------------------------------------------------------------------------- condensed kernel
def check_condensed_kernel(kernel: str) -> str:
    """Return ``kernel`` if it names a condensed kernel (the names of :data:`MASK_KERNELS`), else raise
    ``ValueError`` listing the names."""
    if kernel not in MASK_KERNELS:
        raise ValueError(f"`kernel` can be {', '.join(map(repr, MASK_KERNELS))}, got {kernel!r}")
    return kernel


def cpu_condensed_linear(kernel: str) -> CondensedOp | None:
    """The C++ ``condensed_linear`` op for ``kernel`` ``"auto"`` or ``"cpp"``; ``None`` for ``"torch"``, or for
    ``"auto"`` when the kernel cannot be built (with a warning, once per process).

    Raises:
        RuntimeError: ``kernel="cpp"`` and the kernel cannot be built; the message holds the build error.
    """
    if check_condensed_kernel(kernel) == "torch":
        return None
    return _op_or_fallback(
        kernel,
        _build_condensed(),
        "kernel='cpp': the C++ condensed kernel could not be built ({reason}). It needs a C++ compiler with OpenMP"
        " and ninja; use kernel='auto' or 'torch' to compute with torch's embedding_bag",
        "lightning-sparse: the C++ condensed kernel could not be built, so CondensedLinear computes with torch's"
        " embedding_bag, several times slower at small batches (pass kernel='torch' to skip the build).",
    )


# ------------------------------------------------------------------ condensed training (compute="condensed")
# ``csrc/condensed_train.cpp``: the backward products of the condensed Linear (dy W over the layer's columns, the
# weight gradient at the active positions only) and the moves between the dense weight and the condensed form. The
# forward is ``condensed_linear`` above; :mod:`lightning_sparse.compute.condensed` loads both.
TRAIN_SOURCE = Path(__file__).with_name("csrc") / "condensed_train.cpp"
TRAIN_EXTENSION_NAME = "lightning_sparse_condensed_train"


@functools.cache
def _build_train() -> tuple[Any, str]:
    """Compile and load the condensed training kernels (and the forward's) once per process: ``(namespace of
    the ops, "")``, or ``(None, why it failed)``."""
    forward, reason = _build_condensed()
    if forward is None:
        return None, reason
    op, reason = _load_op(TRAIN_EXTENSION_NAME, TRAIN_SOURCE, "condensed_train_values")
    return (None, reason) if op is None else (torch.ops.lightning_sparse, "")


def cpu_condensed_train(kernel: str) -> Any:
    """``torch.ops.lightning_sparse`` with the condensed training ops (``condensed_linear``,
    ``condensed_train_values``, ``condensed_train_grad_input``, ``condensed_train_grad_values``,
    ``condensed_train_dense_grad``) for ``kernel`` ``"auto"`` or ``"cpp"``; ``None`` for ``"torch"``, or for
    ``"auto"`` when they cannot be built (with a warning, once per process).

    Raises:
        RuntimeError: ``kernel="cpp"`` and the kernels cannot be built; the message holds the build error.
    """
    if check_condensed_kernel(kernel) == "torch":
        return None
    return _op_or_fallback(
        kernel,
        _build_train(),
        "kernel='cpp': the C++ condensed training kernels could not be built ({reason}). They need a C++ compiler"
        " with OpenMP and ninja; use kernel='auto' or 'torch' to compute with torch's ops",
        "lightning-sparse: the C++ condensed training kernels could not be built, so compute='condensed' computes"
        " with torch's ops, not faster than dense compute.",
    )

