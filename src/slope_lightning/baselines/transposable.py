"""The dynamic transposable 2:4 baseline: a dense master weight re-pruned at every step.

Each forward prunes the dense weight W (d_out, d_in) with a *transposable* 2:4 mask, one that
keeps 2 entries per row and 2 per column in every 4×4 tile, so that the pruned W_s is 2:4
along d_in (for the forward Y = X W_sᵀ) and along d_out (for the input gradient dX = dY W_s):
both GEMMs use the same sparse weight. The weight gradient dW = dYᵀ X is dense and flows
straight through to the dense master weight, as in torchao's semi-sparse training (the kind
of baseline torchao shipped until 2026). After Hu et al., "Accelerating Transformer
Pre-training with 2:4 Sparsity" (FST), ICML 2024.

Compared with SLoPe it keeps a dense weight, dense optimizer state, and prunes every step; it
gives no inference speedup (it ends dense).

Backends (the GEMM libraries it runs on):

- ``reference`` (any device, any dtype): the exact transposable mask of
  :func:`transposable_mask` and dense GEMMs on the masked weight.
- ``cutlass`` (CUDA, fp16/bf16, sm80-sm89): ``torch._sparse_semi_structured_tile`` prunes
  4×4 tiles greedily by |w| and packs W_s and W_sᵀ for CUTLASS in one backend;
  ``torch._sparse_semi_structured_mm`` runs both sparse GEMMs.
- ``cusparselt`` (CUDA, fp16/bf16, cuSPARSELt available): the same tile pruning, which packs
  W_s and W_sᵀ for cuSPARSELt in the same call (``use_cutlass=False``, as torchao trains),
  multiplied by ``torch._cslt_sparse_mm``. Where that packing cannot be used (sizes not
  multiples of 128, or a cuSPARSELt whose layout it does not match: checked once per device
  and dtype), W_s is applied densely and W_s and W_sᵀ are compressed by
  ``torch._cslt_compress``.
- ``auto``: per layer and compute dtype, at the forward: ``cutlass`` on sm8x, else
  ``cusparselt``, when dtype and shape allow; otherwise ``reference``.

The greedy tile pruning of the GPU kernels may keep fewer than 2 entries in some rows or
columns of a tile (it never keeps more), so their W_s can differ from the exact reference
mask; :meth:`TransposableSparseLinear.sparse_weight` returns the W_s a backend actually uses.

"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slope_lightning.baselines.layers import (
    DenseWeightLinear,
    convert_linears,
    linear_holding,
    linear_rules,
    replace_with_linear,
    straight_through_linear,
)
from slope_lightning.sparse.backends import BackendName, OperandCache
from slope_lightning.sparse.backends.ops import (
    SemiStructuredOps,
    apply_tile_mask,
    make_ops,
    tile_prune,
)
from slope_lightning.sparse.function import compute_dtype_of
from slope_lightning.sparse.layout import check_divisible
from slope_lightning.sparse.selection import LayerRules

logger = logging.getLogger(__name__)

#: The backends of :data:`~slope_lightning.sparse.BackendName` this baseline runs on.
TRANSPOSABLE_BACKENDS: tuple[BackendName, ...] = (
    BackendName.reference,
    BackendName.cutlass,
    BackendName.cusparselt,
    BackendName.auto,
)


def transposable_backend(value: str | BackendName, where: str = "") -> str:
    """The name of ``value`` if this baseline runs on it, else a ValueError naming the allowed
    ones (``where`` prefixes the message, e.g. the layer)."""
    try:
        backend: BackendName | None = BackendName.parse(value)
    except ValueError:
        backend = None
    if backend not in TRANSPOSABLE_BACKENDS:
        raise ValueError(
            f"{where}unknown backend {value!r} for the transposable baseline; choose one of "
            f"{', '.join(b.value for b in TRANSPOSABLE_BACKENDS)}"
        )
    assert backend is not None
    return backend.value


#: Tiles scored per chunk in :func:`transposable_mask` (bounds its (tiles, 90) score matrix).
_TILES_PER_CHUNK = 1 << 16
#: Both dimensions of W must be multiples of this for the GPU kernels: the tile pruner packs
#: 32×64 blocks of W and of Wᵀ, and reads and writes whole blocks without bounds checks.
_GPU_MULTIPLE = 64
#: Both dimensions of W must be multiples of this for the tile pruner's cuSPARSELt packing
#: (its metadata comes in 128×128 blocks, of W and of Wᵀ).
_CUSPARSELT_TILE_MULTIPLE = 128
#: The dense operand's rows (tokens) are padded to a multiple of this for fp16/bf16 kernels.
_TOKEN_MULTIPLE = 8


# ---------------------------------------------------------------------------- the mask


@cache
def _patterns_cpu() -> Tensor:
    """The 90 binary 4×4 matrices with two ones in every row and column, as (90, 16) bool.

    Ordered lexicographically by the rows' kept column pairs, so ties go to the first.
    """
    pairs = list(itertools.combinations(range(4), 2))  # 6 ways to keep 2 of 4 in a row
    patterns = []
    for rows in itertools.product(pairs, repeat=4):
        tile = torch.zeros(4, 4, dtype=torch.bool)
        for r, kept in enumerate(rows):
            tile[r, list(kept)] = True
        if bool((tile.sum(0) == 2).all()):
            patterns.append(tile.flatten())
    return torch.stack(patterns)  # (90, 16)


def transposable_patterns(device: torch.device | str | None = None) -> Tensor:
    """The 90 transposable 2:4 patterns of a 4×4 tile, (90, 16) bool, row-major per tile."""
    return _patterns_cpu().to(device)


def transposable_mask(weight: Tensor) -> Tensor:
    """The transposable 2:4 mask of ``weight`` that keeps the most magnitude.

    In every 4×4 tile exactly 2 entries per row and 2 per column are kept, and among the 90
    such patterns the one with the largest sum of |w| is chosen (exactly: all patterns are
    scored, in float32, by one matmul per chunk of tiles). An exact tie goes to the first
    pattern in :func:`transposable_patterns` order. Works on any device and dtype.

    Args:
        weight: a (rows, cols) tensor; both sizes multiples of 4.

    Returns:
        A bool tensor of ``weight``'s shape, True where an entry is kept.

    Raises:
        ValueError: ``weight`` is not 2-D or a size is not a multiple of 4.
    """
    if weight.dim() != 2:
        raise ValueError(f"transposable_mask needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if rows % 4 or cols % 4:
        raise ValueError(
            f"transposable_mask needs both dimensions divisible by 4 (whole 4×4 tiles), got "
            f"shape {tuple(weight.shape)}; pad the weight or leave this layer dense"
        )
    patterns = transposable_patterns(weight.device)  # (90, 16) bool
    scores_of = patterns.t().to(torch.float32)  # (16, 90)
    tiles = (
        weight.detach()
        .abs()
        .to(torch.float32)
        .reshape(rows // 4, 4, cols // 4, 4)
        .permute(0, 2, 1, 3)
        .reshape(-1, 16)
    )  # (tiles, 16), row-major inside each tile
    with torch.autocast(weight.device.type, enabled=False):  # score in float32, not bf16
        choice = torch.cat(
            [
                (chunk @ scores_of).argmax(dim=1)  # (chunk,): first maximum on ties
                for chunk in tiles.split(_TILES_PER_CHUNK)
            ]
        )
    mask = patterns[choice]  # (tiles, 16)
    return mask.reshape(rows // 4, cols // 4, 4, 4).permute(0, 2, 1, 3).reshape(rows, cols)


# ---------------------------------------------------------------------------- GEMMs


def _pad_tokens(x: Tensor) -> Tensor:
    """x (T, k) with T padded by zero rows to a multiple of 8, as the fp16/bf16 kernels need."""
    pad = (-x.shape[0]) % _TOKEN_MULTIPLE
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _ops(backend: str) -> SemiStructuredOps:
    """SLoPe's own wrappers of the GEMM libraries: the same limits and algorithm search."""
    return make_ops(backend)


