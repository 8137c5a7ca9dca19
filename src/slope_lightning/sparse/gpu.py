"""GPU backends: 2:4 sparse GEMMs through PyTorch's cuSPARSELt and CUTLASS operators.

The forward Y = X W_Rᵀ and the input gradient dX = dY W_RC each run as one sparse GEMM with
the sparse operand on the left, as the kernels require: Yᵀ = W_R Xᵀ and dXᵀ = W_RCᵀ dYᵀ.
The compressed W_R and W_RCᵀ are cached per layer and rebuilt only when the values change
(an optimizer step) or M_C is refreshed. Tall weights can be cut into square row tiles, as
in the SLoPe paper (cuSPARSELt is slow on "upsample" shapes); whether that pays is measured,
not assumed (see ``AutoBackend``).

Status: written against the operator schemas of torch 2.11-2.13 and tested on CPU with
emulated kernels (padding, tiling, caching, dispatch); not yet measured on a GPU.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from slope_lightning.sparse.backends import (
    OperandCache,
    ReferenceBackend,
    SparseBackend,
    double_pruned_transpose,
)
from slope_lightning.sparse.kernel_ops import (
    KernelChoices,
    add_bias,
    derive_col_index,
    kernels_unavailable,
    measure_kernels,
)
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.timing import time_ms

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeLimits:
    """Multiples the kernels need: rows and cols of the sparse operand, rows of the dense one."""

    sparse_rows: int
    sparse_cols: int
    dense_rows: int


class SemiStructuredOps(Protocol):
    """The two kernel calls a 2:4 backend needs; swapped for an emulation in CPU tests."""

    name: str
    limits: dict[torch.dtype, ShapeLimits]

    def unsupported_gpu(self, capability: tuple[int, int]) -> str | None:
        """Why the kernels cannot run on a GPU of this compute capability (None if they can)."""

    def compress(self, dense: Tensor) -> Any:
        """Compress a 2:4-sparse (rows, cols) tensor (pruned along cols)."""

    def matmul(self, packed: Any, x: Tensor, rows: int) -> Tensor:
        """x @ denseᵀ for x of shape (T, cols), T a multiple of dense_rows: (T, rows)."""


class CuSparseLtOps:
    """cuSPARSELt via ``torch._cslt_compress`` / ``torch._cslt_sparse_mm``.

    The algorithm id is searched once per (device, rows, cols, tokens, dtype) for the whole
    process (every layer of one shape shares it: a search runs dozens of GEMMs) and cached.
    """

    name = "cusparselt"
    limits: ClassVar[dict[torch.dtype, ShapeLimits]] = {
        torch.float16: ShapeLimits(16, 16, 8),
        torch.bfloat16: ShapeLimits(16, 16, 8),
    }
    #: Searched algorithm ids, shared by every instance (one per layer under ``auto``).
    alg_ids: ClassVar[dict[tuple[Hashable, ...], int]] = {}

    def unsupported_gpu(self, capability: tuple[int, int]) -> str | None:
        if capability < (8, 0):
            return "cusparselt needs an sm80+ GPU (Ampere or newer)"
        if not torch.backends.cusparselt.is_available():
            return "this torch build has no cuSPARSELt"
        return None

    def compress(self, dense: Tensor) -> Any:
        return torch._cslt_compress(dense.contiguous())

    def matmul(self, packed: Any, x: Tensor, rows: int) -> Tensor:
        key = (str(x.device), rows, x.shape[1], x.shape[0], x.dtype)
        alg_id = self.alg_ids.get(key)
        if alg_id is None:
            # torch 2.11-2.13: returns an int (deprecated in favour of
            # torch._C._cusparselt.mm_search, which also returns split-k settings).
            try:
                alg_id = int(torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True))
            except RuntimeError as error:  # keep cuSPARSELt's default algorithm
                logger.warning("cusparselt algorithm search failed for %s: %s", key, error)
                alg_id = 0
            self.alg_ids[key] = alg_id
        return torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=alg_id)


class CutlassOps:
    """CUTLASS via PyTorch's semi-structured conversion and ``_sparse_semi_structured_mm``."""

    name = "cutlass"
    limits: ClassVar[dict[torch.dtype, ShapeLimits]] = {
        torch.float16: ShapeLimits(32, 64, 8),
        torch.bfloat16: ShapeLimits(32, 64, 8),
    }

    def unsupported_gpu(self, capability: tuple[int, int]) -> str | None:
        # PyTorch builds its CUTLASS 2:4 GEMM for sm8x only; Hopper (sm90) and later fail at
        # run time (pytorch/pytorch#132928, #132009): use cusparselt there.
        if capability[0] != 8:
            major, minor = capability
            return (
                f"PyTorch's CUTLASS 2:4 kernels run on sm80-sm89 only, this GPU is sm{major}{minor}"
            )
        return None

    def compress(self, dense: Tensor) -> Any:
        from torch.sparse._semi_structured_conversions import (
            sparse_semi_structured_from_dense_cutlass,
        )

        return sparse_semi_structured_from_dense_cutlass(dense.contiguous())

    def matmul(self, packed: Any, x: Tensor, rows: int) -> Tensor:
        values, meta = packed
        return torch._sparse_semi_structured_mm(values, meta, x.t()).t()  # (T, rows)


