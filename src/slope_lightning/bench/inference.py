"""Whole-model inference benchmark: prefill latency and greedy decode throughput of the dense
model and of SLoPe merged for inference (the fused sparse + low-rank path), at several
adapter ranks, measured side by side in one run on the current device.

On CPU this measures the ``reference`` kernels: the method's overhead, not a sparse speedup.
"""

from __future__ import annotations

from typing import Any

import torch

from slope_lightning.bench.common import Row, RowSink
from slope_lightning.bench.methods import bench_config, method_model
from slope_lightning.models import Transformer
from slope_lightning.sparse import add_adapters, merge_for_inference
from slope_lightning.utils import median_ms

#: Adapter ranks as a share of d_model (r/d), as the SLoPe paper reports them; 0 = no adapter.
DEFAULT_RANKS: tuple[float, ...] = (0.0, 0.0156, 0.0625)


@torch.no_grad()
def inference_rows(
    preset: str = "tiny",
    prompt: int = 128,
    new_tokens: int = 16,
    backend: str = "reference",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    ranks: tuple[float, ...] = DEFAULT_RANKS,
    on_row: RowSink | None = None,
    **overrides: Any,
) -> list[Row]:
    """Prefill latency and decode tokens/s: dense vs SLoPe merged, at adapter ranks r/d.

    Args:
        preset, overrides: the transformer (a model preset or a bench preset, see
            :func:`~slope_lightning.bench.methods.bench_config`).
        prompt: prompt tokens of the one sequence (batch 1) that is prefilled; with
            ``new_tokens`` at most the model's ``seq_len``, so that the decode times the KV
            cache path (one position per token).
        new_tokens: tokens decoded greedily after the prompt.
        backend: SparseLinear backend of the SLoPe rows.
        dtype: parameter dtype.
        repeats: timed prefills per row (decodes: half as many, at least one).
        ranks: adapter ranks as a share of d_model; each gives one SLoPe row.
        on_row: called with each row as soon as it is measured, so a timeout keeps it.

    Returns:
        The dense row first, then one SLoPe row per rank; ``prefill_speedup`` is relative to
        the dense row.

    Raises:
        ValueError: ``prompt + new_tokens`` exceeds the model's ``seq_len``.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_len = bench_config(preset, **overrides).seq_len
    if prompt + new_tokens > seq_len:
        raise ValueError(
            f"prompt {prompt} + new_tokens {new_tokens} exceeds the model's seq_len {seq_len}: "
            "generate would crop the prompt, and the prefill would not time the prompt asked "
            f"for; use --prompt {seq_len - new_tokens} or less"
        )
    rows: list[Row] = []
    dense_prefill: float | None = None
    for method, rank in [("dense", 0.0)] + [("slope", r) for r in ranks]:
        model, config = method_model(preset, method, backend, dtype, device, **overrides)
        if method == "slope":
            if rank > 0:
                add_adapters(model, rank=max(1, round(rank * config.d_model)), seed=0)
            merge_for_inference(model)
        model.eval()
        idx = torch.randint(0, config.vocab_size, (1, prompt), device=device)  # (1, T)

        def prefill_once(model: Transformer = model, idx: torch.Tensor = idx) -> None:
            model(idx)

        def decode_once(model: Transformer = model, idx: torch.Tensor = idx) -> None:
            model.generate(idx, new_tokens, temperature=0.0)

        prefill = median_ms(prefill_once, device, repeats)
        decode = median_ms(decode_once, device, max(1, repeats // 2))
        dense_prefill = dense_prefill or prefill
        row: Row = {
            "preset": preset,
            "method": "dense" if method == "dense" else f"slope merged r={rank:.2%}",
            "device": device,
            "prefill_ms": prefill,
            "prefill_speedup": dense_prefill / prefill,
            "decode_tokens_per_s": new_tokens / (decode / 1e3),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


INFERENCE_COLUMNS = [
    "preset",
    "method",
    "device",
    "prefill_ms",
    "prefill_speedup",
    "decode_tokens_per_s",
]
