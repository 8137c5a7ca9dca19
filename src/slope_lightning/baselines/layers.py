"""What the baselines share: converting a model's layers through the one selection plan of
``sparse/``, nn.Linear's parameters and initialisation, the N:M check of their size, and
turning them back into plain ``nn.Linear`` layers."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from slope_lightning.sparse.layout import check_divisible
from slope_lightning.sparse.masks import check_nm
from slope_lightning.sparse.selection import (
    LayerDecision,
    LayerRules,
    plan_layers,
    replace_children,
    swap_layers,
)

logger = logging.getLogger(__name__)


def convert_linears(
    model: nn.Module, rules: LayerRules, build: Callable[[nn.Linear, str], nn.Module]
) -> list[str]:
    """Swap the ``nn.Linear`` layers that ``rules`` select (the plan of
    :func:`~slope_lightning.sparse.selection.plan_layers`) for ``build(linear, name)``, in
    place, logging why each other layer is left as it is.

    Returns:
        The qualified names of the converted layers.

    Raises:
        ValueError: ``model`` is itself a Linear, or an included layer cannot be converted.
    """
    plan = plan_layers(model, rules)
    for decision in plan.layers:
        if decision.decision != "convert":
            logger.info("%s: left as it is (%s)", decision.name, decision.reason)

    def make(decision: LayerDecision) -> nn.Module:
        assert isinstance(decision.module, nn.Linear)  # rules.conv1d is False
        return build(decision.module, decision.name)

    return swap_layers(model, plan, make)


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

    def to_linear(layer: nn.Module) -> nn.Module:
        convertible: ToLinear = layer  # type: ignore[assignment]
        return convertible.to_linear()

    return replace_children(model, layer_type, to_linear)


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
    fix = "exclude this layer or choose an m that divides it"
    check_divisible(name, {"in_features (d_in)": in_features}, m, f"m={m}", fix)


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
