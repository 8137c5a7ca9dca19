"""Each Triton kernel of ``slope_kernels`` against the torch composition it replaces, on real
layer shapes: the measurement by which ``auto`` decides where a kernel is used.

Needs CUDA: on CPU the kernels only run in Triton's interpreter, which checks correctness and
says nothing about speed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slope_lightning.bench.common import Row, RowSink
from slope_lightning.sparse.kernel_ops import kernels_unavailable, measure_kernels
from slope_lightning.sparse.layout import NMLayout


def kernel_rows(
    shapes: Iterable[tuple[int, int]],
    tokens: Iterable[int] = (2048,),
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    on_row: RowSink | None = None,
) -> list[Row]:
    """One row per (shape, tokens, step): torch and Triton milliseconds and which is used.

    Each row goes to ``on_row`` as soon as it is measured, so a timeout keeps it.

    Raises:
        RuntimeError: the kernels cannot be timed on ``device`` (no CUDA, no triton).
    """
    why_not = kernels_unavailable(torch.device(device))
    if why_not is not None:
        raise RuntimeError(f"the kernels benchmark cannot run here: {why_not}")
    rows: list[Row] = []
    for d_out, d_in in shapes:
        layout = NMLayout(d_out, d_in, 2, 4)
        for count in tokens:
            choices, times = measure_kernels(layout, dtype, torch.device(device), tokens=count)
            for step, ms in times.items():
                row: Row = {
                    "shape (out x in)": f"{d_out}x{d_in}",
                    "tokens": count,
                    "dtype": str(dtype).removeprefix("torch."),
                    "step": step,
                    "torch_ms": ms["torch"],
                    "triton_ms": ms["triton"],
                    "torch/triton": ms["torch"] / ms["triton"],
                    "used": choices.as_dict()[step],
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


COLUMNS = [
    "shape (out x in)",
    "tokens",
    "dtype",
    "step",
    "torch_ms",
    "triton_ms",
    "torch/triton",
    "used",
]
