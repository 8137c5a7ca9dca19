"""What the baselines share: turning their layers back into plain ``nn.Linear`` layers."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


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
