"""lightning-sparse: train PyTorch Lightning models sparse from scratch with one callback."""

from lightning_sparse.algorithms import ALGORITHMS, LayerState, SparseAlgorithm, UpdateContext, UpdateResult
from lightning_sparse.callback import SparseTrainingCallback
from lightning_sparse.dst import DST
from lightning_sparse.masking import Masking, maskable_parameters
from lightning_sparse.scheduling import SparseOptions, UpdateSchedule
from lightning_sparse.sparsifier import DSTSparsifier, Sparsifier, UpdateReport, attach_dst_thresholds

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
