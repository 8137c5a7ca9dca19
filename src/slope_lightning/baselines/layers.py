"""What the baselines share: converting a model's layers through the one selection plan of
``sparse/``, nn.Linear's parameters and initialisation, the N:M check of their size, and
turning them back into plain ``nn.Linear`` layers."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import Tensor, nn

from slope_lightning.sparse.function import linear_input, linear_output_grads
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


def linear_rules(
    method: str,
    action: str,
    layer: type[nn.Module],
    n: int,
    m: int,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> LayerRules:
    """The layer selection of a baseline conversion ``method`` (its function's name) that
    turns ``nn.Linear`` layers (not ``Conv1D``) into ``layer`` layers, N:M, by ``include`` /
    ``exclude``; ``action`` says what it does to a layer in messages ("made SR-STE")."""
    single = f"{layer.__name__}.from_linear(linear)"
    return LayerRules(
        n, m, include, exclude, conv1d=False, method=method, action=action, single_layer=single
    )


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


_Layer = TypeVar("_Layer", bound="DenseWeightLinear")


class DenseWeightLinear(nn.Module):
    """What every baseline layer is built on: nn.Linear's dense ``weight`` (d_out, d_in) and
    ``bias``, its initialisation, the input check, and wrapping an nn.Linear's own Parameters.

    A subclass validates its own arguments, calls this ``__init__``, sets its state and then
    calls ``reset_parameters()``.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        name: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_features = in_features
        self.out_features = out_features
        register_linear_parameters(self, in_features, out_features, bias, device, dtype)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (kaiming_uniform_(a=sqrt(5)) and a uniform bias)."""
        init_like_linear(self.weight, self.bias)

    @classmethod
    def wrapping(cls: type[_Layer], linear: nn.Linear, **settings: Any) -> _Layer:
        """A layer holding ``linear``'s own weight and bias Parameters (shared, not copied:
        an optimizer that holds them stays valid, and no memory is spent), in its mode.

        Raises:
            TypeError: ``linear`` is not an nn.Linear.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear needs an nn.Linear, got {type(linear)}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",  # placeholders, replaced by linear's parameters below
            dtype=linear.weight.dtype,
            **settings,
        )
        layer.weight = cast(nn.Parameter, linear.weight)  # nn.Linear's Parameters, shared
        layer.bias = cast("nn.Parameter | None", linear.bias)
        layer.train(linear.training)
        return layer

    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError naming the layer unless x's last dimension is d_in."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"layer {self.name!r}: input has {x.shape[-1]} features, "
                f"expected {self.in_features}"
            )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


#: dense @ W_sᵀ (``transposed=False``) or dense @ W_s (``transposed=True``) from packed
#: operands, (T, rows): a GPU backend's sparse GEMM (see ``transposable.py``).
SparseMatmul = Callable[[tuple[Tensor, ...], Tensor, int, bool], Tensor]


class _StraightThroughLinear(torch.autograd.Function):
    """Y = X W_sᵀ + b; dX = dY W_s (the W_s of the forward); dW = dYᵀ X, dense and straight
    through to the master weight, plus λ (1 − M) ⊙ W (SR-STE's sparse-refined term)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        operands: tuple[Tensor, ...],
        sparse_mm: SparseMatmul | None,
        decay: float,
    ) -> Tensor:
        d_out, d_in = weight.shape
        x2d = linear_input(ctx, x, bias, d_in)  # (T, d_in)
        compute_dtype = ctx.compute_dtype
        with torch.autocast(x.device.type, enabled=False):
            if sparse_mm is None:  # operands = (mask,)
                w_s = weight.to(compute_dtype) * operands[0]  # (d_out, d_in), transient
                y2d = x2d @ w_s.t()  # (T, d_out)
            else:
                y2d = sparse_mm(operands, x2d, d_out, False)  # (T, d_out)
            if bias is not None:
                y2d = y2d + bias.to(compute_dtype)
        # The W_s of this forward (mask or packed operands) is saved like an activation: it
        # lives until the backward and counts in the step's peak memory.
        ctx.save_for_backward(x2d, weight, *operands)
        ctx.sparse_mm = sparse_mm
        ctx.decay = decay
        return y2d.reshape(*x.shape[:-1], d_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2d, weight, *operands = ctx.saved_tensors
        d_out, d_in = weight.shape
        dy = grad_out.reshape(-1, d_out).to(ctx.compute_dtype)  # (T, d_out)
        grad_x2d = grad_weight = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                if ctx.sparse_mm is None:
                    w_s = weight.to(ctx.compute_dtype) * operands[0]  # (d_out, d_in)
                    grad_x2d = dy @ w_s  # (T, d_in)
                else:
                    grad_x2d = ctx.sparse_mm(tuple(operands), dy, d_in, True)
            if ctx.needs_input_grad[1]:
                # Straight through: every entry of W gets dYᵀ X, so pruned ones can grow back.
                grad_weight = (dy.t() @ x2d).to(weight.dtype)  # (d_out, d_in)
                if ctx.decay:  # the pruned entries also decay (operands = (mask,))
                    grad_weight = grad_weight + ctx.decay * weight.detach() * ~operands[0]
            grad_x, grad_bias = linear_output_grads(ctx, dy, grad_x2d)
        return grad_x, grad_weight, grad_bias, None, None, None


def straight_through_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    operands: tuple[Tensor, ...],
    sparse_mm: SparseMatmul | None = None,
    decay: float = 0.0,
) -> Tensor:
    """Y = X W_sᵀ + b for x (..., d_in) with the straight-through weight gradient of the
    dynamic baselines (SR-STE, transposable 2:4).

    W_s is W ⊙ ``operands[0]`` (a bool mask, dense GEMMs) or, with ``sparse_mm``, the packed
    W_s / W_sᵀ in ``operands`` (a GPU backend); ``decay`` (mask operands only) adds
    λ (1 − M) ⊙ W to the weight gradient.
    """
    y: Tensor = _StraightThroughLinear.apply(x, weight, bias, operands, sparse_mm, decay)
    return y
