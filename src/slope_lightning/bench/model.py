"""Whole-model benchmarks: one training step, and inference (prefill and decode), dense vs
SLoPe, measured side by side in one run on the current device.

On CPU these measure the ``reference`` backend and are labelled so: bookkeeping overhead, not
a sparse speedup. The dynamic transposable 2:4 baseline (a dense master weight re-pruned every
step with ``torch._sparse_semi_structured_tile``) needs CUDA and is not measured here yet.
"""

from __future__ import annotations

from typing import Any

import torch

from slope_lightning.bench.common import median_seconds
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import add_adapters, merge_for_inference, sparsify


def _build(preset: str, method: str, backend: str, dtype: torch.dtype, device: str, **overrides):
    torch.manual_seed(0)
    config = TransformerConfig.from_name(preset, **overrides)
    model = Transformer(config)
    if method != "dense":
        sparsify(model, backend=backend)
    return model.to(device=device, dtype=dtype), config


def step_rows(
    preset: str = "tiny",
    batch: int = 8,
    backend: str = "reference",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    compile_model: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Median time of forward + backward + AdamW step, dense vs SLoPe."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    times = {}
    for method in ("dense", "slope"):
        model, config = _build(preset, method, backend, dtype, device, **overrides)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
        forward = torch.compile(model) if compile_model else model

        def step(forward=forward, optimizer=optimizer, idx=idx) -> None:
            _, loss = forward(idx, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times[method] = median_seconds(step, repeats, warmup=2)
        rows.append(
            {
                "preset": preset,
                "method": method if method == "dense" else f"slope ({backend})",
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "compiled": compile_model,
                "tokens/step": batch * config.seq_len,
                "step_ms": times[method] * 1e3,
                "tokens_per_s": batch * config.seq_len / times[method],
            }
        )
    for row in rows:
        row["speedup_vs_dense"] = times["dense"] / (row["step_ms"] / 1e3)
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
        model, config = _build(preset, method, backend, dtype, device, **overrides)
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
]
INFERENCE_COLUMNS = [
    "preset",
    "method",
    "device",
    "prefill_ms",
    "prefill_speedup",
    "decode_tokens_per_s",
]
