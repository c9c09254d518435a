"""Training FLOPs so far of the sparse network and of the dense one, as the RigL paper counts them:
:class:`TrainFlops`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_sparse.cost.speedup import training_step_flops

__all__ = ["TrainFlops"]


class TrainFlops:
    """Training FLOPs so far of the sparse network and of the dense one, as the RigL paper counts them.

    Every optimizer step costs :attr:`step_flops` (``(sparse, dense)`` from
    :func:`~lightning_sparse.cost.speedup.training_step_flops` at the densities of the last
    :meth:`set_step_flops`); :meth:`advance` adds the steps taken since its last call; an update step that
    computed dense weight gradients (RigL's growth) adds their extra cost with :meth:`add_dense_weight_gradients`;
    :meth:`mask_update` does the three in the order of a mask update.

    Example:
        >>> flops = TrainFlops()
        >>> flops.set_step_flops({"a": 100.0, "b": 50.0}, {"a": 0.5, "b": 1.0}, dense_weight_gradients=False)
        (300.0, 450.0)
        >>> flops.advance(10)  # steps 0 .. 9 at these densities
        >>> flops.ratio
        0.6666666666666666
        >>> flops.state_dict()
        {'sparse': 3000.0, 'dense': 4500.0, 'step': 10}
    """

    def __init__(self) -> None:
        self.sparse = 0.0
        """Training FLOPs of the sparse network so far."""
        self.dense = 0.0
        """Training FLOPs of the dense network over the same steps."""
        self.step = 0
        """The step up to which FLOPs are counted (the ``step`` of the last :meth:`advance`)."""
        self.step_flops: tuple[float, float] = (0.0, 0.0)
        """``(sparse, dense)`` FLOPs of one training step at the current densities."""

    def set_step_flops(
        self, flops: Mapping[str, float] | None, densities: Mapping[str, float], dense_weight_gradients: bool
    ) -> tuple[float, float]:
        """Set the FLOPs of one training step from now on, and return them.

        Args:
            flops: forward FLOPs per layer (:attr:`CostModel.flops`); ``None`` (no cost model): steps cost 0.
            densities: density of each layer; layers of ``flops`` missing here count as dense (1.0).
            dense_weight_gradients: the weight gradients are computed dense (sparse momentum, DST).
        """
        if flops is None:
            self.step_flops = (0.0, 0.0)
        else:
            full = {n: densities.get(n, 1.0) for n in flops}
            self.step_flops = training_step_flops(flops, full, dense_weight_gradients)
        return self.step_flops

    def advance(self, step: int) -> None:
        """Count the steps from the last ``advance`` up to ``step`` at the current :attr:`step_flops`.

        A ``step`` at or before the last one counts nothing, and only moves the position back to it."""
        steps = step - self.step
        if steps > 0:
            self.sparse += steps * self.step_flops[0]
            self.dense += steps * self.step_flops[1]
        self.step = step

    def mask_update(
        self,
        step: int,
        flops: Mapping[str, float] | None,
        densities: Mapping[str, float],
        dense_weight_gradients: bool,
        gradient_growth: bool,
    ) -> tuple[float, float]:
        """Count a mask update at ``step``, as the callback does: the steps up to ``step`` at the old costs
        (:meth:`advance`), the extra cost of this step's dense weight gradients when the update grew by gradient
        (``gradient_growth``, RigL: :meth:`add_dense_weight_gradients`), and the new masks' costs from now on
        (:meth:`set_step_flops` with ``flops``, ``densities`` and ``dense_weight_gradients``). Returns the new
        :attr:`step_flops`."""
        self.advance(step)
        if gradient_growth:
            self.add_dense_weight_gradients()
        return self.set_step_flops(flops, densities, dense_weight_gradients)

    def add_dense_weight_gradients(self) -> None:
        """Count the extra cost of one step whose weight gradients were dense, at the current
        :attr:`step_flops`: ``(dense - sparse) / 3`` (RigL's gradient-based growth at an update step). Call it
        before :meth:`set_step_flops` gives the new masks' costs."""
        sparse, dense = self.step_flops
        self.sparse += (dense - sparse) / 3.0

    @property
    def ratio(self) -> float | None:
        """Sparse over dense training FLOPs so far; ``None`` while nothing is counted."""
        return self.sparse / self.dense if self.dense > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """``{"sparse": float, "dense": float, "step": int}``: plain numbers, for a checkpoint."""
        return {"sparse": float(self.sparse), "dense": float(self.dense), "step": int(self.step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (:attr:`step_flops` is not part of it: set it again)."""
        self.sparse = float(state["sparse"])
        self.dense = float(state["dense"])
        self.step = int(state["step"])
