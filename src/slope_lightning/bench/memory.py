"""Model state of dense vs SLoPe (:func:`layer_rows`, :func:`transformer_rows`): parameters,
gradients, optimizer state and persistent buffers counted exactly after one AdamW step (fp32),
not activations, as the SLoPe paper's memory columns do.

The other memory suites live beside it: peak training and inference memory of every method in
:mod:`~slope_lightning.bench.peak`, per-rank state under FSDP2 and saved activations with
activation checkpointing in :mod:`~slope_lightning.bench.sharded` (run by :func:`main`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from slope_lightning.bench.common import Row, RowSink, default_device, emit
from slope_lightning.bench.sharded import (
    CHECKPOINTING_COLUMNS,
    FSDP_COLUMNS,
    checkpointing_rows,
    fsdp_rows,
)
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import memory_report, sparsify
from slope_lightning.utils import machine_info

#: LLaMA-7B projection shapes (d_out, d_in): attention, MLP up/gate, MLP down.
LLAMA_7B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008))


def _state_bytes(
    model: nn.Module, run_step: Callable[[nn.Module], None]
) -> tuple[int, dict[str, int]]:
    """Model-state bytes (total, by category) after one AdamW step of ``run_step``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run_step(model)
    optimizer.step()
    report = memory_report(model, optimizer)
    return report.total, report.as_dict()


def _state_row(model: str, dense: int, sparse: int, parts: dict[str, int]) -> Row:
    """One row of :data:`COLUMNS` from the two models' state bytes."""
    return {
        "model": model,
        "dense_MiB": dense / 2**20,
        "slope_MiB": sparse / 2**20,
        "ratio": sparse / dense,
        "metadata_MiB": parts["metadata"] / 2**20,
    }


def layer_rows(
    shapes: Iterable[tuple[int, int]] = LLAMA_7B_SHAPES,
    tokens: int = 8,
    device: str | torch.device | None = None,
    on_row: RowSink | None = None,
) -> list[Row]:
    """Model state of one linear layer per shape (fp32, AdamW), dense vs SLoPe."""
    dev = default_device(device)
    rows: list[Row] = []
    for d_out, d_in in shapes:
        x = torch.randn(tokens, d_in, device=dev)

        def run_step(model: nn.Module, x: Tensor = x) -> None:
            model(x).sum().backward()

        with torch.device(dev):
            dense_model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
            sparse_model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
        dense_total, _ = _state_bytes(dense_model, run_step)
        del dense_model
        sparsify(sparse_model)
        sparse_total, parts = _state_bytes(sparse_model, run_step)
        emit(rows, _state_row(f"linear {d_out}x{d_in}", dense_total, sparse_total, parts), on_row)
    return rows


def transformer_rows(
    presets: Iterable[str] = ("tiny", "gpt2-small"),
    device: str | torch.device | None = None,
    on_row: RowSink | None = None,
) -> list[Row]:
    """Model state of whole transformers (fp32, AdamW), dense vs SLoPe (``sparsify``)."""
    dev = default_device(device)
    rows: list[Row] = []
    for preset in presets:
        config = TransformerConfig.from_name(preset)
        idx = torch.randint(0, config.vocab_size, (1, 16), device=dev)

        def run_step(model: nn.Module, idx: Tensor = idx) -> None:
            _, loss = model(idx, idx)
            loss.backward()

        torch.manual_seed(0)
        with torch.device(dev):
            dense_total, _ = _state_bytes(Transformer(config), run_step)
            torch.manual_seed(0)
            sparse_model = Transformer(config)
        report = sparsify(sparse_model)
        sparse_total, parts = _state_bytes(sparse_model, run_step)
        emit(
            rows,
            _state_row(
                f"transformer {preset} ({len(report.converted)} sparse layers)",
                dense_total,
                sparse_total,
                parts,
            ),
            on_row,
        )
    return rows


COLUMNS = ["model", "dense_MiB", "slope_MiB", "ratio", "metadata_MiB"]


def main(argv: list[str] | None = None) -> None:
    """``python -m slope_lightning.bench.memory {fsdp,checkpointing}``: per-rank FSDP2 model
    state on CPU processes, or the saved activations with and without activation
    checkpointing; writes ``memory-fsdp-cpu-count`` or ``memory-checkpointing-cpu-count``
    (JSON + markdown) under ``--out``, naming the machine, torch version, date and command."""
    from slope_lightning.bench.common import ResultsTable

    parser = argparse.ArgumentParser(prog="python -m slope_lightning.bench.memory")
    parser.add_argument("suite", choices=["fsdp", "checkpointing"])
    parser.add_argument("--presets", default="tiny,gpt2-small")
    parser.add_argument("--world", type=int, default=2, help="fsdp: processes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    info = machine_info(
        "python -m slope_lightning.bench.memory "
        + shlex.join(sys.argv[1:] if argv is None else argv)
    )
    presets = tuple(args.presets.split(","))
    if args.suite == "fsdp":
        info["processes"] = f"{args.world} (gloo, FSDP2 fully_shard per block and root)"
        table = ResultsTable("memory-fsdp-cpu-count", args.out, info, FSDP_COLUMNS, "ratio")
        fsdp_rows(presets, args.world, args.batch, on_row=table.add, seq_len=args.seq_len)
    else:
        name = "memory-checkpointing-cpu-count"
        table = ResultsTable(name, args.out, info, CHECKPOINTING_COLUMNS, "vs_no_checkpointing")
        checkpointing_rows(presets, args.batch, args.seq_len, on_row=table.add)
    print(table.close(plot=False))


if __name__ == "__main__":
    main()
