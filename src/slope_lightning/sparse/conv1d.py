"""transformers' ``Conv1D`` (GPT-2, GPT-J, ...), recognised by duck typing.

A ``Conv1D`` is a linear layer that stores its weight transposed, (d_in, d_out), and computes
``x @ W + b``. ``sparse/`` never imports transformers: the layer is recognised by its class
name, an int ``nf`` (= d_out) and a 2-D ``weight`` of shape (d_in, nf).
"""

from __future__ import annotations

from torch import Tensor, nn


def weight_of(module: nn.Module) -> Tensor | None:
    """``module.weight`` when it is a tensor (None for no weight, or one of another kind)."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``: a linear layer that stores its weight
    transposed, (d_in, d_out), and computes ``x @ W + b``.

    Recognised by duck typing (class name ``Conv1D``, an int ``nf`` = d_out and a 2-D
    ``weight`` of shape (d_in, nf)), so ``sparse/`` never imports transformers.
    """
    if type(module).__name__ != "Conv1D":
        return False  # before reading .weight: a SparseLinear's builds a dense copy
    weight = weight_of(module)
    nf = getattr(module, "nf", None)
    return (
        isinstance(nf, int) and weight is not None and weight.dim() == 2 and weight.shape[1] == nf
    )


def dense_weight(layer: nn.Module) -> Tensor:
    """The weight of an ``nn.Linear`` or a ``Conv1D`` as (d_out, d_in), detached (a Conv1D's
    (d_in, d_out) weight transposed, as a view).

    Raises:
        TypeError: ``layer`` has no weight tensor.
    """
    weight = weight_of(layer)
    if weight is None:
        raise TypeError(f"{type(layer).__name__} has no weight tensor")
    return weight.detach().t() if is_conv1d(layer) else weight.detach()
