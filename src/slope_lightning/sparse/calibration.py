"""Calibration-aware N:M masks for pretrained weights: Wanda (|W|·‖X‖ per input channel).

Magnitude pruning ranks a weight by |W_ij| alone, which suits a freshly initialised model (the
paper's setting) but not a pretrained one: a small weight on an input channel that carries
large activations matters more than a large weight on a quiet channel. Wanda (Sun et al.,
"A Simple and Effective Pruning Approach for Large Language Models", arXiv 2306.11695)
scores each weight by |W_ij|·‖X_j‖₂, the norm of input channel j over a few calibration
batches, and keeps the N best of every M consecutive entries of a row: the same row-group
structure as SLoPe's row mask M_R, so the result is an ordinary :class:`SparseLinear`.

Two steps, so that the calibration forward and the conversion can run at different times:

- :func:`collect_input_norms` runs the dense model on the calibration batches with forward
  hooks on its ``nn.Linear`` layers and transformers' ``Conv1D`` layers (removed afterwards,
  also on error) and returns ‖X_j‖₂ per layer name;
- :func:`wanda_sparsify` converts the same layers as :func:`~slope_lightning.sparse.sparsify`
  would (include / exclude / tied weights / divisibility / aspect ratio), each with the mask
  chosen on the scores and the original weight values kept exactly.

GPT-2's ``Conv1D`` (a transposed linear: ``x @ W + b`` with W of shape (d_in, d_out)) is
handled like ``nn.Linear``: its input channels are the last dimension of its input, as for a
linear layer, and its weight is transposed to (d_out, d_in) before scoring, so the scores and
the mask are those of the equivalent ``nn.Linear``; the SparseLinear remembers the Conv1D
layout (``weight_layout == "conv1d"``) for dense exports.

The norms come from the dense model in one pass (every layer sees the activations of the
unpruned layers before it), not from Wanda's layer-by-layer sequential variant.

Torch only, like the rest of ``sparse/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from slope_lightning.sparse.backends import BackendName, SparseBackend
from slope_lightning.sparse.config import SparsityConfig, config_from_call, keyword_default
from slope_lightning.sparse.conv1d import dense_weight, is_conv1d
from slope_lightning.sparse.linear import SparseLinear
from slope_lightning.sparse.masks import nm_positions, positions_to_mask
from slope_lightning.sparse.selection import (
    LayerDecision,
    SparsifyReport,
    swap_layers,
)
from slope_lightning.sparse.sparsify import ConversionSettings, plan_sparsify

logger = logging.getLogger(__name__)

#: Runs a model on one calibration batch (the return value is ignored).
ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch to ``model``: a mapping as keyword arguments (an HF batch:
    ``input_ids``, ``attention_mask``...), a tuple or list by its first element (the inputs of
    an ``(inputs, targets)`` pair), anything else as the one argument."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(batch[0])
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def collect_input_norms(
    model: nn.Module,
    batches: Iterable[Any],
    forward: ForwardFn | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """‖X_j‖₂ of every input channel j of every ``nn.Linear`` (and transformers ``Conv1D``)
    over the calibration batches.

    The model runs in eval mode under ``torch.no_grad()`` (its training flags are restored
    afterwards); each batch is moved to the device of the model's first parameter. One
    float32 vector of d_in entries per layer is kept: the memory of the calibration is that
    of a forward pass, not of the activations.

    Args:
        model: the dense model (its ``nn.Linear`` and ``Conv1D`` layers are observed, by
            qualified name; both take inputs whose last dimension is d_in).
        batches: the calibration batches (a few thousand tokens are enough; Wanda used 128
            sequences of 2048 tokens).
        forward: how a batch is fed to the model (default: :func:`default_forward`).
        layers: names of the layers to observe (None: every ``nn.Linear`` and ``Conv1D``).

    Returns:
        layer name -> (d_in,) float32 tensor of input-channel norms, on the layer's device,
        for every observed layer that the forward called at least once.

    Raises:
        ValueError: ``batches`` is empty, or a name in ``layers`` is not an ``nn.Linear``
            or ``Conv1D``.
    """
    forward = forward or default_forward
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) or is_conv1d(mod)
    }
    if layers is not None:
        unknown = [name for name in layers if name not in linears]
        if unknown:
            raise ValueError(
                f"collect_input_norms: {unknown} are not nn.Linear or Conv1D layers of the "
                f"model; known layers are e.g. {sorted(linears)[:5]}"
            )
        linears = {name: linears[name] for name in layers}
    sums: dict[str, Tensor] = {}

    def observer(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()
            squares = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)  # (d_in,)
            if name in sums:
                sums[name] += squares
            else:
                sums[name] = squares

        return hook

    handles = [mod.register_forward_hook(observer(name)) for name, mod in linears.items()]
    modes = {mod: mod.training for mod in model.modules()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                forward(model, _to_device(batch, device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for mod, mode in modes.items():
            mod.training = mode
    if seen == 0:
        raise ValueError("collect_input_norms: no calibration batch was given")
    logger.info("calibration: %d batches, %d of %d layers observed", seen, len(sums), len(linears))
    return {name: total.sqrt() for name, total in sums.items()}


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """Wanda's importance |W_ij|·‖X_j‖₂, (d_out, d_in) float32 (a transient tensor).

    The one Wanda score of the library (``wanda_sparsify``, the SLoPe callback and the
    one-shot baseline): computed in float32 whatever the weight's dtype, so that a bfloat16
    or float16 weight is ranked as its float32 twin, not by a product rounded to 8 bits.

    Raises:
        ValueError: ``input_norm`` is not one norm per input feature, (d_in,).
    """
    if input_norm.shape != (weight.shape[-1],):
        raise ValueError(
            f"input norms of shape {tuple(input_norm.shape)} do not match a weight with "
            f"d_in={weight.shape[-1]}: give one norm per input feature of the layer"
        )
    return weight.detach().float().abs() * input_norm.to(weight.device, torch.float32)


def wanda_mask(weight: Tensor, input_norm: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Boolean (d_out, d_in) N:M mask along d_in keeping the N best Wanda scores per group
    (ties to the lower offset, as magnitude masks). For inspection and tests."""
    scores = wanda_scores(weight, input_norm)
    return positions_to_mask(nm_positions(scores, n, m), m)


