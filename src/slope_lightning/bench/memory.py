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

import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from slope_lightning.baselines import TransposableSparseLinear
from slope_lightning.bench.common import Row, RowSink
from slope_lightning.bench.methods import METHODS, build_model
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import SparseLinear, memory_report, merge_for_inference, sparsify

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
) -> dict[str, Any]:
    """One warm-up AdamW step (counted exactly) and, on CUDA, one step under the peak counter."""
    model, config = build_model(
        preset, method, backend=backend, dtype=dtype, device=device, **overrides
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
) -> dict[str, Any]:
    """One prefill forward in eval mode (SLoPe merged), after one warm-up forward."""
    model, config = build_model(
        preset, method, backend=backend, dtype=dtype, device=device, **overrides
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
                measured = measure(preset, method, batch, backend, dtype, dev, overrides)
                dense_mib = dense_mib or measured["memory_MiB"]
                row: Row = {
                    "preset": preset,
                    "phase": phase,
                    "method": method,
                    "device": dev.type,
                    "dtype": str(dtype).removeprefix("torch."),
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
