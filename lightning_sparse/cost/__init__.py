"""What a sparse network costs, and how much faster it could run. No Lightning here.

* :mod:`~lightning_sparse.cost.costed`: which layers are costed, how their names resolve;
* :mod:`~lightning_sparse.cost.flops`: forward FLOPs per layer, counted on a pass or computed from shapes;
* :mod:`~lightning_sparse.cost.calls`: each layer's call shapes in one pass (forward hooks);
* :mod:`~lightning_sparse.cost.timing`: measured seconds per layer, and :class:`Stopwatch`;
* :mod:`~lightning_sparse.cost.chains`: which layer feeds which along plain chains (``torch.fx``);
* :mod:`~lightning_sparse.cost.model`: :class:`CostModel`, all of the above for one model;
* :mod:`~lightning_sparse.cost.capture`: :class:`InputCapture`, a training step's inputs for a cost model;
* :mod:`~lightning_sparse.cost.channels`: empty channels and densities of masks, whole or row-sharded;
* :mod:`~lightning_sparse.cost.heads`: empty attention heads;
* :mod:`~lightning_sparse.cost.speedup`: the speedup estimates and the FLOPs of a training step;
* :mod:`~lightning_sparse.cost.accounting`: :class:`TrainFlops`, training FLOPs so far;
* :mod:`~lightning_sparse.cost.report`: :class:`SparsityReport`, statistics over training, metrics, table;
* :mod:`~lightning_sparse.cost.figure`: the end-of-fit figure and the loggers that take it.
"""

from lightning_sparse.core.layers import DEFAULT_LAYER_TYPES as LAYER_TYPES
from lightning_sparse.core.layers import AttentionHeads
from lightning_sparse.cost.accounting import TrainFlops
from lightning_sparse.cost.calls import layer_calls
from lightning_sparse.cost.capture import InputCapture
from lightning_sparse.cost.chains import ChainLink, chain_links
from lightning_sparse.cost.channels import LayerChannelStats, channel_stats
from lightning_sparse.cost.figure import send_figure, sparsity_figure
from lightning_sparse.cost.flops import LayerCall, call_flops, flops_from_calls, layer_flops
from lightning_sparse.cost.heads import attention_empty_heads, empty_heads
from lightning_sparse.cost.model import TIMINGS, CostModel, conv_groups
from lightning_sparse.cost.report import MeasuredStats, SparsityReport
from lightning_sparse.cost.speedup import speedup_dense_conv, speedup_sparse_conv, training_step_flops
from lightning_sparse.cost.timing import Stopwatch, layer_times

__all__ = [
    "AttentionHeads",
    "ChainLink",
    "CostModel",
    "InputCapture",
    "LAYER_TYPES",
    "LayerCall",
    "LayerChannelStats",
    "MeasuredStats",
    "SparsityReport",
    "Stopwatch",
    "TIMINGS",
    "TrainFlops",
    "attention_empty_heads",
    "call_flops",
    "chain_links",
    "channel_stats",
    "conv_groups",
    "empty_heads",
    "flops_from_calls",
    "layer_calls",
    "layer_flops",
    "layer_times",
    "send_figure",
    "sparsity_figure",
    "speedup_dense_conv",
    "speedup_sparse_conv",
    "training_step_flops",
]
