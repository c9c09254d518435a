"""Export a sparse-trained model for inference; each exporter returns a copy and leaves the model as it is.

* :func:`compact` (``compact.py``): a smaller dense model without the channels nothing downstream reads.
* :func:`to_sparse` (``sparse_linear.py``): sparse ``nn.Linear`` weights in CSR (:class:`SparseLinear`).
* :func:`to_condensed` (``condensed.py``): constant-fan-in layers (``pattern="fan_in"``) for the CPU
  (:class:`CondensedLinear`, :class:`CondensedConv2d`, a C++ kernel).
* :func:`to_semi_structured` (``semi_structured.py``): 2:4 ``nn.Linear`` weights (``pattern="2:4"``) as
  ``torch.sparse`` semi-structured tensors for CUDA; :func:`semi_structured_layers` names those layers.

The weights are the truth: sparse training zeroes the masked-out weights in place, so a zero weight is a
pruned one (pass ``masks=`` to zero them first).
"""

from lightning_sparse.export.compact import ExampleInput as ExampleInput
from lightning_sparse.export.compact import compact, compaction_report
from lightning_sparse.export.condensed import CondensedConv2d, CondensedLinear, to_condensed
from lightning_sparse.export.semi_structured import semi_structured_layers, to_semi_structured
from lightning_sparse.export.sparse_linear import SparseLinear, to_sparse

__all__ = [
    "CondensedConv2d",
    "CondensedLinear",
    "SparseLinear",
    "compact",
    "compaction_report",
    "semi_structured_layers",
    "to_condensed",
    "to_semi_structured",
    "to_sparse",
]
