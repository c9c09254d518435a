"""``to_sparse``: a copy whose sparse ``nn.Linear`` layers hold their weight in CSR (:class:`SparseLinear`), for
inference.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
>>> fast = to_sparse(model, min_sparsity=0.0)  # every Linear weight in CSR
>>> type(fast[0]).__name__, fast[0].weight.layout
('SparseLinear', torch.sparse_csr)
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import Tensor, nn

from lightning_sparse.export._copy import replace_module

log = logging.getLogger(__name__)


class SparseLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is stored in CSR.

    The CSR parts (``crow_indices``, ``col_indices``, ``values``) and the dense ``bias`` are buffers, so the
    module moves with ``.to()``, deep-copies and round-trips through ``state_dict``; :attr:`weight` rebuilds
    the ``torch.sparse_csr`` tensor (no copy). The product runs through ``torch.addmm``/``torch.sparse.mm``,
    which accept a CSR matrix on the CPU (also under ``torch.inference_mode``). No gradients.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        check_csr_dtype(weight.dtype, weight.device)
        with warnings.catch_warnings():  # torch warns once that CSR support is in beta
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """The sparse counterpart of ``linear`` (same weight and bias)."""
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor of shape ``(out_features, in_features)``."""
        return torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            size=(self.out_features, self.in_features),
            check_invariants=False,  # built by to_sparse_csr, valid by construction
        )

    def forward(self, x: Tensor) -> Tensor:
        check_csr_dtype(self.values.dtype, self.values.device)  # a model cast after export (`.to(torch.bfloat16)`)
        columns = x.reshape(-1, self.in_features).T.contiguous()
        if self.bias is None:
            out = torch.sparse.mm(self.weight, columns)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, columns)
        return out.T.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()},"
            f" bias={self.bias is not None}"
        )


CSR_DTYPES = (torch.float32, torch.float64)
"""The weight dtypes :class:`SparseLinear` takes on the CPU: those of torch's CSR product (``torch.sparse.mm``/
``addmm``), which has no float16/bfloat16 CPU kernel."""


def check_csr_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
    """Refuse a CPU weight dtype that torch's CSR product cannot multiply (see :data:`CSR_DTYPES`); other
    devices are left to torch."""
    if torch.device(device).type == "cpu" and dtype not in CSR_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in CSR_DTYPES)
        raise ValueError(
            f"SparseLinear cannot hold {dtype} weights on the CPU: torch's CSR product (torch.sparse.mm / addmm)"
            f" runs in {allowed} only there. Export a float32 copy (`to_sparse(model.float())`) and feed it float32 inputs, or"
            " keep the model dense"
        )


def to_sparse(model: nn.Module, min_sparsity: float = 0.5) -> nn.Module:
    """A copy of ``model`` in which every sparse enough ``nn.Linear`` is a :class:`SparseLinear` (CSR weight).

    Only plain ``nn.Linear`` modules are replaced (subclasses such as attention's output projection are read
    as dense tensors by their owners), when their fraction of zero weights is at least ``min_sparsity``.
    Convolutions and everything else stay dense. ``model`` is not modified. For inference only: the sparse
    weights are buffers, not parameters, and get no gradients. CPU weights of a dtype other than float32 and
    float64 (:data:`CSR_DTYPES`; float16, bfloat16) are refused: torch's CSR product has no CPU kernel for them.
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1], got {min_sparsity}")
    for name, module in model.named_modules():
        if type(module) is nn.Linear and _sparsity(module.weight) >= min_sparsity:
            try:
                check_csr_dtype(module.weight.dtype, module.weight.device)
            except ValueError as error:
                raise ValueError(f"to_sparse: the Linear layer {name or '(the model)'!r}: {error}") from None
    sparse = copy.deepcopy(model)
    replaced: dict[int, SparseLinear] = {}
    for name, module in list(sparse.named_modules(remove_duplicate=False)):
        if type(module) is not nn.Linear or _sparsity(module.weight) < min_sparsity:
            continue
        if id(module) not in replaced:  # a Linear shared under several names is converted once
            replaced[id(module)] = SparseLinear.from_linear(module)
        if not name:
            return replaced[id(module)]
        replace_module(sparse, name, replaced[id(module)])
    log.info("to_sparse: %d Linear layers stored in CSR", len(replaced))
    return sparse


def _sparsity(weight: Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
