"""Memory of dense vs SLoPe (and the transposable 2:4 baseline), two ways.

1. Model state (:func:`layer_rows`, :func:`transformer_rows`): parameters, gradients, optimizer
   state and persistent buffers counted exactly after one AdamW step (fp32), not activations,
   as the SLoPe paper's memory columns do.
2. Peak training and inference memory (:func:`peak_rows`) for every method of
   :data:`~slope_lightning.bench.methods.METHODS`. On CUDA: the caching allocator's peak over
   one step. On CPU there is no allocator peak counter, so the rows hold an exact count
   instead, labelled as such: model state plus the tensors autograd saves for backward
   (training), model state plus merged inference caches (inference).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slope_lightning.baselines import TransposableSparseLinear
from slope_lightning.bench.common import Row, RowSink
from slope_lightning.bench.methods import METHODS, build_model
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import SparseLinear, memory_report, merge_for_inference, sparsify
from slope_lightning.sparse.memory import local_part

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


def _default_device(device: str | torch.device | None) -> torch.device:
    """CUDA when available: building and pruning billion-parameter models on the CPU takes
    minutes. Byte counts do not depend on the device."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _emit(rows: list[Row], row: Row, on_row: RowSink | None) -> None:
    """Keep ``row`` and hand it to ``on_row`` at once (a timeout then keeps it)."""
    rows.append(row)
    if on_row is not None:
        on_row(row)


def layer_rows(
    shapes: Iterable[tuple[int, int]] = LLAMA_7B_SHAPES,
    tokens: int = 8,
    device: str | torch.device | None = None,
    on_row: RowSink | None = None,
) -> list[Row]:
    """Model state of one linear layer per shape (fp32, AdamW), dense vs SLoPe."""
    dev = _default_device(device)
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
        row: Row = {
            "model": f"linear {d_out}x{d_in}",
            "dense_MiB": dense_total / 2**20,
            "slope_MiB": sparse_total / 2**20,
            "ratio": sparse_total / dense_total,
            "metadata_MiB": parts["metadata"] / 2**20,
        }
        _emit(rows, row, on_row)
    return rows


def transformer_rows(
    presets: Iterable[str] = ("tiny", "gpt2-small"),
    device: str | torch.device | None = None,
    on_row: RowSink | None = None,
) -> list[Row]:
    """Model state of whole transformers (fp32, AdamW), dense vs SLoPe (``sparsify``)."""
    dev = _default_device(device)
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
        row: Row = {
            "model": f"transformer {preset} ({len(report.converted)} sparse layers)",
            "dense_MiB": dense_total / 2**20,
            "slope_MiB": sparse_total / 2**20,
            "ratio": sparse_total / dense_total,
            "metadata_MiB": parts["metadata"] / 2**20,
        }
        _emit(rows, row, on_row)
    return rows


COLUMNS = ["model", "dense_MiB", "slope_MiB", "ratio", "metadata_MiB"]


# ------------------------------------------------------------------------------------------
# Peak training and inference memory
# ------------------------------------------------------------------------------------------

#: What a peak row's ``memory_MiB`` means; a CPU count never reads as a GPU peak.
MEASURE_CUDA = "allocator peak (CUDA)"
MEASURE_CPU_TRAIN = "state + saved activations (exact count, CPU)"
MEASURE_CPU_INFER = "model state + merged caches (exact count, CPU; activations not counted)"


class SavedTensorCounter:
    """Counts the bytes of the tensors autograd saves for backward inside a ``with`` block.

    Each piece of memory is counted once: tensors are keyed by their untyped storage (a view,
    a reshape or a tensor saved twice shares one), and the whole storage is counted, since
    a saved view keeps all of it alive. Storages in ``exclude`` (e.g. the model's parameters
    and buffers, already counted as model state) are left out. Only ``save_for_backward`` is
    seen: tensors a custom autograd Function keeps as plain ``ctx`` attributes are not.

    Example:
        >>> x = torch.randn(4, 4, requires_grad=True)
        >>> with SavedTensorCounter() as saved:
        ...     y = (x * x).sum()
        >>> saved.total  # x saved twice by mul, counted once
        64
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude: set[int] = set(exclude or ())
        self.storages: dict[int, int] = {}  # storage data_ptr -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key != 0 and key not in self.exclude and tensor.device.type != "meta":
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        return tensor  # saved as usual: counting must not change what backward sees

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    @property
    def total(self) -> int:
        """Bytes of distinct saved storages."""
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def state_storages(model: nn.Module) -> set[int]:
    """Storage addresses of ``model``'s parameters and buffers (what model state counts)."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


