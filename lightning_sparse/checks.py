"""Argument checks shared by the options and the schedule: numbers given as Python, numpy or one-element tensor
values, and the error that names what is allowed."""

from __future__ import annotations

import numbers
from typing import Any

import torch

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


def refuse(name: str, allowed: str, value: Any, kind: str) -> ValueError:
    """The error for argument ``name``: what is allowed, what was given (and its type), and which values count."""
    return ValueError(f"`{name}` must be {allowed}, got {value!r} ({type(value).__name__}); {kind}")


def refuse_sparsity(options: dict[str, Any]) -> None:
    """Refuse ``sparsity=``: the options speak of the fraction kept, ``density = 1 - sparsity``."""
    if "sparsity" in options:
        sparsity = as_real(options["sparsity"])
        hint = f"density={1 - sparsity:g}" if sparsity is not None and 0 <= sparsity < 1 else "density = 1 - sparsity"
        raise ValueError(
            f"there is no `sparsity` option: give the fraction of weights kept, `density` = 1 - sparsity ({hint}"
            f" for sparsity={options['sparsity']!r})"
        )
