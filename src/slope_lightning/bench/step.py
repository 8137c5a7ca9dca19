"""Whole-model training step benchmark: forward + backward + AdamW step of dense, SLoPe and
the dynamic transposable 2:4 baseline, measured side by side in one run on the current device.

The methods are those of :mod:`slope_lightning.bench.methods`: the transposable baseline keeps
a dense master weight re-pruned after every optimizer step with
``torch._sparse_semi_structured_tile``, as torchao's semi-sparse training did. Each runs eager
and, if asked, under ``torch.compile``. On CPU these measure the ``reference`` kernels (dense
GEMMs on masked weights) and are labelled so: bookkeeping overhead, not a sparse speedup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from slope_lightning.baselines import TransposableSparseLinear
from slope_lightning.bench.common import Row, RowSink
from slope_lightning.bench.methods import METHODS, method_model
from slope_lightning.utils import first_line, median_ms

logger = logging.getLogger(__name__)


def _method_label(method: str, backend: str, model: torch.nn.Module) -> str:
    """The row label: the method and the kernels it ran (known after the timed steps)."""
    if method == "slope":
        return f"slope ({backend})"
    if method == "transposable":
        layers = [m for m in model.modules() if isinstance(m, TransposableSparseLinear)]
        kernels = sorted({k for layer in layers for k in layer.chosen_backends})
        kernels = kernels or sorted({layer.backend for layer in layers})
        return f"transposable ({'+'.join(kernels) or 'no layer'})"
    return method


def step_rows(
    preset: str = "tiny",
    batch: int = 8,
    backend: str = "reference",
    precision: str = "32-true",
    repeats: int = 5,
    compile_modes: tuple[bool, ...] = (False,),
    on_row: RowSink | None = None,
    compile_backend: str = "inductor",
    **overrides: Any,
) -> list[Row]:
    """Median time of forward + backward + AdamW step for every method and compile mode.

    Args:
        preset, overrides: the transformer (a model preset or a bench preset, see
            :func:`~slope_lightning.bench.methods.bench_config`).
        batch: sequences per step.
        backend: SparseLinear backend of the SLoPe rows.
        precision: how every model trains (:data:`~slope_lightning.bench.methods.PRECISIONS`):
            ``bf16-mixed`` is what the configs run on a GPU (fp32 master values and AdamW
            state, bf16 autocast forward).
        repeats: timed steps per row (after 2 warm-up steps, which also compile).
        compile_modes: run each method eager (False) and/or under ``torch.compile`` (True).
        compile_backend: ``torch.compile``'s backend ("inductor"; "eager" traces the graphs
            without generating code, for the CPU dry run of the GPU check).
        on_row: called with each row as soon as it is measured (e.g.
            :meth:`~slope_lightning.bench.common.ResultsTable.add`), so a timeout keeps it.

    Returns:
        One row per (compile mode, method). A row whose model fails (e.g. does not compile)
        has ``step_ms`` None and the exception's first line in ``note``; the other rows are
        still measured. ``speedup_vs_dense`` compares with the eager dense row,
        ``speedup_vs_dense_same_compile`` with the dense row of the same compile mode (dense
        runs first in each mode, so both are known when a row is emitted).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[Row] = []
    dense_ms: dict[bool, float | None] = {}
    for compiled in compile_modes:
        for method in METHODS:
            if compiled:
                torch._dynamo.reset()  # fresh caches: earlier models do not count against limits
            model, config = method_model(
                preset, method, backend, device=device, precision=precision, **overrides
            )
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
            forward = torch.compile(model, backend=compile_backend) if compiled else model

            def step(
                forward: Callable[..., Any] = forward,
                optimizer: torch.optim.Optimizer = optimizer,
                idx: torch.Tensor = idx,
            ) -> None:
                _, loss = forward(idx, idx)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            ms: float | None = None
            note = ""
            try:
                ms = median_ms(step, device, repeats, warmup=2)
            except Exception as error:  # one failing row must not end the whole benchmark
                note = first_line(error, with_type=True)
                logger.warning(
                    "step %s (%s): failed: %s", method, "compiled" if compiled else "eager", note
                )
            if method == "dense":
                dense_ms[compiled] = ms
            tokens = batch * config.seq_len
            eager, same = dense_ms.get(False), dense_ms.get(compiled)
            row: Row = {
                "preset": preset,
                "method": _method_label(method, backend, model),
                "device": device,
                "precision": precision,
                "compiled": compiled,
                "tokens/step": tokens,
                "step_ms": ms,
                "tokens_per_s": tokens / (ms / 1e3) if ms else None,
                "note": note,
                "speedup_vs_dense": eager / ms if eager and ms else None,
                "speedup_vs_dense_same_compile": same / ms if same and ms else None,
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
            del model, optimizer, forward, step  # free this model before building the next
    return rows


STEP_COLUMNS = [
    "preset",
    "method",
    "device",
    "precision",
    "compiled",
    "tokens/step",
    "step_ms",
    "tokens_per_s",
    "speedup_vs_dense",
    "speedup_vs_dense_same_compile",
    "note",
]