def _wanda_layer(
    decision: LayerDecision,
    input_norm: Tensor,
    config: SparsityConfig,
    backend: BackendName | SparseBackend,
) -> SparseLinear:
    """A SparseLinear of the planned layer (an ``nn.Linear`` or a transformers ``Conv1D``)
    whose row mask keeps the best |W|·‖X‖ of each group and whose values are the layer's
    weights at those positions, exactly."""
    linear = decision.module
    assert linear is not None
    source = linear.get_parameter("weight")
    weight = dense_weight(linear)  # (d_out, d_in)
    d_out, d_in = weight.shape
    bias = getattr(linear, "bias", None)
    # The layer prunes by magnitude, so pruning the scores selects exactly Wanda's mask. The
    # scores are then replaced by the original values at the kept positions (nothing is
    # divided back, so nothing is rounded).
    layer = SparseLinear(
        d_in,
        d_out,
        bias=isinstance(bias, Tensor),
        n=config.n,
        m=config.m,
        backend=backend,
        transpose_mask_interval=config.transpose_mask_interval,
        weight=wanda_scores(weight, input_norm),  # (d_out, d_in), transient
        dtype=weight.dtype,
        name=decision.name,
    )
    with torch.no_grad():
        columns = layer.layout.columns(layer.row_index)  # (d_out, d_in·N/M)
        layer.values.copy_(weight.gather(1, columns))
        if isinstance(bias, Tensor) and layer.bias is not None:
            layer.bias.copy_(bias)
    layer.refresh_transpose_mask(with_stats=False)  # M_C from the original values
    layer.values.requires_grad_(source.requires_grad)
    layer.train(linear.training)
    if is_conv1d(linear):
        layer.weight_layout = "conv1d"  # a dense export writes it back as a Conv1D
    return layer