def kernels_used(model: nn.Module) -> str:
    """Which GEMMs the sparse layers ran: SLoPe's backend (``auto``'s choice once made) and
    the transposable layers' kernels; ``"dense"`` for a model without sparse layers."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            names.add(module.backend.running.name)
        elif isinstance(module, TransposableSparseLinear):
            names.update(module.chosen_backends)
    return ",".join(sorted(names)) or "dense"


def _release(device: torch.device) -> None:
    """Free what the previous measurement left, so it does not inflate the next peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _training_peak(
    preset: str,
    method: str,
    batch: int,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    overrides: dict[str, Any],
    precision: str | None = None,
) -> dict[str, Any]:
    """One warm-up AdamW step (counted exactly) and, on CUDA, one step under the peak counter."""
    model, config = build_model(
        preset, method, backend, dtype, device, precision=precision, **overrides
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)  # (B, T)

    # Warm-up step: builds the optimizer state and kernel caches; counts saved activations.
    with SavedTensorCounter(exclude=state_storages(model)) as saved:
        _, loss = model(idx, idx)
    assert loss is not None
    loss.backward()
    optimizer.step()
    state = memory_report(model, optimizer).total  # with gradients, before zero_grad
    optimizer.zero_grad(set_to_none=True)
    del loss
    row: dict[str, Any] = {
        "state_MiB": state / 2**20,
        "saved_activations_MiB": saved.total / 2**20,
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _, loss = model(idx, idx)
        assert loss is not None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)  # a sync point: the peak is read after the step ends
        row["measure"] = MEASURE_CUDA
        row["memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["measure"] = MEASURE_CPU_TRAIN
        row["memory_MiB"] = (state + saved.total) / 2**20
    row["tokens"] = batch * config.seq_len
    row["kernels"] = kernels_used(model)
    return row


@torch.no_grad()
def _inference_peak(
    preset: str,
    method: str,
    batch: int,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    overrides: dict[str, Any],
    precision: str | None = None,
) -> dict[str, Any]:
    """One prefill forward in eval mode (SLoPe merged), after one warm-up forward."""
    model, config = build_model(
        preset, method, backend, dtype, device, precision=precision, **overrides
    )
    model.eval()
    if method == "slope":
        merge_for_inference(model)
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)  # (B, T)
    model(idx)  # warm-up: builds the fused inference caches
    state = memory_report(model).total  # parameters, buffers, merged caches; no grads
    row: dict[str, Any] = {"state_MiB": state / 2**20, "saved_activations_MiB": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(idx)
        torch.cuda.synchronize(device)
        row["measure"] = MEASURE_CUDA
        row["memory_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["measure"] = MEASURE_CPU_INFER
        row["memory_MiB"] = state / 2**20
    row["tokens"] = batch * config.seq_len
    row["kernels"] = kernels_used(model)
    return row


def peak_rows(
    presets: tuple[str, ...] = ("tiny",),
    methods: tuple[str, ...] = METHODS,
    batch: int = 1,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    backend: str = "reference",
    on_row: RowSink | None = None,
    precision: str | None = None,
    **overrides: Any,
) -> list[Row]:
    """Peak training and inference memory of each method, with ratios vs dense (same run).

    Training: one AdamW step (forward, backward, step, zero_grad) on (batch, seq_len) tokens.
    Inference: one prefill forward under ``torch.no_grad`` in eval mode, SLoPe merged
    (:func:`~slope_lightning.sparse.merge_for_inference`). On CUDA ``memory_MiB`` is
    ``torch.cuda.max_memory_allocated`` over the measured step; on CPU it is the exact count
    named in the ``measure`` column. ``state_MiB`` and ``saved_activations_MiB`` are the
    exact counts on either device.

    Args:
        presets: :meth:`TransformerConfig.from_name` presets.
        methods: names from :data:`~slope_lightning.bench.methods.METHODS`; ``"dense"`` is
            measured first (added if missing) as the base of ``vs_dense``.
        batch: sequences per step.
        seq_len: tokens per sequence, also the model's context (``TransformerConfig.seq_len``,
            which sizes GPT-2's position table); None keeps the preset's.
        dtype: parameter dtype.
        device: where to measure; None picks CUDA when available.
        backend: SparseLinear backend for ``slope`` (the ``kernels`` column says what ran).
        on_row: called with each row as soon as it is measured, so a timeout keeps it.
        precision: train as the configs do (e.g. ``bf16-mixed``, see
            :data:`~slope_lightning.bench.methods.PRECISIONS`); replaces ``dtype``.
        overrides: TransformerConfig fields to change (e.g. ``n_layer=1``).

    Raises:
        ValueError: an unknown method or a non-positive batch or seq_len.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if batch < 1 or (seq_len is not None and seq_len < 1):
        raise ValueError(f"batch and seq_len must be positive, got {batch} and {seq_len}")
    dev = _default_device(device)
    if seq_len is not None:
        overrides = {**overrides, "seq_len": seq_len}
    ordered = ["dense", *(m for m in methods if m != "dense")]
    phases: tuple[tuple[str, Callable[..., Row]], ...] = (
        ("training", _training_peak),
        ("inference", _inference_peak),
    )
    rows: list[Row] = []
    for preset in presets:
        for phase, measure in phases:
            dense_mib = None
            for method in ordered:
                _release(dev)
                measured = measure(preset, method, batch, backend, dtype, dev, overrides, precision)
                dense_mib = dense_mib or measured["memory_MiB"]
                row: Row = {
                    "preset": preset,
                    "phase": phase,
                    "method": method,
                    "device": dev.type,
                    "dtype": precision or str(dtype).removeprefix("torch."),
                    **measured,
                    "vs_dense": measured["memory_MiB"] / dense_mib,
                }
                _emit(rows, row, on_row)
    _release(dev)
    return rows


PEAK_COLUMNS = [
    "preset",
    "phase",
    "method",
    "kernels",
    "device",
    "dtype",
    "tokens",
    "measure",
    "memory_MiB",
    "vs_dense",
    "state_MiB",
    "saved_activations_MiB",
]


# ------------------------------------------------------------------------------------------
# Per-rank model state under FSDP2
# ------------------------------------------------------------------------------------------

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


def _module_state_bytes(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of ``modules``' parameters, buffers, gradients and optimizer state
    (a DTensor counted by its local shard, as :func:`memory_report` does)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Tensor | None) -> None:
        nonlocal total
        if tensor is None:
            return
        local = local_part(tensor)
        if local.numel() and local.data_ptr() not in seen:
            seen.add(local.data_ptr())
            total += local.numel() * local.element_size()

    for module in modules:
        for param in module.parameters():
            add(param)
            add(param.grad)
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor):
                    add(value)
        for buffer in module.buffers():
            add(buffer)
    return total


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
            model, config = build_model(preset, method, **overrides)
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
            layers = _module_state_bytes((named[n] for n in sparse_names), optimizer)
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
    dist.destroy_process_group()


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
            _emit(rows, row, on_row)
    return rows


# ------------------------------------------------------------------------------------------
# Activation checkpointing
# ------------------------------------------------------------------------------------------

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
    from torch.distributed._composable import checkpoint

    if seq_len is not None:
        overrides = {**overrides, "seq_len": seq_len}
    rows: list[Row] = []
    for preset in presets:
        without: int | None = None
        for checkpointed in (False, True):
            model, config = build_model(preset, "slope", **overrides)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            saved = SavedTensorCounter(exclude=state_storages(model))
            handles = []
            if checkpointed:

                def keep_input(
                    module: nn.Module, args: tuple[Any, ...], saved: SavedTensorCounter = saved
                ) -> None:
                    for arg in args:
                        if isinstance(arg, Tensor) and arg.requires_grad:
                            saved._pack(arg)  # what a checkpointed block holds on to

                for block in model.blocks:
                    checkpoint(block)
                    handles.append(block.register_forward_pre_hook(keep_input))
            idx = torch.randint(0, config.vocab_size, (batch, config.seq_len))  # (B, T)
            with saved:
                _, loss = model(idx, idx)
            assert loss is not None
            loss.backward()
            optimizer.step()
            state = memory_report(model, optimizer).total
            for handle in handles:
                handle.remove()
            without = without or saved.total
            row: Row = {
                "preset": preset,
                "method": "slope + activation checkpointing" if checkpointed else "slope",
                "tokens": batch * config.seq_len,
                "saved_activations_MiB": saved.total / 2**20,
                "vs_no_checkpointing": saved.total / without,
                "state_MiB": state / 2**20,
                "memory_MiB": (state + saved.total) / 2**20,
            }
            _emit(rows, row, on_row)
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m slope_lightning.bench.memory {fsdp,checkpointing}``: per-rank FSDP2 model
    state on CPU processes, or the saved activations with and without activation
    checkpointing; writes ``memory-fsdp-cpu-count`` or ``memory-checkpointing-cpu-count``
    (JSON + markdown) under ``--out``, naming the machine, torch version, date and command."""
    from slope_lightning.bench.common import ResultsTable, machine_info

    parser = argparse.ArgumentParser(prog="python -m slope_lightning.bench.memory")
    parser.add_argument("suite", choices=["fsdp", "checkpointing"])
    parser.add_argument("--presets", default="tiny,gpt2-small")
    parser.add_argument("--world", type=int, default=2, help="fsdp: processes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    info = machine_info()
    info["command"] = "python -m slope_lightning.bench.memory " + shlex.join(
        sys.argv[1:] if argv is None else argv
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
