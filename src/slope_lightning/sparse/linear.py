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
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import torch
from torch import Tensor, nn

from slope_lightning.sparse.adapters import AdapterInit, LowRankAdapter, resolve_rank
from slope_lightning.sparse.backends import (
    BackendName,
    OperandCache,
    SparseBackend,
    SparseWeight,
    resolve_backend,
)
from slope_lightning.sparse.function import compute_dtype_of, sparse_linear
from slope_lightning.sparse.kernel_ops import derive_col_index
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.masks import MaskMethod
from slope_lightning.sparse.merged import FusedOperand, build_fused, merged_forward
from slope_lightning.sparse.packing import bits_per_offset, packed_width

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor

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


#: In-place tensor methods that change no values, allowed on :class:`_ReadOnlyWeight`.
_HARMLESS_INPLACE = frozenset({"requires_grad_", "share_memory_"})


class _ReadOnlyWeight(Tensor):
    """What :attr:`SparseLinear.weight` returns: a dense copy of W_R that refuses writes.

    Reads and computations behave as on a plain tensor (their results are plain tensors); an
    in-place method, ``.data`` assignment, item assignment or ``out=`` into it raises,
    because writing into a copy would silently change nothing in the layer.
    """

    layer_name: str = "SparseLinear"

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        attribute = getattr(getattr(func, "__self__", None), "__name__", None)
        out = kwargs.get("out")
        outs = out if isinstance(out, tuple | list) else (out,)
        writes = (
            (name.endswith("_") and not name.startswith("_") and name not in _HARMLESS_INPLACE)
            or name == "__setitem__"
            or (name == "__set__" and attribute == "data")
            or any(isinstance(o, cls) for o in outs)
        )
        mine = [a for a in (*args, *kwargs.values()) if isinstance(a, cls)]
        if writes:
            layer = mine[0].layer_name if mine else cls.layer_name
            raise RuntimeError(
                f"layer {layer!r}: SparseLinear.weight is a read-only dense copy of W_R, built "
                f"at each read; writing into it ({name}) would change nothing in the layer. "
                "Write the kept entries to layer.values, prune a dense weight in with "
                "slope_lightning.sparse.sparsify.load_dense_state_dict, or take a writable "
                "copy with layer.to_dense()"
            )
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if name == "__get__" and attribute == "data" and isinstance(result, Tensor):
            data = result.as_subclass(cls)  # .data must refuse writes too (PEFT's merge)
            data.layer_name = mine[0].layer_name if mine else cls.layer_name
            return data
        return result


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
        self._seen_version = self.values._version
        self._updates_since_refresh = 0
        self._counts_optimizer_steps = False  # see note_optimizer_step
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
        backend: str | BackendName | SparseBackend = "reference",
        transpose_mask_interval: int | None = 1,
        mask_method: MaskMethod = "magnitude",
        generator: torch.Generator | None = None,
        name: str = "SparseLinear",
    ) -> SparseLinear:
        """Prune ``linear``'s weight N:M along d_in (by magnitude by default) and wrap it.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"SparseLinear.from_linear takes an nn.Linear, got {type(linear).__name__}; "
                "convolutions and other layers are not supported (sparsify() lists every "
                "layer it skipped and why)"
            )
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
        if linear.bias is not None and layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        n: int = 2,
        m: int = 4,
        *,
        backend: str | BackendName | SparseBackend = "reference",
        transpose_mask_interval: int | None = 1,
        mask_method: MaskMethod = "magnitude",
        generator: torch.Generator | None = None,
        name: str = "SparseLinear",
    ) -> SparseLinear:
        """Prune a transformers ``Conv1D`` (GPT-2's transposed linear, ``y = x W + b`` with W
        of shape (d_in, d_out)) N:M along d_in and wrap it.

        The layer computes what the Conv1D computed, up to float rounding, and remembers the
        layout (``weight_layout == "conv1d"``) for dense exports. The Conv1D is recognised by
        duck typing (class name ``Conv1D``, an int ``nf`` = d_out, a 2-D ``weight`` of shape
        (d_in, nf)), so transformers is never imported.

        Raises:
            TypeError: ``conv1d`` is not a Conv1D-like module.
        """
        weight = getattr(conv1d, "weight", None)
        nf = getattr(conv1d, "nf", None)
        if not (
            type(conv1d).__name__ == "Conv1D"
            and isinstance(nf, int)
            and isinstance(weight, Tensor)
            and weight.dim() == 2
            and weight.shape[1] == nf
        ):
            raise TypeError(
                f"SparseLinear.from_conv1d takes a transformers Conv1D (an int nf and a weight "
                f"of shape (d_in, nf)), got {type(conv1d).__name__}; for an nn.Linear use "
                "SparseLinear.from_linear"
            )
        bias = getattr(conv1d, "bias", None)
        layer = cls(
            int(weight.shape[0]),
            nf,
            bias=isinstance(bias, Tensor),
            n=n,
            m=m,
            backend=backend,
            transpose_mask_interval=transpose_mask_interval,
            weight=weight.detach().t(),  # (d_out, d_in), a view
            mask_method=mask_method,
            generator=generator,
            name=name,
        )
        if isinstance(bias, Tensor) and layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
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
            warnings.warn(
                f"layer {self.name!r}: reading SparseLinear.weight builds a dense "
                f"({self.out_features}, {self.in_features}) copy of W_R at every read (N/M of "
                "it zeros, read-only, no gradient); keep such reads out of the training loop "
                "and use layer.to_dense() or layer.values where you can",
                stacklevel=2,
            )
        with torch.no_grad():
            dense = self.layout.to_dense(self.values.detach(), self.row_index)  # (d_out, d_in)
        view = dense.as_subclass(_ReadOnlyWeight)
        view.layer_name = self.name
        return view

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            f"layer {self.name!r}: SparseLinear.weight is a read-only dense copy of W_R; write "
            "the kept entries to layer.values, prune a dense weight in with "
            "slope_lightning.sparse.sparsify.load_dense_state_dict, or build a new layer with "
            "SparseLinear.from_linear"
        )

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
        the M_C an unsharded layer would derive, bit for bit (see :meth:`_refresh_sharded`).
        The statistics cost three transient masks; skip them on steps that do not log.
        """
        if _is_dtensor(self.values):
            return self._refresh_sharded(with_stats)
        old = self.col_index
        new = self._derive_col_index()
        if "col_index" in self._parameters:  # held as a parameter: written in place
            old = old.clone() if with_stats else old
            with torch.no_grad():
                self.col_index.copy_(new)
        else:
            self.col_index = new
        self._after_refresh()
        if not with_stats:
            return None
        t_layout = self.layout.transposed()
        with torch.no_grad():
            new_mask = t_layout.mask(new)  # (d_in, d_out), transient
            flipped = int((new_mask & ~t_layout.mask(old)).sum())
            w_r_mask = self.layout.mask(self.row_index).t()  # (d_in, d_out)
            kept = int((new_mask & w_r_mask).sum())
        return TransposeMaskRefresh(flipped=flipped, kept=kept, total=self.values.numel())

    def _after_refresh(self) -> None:
        self._mask_generation += 1
        self._updates_since_refresh = 0
        self._seen_version = self.values._version

    def _refresh_sharded(self, with_stats: bool) -> TransposeMaskRefresh | None:
        """:meth:`refresh_transpose_mask` for values that FSDP2 shards by rows (d_out).

        M_C's groups run along d_out, so each rank derives the columns of M_C that its own
        rows cover, from its own shard of the values and of M_R, and the ranks all-gather
        those packed bytes (2 bits per kept value for 2:4; the whole M_C, transiently): no
        value is gathered. Each rank then keeps its shard of M_C (by rows, d_in) if M_C is
        sharded (see :meth:`hold_masks_as_parameters`), or all of it if it is a replicated
        buffer.

        Every rank takes the same branch, which depends only on global sizes: where a rank's
        rows do not fill whole bytes of M_C (2:4: a multiple of 8 rows per rank), the
        values are gathered instead (N/M of a dense weight, what a forward gathers anyway).
        """
        values = self.values
        assert _is_dtensor(values)
        shard = _row_shard(values)
        if shard is None:
            raise RuntimeError(
                f"layer {self.name!r}: its values are a DTensor placed {values.placements}; "
                "SparseLinear supports FSDP2/HSDP sharding by rows (Shard(0) on one mesh "
                "dimension, Replicate on the others)"
            )
        group, chunk, index = shard
        layout, t_layout = self.layout, self.layout.transposed()
        per_byte = 8 // bits_per_offset(layout.m)
        aligned = chunk % layout.m == 0 and (chunk // layout.m * layout.n) % per_byte == 0
        if aligned:
            local = _local(values)  # (rows here, d_in·N/M)
            rows = local.shape[0]
            if _is_dtensor(self.row_index):
                my_row_index = _local(self.row_index)  # sharded like the values
            else:
                my_row_index = self.row_index[index * chunk : index * chunk + rows]
            assert my_row_index.shape[0] == rows, "M_R must be sharded like the values"
            if rows:
                local_layout = NMLayout(rows, layout.cols, layout.n, layout.m)
                impl = self._backend.kernels.transpose_index
                part = derive_col_index(local, my_row_index, local_layout, impl)
            else:  # torch.chunk leaves trailing ranks empty when the rows run out
                part = my_row_index.new_zeros(layout.cols, 0)
            width = packed_width(t_layout.kept_per_row, layout.m)
            new = _all_gather_columns(part, group, width)  # (d_in, packed d_out): a collective
        else:
            full_values = values.full_tensor()  # a collective
            full_rows = _full(self.row_index)
            impl = self._backend.kernels.transpose_index
            new = derive_col_index(full_values, full_rows, layout, impl)
        # This rank's rows (d_in) of M_C: all of them if M_C is a replicated buffer.
        if _is_dtensor(self.col_index):
            target = _local(self.col_index)
            start = index * -(-layout.cols // group.size())  # torch.chunk's rows, as FSDP2
            mine = new[start : start + target.shape[0]]
            old = target.clone() if with_stats else target
            with torch.no_grad():
                target.copy_(mine)
            reduce = True
        else:
            start, mine, old = 0, new, self.col_index
            self.col_index = new
            reduce = False
        self._after_refresh()
        if not with_stats:
            return None
        rows_here = mine.shape[0]
        mine_layout = NMLayout(rows_here, t_layout.cols, layout.n, layout.m)
        with torch.no_grad():
            new_mask = mine_layout.mask(mine)  # (d_in here, d_out), transient
            flipped = (new_mask & ~mine_layout.mask(old)).sum()
            w_r_mask = layout.mask(_full(self.row_index))[:, start : start + rows_here].t()
            counts = torch.stack([flipped, (new_mask & w_r_mask).sum()])
            if reduce:  # each rank counted its own rows of M_C
                torch.distributed.all_reduce(counts, group=group)  # a collective
        flipped_total, kept = (int(c) for c in counts.tolist())
        return TransposeMaskRefresh(flipped=flipped_total, kept=kept, total=values.numel())

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
        """Count one optimizer update of the values (called by :func:`follow_optimizer`'s hook).

        Once called, the layer counts updates only through it and ignores the values'
        version counter, so an update is never counted twice.
        """
        self._counts_optimizer_steps = True
        self._updates_since_refresh += 1
        self._seen_version = self.values._version
        interval = self.transpose_mask_interval
        # FSDP2: the forward sees a gathered copy that is freed after it, where a refreshed
        # M_C would not last; refresh between steps instead (the same mask: the same W_R).
        due = interval is not None and self._updates_since_refresh >= interval
        if due and _is_dtensor(self.values):
            self.refresh_transpose_mask(with_stats=False)

    def _refresh_transpose_mask_if_due(self) -> None:
        """Refresh M_C when ``transpose_mask_interval`` optimizer updates have happened.

        Contract: called at every training forward. An update is counted either by
        :meth:`note_optimizer_step` (an optimizer step hook, see
        :func:`~slope_lightning.sparse.follow_optimizer`: works for every optimizer) or, for
        a layer no hook reports to, as a move of the values' version counter since the
        previous training forward (every in-place ``torch.optim`` update bumps it, but fused
        optimizers such as ``AdamW(fused=True)`` do not).
        """
        if not self._counts_optimizer_steps:
            version = self.values._version
            if version != self._seen_version:
                self._seen_version = version
                self._updates_since_refresh += 1
        interval = self.transpose_mask_interval
        if interval is not None and self._updates_since_refresh >= interval:
            self.refresh_transpose_mask(with_stats=False)

    def get_extra_state(self) -> Tensor:
        """(updates since the last M_C refresh, N, M) as one int64 tensor.

        A tensor, not a dict, so that ``state_dict()`` holds only tensors (safetensors,
        ``save_pretrained``); N and M let a load refuse a checkpoint of another pattern.
        """
        pending = int(
            not self._counts_optimizer_steps and self.values._version != self._seen_version
        )
        state = [self._updates_since_refresh + pending, self.n, self.m]
        return torch.tensor(state, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Restore the refresh counter; check the pattern and the loaded masks.

        Raises:
            ValueError: the state was saved from another N:M pattern, or the loaded packed
                masks are not a valid N:M pattern.
        """
        if isinstance(state, dict):  # checkpoints written before the tensor form
            updates, pattern = int(state.get("updates_since_refresh", 0)), None
        elif not isinstance(state, Tensor | list | tuple):
            # torch.distributed.checkpoint's placeholder for an extra state absent from a
            # partial load (Lightning loads a full checkpoint into an FSDP2 model one tensor
            # at a time): nothing to restore here; the masks are still checked.
            updates, pattern = self._updates_since_refresh, None
        else:
            values = [int(v) for v in torch.as_tensor(state).flatten().tolist()]
            if len(values) != 3:
                raise ValueError(
                    f"layer {self.name!r}: extra state {values} is not (updates, N, M); the "
                    "checkpoint was not written by this version of slope-lightning"
                )
            updates, pattern = values[0], (values[1], values[2])
        if pattern is not None and pattern != (self.n, self.m):
            raise ValueError(
                f"layer {self.name!r}: the checkpoint holds a {pattern[0]}:{pattern[1]} sparse "
                f"weight, this model is {self.n}:{self.m}; build the model with "
                f"n={pattern[0]}, m={pattern[1]} (model.sparsity.n / .m) to load it"
            )
        self._check_index(_local(self.row_index), self.layout, "row_index (M_R)")
        self._check_index(_local(self.col_index), self.layout.transposed(), "col_index (M_C)")
        self._updates_since_refresh = updates
        self._seen_version = self.values._version
        self._operands.clear()

    def _check_index(self, index: Tensor, layout: NMLayout, label: str) -> None:
        """Raise unless ``index`` decodes to N strictly increasing offsets < M per group
        (``index`` may be a shard of rows, e.g. this rank's under FSDP2)."""
        layout = NMLayout(index.shape[0], layout.cols, layout.n, layout.m)
        positions = layout.positions(index)  # (rows, G, n)
        ok = bool((positions < layout.m).all()) and bool((positions.diff(dim=-1) > 0).all())
        if not ok:
            raise ValueError(
                f"layer {self.name!r}: the loaded {label} is not a valid {layout.n}:{layout.m} "
                "pattern (offsets out of range or repeated within a group); the checkpoint is "
                "corrupt or from another pattern: load an earlier checkpoint or re-export"
            )

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
        training_step = torch.is_grad_enabled() and (self.values.requires_grad or x.requires_grad)
        if training_step:
            if self.merged:
                logger.info("layer %r: unmerged for a training forward", self.name)
                self.unmerge()
            # The optimizer is about to change the values: inference copies would go stale.
            self._operands.clear()
            self._refresh_transpose_mask_if_due()
            self._check_backend(x)
            y = sparse_linear(
                x,
                self.values,
                self.bias,
                self.row_index,
                self.col_index,
                self.layout,
                self._backend,
            )
        elif self.merged:
            self._check_backend(x)
            if self._fused is None or self._fused.key != self.weight_key():
                self._fused = self.fused_operand()  # parameters changed since merge()
            return merged_forward(
                x, self._fused, self.bias, self._backend, self._operands, self.out_features
            )
        else:
            self._check_backend(x)
            y = self._inference_forward(x)
        if self.adapter is not None:
            y = y + self.adapter(x).to(y.dtype)
        return y

    def _inference_forward(self, x: Tensor) -> Tensor:
        """Y = X W_Rᵀ + b without autograd, reusing kernel-side operands across calls."""
        compute_dtype = compute_dtype_of(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).to(compute_dtype)  # (T, d_in)
        bias = self.bias.to(compute_dtype) if self.bias is not None else None
        weight = SparseWeight(
            self.values,
            self.row_index,
            self.layout,
            compute_dtype,
            key=(self.weight_key(), compute_dtype),
        )
        with torch.autocast(x.device.type, enabled=False):
            y2d = self._backend.forward(x2d, weight, bias, self._operands)  # (T, d_out)
        return y2d.reshape(*lead, self.out_features)

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


# ---------------------------------------------------------------------- FSDP2 (sharded values)
#
# Under FSDP2 (``fully_shard``) the values are a DTensor sharded by rows (d_out) between steps,
# and FSDP's gathered plain tensor inside the forward and backward. The packed masks shard
# with them once held as frozen parameters (:meth:`SparseLinear.hold_masks_as_parameters`):
# M_R by rows like the values, M_C by its own rows (d_in). The one place the shards meet is
# M_C's re-derivation between steps (:meth:`SparseLinear._refresh_sharded`).


def _is_dtensor(tensor: Tensor | None) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (torch.distributed may be missing from the build)."""
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: Tensor) -> Tensor:
    """This process's part of ``tensor``: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _full(tensor: Tensor) -> Tensor:
    """All of ``tensor``: a DTensor gathered (a collective), any other tensor itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _row_shard(values: DTensor) -> tuple[ProcessGroup, int, int] | None:
    """(process group, rows per rank, this rank's index) of a DTensor sharded by rows on one
    mesh dimension and replicated on the others (FSDP2, HSDP); None for other placements."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(values.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or placements[shard_dims[0]] != Shard(0):
        return None
    dim = shard_dims[0]
    if not all(isinstance(p, Replicate) for i, p in enumerate(placements) if i != dim):
        return None
    mesh = values.device_mesh
    chunk = -(-values.shape[0] // mesh.size(dim))  # torch.chunk's rows per rank, as FSDP2
    return mesh.get_group(dim), chunk, mesh.get_local_rank(dim)


def _all_gather_columns(part: Tensor, group: ProcessGroup, width: int) -> Tensor:
    """Concatenate every rank's ``part`` (rows, its columns) along the columns, in rank
    order, trimmed to ``width`` columns: torch.chunk's layout, the last parts may be short."""
    world = torch.distributed.get_world_size(group)
    chunk = -(-width // world)
    padded = part.new_zeros(part.shape[0], chunk)
    padded[:, : part.shape[1]] = part
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded.contiguous(), group=group)
    sizes = [max(0, min(chunk, width - r * chunk)) for r in range(world)]
    return torch.cat([g[:, :size] for g, size in zip(gathered, sizes, strict=True)], dim=1)
