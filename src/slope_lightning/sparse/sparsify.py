"""sparsify(): convert a model's linear layers to SLoPe SparseLinear layers, in place.

The conversion is the layer-selection plan of ``selection.py`` (every rule, once) and its
one swap, with a SparseLinear built of each planned layer. ``sparsify(model, config)`` is
the core; the keyword form ``sparsify(model, n=2, m=4, ...)`` builds the same
:class:`~slope_lightning.sparse.config.SparsityConfig` and refuses to be mixed with one.
The model-level operations on a converted model (densify, adapters, merge, dense
checkpoints) live in ``operations.py``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypedDict

import torch
from torch import nn
from typing_extensions import Unpack

from slope_lightning.sparse.backends import BackendName, SparseBackend
from slope_lightning.sparse.config import SparsityConfig, config_from_call, keyword_default
from slope_lightning.sparse.conv1d import is_conv1d
from slope_lightning.sparse.linear import SparseLinear
from slope_lightning.sparse.masks import MaskMethod
from slope_lightning.sparse.selection import (
    LayerDecision,
    LayerRules,
    SparsifyReport,
    plan_layers,
    swap_layers,
)

logger = logging.getLogger(__name__)


class ConversionSettings(TypedDict, total=False):
    """The setting keywords of :func:`sparsify` and of Wanda's ``wanda_sparsify``: the
    :class:`SparsityConfig` fields of the same names (and defaults), which they build; a
    keyword left out keeps the config's default, and none may be given with a config."""

    backend: str | BackendName | SparseBackend
    include: Sequence[str] | None
    exclude: Sequence[str]
    max_aspect_ratio: float | None
    transpose_mask_interval: int | None


class SparsifySettings(ConversionSettings, total=False):
    """:func:`sparsify`'s setting keywords: :class:`ConversionSettings` and the mask choice
    (Wanda's mask is its own)."""

    mask_method: MaskMethod