def _backend_problem(
    backend: str, d_out: int, d_in: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why ``backend`` cannot run a (d_out, d_in) layer computing in ``dtype``; None if it can."""
    if backend == "reference":
        return None
    if device.type != "cuda":
        return f"{backend} needs a CUDA tensor, got {device}"
    if torch.version.hip is not None:
        return f"{backend}: torch._sparse_semi_structured_tile is not built for ROCm"
    ops = _ops(backend)
    if dtype not in ops.limits:
        return f"{backend} computes in float16 or bfloat16, not {dtype}"
    why = ops.unsupported_gpu(torch.cuda.get_device_capability(device))
    if why is not None:
        return why
    if d_out % _GPU_MULTIPLE or d_in % _GPU_MULTIPLE:
        return (
            f"{backend} needs d_out and d_in to be multiples of {_GPU_MULTIPLE}, "
            f"got d_out={d_out}, d_in={d_in}"
        )
    return None


def _build_operands(backend: str, weight: Tensor, compute_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """What ``backend`` needs of the current weight; rebuilt after every optimizer step.

    reference: (mask,). cutlass: (packed, meta, packed_t, meta_t, bitmask).
    cusparselt: (compressed W_s, compressed W_sᵀ, bitmask).
    """
    with torch.no_grad():
        if backend == "reference":
            return (transposable_mask(weight),)  # (d_out, d_in) bool
        weight_c = weight.detach().to(compute_dtype).contiguous()  # (d_out, d_in)
        if backend == "cutlass":
            return tile_prune(weight_c, use_cutlass=True)
        if _tile_packs_for_cusparselt(weight_c):
            # One kernel prunes and packs W_s (2:4 along d_in) and W_sᵀ (along d_out).
            packed, _, packed_t, _, bitmask = tile_prune(weight_c, use_cutlass=False)
            return packed, packed_t, bitmask
        ops = _ops("cusparselt")
        bitmask = tile_prune(weight_c, use_cutlass=True)[4]  # the mask; its packing unused
        pruned = apply_tile_mask(weight_c, bitmask)  # W_s dense
        return (
            ops.compress(pruned),  # W_s, 2:4 along d_in
            ops.compress(pruned.t().contiguous()),  # W_sᵀ, 2:4 along d_out
            bitmask,
        )


def _tile_packs_for_cusparselt(weight: Tensor) -> bool:
    """Whether the tile pruner's own cuSPARSELt packing can serve ``weight`` (d_out, d_in):
    both sizes multiples of 128, and the packing checked on this device and dtype."""
    rows, cols = weight.shape
    if rows % _CUSPARSELT_TILE_MULTIPLE or cols % _CUSPARSELT_TILE_MULTIPLE:
        return False
    return _tile_packing_checked(weight.device, weight.dtype)


@cache
def _tile_packing_checked(device: torch.device, dtype: torch.dtype) -> bool:
    """:func:`tile_packing_matches` for cuSPARSELt, once per device and dtype (a host sync)."""
    agrees = tile_packing_matches(_ops("cusparselt"), device, dtype)
    if not agrees:
        logger.warning(
            "transposable baseline on %s (%s): the tile pruner's cuSPARSELt packing does not "
            "match this cuSPARSELt; W_s and W_sᵀ are compressed separately instead (slower)",
            device,
            dtype,
        )
    return agrees


def tile_packing_matches(ops: SemiStructuredOps, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._sparse_semi_structured_tile(..., use_cutlass=False)`` packs W_s and W_sᵀ
    as ``ops`` (the installed cuSPARSELt) reads them.

    torch writes that layout from reverse-engineered knowledge and tests it on sm8x only, so
    it is checked before use: on a 256×128 weight of ±1 and ±2, both GEMMs (of ±1 inputs, so
    every product and sum is exact in fp16 and bf16) must give the dense products of the
    kernel's own W_s. A packing of another size gives another shape; an error is a mismatch.
    """
    generator = torch.Generator(device=device).manual_seed(0)

    def signs(*shape: int) -> Tensor:
        sign = torch.randint(0, 2, shape, generator=generator, device=device) * 2 - 1
        return sign.to(dtype)

    scale = torch.randint(1, 3, (256, 128), generator=generator, device=device).to(dtype)
    weight = signs(256, 128) * scale  # (d_out, d_in)
    try:
        packed, _, packed_t, _, bitmask = tile_prune(weight, use_cutlass=False)
        pruned = apply_tile_mask(weight, bitmask).float()  # W_s, (256, 128)
        x, dy = signs(16, 128), signs(16, 256)
        y = ops.matmul(packed, x, 256).float()  # x @ W_sᵀ, (16, 256)
        dx = ops.matmul(packed_t, dy, 128).float()  # dy @ W_s, (16, 128)
        return torch.equal(y, x.float() @ pruned.t()) and torch.equal(dx, dy.float() @ pruned)
    except (RuntimeError, ValueError) as error:  # a kernel's error, a shape the ops refuse
        logger.warning("transposable baseline: the tile pruner's cuSPARSELt packing: %s", error)
        return False


def _sparse_mm(
    backend: str, operands: tuple[Tensor, ...], dense: Tensor, rows: int, transposed: bool
) -> Tensor:  # a SparseMatmul once the backend is bound
    """dense @ W_sᵀ (``transposed=False``) or dense @ W_s (``transposed=True``), 2-D.

    The sparse operand A is the packed W_s (d_out, d_in) or W_sᵀ (d_in, d_out), with ``rows``
    rows; the result is dense @ Aᵀ of shape (T, rows), through SLoPe's own backend wrappers.
    """
    tokens = dense.shape[0]
    # Contiguous first: an incoming gradient may be a stride-0 expand, which no backend takes.
    padded = _pad_tokens(dense.contiguous())  # (T8, k)
    if backend == "cutlass":
        packed, meta, packed_t, meta_t, _ = operands
        operand: Any = (packed_t, meta_t) if transposed else (packed, meta)
    else:  # cusparselt
        operand = operands[1] if transposed else operands[0]
    return _ops(backend).matmul(operand, padded, rows)[:tokens]  # (T, rows)


# ---------------------------------------------------------------------------- the layer


class TransposableSparseLinear(DenseWeightLinear):
    """A drop-in nn.Linear trained with a dynamic transposable 2:4 weight (the FST baseline).

    Holds a dense master ``weight`` (d_out, d_in) Parameter. Every forward uses
    W_s = W ⊙ M(W), M a transposable 2:4 mask. A training forward prunes the current weight
    (the mask and any compressed backend operands live until its backward, nothing longer);
    an evaluation forward keeps them and reuses them until the weight changes (its storage or
    version), and any training forward drops them. So no optimizer, fused ones included, can
    leave a stale mask.

    Args:
        in_features, out_features: d_in and d_out; both must be divisible by 4.
        bias: whether to learn an additive bias.
        backend: "reference" (any device), "cutlass" or "cusparselt" (CUDA, fp16/bf16), or
            "auto" (a GPU backend where one can run, else reference; decided per forward
            device and compute dtype).
        device, dtype: of the new parameters.
        name: the layer's name in its model, used in error messages.

    Example:
        >>> layer = TransposableSparseLinear.from_linear(nn.Linear(64, 32), backend="reference")
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str | BackendName = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "TransposableSparseLinear",
    ) -> None:
        chosen = transposable_backend(backend, f"layer {name!r}: ")
        sizes = {"in_features (d_in)": in_features, "out_features (d_out)": out_features}
        fix = "a transposable 2:4 mask needs whole 4×4 tiles (exclude this layer)"
        check_divisible(name, sizes, 4, "4", fix)
        super().__init__(in_features, out_features, bias, device, dtype, name)
        self.backend = chosen
        self.reset_parameters()
        self._operands = OperandCache()  # mask or compressed W_s / W_sᵀ, per weight version
        self._chosen: dict[tuple[torch.device, torch.dtype], str] = {}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        backend: str | BackendName = "auto",
        name: str = "TransposableSparseLinear",
    ) -> TransposableSparseLinear:
        """Wrap ``linear``'s own weight and bias Parameters (shared, not copied).

        Sharing keeps an optimizer that already holds them valid and costs no memory.
        """
        return cls.wrapping(linear, backend=backend, name=name)

    # ------------------------------------------------------------------ backends and cache

    @torch.compiler.disable
    def backend_for(self, device: torch.device, compute_dtype: torch.dtype) -> str:
        """The backend this layer runs for inputs on ``device`` computing in ``compute_dtype``.

        Raises:
            RuntimeError: an explicitly requested GPU backend cannot run this layer.
        """
        key = (device, compute_dtype)
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        shape = (self.out_features, self.in_features)
        if self.backend == "auto":
            chosen = "reference"
            reasons = []
            for candidate in ("cutlass", "cusparselt"):
                why = _backend_problem(candidate, *shape, compute_dtype, device)
                if why is None:
                    chosen = candidate
                    break
                reasons.append(why)
            if chosen == "reference" and device.type == "cuda":
                logger.info(
                    "layer %r (%dx%d, %s): dense masked reference (%s)",
                    self.name,
                    *shape,
                    compute_dtype,
                    "; ".join(reasons),
                )
        else:
            why = _backend_problem(self.backend, *shape, compute_dtype, device)
            if why is not None:
                raise RuntimeError(
                    f"layer {self.name!r} ({shape[0]}x{shape[1]}, computing in {compute_dtype} "
                    f"on {device}): backend {self.backend!r} cannot run it: {why}; use "
                    "backend='auto' (falls back to the dense masked reference per layer) or "
                    "'reference', run on a supported GPU under bf16/fp16 autocast, or exclude "
                    "the layer"
                )
            chosen = self.backend
        self._chosen[key] = chosen
        return chosen

    # The cache lives in Python and its mask search is data dependent: torch.compile runs
    # this eagerly (a graph break per layer) and traces the matmuls around it.
    @torch.compiler.disable
    def _current_operands(self, backend: str, compute_dtype: torch.dtype) -> tuple[Tensor, ...]:
        weight = self.weight
        # Rebuilt when the weight changes in place (optimizer step, load_state_dict) or is
        # replaced (.to(), which allocates new storage).
        # The reference mask does not depend on the compute dtype; GPU operands do.
        key = (
            weight.device,
            weight.dtype,
            weight.data_ptr(),
            weight._version,
            compute_dtype if backend != "reference" else None,
        )
        return self._operands.get(
            backend, key, lambda: _build_operands(backend, weight, compute_dtype)
        )

    def cached_tensors(self) -> list[Tensor]:
        """The current mask or compressed W_s / W_sᵀ (for memory reports)."""
        return self._operands.tensors()

    @property
    def chosen_backends(self) -> tuple[str, ...]:
        """The kernels this layer has run so far (one per device and compute dtype seen)."""
        return tuple(sorted(set(self._chosen.values())))

    @property
    def mask_builds(self) -> int:
        """How many times the mask (and backend operands) were built."""
        return self._operands.builds

    def sparse_weight(self, compute_dtype: torch.dtype | None = None) -> Tensor:
        """The dense W_s (d_out, d_in) the forward uses now, in ``compute_dtype``.

        For the reference backend W ⊙ transposable_mask(W); for a GPU backend, the tile
        backend's own (greedy) pruning.
        """
        compute_dtype = compute_dtype or self.weight.dtype
        backend = self.backend_for(self.weight.device, compute_dtype)
        operands = self._current_operands(backend, compute_dtype)
        with torch.no_grad():
            weight_c = self.weight.detach().to(compute_dtype)
            if backend == "reference":
                return weight_c * operands[0]
            return apply_tile_mask(weight_c, operands[-1])

    def trained_compute_dtype(self) -> torch.dtype:
        """The compute dtype this layer has run in on its weight's device, when it ran in
        exactly one (e.g. bfloat16 under bf16 autocast), else the weight's dtype."""
        dtypes = {dtype for device, dtype in self._chosen if device == self.weight.device}
        return dtypes.pop() if len(dtypes) == 1 else self.weight.dtype

    def to_linear(self, compute_dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear holding W ⊙ M (copied, in the weight's dtype) and the bias (copied):
        the transposable 2:4 model this layer computes, for evaluation or export.

        M is the mask the forward uses in ``compute_dtype`` (default:
        :meth:`trained_compute_dtype`, so that a layer trained under bf16 autocast on a GPU
        backend keeps that backend's tile pruning rather than the exact reference mask): the
        nonzeros of :meth:`sparse_weight`. A kept entry that is zero in the compute dtype is
        zero in W ⊙ M either way.
        """
        kept = self.sparse_weight(compute_dtype or self.trained_compute_dtype()) != 0
        linear = linear_holding(self.weight * kept, self.bias)
        linear.train(self.training)
        return linear

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        compute_dtype = compute_dtype_of(x)
        backend = self.backend_for(x.device, compute_dtype)
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            # A training forward prunes the weight as it is now and keeps nothing for later:
            # the optimizer is about to change it, and a fused optimizer would do so without
            # moving the version counter an inference cache is keyed on.
            self._operands.clear()
            weight = self.weight
            operands = self._operands.get(
                backend, None, lambda: _build_operands(backend, weight, compute_dtype)
            )
        else:
            operands = self._current_operands(backend, compute_dtype)
        sparse_mm = None if backend == "reference" else partial(_sparse_mm, backend)
        return straight_through_linear(x, self.weight, self.bias, operands, sparse_mm)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


# ---------------------------------------------------------------------------- the model


def transposable_rules(
    include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> LayerRules:
    """The layer selection of :func:`transposable_sparsify`: ``nn.Linear`` layers whose
    sizes are multiples of 4, by ``include`` / ``exclude``."""
    return linear_rules(
        "transposable_sparsify",
        "made transposable",
        TransposableSparseLinear,
        2,
        4,
        include,
        exclude,
    )


def transposable_sparsify(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    backend: str | BackendName = "auto",
) -> list[str]:
    """Replace ``model``'s nn.Linear layers by TransposableSparseLinear layers, in place.

    Selects layers as :func:`slope_lightning.sparse.sparsify` does (the one plan of
    :func:`~slope_lightning.sparse.selection.plan_layers`, nn.Linear layers only, 2:4): LM
    heads and embeddings stay dense by default, tied weights and layers whose sizes are not
    multiples of 4 are left dense, and SLoPe SparseLinear layers are left alone.

    Args:
        model: any module whose Linear children are swapped.
        include: fnmatch patterns on qualified layer names; if given, only matching layers
            are considered, and a matching layer that cannot be converted is an error.
        exclude: patterns of layers left dense (None: LM heads and embeddings,
            :data:`~slope_lightning.sparse.DEFAULT_EXCLUDE`).
        backend: the backend of every converted layer, one of :data:`TRANSPOSABLE_BACKENDS`
            (see :class:`TransposableSparseLinear`).

    Returns:
        The qualified names of the converted layers.

    Raises:
        ValueError: unknown backend, ``model`` is itself a Linear, or an included layer cannot
            be converted.
    """
    name = transposable_backend(backend)
    converted = convert_linears(
        model,
        transposable_rules(include, exclude),
        lambda linear, layer: TransposableSparseLinear.from_linear(linear, name, name=layer),
    )
    logger.info("transposable_sparsify: %d layers converted (backend=%s)", len(converted), name)
    return converted


def transposable_finalize(model: nn.Module) -> list[str]:
    """Replace every :class:`TransposableSparseLinear` in ``model`` by the nn.Linear of its
    pruned weight (:meth:`TransposableSparseLinear.to_linear`), in place: the trained
    transposable 2:4 model, for evaluation or export.

    Returns:
        The qualified names of the replaced layers.
    """
    return replace_with_linear(model, TransposableSparseLinear)
