"""SparseLinear: a linear layer trained with SLoPe's static N:M weight and double-pruned backward.

Forward Y = X W_Rᵀ + b; input gradient dX = dY W_RC, where W_RC = W_R ⊙ M_C and M_C is an
N:M mask of W_R along d_out; values gradient (dYᵀ X) at M_R. After Mozaffari et al.,
"SLoPe", arXiv 2405.16325. The kept values are one real Parameter, so any optimizer, gradient
clipping, DDP and checkpointing work unchanged and the optimizer state is N/M of dense size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slope_lightning.sparse.adapters import AdapterInit, LowRankAdapter, resolve_rank
from slope_lightning.sparse.backends import (
    OperandCache,
    ReferenceBackend,
    SparseBackend,
    resolve_backend,
)
from slope_lightning.sparse.kernel_ops import add_bias, derive_col_index, lowrank_add
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.masks import MaskMethod

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransposeMaskRefresh:
    """What one re-derivation of M_C changed.

    Attributes:
        flipped: entries of M_C that were not kept before and are now (= those dropped).
        kept: nonzeros of W_RC, the double-pruned weight.
        total: kept entries of W_R (its number of values).
    """

    flipped: int
    kept: int
    total: int


def compute_dtype_of(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _SparseLinearFunction(torch.autograd.Function):
    """Y = X W_Rᵀ + b with the SLoPe backward; saves X and the packed weight, never a dense one."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        row_index: Tensor,
        col_index: Tensor,
        layout: NMLayout,
        backend: SparseBackend,
        cache: OperandCache,
        mask_generation: int,
    ) -> Tensor:
        device_type = x.device.type
        compute_dtype = compute_dtype_of(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, layout.cols).to(compute_dtype)  # (T, d_in)
        w = values.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        # Cached kernel operands are rebuilt when the values change (their version counter
        # moves at every optimizer step) or M_C is refreshed (its generation moves).
        forward_key = (values._version, compute_dtype)
        with torch.autocast(device_type, enabled=False):
            y2d = backend.forward(x2d, w, row_index, b, layout, cache, forward_key)  # (T, d_out)
        ctx.save_for_backward(x2d, values, row_index, col_index)
        ctx.layout = layout
        ctx.backend = backend
        ctx.cache = cache
        ctx.backward_key = (values._version, mask_generation, compute_dtype)
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y2d.reshape(*lead, layout.rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2d, values, row_index, col_index = ctx.saved_tensors
        layout: NMLayout = ctx.layout
        backend: SparseBackend = ctx.backend
        dy = grad_out.reshape(-1, layout.rows).to(ctx.compute_dtype)  # (T, d_out)
        grad_x = grad_values = grad_bias = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                w = values.to(ctx.compute_dtype)
                grad_x = backend.grad_input(
                    dy, w, row_index, col_index, layout, ctx.cache, ctx.backward_key
                )
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_values = backend.grad_values(dy, x2d, row_index, layout).to(values.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_values, grad_bias, None, None, None, None, None, None


class SparseLinear(nn.Module):
    """A drop-in nn.Linear whose weight is N:M sparse along d_in and trained with SLoPe.

    Storage: ``values`` (d_out, d_in·N/M) Parameter; ``row_index`` (M_R) and ``col_index``
    (M_C) packed offsets, 2 bits per kept value for 2:4. No (d_out, d_in) tensor persists.

    Args:
        in_features, out_features: d_in and d_out; both must be divisible by m.
        bias: whether to learn an additive bias.
        n, m: the N:M pattern (2:4 is what GPUs accelerate; any 1 <= n < m works on
            the reference backend).
        backend: name of the GEMM backend ("reference" runs everywhere; "cusparselt",
            "cutlass" and "auto" need a CUDA GPU), or a SparseBackend instance.
        transpose_mask_interval: re-derive M_C from the current W_R after this many optimizer
            updates of the values (detected automatically). None: only when
            :meth:`refresh_transpose_mask` is called (e.g. by the MaskScheduler callback).
        weight: dense (d_out, d_in) weight to prune; None initialises like nn.Linear.
        mask_method: "magnitude" (keep the largest |w|) or "random".
        generator: random source for ``mask_method="random"`` and for the default init.
        name: the layer's name in its model, used in error messages.

    Example:
        >>> layer = SparseLinear.from_linear(nn.Linear(64, 32), n=2, m=4)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        n: int = 2,
        m: int = 4,
        backend: str | SparseBackend = "reference",
        transpose_mask_interval: int | None = 1,
        weight: Tensor | None = None,
        mask_method: MaskMethod = "magnitude",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "SparseLinear",
    ) -> None:
        super().__init__()
        self.name = name
        for label, size in (
            ("in_features (d_in)", in_features),
            ("out_features (d_out)", out_features),
        ):
            if size % m != 0:
                raise ValueError(
                    f"layer {name!r}: {label}={size} is not divisible by m={m}; N:M pruning "
                    f"needs whole groups along both dimensions (exclude this layer or pick "
                    f"another M)"
                )
        if transpose_mask_interval is not None and transpose_mask_interval < 1:
            raise ValueError(
                f"layer {name!r}: transpose_mask_interval must be a positive number of "
                f"optimizer steps or None (manual), got {transpose_mask_interval}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.layout = NMLayout(out_features, in_features, n, m)
        self.backend_name = backend if isinstance(backend, str) else backend.name
        self.transpose_mask_interval = transpose_mask_interval

        if weight is None:
            weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
            bound = 1.0 / math.sqrt(in_features)  # nn.Linear's kaiming_uniform_(a=sqrt(5))
            weight.uniform_(-bound, bound, generator=generator)
        if not weight.is_floating_point():
            raise ValueError(
                f"layer {name!r}: SparseLinear needs a floating-point weight, got {weight.dtype}; "
                "convert the model to float32/bfloat16/float16 before sparsifying"
            )
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(
                f"layer {name!r}: weight shape {tuple(weight.shape)} != "
                f"(out_features, in_features) = {(out_features, in_features)}"
            )
        factory = {"device": device or weight.device, "dtype": dtype or weight.dtype}
        self._backend: SparseBackend = (
            resolve_backend(backend) if isinstance(backend, str) else backend
        )
        with torch.no_grad():
            values, row_index = self.layout.prune(weight.detach(), mask_method, generator)
        self.values = nn.Parameter(values.to(**factory))  # (d_out, d_in·N/M)
        self.register_buffer("row_index", row_index.to(factory["device"]))  # M_R, packed
        self.register_buffer("col_index", self._derive_col_index())  # M_C, packed
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.adapter: LowRankAdapter | None = None
        self.merged = False
        # Inference cache built by merge(): fused values, fused index, s·R; and the parameter
        # versions it was built from, so an in-place update (optimizer, load) rebuilds it.
        self._fused: tuple[Tensor, Tensor, Tensor] | None = None
        self._fused_key: tuple[int, ...] = ()
        self._seen_version = self.values._version
        self._updates_since_refresh = 0
        self._operands = OperandCache()  # kernel-side copies of the weight (GPU backends)
        self._mask_generation = 0  # bumped whenever M_C changes
        self._checked: set[tuple[torch.dtype, torch.device]] = set()

    # ------------------------------------------------------------------ construction / export

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n: int = 2,
        m: int = 4,
        *,
        backend: str | SparseBackend = "reference",
        transpose_mask_interval: int | None = 1,
        mask_method: MaskMethod = "magnitude",
        generator: torch.Generator | None = None,
        name: str = "SparseLinear",
    ) -> SparseLinear:
        """Prune ``linear``'s weight N:M along d_in (by magnitude by default) and wrap it."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            n=n,
            m=m,
            backend=backend,
            transpose_mask_interval=transpose_mask_interval,
            weight=linear.weight.detach(),
            mask_method=mask_method,
            generator=generator,
            name=name,
        )
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self, include_adapter: bool = False) -> Tensor:
        """W_R as a dense (d_out, d_in) tensor (plus s·(L R)ᵀ if ``include_adapter``)."""
        with torch.no_grad():
            dense = self.layout.to_dense(self.values, self.row_index)
            if include_adapter and self.adapter is not None:
                dense = dense + self.adapter.delta_weight().to(dense.dtype)
        return dense

    def to_linear(self) -> nn.Linear:
        """An equivalent nn.Linear (adapter folded in), e.g. to undo :func:`sparsify`."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.to_dense(include_adapter=True))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------------ masks

    @property
    def n(self) -> int:
        return self.layout.n

    @property
    def m(self) -> int:
        return self.layout.m

    def _derive_col_index(self) -> Tensor:
        """M_C: N:M of W_R along d_out, by magnitude, as packed offsets of W_Rᵀ's rows."""
        impl = self._backend.kernels.transpose_index
        return derive_col_index(self.values, self.row_index, self.layout, impl)

    def refresh_transpose_mask(self, with_stats: bool = True) -> TransposeMaskRefresh | None:
        """Re-derive M_C from the current W_R; report what changed if ``with_stats``.

        Deterministic in W_R, so every DDP rank derives the same mask, and calling it when
        W_R has not changed is harmless. The statistics cost three transient masks; skip
        them on steps that do not log.
        """
        old = self.col_index
        new = self._derive_col_index()
        self.col_index = new
        self._mask_generation += 1
        self._updates_since_refresh = 0
        self._seen_version = self.values._version
        if not with_stats:
            return None
        t_layout = self.layout.transposed()
        with torch.no_grad():
            new_mask = t_layout.mask(new)  # (d_in, d_out), transient
            flipped = int((new_mask & ~t_layout.mask(old)).sum())
            w_r_mask = self.layout.mask(self.row_index).t()  # (d_in, d_out)
            kept = int((new_mask & w_r_mask).sum())
        return TransposeMaskRefresh(flipped=flipped, kept=kept, total=self.values.numel())

    def _track_updates(self) -> None:
        """Count optimizer updates of the values and refresh M_C on schedule."""
        version = self.values._version
        if version != self._seen_version:
            self._seen_version = version
            self._updates_since_refresh += 1
        interval = self.transpose_mask_interval
        if interval is not None and self._updates_since_refresh >= interval:
            self.refresh_transpose_mask(with_stats=False)

    def get_extra_state(self) -> dict[str, int]:
        pending = int(self.values._version != self._seen_version)
        return {"updates_since_refresh": self._updates_since_refresh + pending}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._updates_since_refresh = int(state.get("updates_since_refresh", 0))
        self._seen_version = self.values._version

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        rank: int | float,
        init: AdapterInit = "slope",
        alpha: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[nn.Parameter]:
        """Attach a low-rank adapter; returns its new parameters (for a running optimizer)."""
        if self.adapter is not None:
            raise RuntimeError(f"layer {self.name!r} already has an adapter")
        r = resolve_rank(rank, self.in_features, self.out_features, f"layer {self.name!r}")
        self.adapter = LowRankAdapter(
            self.in_features,
            self.out_features,
            r,
            self.n,
            self.m,
            init=init,
            alpha=alpha,
            device=self.values.device,
            dtype=self.values.dtype,
            generator=generator,
        )
        if self.merged:
            self.unmerge()
        return [self.adapter.down_values, self.adapter.up]

    def merge(self) -> None:
        """Switch to the fused inference path: [W_R ; Lᵀ] (N:M along d_in) and s·R.

        Exact: the merged forward computes the same function. Parameters are untouched, so
        :meth:`unmerge` is exact too; a training forward (grad enabled) unmerges by itself.

        Raises:
            RuntimeError: if the layer is already merged.
            ValueError: if the weight or adapter holds NaN or inf (nothing is changed).
        """
        if self.merged:
            raise RuntimeError(f"layer {self.name!r} is already merged; call unmerge() first")
        self._fused = self._build_fused()
        self.merged = True

    def unmerge(self) -> None:
        """Leave the fused inference path; the layer computes exactly as before merging."""
        if not self.merged:
            raise RuntimeError(f"layer {self.name!r} is not merged")
        self._fused = None
        self.merged = False

    def cached_tensors(self) -> list[Tensor]:
        """Tensors derived from the parameters and kept between calls (for memory reports):
        the merged inference operands and the backend's kernel-side copies."""
        return [*(self._fused or ()), *self._operands.tensors()]

    def _parameter_versions(self) -> tuple[int, ...]:
        params = [self.values] + ([] if self.adapter is None else list(self.adapter.parameters()))
        return tuple(p._version for p in params)

    def _build_fused(self) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            if self.adapter is None:
                fused_values, fused_index = self.values.detach(), self.row_index
                up = self.values.new_zeros(0, self.out_features)
            else:
                adapter = self.adapter
                fused_values = torch.cat([self.values, adapter.down_values.to(self.values.dtype)])
                fused_index = torch.cat([self.row_index, adapter.down_index])
                up = (adapter.up * adapter.scale).to(self.values.dtype)  # scale folded into R
                pad = (-fused_values.shape[0]) % 32
                if pad and not isinstance(self._backend, ReferenceBackend):
                    # Sparse kernels want row counts in multiples of 32: pad with zero rows
                    # (valid N:M offsets, zero values) and matching zero rows of s·R.
                    pad_layout = NMLayout(pad, self.in_features, self.n, self.m)
                    zeros = self.values.new_zeros(pad, self.in_features)
                    pad_values, pad_index = pad_layout.prune(zeros)
                    fused_values = torch.cat([fused_values, pad_values])
                    fused_index = torch.cat([fused_index, pad_index])
                    up = torch.cat([up, up.new_zeros(pad, self.out_features)])
            for label, tensor in (("weight", fused_values), ("adapter R", up)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"layer {self.name!r}: non-finite values in {label}; not merged"
                    )
        self._fused_key = self._parameter_versions()
        return fused_values, fused_index, up

    # ------------------------------------------------------------------ forward

    # torch.compile runs this layer eagerly (one graph break per layer) and compiles the
    # rest of the model: its forward keeps Python-side state (version counters, kernel-side
    # caches, auto-tuning) that Dynamo cannot trace, and the GEMMs it calls are the backend's
    # kernels in either case.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"layer {self.name!r}: input has {x.shape[-1]} features, "
                f"expected {self.in_features}"
            )
        training_step = torch.is_grad_enabled() and (self.values.requires_grad or x.requires_grad)
        if training_step:
            if self.merged:
                logger.info("layer %r: unmerged for a training forward", self.name)
                self.unmerge()
            self._track_updates()
        elif self.merged:
            return self._merged_forward(x)
        self._check_backend(x)
        y = _SparseLinearFunction.apply(
            x,
            self.values,
            self.bias,
            self.row_index,
            self.col_index,
            self.layout,
            self._backend,
            self._operands,
            self._mask_generation,
        )
        if self.adapter is not None:
            y = y + self.adapter(x).to(y.dtype)
        return y

    @property
    def backend(self) -> SparseBackend:
        """The GEMM backend (for ``auto``, its ``choice`` and ``reason`` after first use)."""
        return self._backend

    def _check_backend(self, x: Tensor) -> None:
        """Fail clearly, once per dtype and device, if the backend cannot run this layer."""
        dtype = compute_dtype_of(x)
        if (dtype, x.device) in self._checked:
            return
        why = self._backend.unsupported(self.layout, dtype, x.device)
        if why is not None:
            raise RuntimeError(
                f"layer {self.name!r} ({self.out_features}x{self.in_features}): backend "
                f"{self.backend_name!r} cannot run it: {why}; use backend='auto' (falls back "
                "per layer) or 'reference', or exclude the layer"
            )
        self._checked.add((dtype, x.device))

    def _merged_forward(self, x: Tensor) -> Tensor:
        """One N:M GEMM for [X W_Rᵀ | X L], then one multiply-add for (X L)·(s R)."""
        self._check_backend(x)  # the same clear error as a training forward
        if self._fused is None or self._fused_key != self._parameter_versions():
            self._fused = self._build_fused()  # parameters changed in place since merge()
        fused_values, fused_index, up = self._fused
        layout = self.layout.stacked(NMLayout(up.shape[0], self.in_features, self.n, self.m))
        compute_dtype = compute_dtype_of(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).to(compute_dtype)  # (T, d_in)
        bias = self.bias.to(compute_dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            key = ("fused", self._fused_key, compute_dtype)
            fused = self._backend.forward(
                x2d, fused_values.to(compute_dtype), fused_index, None, layout, self._operands, key
            )  # (T, d_out + r)
            y = fused[:, : self.out_features]
            kernels = self._backend.kernels
            if up.shape[0] > 0:
                low_rank = fused[:, self.out_features :]  # X L (T, r)
                y = lowrank_add(y, low_rank, up.to(compute_dtype), bias, kernels.lowrank_add)
            else:
                y = add_bias(y, bias, kernels.bias_add)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, n={self.n}, m={self.m}, backend={self.backend_name!r}, "
            f"transpose_mask_interval={self.transpose_mask_interval}"
            + (", merged" if self.merged else "")
        )
