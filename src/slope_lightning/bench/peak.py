"""Peak training and inference memory of every method of
:data:`~slope_lightning.bench.methods.METHODS` (:func:`peak_rows`).

On CUDA: the caching allocator's peak over one step. On CPU there is no allocator peak counter,
so the rows hold an exact count instead, labelled as such: model state plus the tensors autograd
saves for backward (training), model state plus merged inference caches (inference).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from slope_lightning.bench.common import Row, RowSink, default_device, emit
from slope_lightning.bench.counting import StorageCounter, kernels_used, state_tensors
from slope_lightning.bench.methods import METHODS, method_model
from slope_lightning.sparse import memory_report, merge_for_inference, sparse_layers

#: What a peak row's ``memory_MiB`` means; a CPU count never reads as a GPU peak.
MEASURE_CUDA = "allocator peak (CUDA)"
MEASURE_CPU_TRAIN = "state + saved activations (exact count, CPU)"
MEASURE_CPU_INFER = "model state + merged caches (exact count, CPU; activations not counted)"


def _release(device: torch.device) -> None:
    """Free what the previous measurement left, so it does not inflate the next peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#: One step of a phase, measured under the CUDA allocator's peak counter.
Step = Callable[[], None]


def _cuda_peak_mib(device: torch.device, step: Step) -> float:
    """The caching allocator's peak over one ``step()``, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)  # a sync point: the peak is read after the step ends
    return torch.cuda.max_memory_allocated(device) / 2**20


def _training_peak(model: nn.Module, idx: Tensor) -> tuple[Row, Step]:
    """One warm-up AdamW step (counted exactly), and the step to measure on CUDA."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        _, loss = model(idx, idx)
        assert loss is not None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Warm-up step: builds the optimizer state and kernel caches; counts saved activations,
    # model state left out after the forward (a freshly derived M_C is the layers' own).
    with StorageCounter() as counter:
        _, loss = model(idx, idx)
    assert loss is not None
    saved = counter.bytes_excluding(state_tensors(model))
    del counter  # it holds the saved storages alive: none may remain for the measured step
    loss.backward()
    optimizer.step()
    state = memory_report(model, optimizer).total  # with gradients, before zero_grad
    optimizer.zero_grad(set_to_none=True)
    del loss
    row: Row = {
        "state_MiB": state / 2**20,
        "saved_activations_MiB": saved / 2**20,
        "measure": MEASURE_CPU_TRAIN,
        "memory_MiB": (state + saved) / 2**20,
    }
    return row, step


@torch.no_grad()
def _inference_peak(model: nn.Module, idx: Tensor) -> tuple[Row, Step]:
    """One prefill forward in eval mode (SLoPe merged), after one warm-up forward."""
    model.eval()
    if sparse_layers(model):
        merge_for_inference(model)
    model(idx)  # warm-up: builds the fused inference caches
    state = memory_report(model).total  # parameters, buffers, merged caches; no grads
    row: Row = {
        "state_MiB": state / 2**20,
        "saved_activations_MiB": None,
        "measure": MEASURE_CPU_INFER,
        "memory_MiB": state / 2**20,
    }

    @torch.no_grad()
    def step() -> None:
        model(idx)

    return row, step


def _peak(
    phase: Callable[[nn.Module, Tensor], tuple[Row, Step]],
    preset: str,
    method: str,
    batch: int,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    overrides: dict[str, Any],
    precision: str | None = None,
) -> Row:
    """One phase's row for one method: the exact counts everywhere, the allocator's peak over
    the phase's step on CUDA."""
    model, config = method_model(
        preset, method, backend, dtype, device, precision=precision, **overrides
    )
    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)  # (B, T)
    row, step = phase(model, idx)
    if device.type == "cuda":
        row["measure"] = MEASURE_CUDA
        row["memory_MiB"] = _cuda_peak_mib(device, step)
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
    dev = default_device(device)
    if seq_len is not None:
        overrides = {**overrides, "seq_len": seq_len}
    ordered = ["dense", *(m for m in methods if m != "dense")]
    phases: tuple[tuple[str, Callable[[nn.Module, Tensor], tuple[Row, Step]]], ...] = (
        ("training", _training_peak),
        ("inference", _inference_peak),
    )
    rows: list[Row] = []
    for preset in presets:
        for phase, measure in phases:
            dense_mib = None
            for method in ordered:
                _release(dev)
                measured = _peak(
                    measure, preset, method, batch, backend, dtype, dev, overrides, precision
                )
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
                emit(rows, row, on_row)
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
