"""Triton kernels for SLoPe (arXiv 2405.16325), each beside a plain-torch reference of itself
(torchao's kernel layout).

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before this
package is first imported (how CI tests them). Importing works without triton installed
(``TRITON_AVAILABLE`` is then False); calling a kernel raises and names its reference.
"""

from slope_kernels._triton import TRITON_AVAILABLE
from slope_kernels.bias_add import bias_add, bias_add_reference
from slope_kernels.fused_lowrank import fused_lowrank_add, fused_lowrank_add_reference
from slope_kernels.gather_grad import gather_packed_grad, gather_packed_grad_reference
from slope_kernels.transpose_mask import derive_transpose_index, derive_transpose_index_reference

__all__ = [
    "TRITON_AVAILABLE",
    "bias_add",
    "bias_add_reference",
    "derive_transpose_index",
    "derive_transpose_index_reference",
    "fused_lowrank_add",
    "fused_lowrank_add_reference",
    "gather_packed_grad",
    "gather_packed_grad_reference",
]
