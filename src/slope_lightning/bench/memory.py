"""Model-state memory, dense vs SLoPe, counted exactly after one AdamW step (fp32).

Counts parameters, gradients, optimizer state and persistent buffers (not activations),
as the SLoPe paper's memory columns do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import memory_report, sparsify

#: LLaMA-7B projection shapes (d_out, d_in): attention, MLP up/gate, MLP down.
LLAMA_7B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008))


def _state_bytes(model: nn.Module, run_step: Any) -> tuple[int, dict[str, int]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run_step(model)
    optimizer.step()
    report = memory_report(model, optimizer)
    return report.total, report.as_dict()


def layer_rows(shapes=LLAMA_7B_SHAPES, tokens: int = 8) -> list[dict[str, Any]]:
    rows = []
    for d_out, d_in in shapes:
        x = torch.randn(tokens, d_in)

        def run_step(model: nn.Module, x=x) -> None:
            model(x).sum().backward()

        dense_total, _ = _state_bytes(nn.Sequential(nn.Linear(d_in, d_out, bias=False)), run_step)
        sparse_model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
        sparsify(sparse_model)
        sparse_total, parts = _state_bytes(sparse_model, run_step)
        rows.append(
            {
                "model": f"linear {d_out}x{d_in}",
                "dense_MiB": dense_total / 2**20,
                "slope_MiB": sparse_total / 2**20,
                "ratio": sparse_total / dense_total,
                "metadata_MiB": parts["metadata"] / 2**20,
            }
        )
    return rows


def transformer_rows(presets=("tiny", "gpt2-small")) -> list[dict[str, Any]]:
    rows = []
    for preset in presets:
        config = TransformerConfig.from_name(preset)
        idx = torch.randint(0, config.vocab_size, (1, 16))

        def run_step(model: nn.Module, idx=idx) -> None:
            _, loss = model(idx, idx)
            loss.backward()

        torch.manual_seed(0)
        dense_total, _ = _state_bytes(Transformer(config), run_step)
        torch.manual_seed(0)
        sparse_model = Transformer(config)
        report = sparsify(sparse_model)
        sparse_total, parts = _state_bytes(sparse_model, run_step)
        rows.append(
            {
                "model": f"transformer {preset} ({len(report.converted)} sparse layers)",
                "dense_MiB": dense_total / 2**20,
                "slope_MiB": sparse_total / 2**20,
                "ratio": sparse_total / dense_total,
                "metadata_MiB": parts["metadata"] / 2**20,
            }
        )
    return rows


COLUMNS = ["model", "dense_MiB", "slope_MiB", "ratio", "metadata_MiB"]
