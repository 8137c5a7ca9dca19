"""Memory of SLoPe under FSDP2 (per-rank model state, :func:`fsdp_rows`) and with activation
checkpointing (saved activations, :func:`checkpointing_rows`), counted exactly on CPU
processes; ``python -m slope_lightning.bench.memory {fsdp,checkpointing}`` runs them.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from slope_lightning.bench.common import Row, RowSink, emit
from slope_lightning.bench.counting import StorageCounter, module_state_bytes, state_tensors
from slope_lightning.bench.methods import method_model
from slope_lightning.models import checkpoint_blocks
from slope_lightning.sparse import memory_report

FSDP_COLUMNS = [
    "preset",
    "world",
    "rank",
    "dense_MiB",
    "slope_MiB",
    "ratio",
    "dense_sparse_layers_MiB",
    "slope_sparse_layers_MiB",
    "sparse_layers_ratio",
    "metadata_MiB",
]


def end_rank() -> NoReturn:
    """End one spawned rank once its results are written: meet every rank, destroy the
    process group, and exit the process at once.

    Python's interpreter finalisation can destroy a gloo process group whose worker threads
    are still joinable (a DeviceMesh or DTensor still holds it), and the process then aborts
    with "terminate called without an active exception" although its work is done (the
    failure mode of pytorch/pytorch#65231). ``os._exit`` skips that finalisation; everything
    the rank had to write is written and closed before it is called.
    """
    import sys

    import torch.distributed as dist

    dist.barrier()  # no rank tears its connections down while another still reads
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fsdp_rank(
    rank: int,
    world: int,
    port: int,
    presets: tuple[str, ...],
    batch: int,
    overrides: dict[str, Any],
    out: str,
) -> None:
    """One rank of :func:`fsdp_rows`: dense and SLoPe, each sharded per block then at the
    root (as :class:`~slope_lightning.module.SLoPeModule` does), one AdamW step, counted."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slope_lightning.sparse import sparse_layers

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for preset in presets:
        measured: dict[str, tuple[int, int, int]] = {}
        sparse_names: list[str] = []
        for method in ("slope", "dense"):
            model, config = method_model(preset, method, **overrides)
            if method == "slope":
                sparse_names = [name for name, _ in sparse_layers(model)]
                for _, layer in sparse_layers(model):
                    layer.hold_masks_as_parameters()
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, config.vocab_size, (batch, config.seq_len))  # (B, T)
            _, loss = model(idx, idx)
            assert loss is not None
            loss.backward()
            optimizer.step()
            report = memory_report(model, optimizer)
            named = dict(model.named_modules())
            layers = module_state_bytes((named[n] for n in sparse_names), optimizer)
            measured[method] = (report.total, layers, report.bytes["metadata"])
            del model, optimizer, loss
        dense, dense_layers, _ = measured["dense"]
        slope, slope_layers, metadata = measured["slope"]
        rows.append(
            {
                "preset": preset,
                "world": world,
                "rank": rank,
                "dense_MiB": dense / 2**20,
                "slope_MiB": slope / 2**20,
                "ratio": slope / dense,
                "dense_sparse_layers_MiB": dense_layers / 2**20,
                "slope_sparse_layers_MiB": slope_layers / 2**20,
                "sparse_layers_ratio": slope_layers / dense_layers,
                "metadata_MiB": metadata / 2**20,
            }
        )
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    end_rank()


def fsdp_rows(
    presets: Iterable[str] = ("tiny",),
    world: int = 2,
    batch: int = 1,
    on_row: RowSink | None = None,
    **overrides: Any,
) -> list[Row]:
    """Per-rank model state of dense vs SLoPe under FSDP2 on ``world`` CPU processes (gloo).

    Each model is sharded as :class:`~slope_lightning.module.SLoPeModule` shards it (every
    block, then the root; SLoPe's packed masks with its values) and takes one fp32 AdamW
    step on (batch, seq_len) tokens; each rank then counts its own parameters, gradients,
    AdamW state and buffers (a DTensor by its local shard). ``*_sparse_layers_*`` count only
    the layers SLoPe makes sparse (their dense ``nn.Linear`` twins for dense): the share the
    method changes. Rows come one per rank, rank order.

    Args:
        presets: :meth:`TransformerConfig.from_name` presets.
        world: processes (FSDP2 shards over all of them).
        batch: sequences per step (per rank).
        on_row: called with each row as soon as the processes finish.
        overrides: TransformerConfig fields to change (e.g. ``seq_len=256``).
    """
    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as out:
        args = (world, port, tuple(presets), batch, overrides, out)
        mp.spawn(_fsdp_rank, args=args, nprocs=world)
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    for preset_rows in zip(*per_rank, strict=True):
        for row in preset_rows:
            emit(rows, row, on_row)
    return rows


CHECKPOINTING_COLUMNS = [
    "preset",
    "method",
    "tokens",
    "saved_activations_MiB",
    "vs_no_checkpointing",
    "state_MiB",
    "memory_MiB",
]


def checkpointing_rows(
    presets: Iterable[str] = ("tiny",),
    batch: int = 1,
    seq_len: int | None = None,
    on_row: RowSink | None = None,
    **overrides: Any,
) -> list[Row]:
    """Saved activations of one SLoPe training step without and with activation
    checkpointing per block (non-reentrant, as ``SLoPeModule(activation_checkpointing=True)``
    applies it), counted exactly on CPU.

    Inside a checkpointed block nothing is saved for the backward (it is recomputed); what a
    checkpointed block keeps is its input, which is counted here too (autograd's hooks do
    not see it). ``memory_MiB`` is model state plus saved activations.
    """
    if seq_len is not None:
        overrides = {**overrides, "seq_len": seq_len}
    rows: list[Row] = []
    for preset in presets:
        without: int | None = None
        for checkpointed in (False, True):
            model, config = method_model(preset, "slope", **overrides)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            counter = StorageCounter()
            handles = []
            if checkpointed:

                def keep_input(
                    module: nn.Module, args: tuple[Any, ...], counter: StorageCounter = counter
                ) -> None:
                    for arg in args:
                        if isinstance(arg, Tensor) and arg.requires_grad:
                            counter.add(arg)  # what a checkpointed block holds on to

                checkpoint_blocks(model.blocks)
                for block in model.blocks:
                    handles.append(block.register_forward_pre_hook(keep_input))
            idx = torch.randint(0, config.vocab_size, (batch, config.seq_len))  # (B, T)
            with counter:
                _, loss = model(idx, idx)
            assert loss is not None
            for handle in handles:
                handle.remove()
            # Model state left out after the forward: a freshly derived M_C is the layers'.
            saved = counter.bytes_excluding(state_tensors(model))
            loss.backward()
            optimizer.step()
            state = memory_report(model, optimizer).total
            without = without or saved
            row: Row = {
                "preset": preset,
                "method": "slope + activation checkpointing" if checkpointed else "slope",
                "tokens": batch * config.seq_len,
                "saved_activations_MiB": saved / 2**20,
                "vs_no_checkpointing": saved / without,
                "state_MiB": state / 2**20,
                "memory_MiB": (state + saved) / 2**20,
            }
            emit(rows, row, on_row)
    return rows