def row_tiles(rows: int, cols: int, tile: bool) -> list[tuple[int, int]]:
    """Row ranges [start, stop) cutting a (rows, cols) operand into square-ish tiles.

    Without ``tile`` (or when rows <= cols) one range covers everything.
    """
    if not tile or rows <= cols:
        return [(0, rows)]
    return [(start, min(start + cols, rows)) for start in range(0, rows, cols)]


class SemiStructuredBackend(SparseBackend):
    """2:4 sparse forward and input-gradient GEMMs; the weight gradient stays a dense GEMM.

    Args:
        ops: the kernels (cuSPARSELt or CUTLASS).
        tile_forward: cut W_R (d_out, d_in) into square row tiles when d_out > d_in.
        tile_backward: cut W_RCᵀ (d_in, d_out) likewise when d_in > d_out.
        require_cuda: refuse non-CUDA tensors (False only for tests with emulated kernels).
        kernels: which steps run as Triton kernels (see ``sparse.kernel_ops``).
    """

    def __init__(
        self,
        ops: SemiStructuredOps,
        tile_forward: bool = False,
        tile_backward: bool = False,
        require_cuda: bool = True,
        kernels: KernelChoices | None = None,
    ) -> None:
        super().__init__(kernels)
        self.ops = ops
        self.tile_forward = tile_forward
        self.tile_backward = tile_backward
        self.require_cuda = require_cuda
        suffix = "+tiled" if tile_forward or tile_backward else ""
        self.name = f"{ops.name}{suffix}"

    def unsupported(self, layout: NMLayout, dtype: torch.dtype, device: torch.device) -> str | None:
        if (layout.n, layout.m) != (2, 4):
            return f"{self.ops.name} runs 2:4 only, not {layout.n}:{layout.m}"
        if self.require_cuda:
            if device.type != "cuda":
                return f"{self.ops.name} needs a CUDA tensor, got {device}"
            why = self.ops.unsupported_gpu(torch.cuda.get_device_capability(device))
            if why is not None:
                return why
        limits = self.ops.limits.get(dtype)
        if limits is None:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in self.ops.limits)
            return f"{self.ops.name} computes in {allowed}, not {dtype} (use bf16 autocast)"
        operands = [
            (layout.rows, layout.cols, self.tile_forward),
            (layout.cols, layout.rows, self.tile_backward),
        ]
        for rows, cols, tile in operands:
            for start, stop in row_tiles(rows, cols, tile):
                if (stop - start) % limits.sparse_rows or cols % limits.sparse_cols:
                    return (
                        f"{self.ops.name} needs sparse operands with rows a multiple of "
                        f"{limits.sparse_rows} and cols a multiple of {limits.sparse_cols}; "
                        f"this layer has a {stop - start}x{cols} operand"
                    )
        return None

    def _compressed(self, dense: Tensor, tile: bool) -> list[tuple[int, int, Any]]:
        rows, cols = dense.shape
        return [
            (start, stop, self.ops.compress(dense[start:stop]))
            for start, stop in row_tiles(rows, cols, tile)
        ]

    def _apply(self, tiles: list[tuple[int, int, Any]], x: Tensor) -> Tensor:
        """x @ operandᵀ over all tiles, with the token dimension padded for the kernels."""
        tokens = x.shape[0]
        multiple = self.ops.limits[x.dtype].dense_rows
        pad = (-tokens) % multiple
        x_padded = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
        parts = [self.ops.matmul(packed, x_padded, stop - start) for start, stop, packed in tiles]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out[:tokens] if pad else out

    def forward(
        self,
        x: Tensor,
        values: Tensor,
        row_index: Tensor,
        bias: Tensor | None,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        cache = cache if cache is not None else OperandCache()

        def build() -> list[tuple[int, int, Any]]:
            return self._compressed(layout.to_dense(values, row_index), self.tile_forward)

        tiles = cache.get(f"{self.name}:forward", key, build)
        y = self._apply(tiles, x)  # (T, d_out)
        return add_bias(y, bias, self.kernels.bias_add)

    def grad_input(
        self,
        grad_out: Tensor,
        values: Tensor,
        row_index: Tensor,
        col_index: Tensor,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        cache = cache if cache is not None else OperandCache()

        def build() -> list[tuple[int, int, Any]]:
            weight_rc_t = double_pruned_transpose(values, row_index, col_index, layout)
            return self._compressed(weight_rc_t, self.tile_backward)  # W_RCᵀ: 2:4 along d_out

        tiles = cache.get(f"{self.name}:backward", key, build)
        return self._apply(tiles, grad_out)  # (T, d_in)


def default_autotune_file() -> Path:
    """Where ``auto`` keeps its measured choices (``SLOPE_AUTOTUNE_FILE`` overrides)."""
    override = os.environ.get("SLOPE_AUTOTUNE_FILE")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "slope_lightning" / "autotune.json"


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens``: ``auto`` decides once per bucket, so a batch
    of 2000 tokens reuses the measurement made at 1500, while decoding one token at a time
    (where a dense GEMM usually wins) gets its own."""
    return 1 << max(0, tokens - 1).bit_length()


class AutoBackend(SparseBackend):
    """Per layer: time every candidate on the real shape and keep the fastest.

    Candidates are the 2:4 backends (tiled or not) that support the layer, and the dense
    GEMM on the masked weight (``reference``): where sparse loses, the layer still trains
    SLoPe-sparse, with dense GEMMs. On CUDA it then times each Triton kernel of
    ``slope_kernels`` against the torch composition it replaces and keeps the faster
    (``kernel_ops.measure_kernels``).

    A decision is made at the first call for each operand shape (the training weight, or the
    merged [W_R; Lᵀ] of inference), dtype and token bucket (:func:`token_bucket`), and cached
    on disk keyed by device name, torch version, shape, dtype and bucket. ``choices`` holds
    every decision; ``choice``, ``kernels`` and ``reason`` describe the latest.
    """

    name = "auto"

    def __init__(
        self,
        candidates: list[SparseBackend],
        autotune_file: Path | None = None,
        repeats: int = 10,
    ) -> None:
        self.candidates = candidates
        self.autotune_file = autotune_file or default_autotune_file()
        self.repeats = repeats
        self.choices: dict[tuple[int, int, torch.dtype, int], SparseBackend] = {}
        self.choice: SparseBackend | None = None
        self.reason = "not chosen yet (decided at the first forward)"
        self.kernel_reason = "not chosen yet"

    @staticmethod
    def _decision(layout: NMLayout, x: Tensor) -> tuple[int, int, torch.dtype, int]:
        """What one decision covers: operand shape, dtype and token bucket."""
        return (layout.rows, layout.cols, x.dtype, token_bucket(x.shape[0]))

    @property
    def kernels(self) -> KernelChoices:  # type: ignore[override]
        """The running decision's kernel choices (all torch before the first forward)."""
        return self.choice.kernels if self.choice is not None else KernelChoices()

    def _key(self, layout: NMLayout, x: Tensor) -> str:
        device = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
        shape = f"{layout.rows}x{layout.cols}"
        bucket = token_bucket(x.shape[0])
        return f"{device}|torch {torch.__version__}|{shape}|{x.dtype}|T<={bucket}"

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.autotune_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save(self, table: dict[str, Any]) -> None:
        self.autotune_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.autotune_file.with_suffix(f".{os.getpid()}.tmp")  # one per DDP rank
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(self.autotune_file)

    def _time(self, backend: SparseBackend, args: tuple[Tensor, ...], layout: NMLayout) -> float:
        x, values, row_index, col_index, grad = args
        cache = OperandCache()

        def run() -> None:
            backend.forward(x, values, row_index, None, layout, cache, 0)
            backend.grad_input(grad, values, row_index, col_index, layout, cache, 0)

        return time_ms(run, x.device, self.repeats)  # the untimed first call builds the cache

    def _choose_kernels(self, layout: NMLayout, x: Tensor, table: dict[str, Any]) -> KernelChoices:
        """Triton kernel or torch composition per step, measured on CUDA and cached."""
        why_not = kernels_unavailable(x.device)
        if why_not is not None:
            self.kernel_reason = f"torch everywhere: {why_not}"
            return KernelChoices()
        key = self._key(layout, x) + "|kernels"
        cached = table.get(key)
        known = {field.name for field in fields(KernelChoices)}
        if (
            isinstance(cached, dict)
            and set(cached) == known
            and set(cached.values())
            <= {
                "torch",
                "triton",
            }
        ):
            self.kernel_reason = f"cached measurement ({self.autotune_file})"
            return KernelChoices(**cached)
        choices, times = measure_kernels(layout, x.dtype, x.device, tokens=x.shape[0])
        self.kernel_reason = "measured " + ", ".join(
            f"{step} torch {t['torch']:.3f} / triton {t['triton']:.3f} ms"
            for step, t in times.items()
        )
        table[key] = choices.as_dict()
        return choices

    def _choose(
        self, x: Tensor, values: Tensor, row_index: Tensor, col_index: Tensor, layout: NMLayout
    ) -> SparseBackend:
        usable: dict[str, SparseBackend] = {"reference": ReferenceBackend()}
        skipped = []
        for candidate in self.candidates:
            why = candidate.unsupported(layout, x.dtype, x.device)
            if why is None:
                usable[candidate.name] = candidate
            else:
                skipped.append(f"{candidate.name}: {why}")
        key = self._key(layout, x)
        table = self._load()
        before = dict(table)
        if table.get(key) in usable:
            self.reason = f"cached measurement ({self.autotune_file})"
            best = table[key]
        elif len(usable) == 1:
            self.reason = "dense GEMM on the masked weight; " + "; ".join(skipped)
            best = "reference"
        else:
            grad = torch.randn(x.shape[0], layout.rows, dtype=x.dtype, device=x.device)
            args = (x.detach(), values.detach(), row_index, col_index, grad)
            times = {name: self._time(backend, args, layout) for name, backend in usable.items()}
            best = min(times, key=times.__getitem__)
            self.reason = "measured " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())
            table[key] = best
        chosen = copy.copy(usable[best])  # its own kernel choices; ops and name are shared
        chosen.kernels = self._choose_kernels(layout, x, table)
        if table != before:
            self._save(table)
        logger.info(
            "auto backend for %dx%d: %s (%s); kernels %s (%s)",
            layout.rows,
            layout.cols,
            best,
            self.reason,
            chosen.kernels.describe(),
            self.kernel_reason,
        )
        return chosen

    def forward(
        self,
        x: Tensor,
        values: Tensor,
        row_index: Tensor,
        bias: Tensor | None,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        decision = self._decision(layout, x)
        chosen = self.choices.get(decision)
        if chosen is None:
            # M_C for timing the backward: derived from W_R as the layer derives it.
            col_index = derive_col_index(values, row_index, layout, "torch")
            chosen = self.choices[decision] = self._choose(x, values, row_index, col_index, layout)
        self.choice = chosen  # the decision running now: reports, kernels and grad_values
        return chosen.forward(x, values, row_index, bias, layout, cache, key)

    def grad_input(
        self,
        grad_out: Tensor,
        values: Tensor,
        row_index: Tensor,
        col_index: Tensor,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        chosen = self._decided(layout, grad_out, "grad_input")
        return chosen.grad_input(grad_out, values, row_index, col_index, layout, cache, key)

    def grad_values(
        self, grad_out: Tensor, x: Tensor, row_index: Tensor, layout: NMLayout
    ) -> Tensor:
        return self._decided(layout, grad_out, "grad_values").grad_values(
            grad_out, x, row_index, layout
        )

    def _decided(self, layout: NMLayout, grad_out: Tensor, what: str) -> SparseBackend:
        """The decision the forward of this operand and token count made."""
        chosen = self.choices.get(self._decision(layout, grad_out))
        if chosen is None:
            raise RuntimeError(
                f"auto backend: {what} for {grad_out.shape[0]} tokens of a "
                f"{layout.rows}x{layout.cols} operand before any forward of that size"
            )
        return chosen


def make_gpu_backend(name: str) -> SparseBackend:
    """The GPU backend called ``name``: "cusparselt", "cutlass" (each optionally "+tiled")
    or "auto"."""
    tiled = name.endswith("+tiled")
    ops = {"cusparselt": CuSparseLtOps, "cutlass": CutlassOps}.get(name.removesuffix("+tiled"))
    if ops is not None:
        return SemiStructuredBackend(ops(), tile_forward=tiled, tile_backward=tiled)
    if name == "auto":
        cslt = CuSparseLtOps()
        return AutoBackend(
            [
                SemiStructuredBackend(cslt),
                SemiStructuredBackend(cslt, tile_forward=True, tile_backward=True),
                SemiStructuredBackend(CutlassOps()),
            ]
        )
    raise ValueError(
        f"unknown GPU backend {name!r}; choose cusparselt, cutlass (each optionally +tiled) or auto"
    )
