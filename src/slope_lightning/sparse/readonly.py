"""The read-only dense weight a SparseLinear shows to code that reads ``module.weight``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

#: The error of assigning ``SparseLinear.weight`` (``{name}``: the layer's name).
ASSIGNING_WEIGHT = (
    "layer {name!r}: SparseLinear.weight is a read-only dense copy of W_R; write the kept "
    "entries to layer.values, prune a dense weight in with "
    "slope_lightning.sparse.load_dense_state_dict, or build a new layer with "
    "SparseLinear.from_linear"
)

#: In-place tensor methods that change no values, allowed on :class:`ReadOnlyWeight`.
_HARMLESS_INPLACE = frozenset({"requires_grad_", "share_memory_"})


class ReadOnlyWeight(Tensor):
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
                "slope_lightning.sparse.load_dense_state_dict, or take a writable "
                "copy with layer.to_dense()"
            )
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if name == "__get__" and attribute == "data" and isinstance(result, Tensor):
            data = result.as_subclass(cls)  # .data must refuse writes too (PEFT's merge)
            data.layer_name = mine[0].layer_name if mine else cls.layer_name
            return data
        return result


def read_only(dense: Tensor, layer_name: str) -> Tensor:
    """``dense`` as a :class:`ReadOnlyWeight` of layer ``layer_name`` (no copy)."""
    view = dense.as_subclass(ReadOnlyWeight)
    view.layer_name = layer_name
    return view


def warn_dense_read(layer_name: str, shape: tuple[int, int]) -> None:
    """The warning of a layer's first ``weight`` read: it builds a dense copy each time."""
    warnings.warn(
        f"layer {layer_name!r}: reading SparseLinear.weight builds a dense {shape} copy of W_R "
        "at every read (N/M of it zeros, read-only, no gradient); keep such reads out of the "
        "training loop and use layer.to_dense() or layer.values where you can",
        stacklevel=3,
    )
