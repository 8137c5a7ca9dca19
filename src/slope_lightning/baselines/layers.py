"""What the baselines' layers share: nn.Linear's parameters and initialisation, the N:M check of
their size, and turning them back into plain ``nn.Linear`` layers."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from slope_lightning.sparse.masks import check_nm


class ToLinear(Protocol):
    """A baseline layer that can give the ``nn.Linear`` of its (pruned) weight."""

    def to_linear(self) -> nn.Linear: ...


def replace_with_linear(model: nn.Module, layer_type: type[nn.Module]) -> list[str]:
    """Replace every ``layer_type`` layer in ``model`` by the ``nn.Linear`` its ``to_linear()``
    gives, in place: a plain model for evaluation or export, whose state dict a dense model
    loads.

    Returns:
        The qualified names of the replaced layers.
    """
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, layer_type):
                layer: ToLinear = child  # type: ignore[assignment]
                setattr(parent, attr, layer.to_linear())
                replaced.append(f"{parent_name}.{attr}" if parent_name else attr)
    return replaced


@torch.no_grad()
def linear_holding(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of ``weight`` (d_out, d_in) and ``bias``, on their
    device and in their dtype: what a baseline layer turns into for export."""
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def check_layer_pattern(name: str, in_features: int, n: int, m: int) -> None:
    """Raise a ValueError naming the layer unless ``n:m`` is a valid pattern and ``m``
    divides its d_in (groups of M run along d_in)."""
    try:
        check_nm(n, m)
    except ValueError as error:
        raise ValueError(f"layer {name!r}: {error}") from None
    if in_features % m:
        raise ValueError(
            f"layer {name!r}: in_features (d_in)={in_features} is not divisible by m={m}; "
            "exclude this layer or choose an m that divides it"
        )


def register_linear_parameters(
    module: nn.Module,
    in_features: int,
    out_features: int,
    bias: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """Give ``module`` nn.Linear's ``weight`` (d_out, d_in) and ``bias`` Parameters (a
    registered None without bias), uninitialised."""
    weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
    module.register_parameter("weight", nn.Parameter(weight))
    module.register_parameter(
        "bias",
        nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None,
    )


def init_like_linear(weight: Tensor, bias: Tensor | None) -> None:
    """nn.Linear's initialisation: kaiming_uniform_(a=sqrt(5)) and a uniform bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)
