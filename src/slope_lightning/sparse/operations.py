"""Model-level operations on a sparsified model: find its SparseLinear layers, undo the
conversion, add adapters, merge them for inference, follow an optimizer's steps, and load a
dense checkpoint into it (sharded models by rows: :mod:`~slope_lightning.sparse.dense_rows`).

All of them act in place on any ``nn.Module`` by visiting (or, for :func:`densify`,
swapping) its SparseLinear children; nothing is monkey-patched and nothing is registered
globally. The conversion itself is :func:`~slope_lightning.sparse.sparsify`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from slope_lightning.sparse.adapters import AdapterInit
from slope_lightning.sparse.backends import DecisionStore
from slope_lightning.sparse.dense_rows import (
    DenseRows,
    SafetensorsRows,
    StateDictRows,
    allocate,
    is_on_meta,
    load_dense_rows,
)
from slope_lightning.sparse.dtensor import is_dtensor
from slope_lightning.sparse.kernel_ops import derive_col_index
from slope_lightning.sparse.linear import SparseLinear, sparse_layers
from slope_lightning.sparse.masks import MaskMethod
from slope_lightning.sparse.selection import replace_children
from slope_lightning.utils import require_finite


def prune_dense_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    mask_method: MaskMethod = "magnitude",
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """``state_dict`` with every dense weight of a sparsified layer pruned into packed form.

    For each SparseLinear of ``model`` whose dense ``<layer>.weight`` the state dict holds
    (a dense checkpoint: ``nn.Linear`` layout (d_out, d_in), or transformers' Conv1D layout
    (d_in, d_out) for a layer made by ``SparseLinear.from_conv1d``), the weight is cast to the
    layer's dtype and pruned N:M as ``sparsify`` prunes (M_R by ``mask_method``, then M_C
    from W_R), and replaced by ``values``, ``row_index``, ``col_index`` and the layer's extra
    state. Every other entry (biases, norms, embeddings, packed layers) is kept as it is. So
    loading the result gives exactly the model that loading the dense checkpoint into the
    dense model and then calling :func:`sparsify` would give.

    Raises:
        ValueError: a dense weight has the wrong shape for its layer, or a layer has both a
            dense weight and packed values in ``state_dict``.
    """
    pruned = dict(state_dict)
    for name, layer in sparse_layers(model):
        prefix = f"{name}." if name else ""
        dense = pruned.pop(f"{prefix}weight", None)
        if dense is None:
            continue
        if f"{prefix}values" in pruned:
            raise ValueError(
                f"layer {name!r}: the state dict holds both a dense {prefix}weight and packed "
                f"{prefix}values; keep one of them"
            )
        expected = (layer.out_features, layer.in_features)
        conv1d = layer.weight_layout == "conv1d"
        if not isinstance(dense, Tensor) or tuple(dense.t().shape if conv1d else dense.shape) != (
            expected
        ):
            found = tuple(dense.shape) if isinstance(dense, Tensor) else type(dense).__name__
            layout = "(d_in, d_out) = " + str(expected[::-1]) if conv1d else str(expected)
            raise ValueError(
                f"layer {name!r}: the dense weight {prefix}weight has shape {found}, the layer "
                f"needs {layout}; load a checkpoint of this architecture"
            )
        weight = (dense.t() if conv1d else dense).detach()
        weight = weight.to(device=layer.row_index.device, dtype=layer.values.dtype)
        with torch.no_grad():
            values, row_index = layer.layout.prune(weight, mask_method, generator)
            col_index = derive_col_index(values, row_index, layer.layout, "torch")
        pruned[f"{prefix}values"] = values
        pruned[f"{prefix}row_index"] = row_index
        pruned[f"{prefix}col_index"] = col_index
        # No optimizer step since M_C was derived, and the layer's N:M (see get_extra_state).
        pruned[f"{prefix}_extra_state"] = torch.tensor([0, layer.n, layer.m])
    return pruned


def load_dense_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    mask_method: MaskMethod = "magnitude",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Any:
    """Load a dense checkpoint's state dict into a sparsified ``model``: the supported way to
    start SLoPe from a dense model (sparse continued pretraining).

    Each dense weight of a SparseLinear is pruned N:M into it (see
    :func:`prune_dense_state_dict`); everything else loads as ``model.load_state_dict`` loads
    it. The result equals loading the checkpoint into the dense model, then sparsifying.

    A model sharded by FSDP2 (DTensor parameters) or still on the meta device takes the
    row-wise path of :func:`load_dense_safetensors` (every rank calls it, a collective): each
    rank copies and prunes only its rows of each tensor, with the same result.

    Args:
        model: the sparsified model (or the LightningModule holding it: the keys are
            qualified names from ``model``).
        state_dict: e.g. ``torch.load(path, weights_only=True)["state_dict"]`` of a dense
            Lightning checkpoint, or a transformers model's ``state_dict()``.
        strict: as in ``load_state_dict``: every key must match.
        mask_method: how M_R is chosen from the dense weights (as in :func:`sparsify`);
            "magnitude" only for a sharded or meta model.
        generator: random source for ``mask_method="random"``.
        device: where a meta model is allocated.

    Returns:
        ``load_state_dict``'s named tuple of missing and unexpected keys.

    Raises:
        ValueError: a dense weight does not fit its layer (see :func:`prune_dense_state_dict`),
            or a tensor holds NaN/inf (the message names it; nothing is loaded); on a sharded
            or meta model, also missing or unexpected keys with ``strict``, or another
            mask method than "magnitude".
        RuntimeError: ``strict`` and keys that do not match (``load_state_dict``'s error).

    Example:
        >>> dense = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> from slope_lightning.sparse import sparsify
        >>> _ = sparsify(model)
        >>> load_dense_state_dict(model, dense.state_dict())
        <All keys matched successfully>
    """
    if is_on_meta(model) or any(is_dtensor(p) for p in model.parameters()):
        if mask_method != "magnitude":
            raise ValueError(
                f"load_dense_state_dict(mask_method={mask_method!r}) on a sharded or meta "
                "model: each rank prunes its own rows, by magnitude only; pass "
                "mask_method='magnitude'"
            )
        return _load_by_rows(model, StateDictRows(state_dict), strict, device)
    tensors = {key: value for key, value in state_dict.items() if isinstance(value, Tensor)}
    require_finite(tensors, "load", "the dense state dict")  # as every save path refuses them
    sparse_state = prune_dense_state_dict(
        model, state_dict, mask_method=mask_method, generator=generator
    )
    # A tied parameter is stored once (safetensors keeps no aliases): its other names load it.
    named = dict(model.named_parameters(remove_duplicate=False))
    for name, param in named.items():
        stored = next((n for n, p in named.items() if p is param and n in sparse_state), None)
        if name not in sparse_state and stored is not None:
            sparse_state[name] = sparse_state[stored]
    return model.load_state_dict(sparse_state, strict=strict)


def load_dense_safetensors(
    model: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    device: torch.device | str = "cpu",
) -> Any:
    """Load a dense ``.safetensors`` checkpoint into a sparsified ``model`` (plain, sharded by
    FSDP2, or still on the meta device), reading only the rows each process holds.

    Each SparseLinear's dense ``<layer>.weight`` rows are pruned N:M by magnitude into its
    values and M_R, M_C derived after (a collective under FSDP2: every rank calls this);
    every other tensor takes its rows. The result equals :func:`load_dense_state_dict` with
    the whole file. A meta model is allocated on ``device`` first (tied parameters kept
    tied); one with non-persistent buffers (the project's Transformer: its rotary tables)
    needs :func:`slope_lightning.models.meta_init.materialize`, which recomputes them.

    Returns:
        The missing and unexpected keys, named as ``load_state_dict``'s (empty with
        ``strict``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is truncated or corrupt, a key of another shape (named, with
            both shapes), missing or unexpected keys with ``strict``, NaN/inf (the key
            named); on every process when it happens on one; or a meta model with
            non-persistent buffers.
    """
    return _load_by_rows(model, SafetensorsRows(path), strict, device)


def _load_by_rows(
    model: nn.Module, source: DenseRows, strict: bool, device: torch.device | str
) -> Any:
    if is_on_meta(model):
        persistent = set(model.state_dict(keep_vars=True))
        derived = [
            name
            for name, buffer in model.named_buffers()
            if name not in persistent and buffer.is_meta
        ]
        if derived:
            raise ValueError(
                f"the model is on the meta device with buffers no checkpoint holds "
                f"({derived[:3]}); for the project's Transformer use "
                "slope_lightning.models.meta_init.materialize(model, rows, device) with rows = "
                "SafetensorsRows(path) or StateDictRows(state_dict), which recomputes them (a "
                "SLoPeModule(meta_init=True): module.initialise_from(rows) before "
                "configure_model), or allocate and initialise them yourself first"
            )
        allocate(model, device)
    return load_dense_rows(model, source, strict=strict)


def backend_report(model: nn.Module) -> str:
    """A table of every SparseLinear's backend and, for ``auto``, its choice and why, and which
    steps run as Triton kernels (only where measured faster than torch).

    ``auto`` decides at a layer's first forward, so call this after one step.
    """
    layers = sparse_layers(model)
    width = max([len("layer"), *(len(name) for name, _ in layers)])
    lines = [f"{'layer':<{width}}  {'shape (out x in)':>17}  backend"]
    for name, layer in layers:
        shape = f"{layer.out_features} x {layer.in_features}"
        lines.append(f"{name:<{width}}  {shape:>17}  {layer.backend.describe()}")
    return "\n".join(lines)


def follow_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Tell every SparseLinear of ``model`` whose values ``optimizer`` updates about each step.

    The only step counter of the M_C refresh (the rule: :mod:`slope_lightning.sparse.refresh`).
    Needed for ``transpose_mask_interval`` > 1 (a layer cannot see a fused optimizer's
    step; without it such a layer refuses to train) and under FSDP2, where M_C is re-derived
    from the shards right after each step; with the default interval 1 on one process it is
    not needed (every training forward re-derives M_C). Works for every optimizer, fused,
    foreach or plain. Call it once per optimizer, before training (the Lightning module and
    the SLoPe callback do; twice would count each step twice). Returns the hook's handle
    (``handle.remove()`` detaches it).
    """
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    layers = [layer for _, layer in sparse_layers(model) if id(layer.values) in owned]
    for layer in layers:
        layer.refresh_counter.counted = True

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for layer in layers:
            layer.note_optimizer_step()

    return optimizer.register_step_post_hook(after_step)


def use_decision_store(model: nn.Module, path: str | Path | None) -> DecisionStore:
    """Keep the measured decisions of every ``auto`` layer of ``model`` in one store.

    Which GEMM ``auto`` runs is then read from, and written to, ``path`` (JSON; None keeps
    them in memory): a file the run owns, such as one inside its log directory, rather than
    one shared by every run of the machine. Layers with other backends are unaffected.
    """
    store = DecisionStore(path)
    for _, layer in sparse_layers(model):
        layer.backend.use_decision_store(store)
    return store


def densify(model: nn.Module) -> list[str]:
    """Undo :func:`~slope_lightning.sparse.sparsify`: swap every SparseLinear for an
    equivalent nn.Linear.

    Adapters are folded into the dense weight. Returns the names of the swapped layers.
    """
    return replace_children(model, SparseLinear, _to_linear)


def _to_linear(layer: nn.Module) -> nn.Module:
    assert isinstance(layer, SparseLinear)
    return layer.to_linear()


def add_adapters(
    model: nn.Module,
    rank: int | float,
    *,
    init: AdapterInit = "slope",
    alpha: float | None = None,
    seed: int | None = None,
) -> list[nn.Parameter]:
    """Attach lazy low-rank adapters to every SparseLinear in ``model``.

    Args:
        rank: an int, or a float in (0, 1) read as a fraction of each layer's d_in
            (the paper's 1.56% is ``0.0156``).
        init: "slope" (L ~ N(0,1), R = 0, s = 1/r) or "peft" (Kaiming L, R = 0, s = alpha/r).
        alpha: scale numerator for ``init="peft"`` (default: r, i.e. s = 1).
        seed: seed for L's initialisation.

    Returns:
        The new parameters, to be added to a running optimizer
        (``optimizer.add_param_group({"params": params})``).

    Raises:
        ValueError: no SparseLinear in the model, or a bad rank for some layer.
        RuntimeError: some layer already has an adapter.
    """
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(
            "add_adapters(): the model has no SparseLinear layer; call sparsify() first"
        )
    if any(layer.adapter is not None for _, layer in layers):
        raise RuntimeError("add_adapters(): the model already has adapters")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    params: list[nn.Parameter] = []
    for _, layer in layers:
        params += layer.add_adapter(rank, init=init, alpha=alpha, generator=generator)
    return params


def merge_for_inference(model: nn.Module) -> int:
    """Switch every SparseLinear to the fused sparse + low-rank inference path.

    Run the merged model under ``torch.no_grad()`` or ``torch.inference_mode()``: a forward
    with gradients enabled unmerges the layer (merged weights are not trained). Returns the
    number of layers merged.
    """
    layers = [layer for _, layer in sparse_layers(model)]
    already = [layer.name for layer in layers if layer.merged]
    if already:
        raise RuntimeError(
            f"{len(already)} layer(s) already merged (e.g. {already[0]!r}); call unmerge(model) "
            "first"
        )
    # Validate every layer before merging any: a NaN in a late layer leaves nothing merged.
    fused = [layer.fused_operand() for layer in layers]
    for layer, operand in zip(layers, fused, strict=True):
        layer.merge(operand)
    return len(layers)


def unmerge(model: nn.Module) -> int:
    """Undo :func:`merge_for_inference` on every merged SparseLinear; returns how many."""
    merged = [layer for _, layer in sparse_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    return len(merged)
