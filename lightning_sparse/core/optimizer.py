"""Reading the momentum (the exponentially smoothed gradient) out of an optimizer's state. No Lightning."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sparse.core.distributed import local
from lightning_sparse.functional.passes import zero_where_

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
SUPPORTED_OPTIMIZERS = "torch.optim.SGD with momentum > 0, Adam, AdamW, NAdam or RAdam"


def check_momentum_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """Raise ``ValueError`` unless ``optimizer`` keeps a momentum for every tensor in ``params``.

    Sparse momentum reads SGD's ``momentum_buffer`` or Adam's ``exp_avg`` / ``exp_avg_sq``; plain SGD
    (``momentum=0``) and other optimizers keep no such state.
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [i for i, p in enumerate(params) if id(p) not in groups]
    if missing:
        raise ValueError(
            f"{len(missing)} masked weight(s) are not optimized by {type(optimizer).__name__}; sparse momentum"
            " needs the optimizer's momentum of every masked weight"
        )
    if isinstance(optimizer, ADAM_FAMILY):
        return
    if isinstance(optimizer, torch.optim.SGD):
        momenta = {groups[id(p)]["momentum"] for p in params}
        if min(momenta) > 0:
            return
        raise ValueError(
            f"sparse momentum needs an optimizer that keeps a momentum: {SUPPORTED_OPTIMIZERS}."
            f" Got SGD with momentum={min(momenta)}"
        )
    raise ValueError(
        f"sparse momentum needs an optimizer that keeps a momentum: {SUPPORTED_OPTIMIZERS}."
        f" Got {type(optimizer).__name__}"
    )


def optimizer_momentum(optimizer: torch.optim.Optimizer, param: Tensor) -> Tensor:
    """The momentum of ``param``: SGD's ``momentum_buffer``, or ``exp_avg / (sqrt(exp_avg_sq) + eps)`` for
    the Adam family. Zeros before the optimizer's first step."""
    state = optimizer.state.get(param, {})
    if "momentum_buffer" in state and state["momentum_buffer"] is not None:
        return state["momentum_buffer"]
    if "exp_avg" in state:
        eps = next(g["eps"] for g in optimizer.param_groups if any(p is param for p in g["params"]))
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + eps)
    return torch.zeros_like(param)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, positions: Tensor) -> None:
    """Zero every per-weight optimizer state tensor of ``param`` (momentum, second moments) at ``positions``
    (a bool tensor shaped like ``param``, or like its local shard under FSDP2). Scalar state such as Adam's
    ``step`` is left alone."""
    state = optimizer.state.get(param, {}).values()
    zero_where_([local(v) for v in state if isinstance(v, Tensor) and v.shape == param.shape], positions)
