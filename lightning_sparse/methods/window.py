"""Where a run is in its update window (schedule math; read by the options and the sparsifier)."""

from __future__ import annotations

import math


def window_progress(step: int, total: float, stop_at: float) -> float:
    """Progress through the update window: ``step / (stop_at * total)``, clipped to [0, 1]."""
    end = stop_at * total
    return min(max(step / end, 0.0), 1.0) if end > 0 and math.isfinite(end) else 0.0