def wanda_sparsify(
    model: nn.Module,
    norms: Mapping[str, Tensor],
    n: int | SparsityConfig = 2,
    # keyword_default() marks a default so a config plus m is caught (B008: on purpose)
    m: int = keyword_default(4),
    **settings: Unpack[ConversionSettings],
) -> SparsifyReport:
    """Like :func:`~slope_lightning.sparse.sparsify`, with Wanda row masks from ``norms``.

    Layers are selected by the same plan as ``sparsify`` (the settings come from a
    :class:`SparsityConfig` or from the keywords, never both; its ``mask_method`` is not
    read: the mask is Wanda's here): ``nn.Linear`` layers and transformers' ``Conv1D``
    (scored as the equivalent linear, W transposed). Every converted layer keeps, in each
    group of M consecutive weights of a row, the N with the largest |W_ij|·‖X_j‖₂
    (:func:`wanda_scores`), and its original values at those positions.

    Args:
        model: the dense model, converted in place.
        norms: :func:`collect_input_norms` of the same model (layer name -> (d_in,) norms).
        n, m, backend, include, exclude, max_aspect_ratio, transpose_mask_interval: as for
            :func:`~slope_lightning.sparse.sparsify`; ``n`` may be a SparsityConfig instead.

    Returns:
        The :class:`SparsifyReport`; converted layers have the reason ``"converted (wanda)"``
        (``"converted (wanda, Conv1D)"`` for a Conv1D).

    Raises:
        TypeError: a SparsityConfig and a setting keyword are both given.
        ValueError: bad n/m, a config with ``sparse=False``, an included layer that cannot
            be converted, or a layer to convert without calibration norms (it never ran in
            the calibration forward: exclude it or feed batches that reach it).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> norms = collect_input_norms(model, [torch.randn(4, 8)])
        >>> len(wanda_sparsify(model, norms).converted)
        2
    """
    accepted = {"m", *ConversionSettings.__optional_keys__}
    config, instance = config_from_call("wanda_sparsify", n, {"m": m, **settings}, accepted)
    assert instance is None or isinstance(instance, SparseBackend)
    plan = plan_sparsify(model, config, instance, method="wanda_sparsify")
    return wanda_sparsify_planned(model, plan, norms, config, backend=instance)


def calibrate_and_sparsify(
    model: nn.Module,
    batches: Iterable[Any],
    config: SparsityConfig | None = None,
    forward: ForwardFn | None = None,
    **settings: Any,
) -> SparsifyReport:
    """:func:`collect_input_norms` on ``batches``, then :func:`wanda_sparsify`: one call,
    one plan.

    Only the layers that will be converted are observed. ``settings`` are the keywords of
    :func:`wanda_sparsify` (not with ``config``).

    Raises:
        TypeError: both a config and keyword settings are given.
    """
    if config is not None and settings:
        raise TypeError(
            f"calibrate_and_sparsify: give a SparsityConfig or keywords, not both ({settings})"
        )
    first = config if config is not None else settings.pop("n", 2)
    config, instance = config_from_call("calibrate_and_sparsify", first, settings)
    assert instance is None or isinstance(instance, SparseBackend)
    plan = plan_sparsify(model, config, instance, method="wanda_sparsify")
    norms = collect_input_norms(model, batches, forward, layers=[d.name for d in plan.planned])
    return wanda_sparsify_planned(model, plan, norms, config, backend=instance)


def wanda_sparsify_planned(
    model: nn.Module,
    plan: SparsifyReport,
    norms: Mapping[str, Tensor],
    config: SparsityConfig,
    *,
    backend: SparseBackend | None = None,
) -> SparsifyReport:
    """Swap the layers ``plan`` converts for SparseLinear layers with Wanda row masks from
    ``norms``, in place, after checking every norm; returns ``plan``, now the report.

    The second half of :func:`wanda_sparsify`, for callers that built the plan already
    (:func:`~slope_lightning.sparse.sparsify.plan_sparsify`) and collected the norms of its
    planned layers: the SLoPe callback plans once and converts once.

    Raises:
        ValueError: a planned layer without norms, or with norms of the wrong size (nothing
            is converted then).
    """
    missing = [d.name for d in plan.planned if d.name not in norms]
    if missing:
        raise ValueError(
            f"wanda_sparsify: no calibration input reached {len(missing)} layer(s) to convert "
            f"(e.g. {missing[0]!r}); feed calibration batches that run them, or exclude them"
        )
    # Validate every layer before converting any, so a bad norm leaves the model unchanged.
    for d in plan.planned:
        if norms[d.name].shape != (d.in_features,):
            raise ValueError(
                f"wanda_sparsify: layer {d.name!r} has d_in={d.in_features} but its "
                f"calibration norms have shape {tuple(norms[d.name].shape)}"
            )
    layer_backend: BackendName | SparseBackend = backend or config.backend
    swap_layers(
        model, plan, lambda d: _wanda_layer(d, norms[d.name], config, layer_backend), tag="wanda"
    )
    logger.info("%s", plan)
    return plan
