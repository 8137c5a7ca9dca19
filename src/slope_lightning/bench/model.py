"""Whole-model benchmarks: one training step, and inference (prefill and decode), measured
side by side in one run on the current device.

The step benchmark compares the three training methods of :mod:`slope_lightning.bench.methods`:
dense, SLoPe and the dynamic transposable 2:4 baseline (a dense master weight re-pruned after
every optimizer step with ``torch._sparse_semi_structured_tile``, as torchao's semi-sparse
training did), each eager and, if asked, under ``torch.compile``. On CPU these measure the
``reference`` kernels (dense GEMMs on masked weights) and are labelled so: bookkeeping
overhead, not a sparse speedup.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from slope_lightning.bench.common import median_seconds
from slope_lightning.bench.methods import METHODS, build_model
from slope_lightning.sparse import TransposableSparseLinear, add_adapters, merge_for_inference

logger = logging.getLogger(__name__)


def _method_label(method: str, backend: str, model: torch.nn.Module) -> str:
    """The row label: the method and the kernels it ran (known after the timed steps)."""
    if method == "slope":
        return f"slope ({backend})"
    if method == "transposable":
        layers = [m for m in model.modules() if isinstance(m, TransposableSparseLinear)]
        kernels = sorted({k for layer in layers for k in layer.chosen_kernels})
        kernels = kernels or sorted({layer.kernel for layer in layers})
        return f"transposable ({'+'.join(kernels) or 'no layer'})"
    return method


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def step_rows(
    preset: str = "tiny",
    batch: int = 8,
    backend: str = "reference",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    compile_modes: tuple[bool, ...] = (False,),
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Median time of forward + backward + AdamW step for every method and compile mode.

    Args:
        preset, overrides: the transformer (:meth:`TransformerConfig.from_name`).
        batch: sequences per step.
        backend: SparseLinear backend of the SLoPe rows.
        dtype: parameter dtype of every model.
        repeats: timed steps per row (after 2 warm-up steps, which also compile).
        compile_modes: run each method eager (False) and/or under ``torch.compile`` (True).

    Returns:
        One row per (compile mode, method). A row whose model fails (e.g. does not compile)
        has ``step_ms`` None and the exception's first line in ``note``; the other rows are
        still measured. ``speedup_vs_dense`` compares with the eager dense row,
        ``speedup_vs_dense_same_compile`` with the dense row of the same compile mode.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for compiled in compile_modes:
        for method in METHODS:
            if compiled:
                torch._dynamo.reset()  # fresh caches: earlier models do not count against limits
            model, config = build_model(preset, method, backend, dtype, device, **overrides)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
            forward = torch.compile(model) if compiled else model

            def step(forward=forward, optimizer=optimizer, idx=idx) -> None:
                _, loss = forward(idx, idx)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds, note = None, ""
            try:
                seconds = median_seconds(step, repeats, warmup=2)
            except Exception as error:  # one failing row must not end the whole benchmark
                note = _first_line(error)
                logger.warning(
                    "step %s (%s): failed: %s", method, "compiled" if compiled else "eager", note
                )
            rows.append(
                {
                    "preset": preset,
                    "method": _method_label(method, backend, model),
                    "device": device,
                    "dtype": str(dtype).removeprefix("torch."),
                    "compiled": compiled,
                    "tokens/step": batch * config.seq_len,
                    "step_ms": seconds * 1e3 if seconds is not None else None,
                    "tokens_per_s": batch * config.seq_len / seconds if seconds else None,
                    "note": note,
                    "_method": method,
                }
            )
    dense_ms: dict[bool, float | None] = {}
    for row in rows:
        if row.pop("_method") == "dense":
            dense_ms[row["compiled"]] = row["step_ms"]
    for row in rows:
        ms, eager, same = row["step_ms"], dense_ms.get(False), dense_ms.get(row["compiled"])
        row["speedup_vs_dense"] = eager / ms if eager and ms else None
        row["speedup_vs_dense_same_compile"] = same / ms if same and ms else None
    return rows


@torch.no_grad()
def inference_rows(
    preset: str = "tiny",
    prompt: int = 128,
    new_tokens: int = 16,
    backend: str = "reference",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    ranks: tuple[float, ...] = (0.0, 0.0156, 0.0625),
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Prefill latency and decode tokens/s: dense vs SLoPe merged, at adapter ranks r/d."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    dense_prefill = None
    for method, rank in [("dense", 0.0)] + [("slope", r) for r in ranks]:
        model, config = build_model(preset, method, backend, dtype, device, **overrides)
        if method == "slope":
            if rank > 0:
                add_adapters(model, rank=max(1, round(rank * config.d_model)), seed=0)
            merge_for_inference(model)
        model.eval()
        idx = torch.randint(0, config.vocab_size, (1, prompt), device=device)
        prefill = median_seconds(lambda model=model, idx=idx: model(idx), repeats)
        decode = median_seconds(
            lambda model=model, idx=idx: model.generate(idx, new_tokens, temperature=0.0),
            max(1, repeats // 2),
        )
        dense_prefill = dense_prefill or prefill
        rows.append(
            {
                "preset": preset,
                "method": "dense" if method == "dense" else f"slope merged r={rank:.2%}",
                "device": device,
                "prefill_ms": prefill * 1e3,
                "prefill_speedup": dense_prefill / prefill,
                "decode_tokens_per_s": new_tokens / decode,
            }
        )
    return rows


STEP_COLUMNS = [
    "preset",
    "method",
    "device",
    "dtype",
    "compiled",
    "tokens/step",
    "step_ms",
    "tokens_per_s",
    "speedup_vs_dense",
    "speedup_vs_dense_same_compile",
    "note",
]
INFERENCE_COLUMNS = [
    "preset",
    "method",
    "device",
    "prefill_ms",
    "prefill_speedup",
    "decode_tokens_per_s",
]
