"""Every call into PyTorch's private 2:4 sparse operators, behind one small interface.

``torch._cslt_*`` (cuSPARSELt) and ``torch._sparse_semi_structured_*`` (CUTLASS and the 4×4
tile pruner) are private and their schemas move between torch releases; nothing else in the
library calls them. Three implementations of :class:`SemiStructuredOps`:

- :class:`CuSparseLtOps`: cuSPARSELt (sm80+).
- :class:`CutlassOps`: PyTorch's CUTLASS 2:4 GEMM (sm80-sm89 only).
- :class:`EmulatedOps`: dense torch math with the kernels' shape rules asserted, on any
  device and dtype. It is a first-class choice (``backend="emulated"``), like torchao's
  ``KernelPreference.EMULATED``: CPU CI runs the GPU backends' logic (compression caches,
  padding, tiling, dispatch) end to end through it.

Written against the operator schemas of torch 2.11-2.14.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from slope_lightning.sparse.layout import NMLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeLimits:
    """Multiples the kernels need: rows and cols of the sparse operand, rows of the dense one."""

    sparse_rows: int
    sparse_cols: int
    dense_rows: int


class SemiStructuredOps(Protocol):
    """The calls a 2:4 backend makes: compress a pruned operand, multiply by it."""

    name: str
    limits: ClassVar[dict[torch.dtype, ShapeLimits]]
    #: Whether the operators need CUDA tensors (False only for the emulation).
    needs_cuda: bool
    #: Whether :meth:`matmul` adds a bias in its epilogue (else the caller adds it).
    fuses_bias: bool

    def unsupported_gpu(self, capability: tuple[int, int]) -> str | None:
        """Why the kernels cannot run on a GPU of this compute capability (None if they can)."""
        ...

    def compress(self, dense: Tensor) -> Any:
        """Compress a 2:4-sparse (rows, cols) tensor (pruned along cols)."""
        ...

    def matmul(self, packed: Any, x: Tensor, rows: int, bias: Tensor | None = None) -> Tensor:
        """x @ denseᵀ (+ bias) for x of shape (T, cols), T a multiple of dense_rows: (T, rows).

        ``bias`` (rows,) is only passed where :attr:`fuses_bias` is True.
        """
        ...


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens``: a measurement made for one token count is
    reused for every count of its bucket (a batch of 2000 tokens reuses the one made at
    1500), while decoding one token at a time gets its own."""
    return 1 << max(0, tokens - 1).bit_length()


