"""The fused sparse + low-rank inference path of a SparseLinear.

Y = X W_Rᵀ + (X L)(s R) + b runs as one N:M GEMM with the stacked operand [W_R ; Lᵀ]
(Lᵀ is kept N:M along d_in, so the stack is N:M too), giving [X W_Rᵀ | X L], then one
multiply-add for (X L)·(s R). Exact: it computes the same function as the training path.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from slope_lightning.sparse.adapters import LowRankAdapter
from slope_lightning.sparse.backends import OperandCache, SparseBackend, SparseWeight
from slope_lightning.sparse.function import compute_dtype_of
from slope_lightning.sparse.kernel_ops import add_bias, lowrank_add
from slope_lightning.sparse.layout import NMLayout


@dataclass(frozen=True)
class FusedOperand:
    """[W_R ; Lᵀ] packed N:M, and s·R, built from one version of the parameters.

    Attributes:
        values: (d_out + r + pad, d_in·N/M) stacked kept values.
        index: their packed offsets.
        up: (r + pad, d_out), the adapter's R with its scale folded in.
        layout: the stacked operand's layout (built once, not per decode step).
        key: the parameter versions it was built from (see ``SparseLinear.weight_key``).
    """

    values: Tensor
    index: Tensor
    up: Tensor
    layout: NMLayout
    key: Hashable

    def tensors(self) -> list[Tensor]:
        return [self.values, self.index, self.up]


def build_fused(
    values: Tensor,
    row_index: Tensor,
    layout: NMLayout,
    adapter: LowRankAdapter | None,
    row_multiple: int,
    key: Hashable,
    name: str,
) -> FusedOperand:
    """Stack W_R and the adapter's Lᵀ (zero rows pad the stack to ``row_multiple``).

    Raises:
        ValueError: the weight or adapter holds NaN or inf (nothing is built).
    """
    d_out, d_in = layout.rows, layout.cols
    with torch.no_grad():
        if adapter is None:
            fused_values, fused_index = values.detach(), row_index
            up = values.new_zeros(0, d_out)
        else:
            fused_values = torch.cat([values, adapter.down_values.to(values.dtype)])
            fused_index = torch.cat([row_index, adapter.down_index])
            up = (adapter.up * adapter.scale).to(values.dtype)  # scale folded into R
            pad = (-fused_values.shape[0]) % row_multiple
            if pad:
                # Sparse kernels want row counts in multiples of row_multiple: pad with zero
                # rows (valid N:M offsets, zero values) and matching zero rows of s·R.
                pad_layout = NMLayout(pad, d_in, layout.n, layout.m)
                pad_values, pad_index = pad_layout.prune(values.new_zeros(pad, d_in))
                fused_values = torch.cat([fused_values, pad_values])
                fused_index = torch.cat([fused_index, pad_index])
                up = torch.cat([up, up.new_zeros(pad, d_out)])
        for label, tensor in (("weight", fused_values), ("adapter R", up)):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"layer {name!r}: non-finite values in {label}; not merged (find the "
                    "step that diverged and resume from the checkpoint before it)"
                )
    stacked = layout.stacked(NMLayout(up.shape[0], d_in, layout.n, layout.m))
    return FusedOperand(fused_values, fused_index, up, stacked, key)


def merged_forward(
    x: Tensor,
    fused: FusedOperand,
    bias: Tensor | None,
    backend: SparseBackend,
    cache: OperandCache,
    out_features: int,
) -> Tensor:
    """One N:M GEMM for [X W_Rᵀ | X L], then one multiply-add for (X L)·(s R)."""
    compute_dtype = compute_dtype_of(x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, fused.layout.cols).to(compute_dtype)  # (T, d_in)
    b = bias.to(compute_dtype) if bias is not None else None
    weight = SparseWeight(
        fused.values,
        fused.index,
        fused.layout,
        compute_dtype,
        key=("fused", fused.key, compute_dtype),
    )
    with torch.autocast(x.device.type, enabled=False):
        stacked = backend.forward(x2d, weight, None, cache)  # (T, d_out + r)
        y = stacked[:, :out_features]
        kernels = backend.running.kernels
        if fused.up.shape[0] > 0:
            low_rank = stacked[:, out_features:]  # X L (T, r)
            y = lowrank_add(y, low_rank, fused.up.to(compute_dtype), b, kernels.lowrank_add)
        else:
            y = add_bias(y, b, kernels.bias_add)
    return y.reshape(*lead, out_features)
