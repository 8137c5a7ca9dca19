"""2:4 sparse GEMMs through a :class:`~slope_lightning.sparse.backends.ops.SemiStructuredOps`.

The forward Y = X W_Rᵀ and the input gradient dX = dY W_RC each run as one sparse GEMM with
the sparse operand on the left, as the kernels require: Yᵀ = W_R Xᵀ and dXᵀ = W_RCᵀ dYᵀ.
Tall weights can be cut into square row tiles, as in the SLoPe paper (cuSPARSELt is slow on
"upsample" shapes); whether that pays is measured, not assumed (``auto``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from slope_lightning.sparse.backends.base import OperandCache, SparseBackend, SparseWeight
from slope_lightning.sparse.backends.ops import SemiStructuredOps
from slope_lightning.sparse.kernel_ops import KernelChoices, add_bias
from slope_lightning.sparse.layout import NMLayout

#: Compressed row tiles of one operand: (start row, stop row, compressed tile).
Tiles = list[tuple[int, int, Any]]


def row_tiles(rows: int, cols: int, tile: bool) -> list[tuple[int, int]]:
    """Row ranges [start, stop) cutting a (rows, cols) operand into square-ish tiles.

    Without ``tile`` (or when rows <= cols) one range covers everything.
    """
    if not tile or rows <= cols:
        return [(0, rows)]
    return [(start, min(start + cols, rows)) for start in range(0, rows, cols)]


class SemiStructuredBackend(SparseBackend):
    """2:4 sparse forward and input-gradient GEMMs; the weight gradient stays a dense GEMM.

    Args:
        ops: the kernels (cuSPARSELt, CUTLASS, or their emulation).
        tiled: cut tall operands into square row tiles: W_R (d_out, d_in) when d_out > d_in
            and W_RCᵀ (d_in, d_out) when d_in > d_out.
        kernels: which steps run as Triton kernels (see ``sparse.kernel_ops``).
    """

    #: Sparse operand rows are a multiple of 32 for every ops' dtype (CUTLASS's limit).
    row_multiple = 32

    def __init__(
        self, ops: SemiStructuredOps, tiled: bool = False, kernels: KernelChoices | None = None
    ) -> None:
        super().__init__(kernels)
        self.ops = ops
        self.tiled = tiled
        self.name = f"{ops.name}_tiled" if tiled else ops.name

    def unsupported(self, layout: NMLayout, dtype: torch.dtype, device: torch.device) -> str | None:
        if (layout.n, layout.m) != (2, 4):
            return f"{self.ops.name} runs 2:4 only, not {layout.n}:{layout.m}"
        if self.ops.needs_cuda:
            if device.type != "cuda":
                return f"{self.ops.name} needs a CUDA tensor, got {device}"
            why = self.ops.unsupported_gpu(torch.cuda.get_device_capability(device))
            if why is not None:
                return why
        limits = self.ops.limits.get(dtype)
        if limits is None:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in self.ops.limits)
            return f"{self.ops.name} computes in {allowed}, not {dtype} (use bf16 autocast)"
        for rows, cols in ((layout.rows, layout.cols), (layout.cols, layout.rows)):
            for start, stop in row_tiles(rows, cols, self.tiled):
                if (stop - start) % limits.sparse_rows or cols % limits.sparse_cols:
                    return (
                        f"{self.ops.name} needs sparse operands with rows a multiple of "
                        f"{limits.sparse_rows} and cols a multiple of {limits.sparse_cols}; "
                        f"this layer has a {stop - start}x{cols} operand"
                    )
        return None

    def _compressed(self, dense: Tensor) -> Tiles:
        rows, cols = dense.shape
        return [
            (start, stop, self.ops.compress(dense[start:stop]))
            for start, stop in row_tiles(rows, cols, self.tiled)
        ]

    def _apply(self, tiles: Tiles, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x @ operandᵀ (+ bias, fused into the GEMM) over all tiles, with the token
        dimension padded for the kernels."""
        tokens = x.shape[0]
        multiple = self.ops.limits[x.dtype].dense_rows
        pad = (-tokens) % multiple
        # Contiguous first: an incoming gradient may be a stride-0 expand, no kernel takes it.
        x_padded = F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()  # (T', k)
        parts = [
            self.ops.matmul(
                packed, x_padded, stop - start, None if bias is None else bias[start:stop]
            )
            for start, stop, packed in tiles
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out[:tokens] if pad else out

    def forward(
        self, x: Tensor, weight: SparseWeight, bias: Tensor | None, cache: OperandCache | None
    ) -> Tensor:
        cache = cache if cache is not None else OperandCache()
        tiles = cache.get(
            f"{self.name}:forward", weight.key, lambda: self._compressed(weight.dense())
        )
        if self.ops.fuses_bias:
            return self._apply(tiles, x, bias)  # (T, d_out), bias in the GEMM's epilogue
        y = self._apply(tiles, x)  # (T, d_out)
        return add_bias(y, bias, self.kernels.bias_add)

    def grad_input(
        self, grad_out: Tensor, weight: SparseWeight, cache: OperandCache | None
    ) -> Tensor:
        cache = cache if cache is not None else OperandCache()
        tiles = cache.get(
            f"{self.name}:backward",
            weight.key,
            lambda: self._compressed(weight.double_pruned_t()),  # W_RCᵀ: 2:4 along d_out
        )
        return self._apply(tiles, grad_out)  # (T, d_in)