@dataclass(frozen=True)
class AlgorithmChoice:
    """What cuSPARSELt's algorithm search returns: the algorithm and its split-k settings."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1


#: cuSPARSELt's own choice (what ``_cslt_sparse_mm`` runs without search results).
DEFAULT_ALGORITHM = AlgorithmChoice()


def search_algorithm(packed: Any, dense: Tensor) -> AlgorithmChoice:
    """cuSPARSELt's fastest algorithm for ``packed @ dense`` with ``transpose_result=True``.

    Uses ``torch._C._cusparselt.mm_search`` (torch >= 2.6; 2.11 and 2.13 included), which
    returns (alg_id, split_k, split_k_mode, max_alg_id) and takes its arguments by position
    only: (compressed_A, dense_B, bias, alpha, out_dtype, transpose_result). Without it, the
    deprecated ``torch._cslt_sparse_mm_search``, which returns the algorithm id alone.
    """
    binding = getattr(torch._C, "_cusparselt", None)
    mm_search = getattr(binding, "mm_search", None)
    if mm_search is None:
        return AlgorithmChoice(
            int(torch._cslt_sparse_mm_search(packed, dense, transpose_result=True))
        )
    alg_id, split_k, split_k_mode, *_ = mm_search(packed, dense, None, None, None, True)
    return AlgorithmChoice(int(alg_id), int(split_k), int(split_k_mode))


def sparse_mm_arguments(choice: AlgorithmChoice) -> dict[str, Any]:
    """The keyword arguments of ``torch._cslt_sparse_mm`` that run ``choice``.

    Read against the installed schema: the split-k arguments are passed only where it has
    them (a torch without them runs the algorithm with cuSPARSELt's default split-k).
    """
    arguments: dict[str, Any] = {"alg_id": choice.alg_id}
    if _takes_split_k():
        arguments |= {"split_k": choice.split_k, "split_k_mode": choice.split_k_mode}
    return arguments


@functools.cache
def _takes_split_k() -> bool:
    """Whether the installed ``_cslt_sparse_mm`` has the split-k arguments: read from its
    schema once per process, not at every GEMM."""
    names = {argument.name for argument in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    return {"split_k", "split_k_mode"} <= names


@dataclass
class AlgorithmCache:
    """cuSPARSELt algorithm choices, searched once per (device, rows, cols, dtype, token bucket).

    A search runs dozens of GEMMs, and every layer of one shape shares its result, so the one
    instance, :data:`ALGORITHM_IDS`, lives for the process: a memo of a pure measurement, not
    state that changes results (every algorithm computes the same product). The token count
    is bucketed (:func:`token_bucket`), so a new prompt length reuses its bucket's search.
    """

    choices: dict[tuple[Hashable, ...], AlgorithmChoice] = field(default_factory=dict)
    searches: int = 0

    @staticmethod
    def key(x: Tensor, rows: int) -> tuple[Hashable, ...]:
        return (str(x.device), rows, x.shape[1], x.dtype, token_bucket(x.shape[0]))

    def get(self, packed: Any, x: Tensor, rows: int) -> AlgorithmChoice:
        """The bucket's choice for ``packed @ x.t()``, searched now if it has none."""
        key = self.key(x, rows)
        choice = self.choices.get(key)
        if choice is None:
            self.searches += 1
            try:
                choice = search_algorithm(packed, x.t())
            except RuntimeError as error:  # keep cuSPARSELt's default algorithm
                logger.warning("cusparselt algorithm search failed for %s: %s", key, error)
                choice = DEFAULT_ALGORITHM
            self.choices[key] = choice
        return choice

    def demote(self, x: Tensor, rows: int, error: Exception) -> None:
        """Use the default algorithm for this bucket from now on: its searched choice failed
        at another token count of the bucket."""
        key = self.key(x, rows)
        logger.warning(
            "cusparselt: the searched algorithm %s failed for %s (%s); using the default",
            self.choices.get(key),
            key,
            error,
        )
        self.choices[key] = DEFAULT_ALGORITHM


#: The process-wide algorithm memo (see :class:`AlgorithmCache`).
ALGORITHM_IDS = AlgorithmCache()

_HALF_LIMITS = {torch.float16: ShapeLimits(16, 16, 8), torch.bfloat16: ShapeLimits(16, 16, 8)}


class CuSparseLtOps:
    """cuSPARSELt via ``torch._cslt_compress`` / ``torch._cslt_sparse_mm``."""

    name = "cusparselt"
    needs_cuda = True
    fuses_bias = True
    limits: ClassVar[dict[torch.dtype, ShapeLimits]] = _HALF_LIMITS

    def unsupported_gpu(self, capability: tuple[int, int]) -> str | None:
        if capability < (8, 0):
            return "cusparselt needs an sm80+ GPU (Ampere or newer)"
        if not torch.backends.cusparselt.is_available():
            return "this torch build has no cuSPARSELt"
        return None

    def compress(self, dense: Tensor) -> Any:
        return torch._cslt_compress(dense.contiguous())

    def matmul(self, packed: Any, x: Tensor, rows: int, bias: Tensor | None = None) -> Tensor:
        choice = ALGORITHM_IDS.get(packed, x, rows)
        try:
            return self._sparse_mm(packed, x, bias, choice)
        except RuntimeError as error:  # a choice searched at another count of the bucket
            if choice == DEFAULT_ALGORITHM:
                raise
            ALGORITHM_IDS.demote(x, rows, error)
            return self._sparse_mm(packed, x, bias, DEFAULT_ALGORITHM)

    @staticmethod
    def _sparse_mm(packed: Any, x: Tensor, bias: Tensor | None, choice: AlgorithmChoice) -> Tensor:
        # The bias is added per row of W x = per output feature, in the GEMM's epilogue.
        arguments = {"bias": bias, "transpose_result": True, **sparse_mm_arguments(choice)}
        return torch._cslt_sparse_mm(packed, x.t(), **arguments)


class CutlassOps:
    """CUTLASS via PyTorch's semi-structured conversion and ``_sparse_semi_structured_mm``."""

    name = "cutlass"
    needs_cuda = True
    fuses_bias = False
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

    def matmul(self, packed: Any, x: Tensor, rows: int, bias: Tensor | None = None) -> Tensor:
        values, meta = packed
        return torch._sparse_semi_structured_mm(values, meta, x.t()).t()  # (T, rows)


class EmulatedOps:
    """cuSPARSELt's contract in plain torch, on any device and floating dtype.

    ``compress`` checks that the operand really is 2:4 along its columns and that its shape
    meets cuSPARSELt's multiples, then stores it compressed as the library does: the kept
    values plus 2 bits of position per value (our packed N:M format), so a compressed
    operand costs the same bytes as cuSPARSELt's and memory counted on CPU is exact.
    ``matmul`` checks the token padding and multiplies through a transient dense copy. A bug
    in the backends' padding, tiling or double pruning therefore fails here, on CPU, exactly
    where it would fail (or silently mis-compute) on a GPU. ``compressed_shapes`` records
    every operand compressed, for tests of caching and tiling.

    Args:
        fuses_bias: True: cuSPARSELt's contract (the bias in the GEMM's epilogue); False:
            CUTLASS's (the caller adds it).
    """

    name = "emulated"
    needs_cuda = False
    limits: ClassVar[dict[torch.dtype, ShapeLimits]] = {
        dtype: ShapeLimits(16, 16, 8)
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    }

    def __init__(self, fuses_bias: bool = True) -> None:
        self.fuses_bias = fuses_bias
        self.compressed_shapes: list[tuple[int, int]] = []

    def unsupported_gpu(self, capability: tuple[int, int]) -> str | None:
        return None

    def compress(self, dense: Tensor) -> Any:
        rows, cols = dense.shape
        limits = self.limits[dense.dtype]
        if rows % limits.sparse_rows or cols % limits.sparse_cols:
            raise ValueError(
                f"emulated 2:4 compress: a {rows}x{cols} operand; rows must be a multiple of "
                f"{limits.sparse_rows} and cols of {limits.sparse_cols}"
            )
        kept = (dense != 0).view(rows, cols // 4, 4).sum(-1)  # (rows, groups)
        if bool((kept > 2).any()):
            raise ValueError("emulated 2:4 compress: the operand is not 2:4 along its columns")
        self.compressed_shapes.append((rows, cols))
        layout = NMLayout(rows, cols, 2, 4)
        values, index = layout.prune(dense)  # exact: the operand is already 2:4
        return values, index, layout

    def matmul(self, packed: Any, x: Tensor, rows: int, bias: Tensor | None = None) -> Tensor:
        values, index, layout = packed
        multiple = self.limits[x.dtype].dense_rows
        if x.shape[0] % multiple:
            raise ValueError(
                f"emulated 2:4 matmul: {x.shape[0]} tokens, not padded to a multiple of {multiple}"
            )
        if layout.rows != rows:
            raise ValueError(f"emulated 2:4 matmul: operand has {layout.rows} rows, not {rows}")
        if bias is not None and tuple(bias.shape) != (rows,):
            raise ValueError(f"emulated 2:4 matmul: bias {tuple(bias.shape)}, expected ({rows},)")
        out = x @ layout.to_dense(values, index).t()  # (T, rows); the dense copy is transient
        return out + bias if bias is not None else out


# ---------------------------------------------------------------- the 4×4 tile pruner

#: The pruning algorithm of ``torch._sparse_semi_structured_tile`` that ranks by |w| (its
#: default, "", ranks by signed value).
TILE_ALGORITHM = "largest_abs_values_greedy"


def tile_prune(weight: Tensor, use_cutlass: bool) -> tuple[Tensor, ...]:
    """``torch._sparse_semi_structured_tile`` on a contiguous fp16/bf16 (d_out, d_in) weight.

    Returns (packed, meta, packed_t, meta_t, bitmask): W_s and W_sᵀ packed for CUTLASS
    (``use_cutlass=True``), and the per-tile keep bits that :func:`apply_tile_mask` turns back
    into a dense W_s. Used by the transposable baseline.
    """
    return torch._sparse_semi_structured_tile(
        weight, algorithm=TILE_ALGORITHM, use_cutlass=use_cutlass
    )


def apply_tile_mask(weight: Tensor, bitmask: Tensor) -> Tensor:
    """The dense W_s: ``weight`` with the entries :func:`tile_prune` dropped set to zero."""
    return torch._sparse_semi_structured_apply_dense(weight.contiguous(), bitmask)


def make_ops(name: str) -> SemiStructuredOps:
    """The ops called ``name``: "cusparselt", "cutlass" or "emulated"."""
    if name == "cusparselt":
        return CuSparseLtOps()
    if name == "cutlass":
        return CutlassOps()
    if name == "emulated":
        return EmulatedOps()
    raise ValueError(f"unknown 2:4 ops {name!r}; choose one of cusparselt, cutlass, emulated")