def sparsify(
    model: nn.Module,
    n: int | SparsityConfig = 2,
    # keyword_default() marks a default so a config plus m is caught (B008: on purpose)
    m: int = keyword_default(4),
    *,
    seed: int | None = None,
    **settings: Unpack[SparsifySettings],
) -> SparsifyReport:
    """Replace ``model``'s nn.Linear layers by SLoPe SparseLinear layers, in place.

    ``sparsify(model, config)`` with a :class:`SparsityConfig` is the core (the form the
    Lightning module and ``load_exported`` use); the keywords below build the same config
    (``sparsify(model, n=2, m=4, ...)``; after ``m`` they are :class:`SparsifySettings`)
    and cannot be mixed with one.

    What is converted: ``nn.Linear`` layers, and transformers' ``Conv1D`` (GPT-2's transposed
    linear, recognised by duck typing) with its weight transposed. What stays dense, each
    with its reason in the report (the rules of
    :func:`~slope_lightning.sparse.selection.plan_layers`): LM heads and embeddings
    (``exclude``), weights shared with another module (tied heads), sizes not divisible by m,
    ``nn.MultiheadAttention.out_proj`` (the attention reads its weight directly), PEFT's own
    adapter layers (``lora_A``, ``lora_B``, ``modules_to_save`` copies: always) and the
    ``base_layer`` under a PEFT adapter (unless ``include`` names it), and any other module
    whose class name ends in ``Linear``. Layers of up to 2**24 entries are converted on one
    intra-op thread (see :func:`_conversion_threads`): SmolLM2-135M takes about 3 s of CPU.

    Args:
        model: any module; its Linear (and Conv1D) children are swapped (the model itself
            must not be a bare Linear: wrap it, or use ``SparseLinear.from_linear``).
        n: kept entries per group (2 for 2:4), or a SparsityConfig holding every setting.
        m: group size (4 for 2:4).
        backend: GEMM backend for every converted layer: a name (each layer gets its own
            instance, so ``auto`` decides per layer) or a SparseBackend instance (shared).
        include: fnmatch patterns on qualified layer names; if given, only matching layers are
            considered, and a matching layer that cannot be converted is an error.
        exclude: patterns of layers left dense (default: LM heads and embeddings).
        max_aspect_ratio: leave dense layers whose max(d_out/d_in, d_in/d_out) exceeds this.
        transpose_mask_interval: optimizer steps between re-derivations of M_C (None: manual).
        mask_method: "magnitude" or "random" row masks ("wanda" needs calibration batches:
            :func:`~slope_lightning.sparse.calibrate_and_sparsify`).
        seed: seed for random masks (allowed with a config too).

    Returns:
        A :class:`SparsifyReport` listing every linear layer, converted or not, and why.

    Raises:
        TypeError: ``model`` is not an nn.Module, or a SparsityConfig and a setting keyword
            (``m``, ``backend``, ...) are both given.
        ValueError: bad n/m, unknown backend, a config with ``sparse=False``, or an explicitly
            included layer that cannot be converted (dimension not divisible by m, non-float
            weight, not a linear layer); nothing is converted then.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> len(sparsify(model, SparsityConfig(n=2, m=4)).converted)
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"sparsify() takes an nn.Module, got {type(model).__name__}; pass the model "
            "object whose nn.Linear layers should become sparse"
        )
    accepted = {"m", *SparsifySettings.__optional_keys__}
    config, instance = config_from_call("sparsify", n, {"m": m, **settings}, accepted)
    assert instance is None or isinstance(instance, SparseBackend)
    return _sparsify(model, config, instance, seed)


def _sparsify(
    model: nn.Module, config: SparsityConfig, instance: SparseBackend | None, seed: int | None
) -> SparsifyReport:
    """The conversion of ``model`` by ``config``: plan once, then swap the planned layers
    (``instance``: a backend shared by every layer instead of ``config.backend``)."""
    # Every decision first: an include error leaves the model unchanged.
    report = plan_sparsify(model, config, instance)
    sparsify_planned(model, report, config, backend=instance, seed=seed)
    if not report.converted:
        reasons = report.reasons_left_dense() or ["the model has no nn.Linear or Conv1D layer"]
        warnings.warn(
            f"sparsify() converted no layer ({'; '.join(reasons)}); print the returned report "
            "for every layer's reason",
            stacklevel=3,
        )
    return report


def plan_sparsify(
    model: nn.Module,
    config: SparsityConfig,
    backend: SparseBackend | None = None,
    method: str = "sparsify",
) -> SparsifyReport:
    """The plan of converting ``model`` by ``config`` (its n, m, include, exclude and aspect
    ratio; ``nn.Linear`` and ``Conv1D`` layers), nothing swapped yet: what
    :func:`sparsify_planned` (or Wanda's ``wanda_sparsify_planned``) then converts.

    Args:
        model: the model to plan for.
        config: the sparsity settings.
        backend: a backend instance shared by every layer, shown instead of
            ``config.backend``.
        method: the conversion's name in the report and messages.

    Raises:
        ValueError: ``model`` is itself a linear layer, or an included layer cannot be
            converted.
    """
    name = backend.name if backend is not None else config.backend.value
    return plan_layers(model, LayerRules.from_config(config, method), backend=name)


def sparsify_planned(
    model: nn.Module,
    plan: SparsifyReport,
    config: SparsityConfig,
    *,
    backend: SparseBackend | None = None,
    seed: int | None = None,
) -> SparsifyReport:
    """Swap the layers ``plan`` converts for SparseLinear layers of ``config`` (its n, m,
    backend, refresh interval and magnitude or random mask), in place, and return ``plan``,
    now the report of what was done.

    The second half of :func:`sparsify`, for callers that built the plan already
    (:func:`plan_sparsify`) and looked at it: the SLoPe callback plans once and converts once.

    Args:
        model: the model ``plan`` was built of.
        plan: from :func:`plan_sparsify` (or :func:`~slope_lightning.sparse.plan_layers`).
        config: the layers' settings.
        backend: a backend instance shared by every layer instead of ``config.backend``.
        seed: seed of random masks.
    """
    layer_backend: BackendName | SparseBackend = backend or config.backend
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def build(decision: LayerDecision) -> nn.Module:
        dense: Any = decision.module  # an nn.Linear or a transformers Conv1D
        assert dense is not None, "a planned layer carries its module"
        convert = SparseLinear.from_conv1d if is_conv1d(dense) else SparseLinear.from_linear
        sparse = convert(
            dense,
            config.n,
            config.m,
            backend=layer_backend,
            transpose_mask_interval=config.transpose_mask_interval,
            mask_method=config.mask_method,
            generator=generator,
            name=decision.name,
        )
        sparse.values.requires_grad_(dense.get_parameter("weight").requires_grad)
        sparse.train(dense.training)
        return sparse

    largest = max((d.out_features * d.in_features for d in plan.planned), default=0)
    with _conversion_threads(largest):
        swap_layers(model, plan, build)
    logger.info("%s", plan)
    return plan


#: Layers up to this many weight entries are converted on one thread (see
#: :func:`_conversion_threads`); 4096 x 4096 and larger use every thread.
SINGLE_THREAD_NUMEL = 1 << 24


@contextlib.contextmanager
def _conversion_threads(largest: int) -> Iterator[None]:
    """Run the conversion of layers of at most ``largest`` entries on one intra-op thread
    when they are small (<= :data:`SINGLE_THREAD_NUMEL`); restore the thread count after.

    Converting a layer is about 30 elementwise ops of up to a million entries (two mask
    selections, packing, a transient dense W_R), each ~0.1 ms on one thread. Split over
    threads, each op is a parallel region, and when the cores are shared with other processes
    every region waits for a time slice: SmolLM2-135M's 210 layers took 70 s on 2 busy cores
    with 2 threads and 6 s with one. Large layers keep every thread: their ops are long
    enough to gain from them. A process-wide setting, changed only for the duration of
    :func:`sparsify` (other threads running torch meanwhile run on one intra-op thread too).
    """
    threads = torch.get_num_threads()
    if threads == 1 or largest > SINGLE_THREAD_NUMEL:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
