"""SR-STE: dynamic N:M sparsity with a sparse-refined straight-through gradient.

After Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch" (ICLR 2021), the 2:4 training baseline of the SLoPe paper. For one linear layer with
a dense master weight W (d_out, d_in):

1. **Mask, every step.** M = the N:M magnitude mask of the current W along d_in (in every row,
   each group of M consecutive entries keeps its N largest |w|; ties to the lower offset, as
   :func:`~slope_lightning.sparse.masks.nm_positions`). It is recomputed from W at every
   forward, so entries grow back into the mask as training moves them.
2. **Forward.** Y = X W̃ᵀ + b with W̃ = W ⊙ M.
3. **Input gradient.** dX = dY W̃, the exact gradient of the forward (W̃ is what was used).
4. **Weight gradient (sparse-refined STE).** g = dYᵀ X, dense and straight through to every
   entry of W, plus the decay of the pruned entries: dW = g + λ (1 − M) ⊙ W. The decay term
   pulls the pruned weights towards zero, so the mask stops flipping back and forth between
   near-equal entries (the paper's λ_W = 2e-4).

The term is part of the gradient the optimizer sees, as in the paper (which used SGD with
momentum), so it passes through Adam's normalisation under AdamW and through gradient
clipping. It is added by every backward: under gradient accumulation over k micro-batches
it is applied k times per step (scale ``decay`` by 1/k to keep λ per step).

It keeps a dense weight, a dense gradient and full-size optimizer state: its GEMMs could be
2:4 sparse on a GPU (forward and input gradient), its memory is dense. Here they run as
dense GEMMs on the masked weight (the reference), on any device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from slope_lightning.baselines.layers import (
    DenseWeightLinear,
    check_layer_pattern,
    convert_linears,
    linear_holding,
    linear_rules,
    replace_with_linear,
    straight_through_linear,
)
from slope_lightning.sparse.masks import nm_positions, positions_to_mask
from slope_lightning.sparse.selection import LayerRules

logger = logging.getLogger(__name__)

#: The paper's λ_W for the sparse-refined term.
DEFAULT_DECAY = 2e-4


def srste_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """The N:M magnitude mask of ``weight`` along d_in (its last dimension), bool.

    Args:
        weight: (d_out, d_in), d_in divisible by ``m``.
        n, m: the N:M pattern.

    Returns:
        (d_out, d_in) bool, True where an entry is kept.
    """
    return positions_to_mask(nm_positions(weight.detach(), n, m), m)  # (d_out, d_in)


class SRSTELinear(DenseWeightLinear):
    """A drop-in nn.Linear trained with SR-STE: a dense master weight, an N:M mask recomputed
    from it at every forward, and the sparse-refined straight-through gradient.

    Holds a dense ``weight`` (d_out, d_in) Parameter; no mask outlives a forward (a training
    forward's mask lives until its backward, like an activation). An evaluation forward uses
    the same W ⊙ M(W): the model it evaluates is the N:M sparse one. :meth:`to_linear` gives
    that sparse model as a plain nn.Linear (zeros at the pruned entries).

    Args:
        in_features, out_features: d_in and d_out; d_in must be divisible by ``m``.
        bias: whether to learn an additive bias.
        n, m: the N:M pattern (2:4 by default).
        decay: λ of the sparse-refined term λ (1 − M) ⊙ W added to the weight gradient
            (0 gives the plain STE).
        device, dtype: of the new parameters.
        name: the layer's name in its model, used in error messages.

    Raises:
        ValueError: an invalid N:M pattern, d_in not divisible by m, or a negative decay.

    Example:
        >>> layer = SRSTELinear.from_linear(nn.Linear(16, 8))
        >>> layer(torch.randn(3, 16)).shape
        torch.Size([3, 8])
        >>> int(layer.mask().sum())  # 2 of every 4 weights
        64
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        n: int = 2,
        m: int = 4,
        decay: float = DEFAULT_DECAY,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "SRSTELinear",
    ) -> None:
        check_layer_pattern(name, in_features, n, m)
        if isinstance(decay, bool) or not isinstance(decay, int | float) or decay < 0:
            raise ValueError(f"layer {name!r}: decay must be a number >= 0, got {decay!r}")
        super().__init__(in_features, out_features, bias, device, dtype, name)
        self.n = n
        self.m = m
        self.decay = float(decay)
        self.reset_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n: int = 2,
        m: int = 4,
        decay: float = DEFAULT_DECAY,
        name: str = "SRSTELinear",
    ) -> SRSTELinear:
        """Wrap ``linear``'s own weight and bias Parameters (shared, not copied), so an
        optimizer that already holds them stays valid.

        Raises:
            TypeError: ``linear`` is not an nn.Linear.
        """
        return cls.wrapping(linear, n=n, m=m, decay=decay, name=name)

    def mask(self) -> Tensor:
        """The N:M mask of the current weight (what the next forward uses), bool (d_out, d_in)."""
        return srste_mask(self.weight, self.n, self.m)

    def sparse_weight(self) -> Tensor:
        """W ⊙ M(W), detached: the N:M sparse weight the model computes with now."""
        with torch.no_grad():
            return self.weight * self.mask()

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the sparse weight W ⊙ M (copied) and the bias (copied)."""
        linear = linear_holding(self.sparse_weight(), self.bias)
        linear.train(self.training)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        mask = self.mask()  # from the weight as it is now: after the last optimizer step
        return straight_through_linear(x, self.weight, self.bias, (mask,), decay=self.decay)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, m={self.m}, decay={self.decay:g}"


def srste_rules(
    n: int = 2,
    m: int = 4,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> LayerRules:
    """The layer selection of :func:`srste_sparsify`: ``nn.Linear`` layers whose sizes are
    multiples of ``m``, by ``include`` / ``exclude``."""
    return linear_rules("srste_sparsify", "made SR-STE", SRSTELinear, n, m, include, exclude)


def srste_sparsify(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    decay: float = DEFAULT_DECAY,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Replace ``model``'s nn.Linear layers by :class:`SRSTELinear` layers, in place.

    Selects layers as :func:`slope_lightning.sparse.sparsify` does (the one plan of
    :func:`~slope_lightning.sparse.selection.plan_layers`, nn.Linear layers only): LM heads
    and embeddings stay dense by default, tied weights, non-float weights and layers whose
    sizes are not multiples of ``m`` are left dense. The new layers share the old ones' Parameters.

    Args:
        model: any module whose Linear children are swapped.
        n, m: the N:M pattern.
        decay: λ of the sparse-refined term (see :class:`SRSTELinear`).
        include: fnmatch patterns on qualified layer names; if given, only matching layers
            are considered, and a matching layer that cannot be converted is an error.
        exclude: patterns of layers left dense (None: LM heads and embeddings,
            :data:`~slope_lightning.sparse.DEFAULT_EXCLUDE`).

    Returns:
        The qualified names of the converted layers.

    Raises:
        ValueError: an invalid N:M pattern or decay, ``model`` is itself a Linear, or an
            included layer cannot be converted.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        >>> srste_sparsify(model)
        ['0', '2']
    """
    converted = convert_linears(
        model,
        srste_rules(n, m, include, exclude),
        lambda linear, name: SRSTELinear.from_linear(linear, n, m, decay, name=name),
    )
    logger.info(
        "srste_sparsify: %d layers converted (%d:%d, decay=%g)", len(converted), n, m, decay
    )
    return converted


def srste_finalize(model: nn.Module) -> list[str]:
    """Replace every :class:`SRSTELinear` in ``model`` by the nn.Linear of its sparse weight
    (:meth:`SRSTELinear.to_linear`), in place: the trained N:M model, for evaluation or export.

    Returns:
        The qualified names of the replaced layers.
    """
    return replace_with_linear(model, SRSTELinear)
