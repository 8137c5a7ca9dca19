"""SparseLinear: a linear layer trained with SLoPe's static N:M weight and double-pruned backward.

The kept values are one real Parameter, so any optimizer, gradient clipping, DDP and
checkpointing work unchanged and the optimizer state is N/M of dense size. The GEMMs live in
``function`` (training) and ``merged`` (inference with adapters); this module owns the
layer's state: values, masks, adapter, caches. After Mozaffari et al., "SLoPe", arXiv
2405.16325.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from slope_lightning.sparse.adapters import AdapterInit, LowRankAdapter, resolve_rank
from slope_lightning.sparse.backends import (
    BackendName,
    OperandCache,
    SparseBackend,
    resolve_backend,
)
from slope_lightning.sparse.conv1d import dense_weight, is_conv1d
from slope_lightning.sparse.dtensor import is_dtensor, local_part, shard_like
from slope_lightning.sparse.function import (
    compute_dtype_of,
    sparse_linear,
    sparse_linear_inference,
)
from slope_lightning.sparse.kernel_ops import derive_col_index
from slope_lightning.sparse.layout import NMLayout, check_divisible
from slope_lightning.sparse.masks import MaskMethod
from slope_lightning.sparse.merged import FusedOperand, build_fused, merged_forward
from slope_lightning.sparse.readonly import ASSIGNING_WEIGHT, read_only, warn_dense_read
from slope_lightning.sparse.refresh import (
    RefreshCounter,
    check_interval,
    count_optimizer_step,
    transpose_mask_for_training,
)
from slope_lightning.sparse.sharded import TransposeMaskRefresh, refresh_col_index
from slope_lightning.sparse.state import check_index, read_extra_state

logger = logging.getLogger(__name__)


class LayerSettings(TypedDict, total=False):
    """Keywords of :class:`SparseLinear`'s constructor that :meth:`SparseLinear.from_linear`
    and :meth:`SparseLinear.from_conv1d` pass on (the defaults are the constructor's)."""

    backend: str | BackendName | SparseBackend
    transpose_mask_interval: int | None
    mask_method: MaskMethod
    generator: torch.Generator | None
    name: str


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
        transpose_mask_interval: 1 (default): re-derive M_C from the current W_R at every
            training forward, whatever the optimizer. k > 1: after every k optimizer steps,
            which :func:`~slope_lightning.sparse.follow_optimizer` must report. None: only
            when :meth:`refresh_transpose_mask` is called (e.g. by the MaskScheduler
            callback). The rule: :mod:`slope_lightning.sparse.refresh`.
        weight: dense (d_out, d_in) weight to prune; None initialises like nn.Linear.
        mask_method: "magnitude" (keep the largest |w|) or "random".
        generator: random source for ``mask_method="random"`` and for the default init.
        name: the layer's name in its model, used in error messages.

    Example:
        >>> layer = SparseLinear.from_linear(nn.Linear(64, 32), n=2, m=4)
        >>> layer(torch.randn(8, 64)).shape
        torch.Size([8, 32])
    """

    row_index: Tensor  # M_R, packed (buffer)
    col_index: Tensor  # M_C, packed (buffer)
    #: How the dense weight this layer came from was stored: "linear", (d_out, d_in), or
    #: "conv1d", transformers' Conv1D, (d_in, d_out) (set by :meth:`from_conv1d`; a dense
    #: export writes the weight back in that layout).
    weight_layout: Literal["linear", "conv1d"] = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        n: int = 2,
        m: int = 4,
        backend: str | BackendName | SparseBackend = "reference",
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
        sizes = {"in_features (d_in)": in_features, "out_features (d_out)": out_features}
        fix = "N:M pruning needs whole groups along both dimensions (exclude this layer or pick "
        check_divisible(name, sizes, m, f"m={m}", fix + "another M)")
        check_interval(transpose_mask_interval, name)
        self.in_features = in_features
        self.out_features = out_features
        self.layout = NMLayout(out_features, in_features, n, m)
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
        target_device = torch.device(device) if device is not None else weight.device
        target_dtype = dtype or weight.dtype
        self._backend = resolve_backend(backend)
        with torch.no_grad():
            values, row_index = self.layout.prune(weight.detach(), mask_method, generator)
        self.values = nn.Parameter(values.to(device=target_device, dtype=target_dtype))
        self.register_buffer("row_index", row_index.to(target_device))  # M_R, packed
        self.register_buffer("col_index", self._derive_col_index())  # M_C, packed
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=target_device, dtype=target_dtype)
            )
        else:
            self.register_parameter("bias", None)
        self.adapter: LowRankAdapter | None = None
        self.merged = False
        self._fused: FusedOperand | None = None  # merged inference operand, built by merge()
        self._operands = OperandCache()  # kernel-side copies for inference (GPU backends)
        self.refresh_counter = RefreshCounter()  # optimizer steps, see sparse.refresh
        self._mask_generation = 0  # bumped whenever M_C changes
        self._checked: set[tuple[torch.dtype, torch.device]] = set()

    # ------------------------------------------------------------------ construction / export

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, n: int = 2, m: int = 4, **settings: Unpack[LayerSettings]
    ) -> SparseLinear:
        """Prune ``linear``'s weight N:M along d_in (by magnitude by default) and wrap it.

        ``settings``: the constructor's ``backend``, ``transpose_mask_interval``,
        ``mask_method``, ``generator`` and ``name`` (keywords, same defaults).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"SparseLinear.from_linear takes an nn.Linear, got {type(linear).__name__}; "
                "convolutions and other layers are not supported (sparsify() lists every "
                "layer it skipped and why)"
            )
        return cls._wrap(linear, n, m, settings)

    @classmethod
    def from_conv1d(
        cls, conv1d: nn.Module, n: int = 2, m: int = 4, **settings: Unpack[LayerSettings]
    ) -> SparseLinear:
        """Prune a transformers ``Conv1D`` (GPT-2's transposed linear, ``y = x W + b`` with W
        of shape (d_in, d_out)) N:M along d_in and wrap it; ``settings`` as for
        :meth:`from_linear`.

        The layer computes what the Conv1D computed, up to float rounding, and remembers the
        layout (``weight_layout == "conv1d"``) for dense exports. The Conv1D is recognised by
        duck typing (class name ``Conv1D``, an int ``nf`` = d_out, a 2-D ``weight`` of shape
        (d_in, nf)), so transformers is never imported.

        Raises:
            TypeError: ``conv1d`` is not a Conv1D-like module.
        """
        if not is_conv1d(conv1d):
            raise TypeError(
                f"SparseLinear.from_conv1d takes a transformers Conv1D (an int nf and a weight "
                f"of shape (d_in, nf)), got {type(conv1d).__name__}; for an nn.Linear use "
                "SparseLinear.from_linear"
            )
        return cls._wrap(conv1d, n, m, settings)

    @classmethod
    def _wrap(cls, dense: nn.Module, n: int, m: int, settings: LayerSettings) -> SparseLinear:
        """A layer of the pruned weight and the bias of ``dense`` (an nn.Linear or a Conv1D,
        whose layout it remembers)."""
        weight = dense_weight(dense)  # (d_out, d_in); a view of a Conv1D's (d_in, d_out)
        bias = getattr(dense, "bias", None)
        d_out, d_in = weight.shape
        layer = cls(d_in, d_out, bias=isinstance(bias, Tensor), n=n, m=m, weight=weight, **settings)
        if isinstance(bias, Tensor) and layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        if is_conv1d(dense):
            layer.weight_layout = "conv1d"
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

    @property
    def weight(self) -> Tensor:
        """W_R as a dense (d_out, d_in) tensor, built on demand, for code that reads
        ``module.weight`` (its dtype, device or shape: HF and PEFT utilities, init code).

        The contract: every read builds a new (d_out, d_in) copy, N/M of it zeros (the first
        read per layer warns of this cost), without gradient; computing with it works, but
        writing into it (``weight.data += ...``, ``weight.data = ...``, ``normal_``,
        ``copy_``, ``out=``) raises, since it would change nothing in the layer (PEFT's
        merge, for one, would silently be lost). Assigning ``layer.weight`` raises too. Train
        ``values``; :meth:`to_dense` gives an ordinary copy (``include_adapter=True``: with
        the adapter's delta folded in).
        """
        if not getattr(self, "_weight_read_warned", False):
            self._weight_read_warned = True
            warn_dense_read(self.name, (self.out_features, self.in_features))
        with torch.no_grad():
            dense = self.layout.to_dense(self.values.detach(), self.row_index)  # (d_out, d_in)
        return read_only(dense, self.name)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(ASSIGNING_WEIGHT.format(name=self.name))

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
        W_R has not changed is harmless. Under FSDP2 (values sharded between steps) it is a
        collective: every rank of the mesh must call it, as the MaskScheduler callback and
        :func:`~slope_lightning.sparse.follow_optimizer`'s hook do, and the ranks end with
        the M_C an unsharded layer would derive, bit for bit (see
        :func:`~slope_lightning.sparse.sharded.refresh_sharded`).
        The statistics cost three transient masks; skip them on steps that do not log.
        """
        return refresh_col_index(self, with_stats)

    def _after_refresh(self) -> None:
        self._mask_generation += 1
        self.refresh_counter.steps = 0

    def hold_masks_as_parameters(self) -> None:
        """Hold M_R and M_C as frozen parameters (``requires_grad=False``), not buffers.

        For FSDP2, which shards parameters and replicates buffers: call it before
        ``fully_shard`` (:class:`~slope_lightning.module.SLoPeModule` does) and the packed
        masks shard by rows with the values and are gathered with them for the forward and
        the backward. Replicated, they would cost every rank 4 bits per kept value (2:4),
        which at 8 ranks is as much as the values' own sharded fp32 state and at 32 ranks
        more. State-dict keys do not change, so a checkpoint of either form loads into the
        other. No optimizer sees them (nothing requires their gradient). Idempotent.
        """
        for name in ("row_index", "col_index"):
            if name in self._buffers:
                tensor = self._buffers.pop(name)
                assert tensor is not None
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def note_optimizer_step(self) -> None:
        """Count one optimizer step of the values (called by :func:`follow_optimizer`'s hook);
        under FSDP2, re-derive M_C from the shards when it is due (a collective)."""
        count_optimizer_step(self)

    def get_extra_state(self) -> Tensor:
        """(optimizer steps since the last M_C refresh, N, M) as one int64 tensor.

        A tensor, not a dict, so that ``state_dict()`` holds only tensors (safetensors,
        ``save_pretrained``); N and M let a load refuse a checkpoint of another pattern.
        """
        state = [self.refresh_counter.steps, self.n, self.m]
        return torch.tensor(state, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Restore the refresh counter; check the pattern and the loaded masks.

        Raises:
            ValueError: the state was saved from another N:M pattern, or the loaded packed
                masks are not a valid N:M pattern.
        """
        updates = read_extra_state(state, self.refresh_counter.steps, self.layout, self.name)
        check_index(local_part(self.row_index), self.layout, "row_index (M_R)", self.name)
        t_layout = self.layout.transposed()
        check_index(local_part(self.col_index), t_layout, "col_index (M_C)", self.name)
        self.refresh_counter.steps = updates
        self._operands.clear()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The one place adapters come back on a load: a state dict saved after adapters were
        # switched on holds ``<prefix>adapter.*``; a layer without one attaches an adapter of
        # that rank first (placeholder values, overwritten by this very load). So resume,
        # load_from_checkpoint, safetensors and any trainer's load path work alike.
        up = state_dict.get(f"{prefix}adapter.up")
        if up is not None and self.adapter is None:
            placeholder = torch.Generator().manual_seed(0)  # leaves the global RNG untouched
            self.add_adapter(int(up.shape[0]), generator=placeholder)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        rank: int | float,
        init: AdapterInit = "slope",
        alpha: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[nn.Parameter]:
        """Attach a low-rank adapter; returns its new parameters (for a running optimizer).

        On a layer that FSDP2 shards, the adapter's parameters are sharded by rows like its
        values (each rank keeps its rows of the same seeded draw) and gathered for each
        forward, their gradients reduce-scattered: no rank holds all of them.
        """
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
        if is_dtensor(self.values):
            self.adapter.down_values = shard_like(self.adapter.down_values, self.values)
            self.adapter.up = shard_like(self.adapter.up, self.values)
        if self.merged:
            self.unmerge()
        return [self.adapter.down_values, self.adapter.up]

    def weight_key(self) -> Hashable:
        """What every cached operand derived from this layer's parameters is keyed by.

        The one place such a key is made: each parameter's storage and version (an in-place
        update, ``load_state_dict`` or ``.to()`` changes one of them) and the M_C
        generation. Training forwards drop the caches anyway (see :meth:`forward`), so a
        fused optimizer, which moves no version counter, never leaves a stale operand.
        """
        params = [self.values] + ([] if self.adapter is None else list(self.adapter.parameters()))
        return (
            tuple((p.device, p.dtype, p.data_ptr(), p._version) for p in params),
            self._mask_generation,
        )

    def fused_operand(self) -> FusedOperand:
        """The merged inference operand [W_R ; Lᵀ] and s·R from the current parameters.

        Raises:
            ValueError: if the weight or adapter holds NaN or inf.
        """
        return build_fused(
            self.values,
            self.row_index,
            self.layout,
            self.adapter,
            self._backend.row_multiple,
            self.weight_key(),
            self.name,
        )

    def merge(self, fused: FusedOperand | None = None) -> None:
        """Switch to the fused inference path: [W_R ; Lᵀ] (N:M along d_in) and s·R.

        Exact: the merged forward computes the same function. Parameters are untouched, so
        :meth:`unmerge` is exact too; a training forward (grad enabled) unmerges by itself.

        Args:
            fused: an operand already built by :meth:`fused_operand` (lets a model validate
                every layer before merging any); None builds it now.

        Raises:
            RuntimeError: if the layer is already merged.
            ValueError: if the weight or adapter holds NaN or inf (nothing is changed).
        """
        if self.merged:
            raise RuntimeError(f"layer {self.name!r} is already merged; call unmerge() first")
        self._fused = fused if fused is not None else self.fused_operand()
        self.merged = True

    def unmerge(self) -> None:
        """Leave the fused inference path; the layer computes exactly as before merging."""
        if not self.merged:
            raise RuntimeError(f"layer {self.name!r} is not merged")
        self._fused = None
        self._operands.clear()
        self.merged = False

    def cached_tensors(self) -> list[Tensor]:
        """Tensors derived from the parameters and kept between calls (for memory reports):
        the merged inference operand and the backend's kernel-side copies."""
        fused = self._fused.tensors() if self._fused is not None else []
        return [*fused, *self._operands.tensors()]

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
        if not x.is_floating_point():
            raise TypeError(
                f"layer {self.name!r}: input dtype {x.dtype} is not floating point; feed "
                "activations (e.g. embeddings), not token ids, and cast with x.float()"
            )
        self._check_backend(x)
        training_step = torch.is_grad_enabled() and (self.values.requires_grad or x.requires_grad)
        if training_step:
            if self.merged:
                logger.info("layer %r: unmerged for a training forward", self.name)
                self.unmerge()
            # The optimizer is about to change the values: inference copies would go stale.
            self._operands.clear()
            col_index = transpose_mask_for_training(self)  # M_C for this backward
            y = sparse_linear(
                x, self.values, self.bias, self.row_index, col_index, self.layout, self._backend
            )
        elif self.merged:
            if self._fused is None or self._fused.key != self.weight_key():
                self._fused = self.fused_operand()  # parameters changed since merge()
            return merged_forward(
                x, self._fused, self.bias, self._backend, self._operands, self.out_features
            )
        else:
            key = (self.weight_key(), compute_dtype_of(x))  # kernel-side operands reused
            weight = (self.values, self.bias, self.row_index, self.layout)
            y = sparse_linear_inference(x, *weight, self._backend, self._operands, key)
        if self.adapter is not None:
            y = y + self.adapter(x).to(y.dtype)
        return y

    @property
    def backend(self) -> SparseBackend:
        """The GEMM backend (``backend.running`` is the one that ran, e.g. ``auto``'s choice)."""
        return self._backend

    @property
    def backend_name(self) -> str:
        """The backend's name as given (e.g. "auto", not its choice)."""
        return self._backend.name

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

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, n={self.n}, m={self.m}, backend={self.backend_name!r}, "
            f"transpose_mask_interval={self.transpose_mask_interval}"
            + (", merged" if self.merged else "")
        )


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """Every SparseLinear in ``model`` with its qualified name."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]
