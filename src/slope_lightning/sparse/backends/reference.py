"""The reference backend: plain torch on any device, dtype and N:M pattern."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from slope_lightning.sparse.backends.base import OperandCache, SparseBackend, SparseWeight


class ReferenceBackend(SparseBackend):
    """Dense GEMMs on the masked weight; dense tensors exist only inside one call.

    Nothing is cached: the dense W_R (and W_RC in the backward) is rebuilt from the packed
    values at every call, which keeps the memory saving at the cost of the rebuild.
    """

    name = "reference"

    def forward(
        self, x: Tensor, weight: SparseWeight, bias: Tensor | None, cache: OperandCache | None
    ) -> Tensor:
        return F.linear(x, weight.dense(), bias)  # (T, d_out)

    def grad_input(
        self, grad_out: Tensor, weight: SparseWeight, cache: OperandCache | None
    ) -> Tensor:
        return grad_out @ weight.double_pruned()  # (T, d_in)
