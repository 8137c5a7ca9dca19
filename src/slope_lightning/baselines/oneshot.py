"""One-shot N:M pruning of a trained dense model, then fine-tuning with the mask fixed.

The post-training baseline: train dense, prune every selected linear layer once to N:M along
d_in, and optionally fine-tune the pruned model with the mask frozen. Two scores choose the
kept entries of each group of M consecutive weights in a row:

- ``magnitude``: |W_ij| (the classic baseline).
- ``wanda``: |W_ij| · ‖X_j‖₂, the weight's magnitude times the norm of its input feature over
  calibration tokens (Sun et al., "A Simple and Effective Pruning Approach for Large Language
  Models", 2023). The input norms come from :func:`wanda_input_norms`.

A pruned layer is a :class:`FixedMaskLinear`: a dense weight whose pruned entries are zero, the
kept positions as a compact buffer (N bytes per group of M weights), and a forward that
multiplies by the mask, so that the weight gradient is zero outside it and a fine-tune never
brings a pruned entry back. The input gradient is exact: dX = dY (W ⊙ M).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slope_lightning.baselines.layers import (
    DenseWeightLinear,
    check_layer_pattern,
    convert_linears,
    linear_holding,
    linear_rules,
    replace_with_linear,
)
from slope_lightning.sparse.calibration import collect_input_norms, wanda_scores
from slope_lightning.sparse.masks import MaskMethod, nm_positions, positions_to_mask
from slope_lightning.sparse.selection import LayerRules, plan_layers

logger = logging.getLogger(__name__)

#: The mask methods of :data:`~slope_lightning.sparse.MaskMethod` a one-shot prune takes
#: (a random one-shot mask is no baseline worth training).
ONESHOT_METHODS: tuple[MaskMethod, ...] = ("magnitude", "wanda")


class FixedMaskLinear(DenseWeightLinear):
    """A linear layer pruned N:M once, with its mask fixed: Y = X (W ⊙ M)ᵀ + b.

    ``weight`` is a dense Parameter whose pruned entries were set to zero; ``positions``
    (uint8 buffer, (d_out, d_in/m, n)) holds the kept offsets of every group and is saved in
    the state dict. The forward multiplies by the mask, so the weight gradient is
    dYᵀX ⊙ M and the pruned entries stay zero under any optimizer, momentum included.

    Args:
        in_features, out_features: d_in and d_out; d_in must be divisible by ``m``.
        bias: whether to learn an additive bias.
        n, m: the N:M pattern.
        device, dtype: of the new parameters.
        name: the layer's name in its model, used in error messages.

    Raises:
        ValueError: an invalid N:M pattern, or d_in not divisible by m.

    Example:
        >>> layer = FixedMaskLinear.from_linear(nn.Linear(16, 8))
        >>> int((layer.weight != 0).sum())  # 2 of every 4 weights remain
        64
    """

    positions: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        n: int = 2,
        m: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "FixedMaskLinear",
    ) -> None:
        check_layer_pattern(name, in_features, n, m)
        super().__init__(in_features, out_features, bias, device, dtype, name)
        self.n = n
        self.m = m
        # kept offsets of every group: chosen by prune_ (reset_parameters, from_linear)
        self.register_buffer(
            "positions",
            torch.zeros(out_features, in_features // m, n, dtype=torch.uint8, device=device),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, then magnitude pruning of it."""
        super().reset_parameters()
        if self.weight.device.type != "meta":
            self.prune_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n: int = 2,
        m: int = 4,
        scores: Tensor | None = None,
        name: str = "FixedMaskLinear",
    ) -> FixedMaskLinear:
        """Prune ``linear`` N:M along d_in, keeping the entries of largest ``scores`` (default
        |W|: magnitude pruning) in every group; ties go to the lower offset.

        The layer shares ``linear``'s Parameters, and the pruned entries of the shared weight
        are set to zero in place: the dense layer is consumed.

        Raises:
            TypeError: ``linear`` is not an nn.Linear.
            ValueError: ``scores`` does not have the weight's shape.
        """
        layer = cls.wrapping(linear, n=n, m=m, name=name)
        layer.prune_(scores)  # replaces the meta positions
        return layer

    @torch.no_grad()
    def prune_(self, scores: Tensor | None = None) -> None:
        """Choose the mask from ``scores`` (default |W|) and zero the other entries, in place.

        Raises:
            ValueError: ``scores`` does not have the weight's shape.
        """
        if scores is None:
            scores = self.weight
        if scores.shape != self.weight.shape:
            raise ValueError(
                f"layer {self.name!r}: scores have shape {tuple(scores.shape)}, expected the "
                f"weight's {tuple(self.weight.shape)}"
            )
        positions = nm_positions(scores.detach(), self.n, self.m)  # (d_out, d_in/m, n)
        self.positions = positions.to(torch.uint8)
        self.weight.mul_(self.mask())

    def mask(self) -> Tensor:
        """The fixed mask, bool (d_out, d_in); built transiently from ``positions``."""
        return positions_to_mask(self.positions.long(), self.m)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding W ⊙ M (copied) and the bias (copied)."""
        linear = linear_holding(self.weight * self.mask(), self.bias)
        linear.train(self.training)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        # autograd of W ⊙ M gives dW = (dYᵀX) ⊙ M and dX = dY (W ⊙ M)
        return F.linear(x, self.weight * self.mask(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, m={self.m}"


def oneshot_rules(
    n: int = 2,
    m: int = 4,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> LayerRules:
    """The layer selection of :func:`oneshot_prune` (and of its calibration): ``nn.Linear``
    layers whose sizes are multiples of ``m``, by ``include`` / ``exclude``."""
    return linear_rules("oneshot_prune", "pruned", FixedMaskLinear, n, m, include, exclude)


def _call(model: nn.Module, batch: Any) -> object:
    return model(batch)


def wanda_input_norms(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], object] | None = None,
    m: int = 4,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    n: int = 2,
) -> dict[str, Tensor]:
    """‖X_j‖₂ of every input feature of every Linear :func:`oneshot_prune` would prune, over
    calibration batches: :func:`~slope_lightning.sparse.calibration.collect_input_norms` (the
    one Wanda of the library) on the layers of the same plan.

    Args:
        model: the trained dense model (run in eval mode, restored afterwards).
        batches: calibration inputs.
        forward: runs the model on one batch (default ``model(batch)``).
        m, include, exclude, n: the layer selection of :func:`oneshot_prune`.

    Returns:
        Qualified layer name -> (d_in,) float32 norms.

    Raises:
        ValueError: no calibration token reached some layer.
    """
    plan = plan_layers(model, oneshot_rules(n, m, include, exclude))
    names = [d.name for d in plan.planned]
    norms = collect_input_norms(model, batches, forward or _call, layers=names)
    for name in names:
        if name not in norms:
            raise ValueError(
                f"layer {name!r} saw no calibration token: give batches that run through it"
            )
    return norms


def oneshot_prune(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    method: MaskMethod = "magnitude",
    input_norms: Mapping[str, Tensor] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Prune ``model``'s Linear layers N:M once, in place, as :class:`FixedMaskLinear` layers.

    Args:
        model: the trained dense model.
        n, m: the N:M pattern.
        method: ``"magnitude"`` (|W|) or ``"wanda"`` (|W| · ‖X_j‖₂, scored by
            :func:`~slope_lightning.sparse.calibration.wanda_scores`; needs ``input_norms``).
        input_norms: from :func:`wanda_input_norms`, for ``method="wanda"``.
        include, exclude: the layer selection (as :func:`slope_lightning.sparse.sparsify`;
            exclude None: :data:`~slope_lightning.sparse.DEFAULT_EXCLUDE`).

    Returns:
        The qualified names of the pruned layers.

    Raises:
        ValueError: unknown method, wanda without norms for a layer, an invalid N:M pattern,
            ``model`` is itself a Linear, or an included layer cannot be pruned.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        >>> oneshot_prune(model)
        ['0', '2']
    """
    if method not in ONESHOT_METHODS:
        raise ValueError(
            f"unknown one-shot method {method!r}; choose one of {', '.join(ONESHOT_METHODS)}"
        )
    rules = oneshot_rules(n, m, include, exclude)
    if method == "wanda":
        plan = plan_layers(model, rules)  # checked before anything is swapped
        missing = [d.name for d in plan.planned if input_norms is None or d.name not in input_norms]
        if missing:
            raise ValueError(
                f"method='wanda' needs the input norms of every pruned layer; missing for "
                f"{missing[:3]}{' ...' if len(missing) > 3 else ''}: compute them with "
                "wanda_input_norms(model, calibration_batches)"
            )

    def prune(linear: nn.Linear, name: str) -> nn.Module:
        scores = None
        if method == "wanda":
            assert input_norms is not None
            scores = wanda_scores(linear.weight, input_norms[name])  # float32
        return FixedMaskLinear.from_linear(linear, n, m, scores, name=name)

    pruned = convert_linears(model, rules, prune)
    logger.info("oneshot_prune: %d layers pruned %d:%d by %s", len(pruned), n, m, method)
    return pruned


def oneshot_finalize(model: nn.Module) -> list[str]:
    """Replace every :class:`FixedMaskLinear` in ``model`` by the nn.Linear of its pruned
    weight (:meth:`FixedMaskLinear.to_linear`), in place: a plain model for export, whose
    state dict a dense :class:`~slope_lightning.models.Transformer` loads.

    Returns:
        The qualified names of the replaced layers.
    """
    return replace_with_linear(model, FixedMaskLinear)
