"""Time of one linear layer, SLoPe (each backend, tiled or not) vs nn.Linear, in the same run.

Phases:

- ``forward``: an inference forward (no grad); kernel-side operands are built once and
  reused, as in serving.
- ``input-grad``: the input gradient alone (one GEMM, its operand rebuilt per call).
- ``fwd+bwd``: a training forward and backward.
- ``fwd+bwd+update``: a whole training step of the layer, AdamW update included. The values
  change at every step, so every compressed operand (W_R, and W_RCᵀ after re-deriving M_C)
  is rebuilt every call: this is what a real step costs, and the figure speed claims use.

Shapes come from real models (``MODEL_SHAPES``: the attention and MLP projections of GPT-2
small/medium, OPT-6.7B/13B, LLaMA-3-8B and Mistral-7B) or are given as ``d_out x d_in``.

On a machine without a GPU this measures the ``reference`` backend (plain torch): it tells
the overhead of the method's bookkeeping, not a sparse speedup (CPUs have no 2:4 kernels).
On a GPU, pass e.g. ``--backends cusparselt,cusparselt_tiled,cutlass,auto --dtype bfloat16``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from slope_lightning.bench.common import Row, RowSink
from slope_lightning.sparse import SparseLinear
from slope_lightning.utils import first_line, median_ms

Shape = tuple[int, int]

#: (d_out, d_in) of every distinct projection: attention (fused QKV or Q/K/V/O) and MLP.
MODEL_SHAPES: dict[str, tuple[Shape, ...]] = {
    "gpt2-small": ((2304, 768), (768, 768), (3072, 768), (768, 3072)),
    "gpt2-medium": ((3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)),
    "opt-6.7b": ((4096, 4096), (16384, 4096), (4096, 16384)),
    "opt-13b": ((5120, 5120), (20480, 5120), (5120, 20480)),
    # LLaMA-3-8B and Mistral-7B share their projection shapes (GQA: 8 KV heads of 128).
    "llama-3-8b": ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)),
    "mistral-7b": ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)),
}

DEFAULT_SHAPES: tuple[Shape, ...] = ((4096, 4096),)
PHASES: tuple[str, ...] = ("forward", "input-grad", "fwd+bwd", "fwd+bwd+update")


def shapes_of(models: Iterable[str]) -> list[Shape]:
    """The distinct layer shapes of the named models, in first-seen order."""
    shapes: list[Shape] = []
    for model in models:
        if model not in MODEL_SHAPES:
            raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODEL_SHAPES)}")
        shapes += [shape for shape in MODEL_SHAPES[model] if shape not in shapes]
    return shapes


def _phase_runner(phase: str, layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running one phase of ``layer`` on ``x``."""
    if phase == "forward":

        def forward() -> None:
            with torch.no_grad():
                layer(x)

        return forward
    if phase == "input-grad":
        # The parameters are frozen for this phase, so backward computes dX alone.
        y = layer(x)
        grad = torch.randn_like(y)

        def input_grad() -> None:
            torch.autograd.grad(y, x, grad, retain_graph=True)

        return input_grad

    optimizer = (
        torch.optim.AdamW(layer.parameters(), lr=1e-6) if phase == "fwd+bwd+update" else None
    )

    def training_step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
        if optimizer is not None:  # new values: the next call rebuilds every operand
            optimizer.step()

    return training_step


def _time_phase(phase: str, layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one call of ``phase`` (see :func:`_phase_runner`)."""
    frozen = phase == "input-grad"
    for parameter in layer.parameters():
        parameter.requires_grad_(not frozen)
    try:
        return median_ms(_phase_runner(phase, layer, x), x.device, repeats)
    finally:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)


def layer_rows(
    shapes: Iterable[Shape] = DEFAULT_SHAPES,
    tokens: int | Iterable[int] = 2048,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    backends: tuple[str, ...] = ("reference",),
    device: str | None = None,
    phases: tuple[str, ...] = PHASES,
    on_row: RowSink | None = None,
) -> list[Row]:
    """One row per (shape, token count, backend, phase): dense and SLoPe time and their ratio.

    A backend that cannot run a shape gets a row with the reason instead of a time. Each
    row goes to ``on_row`` as soon as its (shape, tokens, backend) is measured, so a timeout
    keeps the finished ones: list the shapes that matter most first.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    token_counts = [tokens] if isinstance(tokens, int) else list(tokens)
    rows: list[Row] = []
    for d_out, d_in in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=device)
        for count in token_counts:
            x = torch.randn(count, d_in, dtype=dtype, device=device, requires_grad=True)
            dense_ms = {phase: _time_phase(phase, dense, x, repeats) for phase in phases}
            for backend in backends:
                for row in _backend_rows(backend, dense, x, dense_ms, repeats, device):
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def _backend_rows(
    backend: str,
    dense: nn.Linear,
    x: torch.Tensor,
    dense_ms: dict[str, float],
    repeats: int,
    device: str,
) -> list[Row]:
    """The rows of one backend on one (shape, tokens), timed against ``dense_ms``."""
    label = backend if device != "cpu" else f"{backend} (CPU)"
    base: Row = {
        "shape (out x in)": f"{dense.out_features}x{dense.in_features}",
        "tokens": x.shape[0],
        "dtype": str(x.dtype).removeprefix("torch."),
        "backend": label,
    }
    try:
        sparse = SparseLinear.from_linear(dense, backend=backend)
        sparse_ms = {phase: _time_phase(phase, sparse, x, repeats) for phase in dense_ms}
    except Exception as error:  # cannot run this shape/dtype/device, or a kernel failed
        # A RuntimeError is the backends' "cannot run this layer"; anything else (e.g. a
        # Triton compile error) is named, and costs one row, not the whole benchmark.
        note = first_line(error, with_type=True)
        if isinstance(error, RuntimeError):
            note = note.removeprefix("RuntimeError: ")
        return [{**base, "phase": "all", "note": note}]
    note = ""
    running = sparse.backend.running
    if running is not sparse.backend:  # auto: the decision it made
        base["backend"] += f" -> {running.name}"
        note = f"kernels {running.kernels.describe()}"
    return [
        {
            **base,
            "phase": phase,
            "dense_ms": dense_ms[phase],
            "slope_ms": sparse_ms[phase],
            "slope/dense": sparse_ms[phase] / dense_ms[phase],
            "dense/slope": dense_ms[phase] / sparse_ms[phase],
            "note": note,
        }
        for phase in dense_ms
    ]


COLUMNS = [
    "shape (out x in)",
    "tokens",
    "dtype",
    "phase",
    "backend",
    "dense_ms",
    "slope_ms",
    "slope/dense",
    "dense/slope",
    "note",
]
