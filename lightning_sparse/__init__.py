"""lightning-sparse: train PyTorch Lightning models sparse from scratch with one callback."""

from lightning_sparse.core.masking import Masking
from lightning_sparse.core.selection import maskable_parameters
from lightning_sparse.core.sparsifier import Sparsifier, UpdateReport
from lightning_sparse.lightning.callback import SparseTrainingCallback
from lightning_sparse.methods import ALGORITHMS, LayerState, SparseAlgorithm, UpdateContext, UpdateResult
from lightning_sparse.methods.dst import DST
from lightning_sparse.methods.dst_sparsifier import DSTSparsifier, attach_dst_thresholds
from lightning_sparse.options import SparseOptions
from lightning_sparse.schedule import UpdateSchedule

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "DST",
    "LayerState",
    "DSTSparsifier",
    "Masking",
    "SparseAlgorithm",
    "SparseOptions",
    "SparseTrainingCallback",
    "Sparsifier",
    "UpdateContext",
    "UpdateReport",
    "UpdateResult",
    "UpdateSchedule",
    "__version__",
    "attach_dst_thresholds",
    "maskable_parameters",
]
