"""The steps of a SLoPe layer that a Triton kernel of ``slope_kernels`` can replace, each next
to the torch composition it replaces, and the per-layer choice between the two.

- ``lowrank_add``: C + (X L)·(s R) + b, the epilogue of the fused sparse + low-rank inference
  path (torch: ``addmm`` then a bias add).
- ``bias_add``: the bias add after a 2:4 sparse GEMM (torch: ``y + b``).
- ``gather_grad``: the dense weight gradient's entries at M_R's positions, i.e. the packed
  values' gradient (torch: the lookup-table gather of ``NMLayout.gather``).
- ``transpose_index``: M_C re-derived from the packed values (torch: densify W_R, prune its
  transpose).

A kernel runs only where it measured faster than its torch composition: ``auto`` times both
on the layer's real shape on CUDA at first use (:func:`measure_kernels`). Everywhere else,
including every CPU run, the torch composition runs. Both give the same numbers (the
kernels are tested against their references), so the choice changes speed, never results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from slope_lightning.sparse.layout import NMLayout
from slope_lightning.utils import median_ms

Impl = Literal["torch", "triton"]
IMPLS: tuple[str, ...] = ("torch", "triton")


@dataclass(frozen=True)
class KernelChoices:
    """Which implementation runs each replaceable step of one layer."""

    lowrank_add: Impl = "torch"
    bias_add: Impl = "torch"
    gather_grad: Impl = "torch"
    transpose_index: Impl = "torch"

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) not in IMPLS:
                raise ValueError(
                    f"kernel choice {field.name}={getattr(self, field.name)!r}: "
                    f"choose one of {', '.join(IMPLS)}"
                )

    @classmethod
    def everywhere(cls, impl: Impl) -> KernelChoices:
        """The same implementation for every step (``"triton"`` forces the kernels)."""
        return cls(**{field.name: impl for field in fields(cls)})

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        """E.g. ``"triton: gather_grad; torch: lowrank_add, bias_add, transpose_index"``."""
        parts = []
        for impl in IMPLS:
            steps = [name for name, value in self.as_dict().items() if value == impl]
            if steps:
                parts.append(f"{impl}: {', '.join(steps)}")
        return "; ".join(parts)


def lowrank_add(c: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, impl: Impl) -> Tensor:
    """c + a @ b (+ bias) for c (T, N), a (T, r), b (r, N) of one dtype."""
    if impl == "triton":
        from slope_kernels import fused_lowrank_add

        return fused_lowrank_add(c, a, b, 1.0, bias)
    out = torch.addmm(c, a, b)
    return out + bias if bias is not None else out


def add_bias(y: Tensor, bias: Tensor | None, impl: Impl) -> Tensor:
    """y (T, N) + bias (N,), or y itself without a bias."""
    if bias is None:
        return y
    # The kernel needs y contiguous along N; CUTLASS's output is a transposed view
    # (stride(-1) = T), which only the torch composition takes.
    if impl == "triton" and (y.shape[-1] <= 1 or y.stride(-1) == 1):
        from slope_kernels import bias_add

        return bias_add(y, bias, inplace=True)  # y is the GEMM's fresh output
    return y + bias


def gather_grad(grad_weight: Tensor, row_index: Tensor, layout: NMLayout, impl: Impl) -> Tensor:
    """The (d_out, d_in·N/M) entries of a dense (d_out, d_in) gradient at M_R's positions."""
    if impl == "triton":
        from slope_kernels import gather_packed_grad

        return gather_packed_grad(grad_weight.contiguous(), row_index, layout.n, layout.m)
    return layout.gather(grad_weight, row_index)


def derive_col_index(values: Tensor, row_index: Tensor, layout: NMLayout, impl: Impl) -> Tensor:
    """M_C: W_R pruned N:M along d_out by magnitude, packed as offsets of W_Rᵀ's rows."""
    with torch.no_grad():
        if impl == "triton":
            from slope_kernels import derive_transpose_index

            return derive_transpose_index(
                values.detach().contiguous(),
                row_index,
                layout.n,
                layout.m,
                layout.rows,
                layout.cols,
            )
        w_r_t = layout.to_dense(values, row_index).t()  # (d_in, d_out), transient
        return layout.transposed().prune(w_r_t)[1]


def kernels_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot be timed on ``device`` (None when they can)."""
    if device.type != "cuda":
        return "Triton kernels are only timed on CUDA (on CPU they run interpreted, for tests)"
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    try:
        from slope_kernels import TRITON_AVAILABLE
    except ImportError:  # pragma: no cover - slope_kernels ships with this package
        return "slope_kernels is not installed"
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    return None


Timer = Callable[[Callable[[], object], torch.device], float]


def _default_timer(fn: Callable[[], object], device: torch.device) -> float:
    return median_ms(fn, device, repeats=10)


def measure_kernels(
    layout: NMLayout,
    dtype: torch.dtype,
    device: torch.device,
    tokens: int,
    rank: int | None = None,
    timer: Timer = _default_timer,
) -> tuple[KernelChoices, dict[str, dict[str, float]]]:
    """Time every step both ways on this layer's shape; keep the faster per step.

    Args:
        layout: the layer's weight layout (d_out, d_in, N:M).
        dtype: the compute dtype (the kernels' operands).
        device: where to time (CUDA; see :func:`kernels_unavailable`).
        tokens: rows of the activations (the batch's token count).
        rank: adapter rank for ``lowrank_add``; default d_in/16 (6.25%), at least 16.
        timer: ``timer(fn, device) -> ms``; injectable for tests.

    Returns:
        The choices and, per step, the milliseconds of each implementation. A step whose
        kernel fails to run (any exception: Triton's compile and resource errors are not
        RuntimeErrors) keeps torch, with its time recorded as ``inf``.
    """
    rows, cols = layout.rows, layout.cols
    rank = rank if rank is not None else max(16, cols // 16)
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    values, row_index = layout.prune(randn(rows, cols))
    fused_out = randn(tokens, rows + rank)
    c, a = fused_out[:, :rows], fused_out[:, rows:]
    up, bias, y = randn(rank, rows), randn(rows), randn(tokens, rows)
    grad_weight = randn(rows, cols)
    steps: dict[str, Callable[[Impl], object]] = {
        "lowrank_add": lambda impl: lowrank_add(c, a, up, bias, impl),
        "bias_add": lambda impl: add_bias(y, bias, impl),
        "gather_grad": lambda impl: gather_grad(grad_weight, row_index, layout, impl),
        "transpose_index": lambda impl: derive_col_index(values, row_index, layout, impl),
    }
    times: dict[str, dict[str, float]] = {}
    chosen: dict[str, Impl] = {}
    for step, run in steps.items():
        times[step] = {}
        for impl in ("torch", "triton"):
            try:
                times[step][impl] = timer(functools.partial(run, impl), device)
            except Exception:  # e.g. triton CompilationError, OutOfResources, a ValueError
                times[step][impl] = float("inf")
        chosen[step] = "triton" if times[step]["triton"] < times[step]["torch"] else "torch"
    return KernelChoices(**chosen), times
