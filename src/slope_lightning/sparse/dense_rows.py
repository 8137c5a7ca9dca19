"""Dense weights in by rows: load a dense checkpoint into a sparsified model that FSDP2 may
have sharded, each process reading and pruning only the rows it holds.

M_R is N:M along d_in, so a row's mask needs only that row: a rank reads its rows of a sparse
layer's dense ``<layer>.weight``, prunes them by magnitude into its local values and M_R, and
M_C then comes from the sharded refresh (a collective,
:meth:`~slope_lightning.sparse.SparseLinear.refresh_transpose_mask`). Every other tensor: this
rank's rows of a row-sharded DTensor, the whole of a plain one. The result is bit for bit what
loading the whole checkpoint into the unsharded model and sparsifying by magnitude gives.

The rows come from a :class:`DenseRows`: :class:`SafetensorsRows` (a file, read slice by
slice, never whole) or :class:`StateDictRows` (tensors already in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from safetensors import safe_open
from torch import Tensor, nn

from slope_lightning.sparse.dtensor import is_dtensor, local_part, local_rows
from slope_lightning.sparse.linear import SparseLinear, sparse_layers
from slope_lightning.utils import reading_safetensors

__all__ = [
    "DenseRows",
    "LoadedKeys",
    "SafetensorsRows",
    "StateDictRows",
    "allocate",
    "check_dense_rows",
    "is_on_meta",
    "load_dense_rows",
    "require_masks_sharded_with_values",
    "write_sparse_rows",
]

logger = logging.getLogger(__name__)


class DenseRows(Protocol):
    """A dense checkpoint read by rows: what :func:`load_dense_rows` needs of a source.

    Attributes:
        name: what the messages call the source (a file's path).
    """

    name: str

    def keys(self) -> Iterable[str]:
        """The names of the tensors."""
        ...

    def shape(self, key: str) -> tuple[int, ...]:
        """The full shape of tensor ``key``, read without its data."""
        ...

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (dim 0) of tensor ``key``."""
        ...

    def columns(self, key: str, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` (dim 1) of tensor ``key``: the rows of a Conv1D-stored
        (d_in, d_out) weight's layer."""
        ...

    def whole(self, key: str) -> Tensor:
        """All of tensor ``key`` (a scalar has no rows to read)."""
        ...


class LoadedKeys(NamedTuple):
    """What :func:`load_dense_rows` did not match, as ``load_state_dict``'s named tuple."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class StateDictRows:
    """The rows of tensors in memory (a state dict): every rank holds them all."""

    def __init__(self, state: Mapping[str, Any], name: str = "the dense state dict") -> None:
        self.name = name
        self._state = {key: value for key, value in state.items() if isinstance(value, Tensor)}

    def keys(self) -> Iterable[str]:
        return self._state.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        return self._state[key][start:stop]

    def columns(self, key: str, start: int, stop: int) -> Tensor:
        return self._state[key][:, start:stop]

    def whole(self, key: str) -> Tensor:
        return self._state[key]


class SafetensorsRows:
    """The rows of a ``.safetensors`` file, each read on its own (``safe_open``'s slices):
    a rank never reads more of the file than the rows it asks for.

    Args:
        path: the file.
        error: raised for a truncated or corrupt file (named in the message).
        fix: how the message ends.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError (or ``error``): the file is truncated, corrupt or not safetensors.
    """

    def __init__(
        self,
        path: str | Path,
        error: type[Exception] = ValueError,
        fix: str = "fetch or save it again",
    ) -> None:
        self.name = str(path)
        self._path, self._error, self._fix = Path(path), error, fix
        if not self._path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; pass an existing file")
        with reading_safetensors(self._path, fix, error):
            self._file = safe_open(str(self._path), "pt")
            keys = self._file.keys()  # safe_open's handle is not iterable
            self._shapes = {key: tuple(self._file.get_slice(key).get_shape()) for key in keys}

    def keys(self) -> Iterable[str]:
        return self._shapes.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        with reading_safetensors(self._path, self._fix, self._error):
            return self._file.get_slice(key)[start:stop]

    def columns(self, key: str, start: int, stop: int) -> Tensor:
        with reading_safetensors(self._path, self._fix, self._error):
            return self._file.get_slice(key)[:, start:stop]

    def whole(self, key: str) -> Tensor:
        with reading_safetensors(self._path, self._fix, self._error):
            return self._file.get_tensor(key)


@dataclass(frozen=True)
class _Fill:
    """One of the model's tensors filled from the source's ``key``: a SparseLinear (its dense
    weight's rows pruned into its values and M_R), or a parameter or buffer (its rows)."""

    key: str
    target: SparseLinear | Tensor
    name: str


def is_on_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is still a meta tensor."""
    tensors = [*model.parameters(), *model.buffers()]
    return any(local_part(t).is_meta or t.is_meta for t in tensors)


def allocate(model: nn.Module, device: torch.device | str) -> None:
    """Allocate a meta-built ``model`` on ``device`` (``to_empty``: uninitialised memory,
    sharded parameters as their local shards), keeping tied parameters tied (``to_empty``
    unties them)."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    model.to_empty(device=device)
    for first, *others in aliases.values():
        param = model.get_parameter(first)
        for other in others:
            owner, _, leaf = other.rpartition(".")
            if model.get_parameter(other) is not param:
                setattr(model.get_submodule(owner), leaf, param)


def check_dense_rows(model: nn.Module, source: DenseRows, *, strict: bool = True) -> None:
    """Check, reading no data, that ``source`` fits ``model`` (meta, sharded or plain): the
    keys (with ``strict``: every parameter and persistent buffer covered, nothing left over;
    a tied parameter is stored under one of its names) and every shape against the model's
    full shape.

    Raises:
        ValueError: a key of another shape (the message names it and both shapes), with
            ``strict`` missing or unexpected keys (named), or a sparse layer whose values
            are sharded but whose masks are not (see
            :meth:`~slope_lightning.sparse.SparseLinear.hold_masks_as_parameters`).
    """
    _plan(model, source, strict)


@torch.no_grad()
def load_dense_rows(model: nn.Module, source: DenseRows, *, strict: bool = True) -> LoadedKeys:
    """Load a dense checkpoint into an allocated (sparsified, FSDP2-sharded or not) ``model``,
    each process reading and pruning (by magnitude) only the rows it holds.

    Under FSDP2 this is a collective: every process calls it. The processes agree on failure
    before M_C's sharded refresh, so a failure on one (NaN in its rows, an unreadable file)
    raises on every one instead of leaving the others waiting.

    Returns:
        The missing and unexpected keys, named as ``load_state_dict``'s (empty with
        ``strict``).

    Raises:
        ValueError: ``model`` still has meta tensors (allocate it first), whatever
            :func:`check_dense_rows` refuses, a tensor with NaN/inf (the key named), or on
            the other processes, the failure of one (its rank and message).
    """
    if is_on_meta(model):
        raise ValueError(
            "load_dense_rows: the model still has meta tensors; allocate it first "
            "(slope_lightning.sparse.dense_rows.allocate(model, device)), or use "
            "load_dense_safetensors / materialize, which do"
        )
    failure: Exception | None = None
    missing: list[str] = []
    unexpected: list[str] = []
    try:
        fills, missing, unexpected = _plan(model, source, strict)
        for fill in fills:
            _fill(fill, source)
    except Exception as error:  # agreed on below, then raised on every process
        failure = error
    _agree(model, source, failure)
    for _, layer in sparse_layers(model):
        layer.refresh_transpose_mask(with_stats=False)  # M_C; a collective when sharded
    return LoadedKeys(missing, unexpected)


def write_sparse_rows(layer: SparseLinear, mine: Tensor) -> None:
    """Prune this process's rows of ``layer``'s dense weight (``mine``: (rows held, d_in), the
    rows :func:`~slope_lightning.sparse.dtensor.local_rows` of its values names) N:M by
    magnitude, each row alone, into its local values and M_R. M_C is derived after, from
    all processes (:meth:`SparseLinear.refresh_transpose_mask`)."""
    rows = local_rows(layer.values, layer.name)
    values_here = local_part(layer.values)
    mine = mine.to(device=values_here.device, dtype=values_here.dtype)
    layout = type(layer.layout)(mine.shape[0], layer.in_features, layer.n, layer.m)
    values, row_index = layout.prune(mine, "magnitude")
    values_here.copy_(values)
    if is_dtensor(layer.row_index):  # sharded with the values (hold_masks_as_parameters)
        local_part(layer.row_index).copy_(row_index)
    else:  # unsharded: all rows here
        layer.row_index[rows] = row_index


def require_masks_sharded_with_values(model: nn.Module) -> None:
    """Refuse a sparse layer whose values are sharded but whose masks are replicated: a rank
    initialising or loading its rows could write only its own rows of M_R.

    Raises:
        ValueError: such a layer (named), with the fix.
    """
    for name, layer in sparse_layers(model):
        if is_dtensor(layer.values) and not is_dtensor(layer.row_index):
            raise ValueError(
                f"layer {name!r}: its values are sharded but its masks replicated, so a rank "
                "could write only its own rows of M_R; call hold_masks_as_parameters() on "
                "every SparseLinear before fully_shard (SLoPeModule does)"
            )


def _plan(
    model: nn.Module, source: DenseRows, strict: bool
) -> tuple[list[_Fill], list[str], list[str]]:
    """What to fill from which key; the missing and unexpected keys. Reads no data."""
    available = set(source.keys())
    fills: list[_Fill] = []
    missing: list[str] = []
    owned: set[int] = set()
    require_masks_sharded_with_values(model)
    for name, layer in sparse_layers(model):
        key = f"{name}.weight" if name else "weight"
        owned |= {id(layer.values), id(layer.row_index), id(layer.col_index)}
        d_out, d_in = layer.out_features, layer.in_features
        shape = (d_in, d_out) if layer.weight_layout == "conv1d" else (d_out, d_in)
        if _check(source, key, shape, available):
            fills.append(_Fill(key, layer, name))
        else:
            missing.append(key)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in owned:
            names.setdefault(id(param), []).append(name)
    for aliases in names.values():
        param = model.get_parameter(aliases[0])
        stored = next((name for name in aliases if name in available), None)
        if stored is not None and _check(source, stored, tuple(param.shape), available):
            fills.append(_Fill(stored, param, aliases[0]))
        else:
            missing.append(aliases[0])
    persistent = set(model.state_dict(keep_vars=True))  # a checkpoint of the model holds these
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if id(buffer) in owned:
            continue
        if _check(source, name, tuple(buffer.shape), available):
            fills.append(_Fill(name, buffer, name))
        elif name in persistent:  # e.g. running statistics; not a derived (non-persistent) one
            missing.append(name)
    filled = {fill.name for fill in fills}
    used = {fill.key for fill in fills}
    used |= {name for group in names.values() if group[0] in filled for name in group}
    unexpected = sorted(available - used)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source.name} does not fit the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; pass the dense weights of this "
            "model's architecture, in its parameter names"
        )
    return fills, missing, unexpected


def _check(source: DenseRows, key: str, expected: tuple[int, ...], available: set[str]) -> bool:
    """Whether ``key`` is in ``source``, of the ``expected`` shape.

    Raises:
        ValueError: it is there with another shape.
    """
    if key not in available:
        return False
    found = tuple(source.shape(key))
    if found != expected:
        raise ValueError(
            f"{source.name} does not fit the model: {key} is {found} in the file but "
            f"{expected} in the model; pass weights of this model's shape (its preset and "
            "model_overrides)"
        )
    return True


def _fill(fill: _Fill, source: DenseRows) -> None:
    """Read this process's rows of ``fill.key``, refuse NaN/inf, write them into the model."""
    target = fill.target
    if isinstance(target, SparseLinear):
        rows = local_rows(target.values, fill.name)
        if target.weight_layout == "conv1d":  # stored (d_in, d_out): the layer's rows are columns
            mine = source.columns(fill.key, rows.start, rows.stop).t()
        else:
            mine = source.rows(fill.key, rows.start, rows.stop)
        _require_finite(mine, fill.key, source)
        write_sparse_rows(target, mine)
        return
    if target.dim() == 0:  # a scalar (a step count): never sharded, read whole
        mine = source.whole(fill.key)
    else:
        rows = local_rows(target, fill.name)
        mine = source.rows(fill.key, rows.start, rows.stop)
    _require_finite(mine, fill.key, source)
    local_part(target).copy_(mine)


def _require_finite(tensor: Tensor, key: str, source: DenseRows) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{source.name}: refusing non-finite weights: {key} holds NaN/inf; use a "
            "checkpoint saved before training diverged"
        )


def _agree(model: nn.Module, source: DenseRows, failure: Exception | None) -> None:
    """Raise ``failure`` here, and on every other process of a sharded ``model`` the first
    failing rank's message, so no process waits alone at M_C's collective refresh."""
    sharded = any(is_dtensor(p) for p in model.parameters())
    if not sharded or not torch.distributed.is_initialized():
        if failure is not None:
            raise failure
        return
    messages: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(messages, None if failure is None else str(failure))
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise ValueError(f"loading {source.name} failed on rank {rank}: {message}")
