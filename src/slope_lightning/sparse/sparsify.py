"""Model-level operations: sparsify, densify, add adapters, merge for inference.

All of them act in place on any ``nn.Module`` by swapping or visiting its ``nn.Linear`` /
``SparseLinear`` children; nothing is monkey-patched and nothing is registered globally.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from slope_lightning.sparse.adapters import AdapterInit
from slope_lightning.sparse.backends import BackendName, DecisionStore, SparseBackend
from slope_lightning.sparse.config import (
    KeywordDefault,
    SparsityConfig,
    given_or_default,
    keyword_default,
)
from slope_lightning.sparse.linear import SparseLinear
from slope_lightning.sparse.masks import MaskMethod, check_nm

logger = logging.getLogger(__name__)

#: Layers left dense by default: LM heads and embeddings (the method sparsifies only the
#: linear layers inside transformer blocks).
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*.lm_head", "output", "*embed*", "*wte", "*wpe")


@dataclass(frozen=True)
class LayerDecision:
    """What :func:`sparsify` did with one linear layer."""

    name: str
    out_features: int
    in_features: int
    converted: bool
    reason: str


class NothingSparsifiedError(ValueError):
    """A sparse configuration converted no layer; the message says why for each layer."""


@dataclass
class SparsifyReport:
    """Per-layer outcome of :func:`sparsify`; ``print(report)`` shows a table."""

    n: int
    m: int
    backend: str
    layers: list[LayerDecision] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.converted]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.converted]

    def require_converted(self) -> None:
        """Raise unless at least one layer was converted, saying why each was not.

        Raises:
            NothingSparsifiedError: no layer converted (e.g. m=3 divides no layer size).
        """
        if self.converted:
            return
        deliberate = ("excluded by pattern", "not matched by include")
        candidates = [d for d in self.layers if not d.reason.startswith(deliberate)]
        reasons: dict[str, list[str]] = {}
        for layer in candidates or self.layers:
            reasons.setdefault(layer.reason, []).append(
                f"{layer.name} ({layer.out_features} x {layer.in_features})"
            )
        detail = "; ".join(
            f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {reason}"
            for reason, names in reasons.items()
        )
        raise NothingSparsifiedError(
            f"model.sparsity: sparse=true but no layer could be made {self.n}:{self.m} sparse "
            f"({detail or 'the model has no linear layer'}); choose an m that divides the "
            "layer sizes (m=4 for 2:4), adjust include/exclude, or set model.sparsity.sparse "
            "false"
        )

    def __str__(self) -> str:
        width = max([len("layer"), *(len(d.name) for d in self.layers)])
        lines = [
            f"sparsify {self.n}:{self.m}, backend={self.backend}: "
            f"{len(self.converted)} converted, {len(self.skipped)} left dense",
            f"{'layer':<{width}}  {'shape (out x in)':>17}  result",
        ]
        for d in self.layers:
            shape = f"{d.out_features} x {d.in_features}"
            result = "sparse" if d.converted else "dense"
            lines.append(f"{d.name:<{width}}  {shape:>17}  {result}: {d.reason}")
        if self.backend == "auto":
            lines.append(
                "auto measures each layer's GEMMs and kernels at its first forward; "
                "backend_report(model) shows the choices after one step"
            )
        return "\n".join(lines)


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Map id(parameter) to every qualified name it is registered under."""
    owners: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners[id(param)].append(f"{module_name}.{param_name}" if module_name else param_name)
    return owners


#: (qualified name, parent, attribute, child) of one Linear/SparseLinear child.
LinearChild = tuple[str, nn.Module, str, nn.Linear | SparseLinear]


def _linear_children(model: nn.Module) -> list[LinearChild]:
    """(qualified name, parent, attribute, child) for every Linear/SparseLinear child."""
    found: list[LinearChild] = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear | SparseLinear):
                name = f"{parent_name}.{attr}" if parent_name else attr
                found.append((name, parent, attr, child))
    return found


def linear_candidates(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    multiple: int,
    what: str,
    multiple_name: str = "",
) -> Iterator[tuple[str, nn.Module, str, nn.Linear | SparseLinear, str | None]]:
    """Every Linear/SparseLinear child of ``model`` and why it stays as it is (None: convert).

    Yields (qualified name, parent, attribute, child, reason). The selection rules shared by
    :func:`sparsify` and the baselines: ``exclude`` patterns, ``include`` patterns, weights
    shared with another module (tied heads), non-float weights, and sizes not divisible by
    ``multiple`` (called ``multiple_name`` in messages, e.g. "m=4"). A SparseLinear child
    is yielded with its "already sparse" reason.

    Raises:
        ValueError: a layer matched by ``include`` cannot be converted (``what`` names the
            conversion in the message).
    """
    owners = _parameter_owners(model)
    for name, parent, attr, child in _linear_children(model):
        if isinstance(child, SparseLinear):
            yield name, parent, attr, child, f"already sparse ({child.n}:{child.m})"
            continue
        excluded_by = _matches(name, exclude)
        if excluded_by is not None:
            yield name, parent, attr, child, f"excluded by pattern {excluded_by!r}"
            continue
        included_by = _matches(name, include) if include is not None else None
        if include is not None and included_by is None:
            yield name, parent, attr, child, "not matched by include patterns"
            continue
        d_out, d_in = child.out_features, child.in_features
        shared = [o for o in owners[id(child.weight)] if o != f"{name}.weight"]
        problem = None
        if shared:
            problem = f"weight shared with {', '.join(shared)}"
        elif not child.weight.is_floating_point():
            problem = f"weight dtype {child.weight.dtype} is not floating point"
        elif d_in % multiple or d_out % multiple:
            divisor = multiple_name or str(multiple)
            problem = f"d_in={d_in} and d_out={d_out} must both be divisible by {divisor}"
        if problem is not None and included_by is not None:
            raise ValueError(
                f"layer {name!r} matches include pattern {included_by!r} but cannot be "
                f"{what}: {problem}; remove it from include or change the layer"
            )
        yield name, parent, attr, child, problem


def sparsify(
    model: nn.Module,
    n: int | SparsityConfig = 2,
    # keyword_default() marks a default so a config plus a keyword is caught (B008: on purpose)
    m: int = keyword_default(4),
    *,
    backend: str | BackendName | SparseBackend = keyword_default("reference"),  # noqa: B008
    include: Sequence[str] | None = keyword_default(None),
    exclude: Sequence[str] = keyword_default(DEFAULT_EXCLUDE),
    max_aspect_ratio: float | None = keyword_default(None),
    transpose_mask_interval: int | None = keyword_default(1),
    mask_method: MaskMethod = keyword_default("magnitude"),  # noqa: B008
    seed: int | None = None,
) -> SparsifyReport:
    """Replace ``model``'s nn.Linear layers by SLoPe SparseLinear layers, in place.

    The settings come either from a :class:`SparsityConfig` (``sparsify(model, config)``, the
    form the Lightning module and ``load_exported`` use) or from the keywords below, never
    from both.

    Args:
        model: any module; its Linear children are swapped (the model itself must not be a
            bare Linear: wrap it, or use ``SparseLinear.from_linear``).
        n: kept entries per group (2 for 2:4), or a SparsityConfig holding every setting.
        m: group size (4 for 2:4).
        backend: GEMM backend for every converted layer: a name (each layer gets its own
            instance, so ``auto`` decides per layer) or a SparseBackend instance (shared).
        include: fnmatch patterns on qualified layer names; if given, only matching layers are
            considered, and a matching layer that cannot be converted is an error.
        exclude: patterns of layers left dense (default: LM heads and embeddings).
        max_aspect_ratio: leave dense layers whose max(d_out/d_in, d_in/d_out) exceeds this.
        transpose_mask_interval: optimizer steps between re-derivations of M_C (None: manual).
        mask_method: "magnitude" or "random" row masks.
        seed: seed for random masks (allowed with a config too).

    Returns:
        A :class:`SparsifyReport` listing every linear layer, converted or not, and why.

    Raises:
        TypeError: ``model`` is not an nn.Module, or a SparsityConfig and a setting keyword
            (``m``, ``backend``, ...) are both given.
        ValueError: bad n/m, unknown backend, a config with ``sparse=False``, or an explicitly
            included layer that cannot be converted (dimension not divisible by m, non-float
            weight).

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
    if isinstance(n, SparsityConfig):
        settings = {
            "m": m,
            "backend": backend,
            "include": include,
            "exclude": exclude,
            "max_aspect_ratio": max_aspect_ratio,
            "transpose_mask_interval": transpose_mask_interval,
            "mask_method": mask_method,
        }
        given = [key for key, value in settings.items() if not isinstance(value, KeywordDefault)]
        if given:
            raise TypeError(
                "sparsify(model, config) takes every setting from the SparsityConfig, but "
                f"these keywords were given too: {', '.join(given)}; put them in the config "
                "(dataclasses.replace(config, ...)) or pass keywords only"
            )
        config = n
        if not config.sparse:
            raise ValueError(
                "sparsify(model, config) got a config with sparse=False (the dense baseline); "
                "check config.sparse before calling, or set sparse=True"
            )
        n, m, backend = config.n, config.m, config.backend
        include, max_aspect_ratio = config.include, config.max_aspect_ratio
        exclude = tuple(config.exclude) if config.exclude is not None else DEFAULT_EXCLUDE
        transpose_mask_interval = config.transpose_mask_interval
        mask_method = config.mask_method
    else:
        m, backend, include, exclude = (
            given_or_default(m),
            given_or_default(backend),
            given_or_default(include),
            given_or_default(exclude),
        )
        max_aspect_ratio = given_or_default(max_aspect_ratio)
        transpose_mask_interval = given_or_default(transpose_mask_interval)
        mask_method = given_or_default(mask_method)
    check_nm(n, m)
    if isinstance(backend, str):
        backend = BackendName.parse(backend)  # an unknown name fails here, listing the choices
    if isinstance(model, nn.Linear | SparseLinear):
        raise ValueError(
            "sparsify() swaps layers inside a model; for a single layer use "
            "SparseLinear.from_linear(linear, n, m)"
        )
    if max_aspect_ratio is not None and max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    report = SparsifyReport(
        n=n, m=m, backend=backend.value if isinstance(backend, BackendName) else backend.name
    )

    for name, parent, attr, child, reason in linear_candidates(
        model, include, exclude, m, f"sparsified {n}:{m}", multiple_name=f"m={m}"
    ):
        d_out, d_in = child.out_features, child.in_features

        def decide(
            converted: bool, reason: str, name: str = name, d_out: int = d_out, d_in: int = d_in
        ) -> None:
            report.layers.append(LayerDecision(name, d_out, d_in, converted, reason))

        if reason is not None:
            decide(isinstance(child, SparseLinear), reason)
            continue
        ratio = max(d_out, d_in) / min(d_out, d_in)
        if max_aspect_ratio is not None and ratio > max_aspect_ratio:
            decide(False, f"aspect ratio {ratio:.2f} > max_aspect_ratio {max_aspect_ratio}")
            continue
        assert isinstance(child, nn.Linear)  # a SparseLinear child always has a reason
        sparse = SparseLinear.from_linear(
            child,
            n,
            m,
            backend=backend,
            transpose_mask_interval=transpose_mask_interval,
            mask_method=mask_method,
            generator=generator,
            name=name,
        )
        sparse.values.requires_grad_(child.weight.requires_grad)
        sparse.train(child.training)
        setattr(parent, attr, sparse)
        decide(True, "converted")

    if not report.converted:
        reasons = sorted({d.reason for d in report.layers}) or ["the model has no nn.Linear layer"]
        warnings.warn(
            f"sparsify() converted no layer ({'; '.join(reasons)}); check include/exclude "
            f"patterns and that layer sizes are divisible by m={m}",
            stacklevel=2,
        )
    logger.info("%s", report)
    return report


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """Every SparseLinear in ``model`` with its qualified name."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]


def backend_report(model: nn.Module) -> str:
    """A table of every SparseLinear's backend and, for ``auto``, its choice and why, and which
    steps run as Triton kernels (only where measured faster than torch).

    ``auto`` decides at a layer's first forward, so call this after one step.
    """
    layers = sparse_layers(model)
    width = max([len("layer"), *(len(name) for name, _ in layers)])
    lines = [f"{'layer':<{width}}  {'shape (out x in)':>17}  backend"]
    for name, layer in layers:
        shape = f"{layer.out_features} x {layer.in_features}"
        lines.append(f"{name:<{width}}  {shape:>17}  {layer.backend.describe()}")
    return "\n".join(lines)


def follow_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Tell every SparseLinear of ``model`` whose values ``optimizer`` updates about each step.

    Layers re-derive M_C every ``transpose_mask_interval`` optimizer updates. Without this
    they detect an update through their values' version counter, which fused optimizers
    (``AdamW(fused=True)``, the default of many trainers on CUDA) do not move; with it,
    every optimizer counts, fused, foreach or plain. Call it once per optimizer (the
    Lightning module does). Returns the hook's handle (``handle.remove()`` detaches it).
    """
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    layers = [layer for _, layer in sparse_layers(model) if id(layer.values) in owned]

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for layer in layers:
            layer.note_optimizer_step()

    return optimizer.register_step_post_hook(after_step)


def use_decision_store(model: nn.Module, path: str | Path | None) -> DecisionStore:
    """Keep the measured decisions of every ``auto`` layer of ``model`` in one store.

    Which GEMM ``auto`` runs is then read from, and written to, ``path`` (JSON; None keeps
    them in memory): a file the run owns, such as one inside its log directory, rather than
    one shared by every run of the machine. Layers with other backends are unaffected.
    """
    store = DecisionStore(path)
    for _, layer in sparse_layers(model):
        layer.backend.use_decision_store(store)
    return store


def densify(model: nn.Module) -> list[str]:
    """Undo :func:`sparsify`: swap every SparseLinear for an equivalent nn.Linear.

    Adapters are folded into the dense weight. Returns the names of the swapped layers.
    """
    swapped = []
    for name, parent, attr, child in _linear_children(model):
        if isinstance(child, SparseLinear):
            setattr(parent, attr, child.to_linear())
            swapped.append(name)
    return swapped


def add_adapters(
    model: nn.Module,
    rank: int | float,
    *,
    init: AdapterInit = "slope",
    alpha: float | None = None,
    seed: int | None = None,
) -> list[nn.Parameter]:
    """Attach lazy low-rank adapters to every SparseLinear in ``model``.

    Args:
        rank: an int, or a float in (0, 1) read as a fraction of each layer's d_in
            (the paper's 1.56% is ``0.0156``).
        init: "slope" (L ~ N(0,1), R = 0, s = 1/r) or "peft" (Kaiming L, R = 0, s = alpha/r).
        alpha: scale numerator for ``init="peft"`` (default: r, i.e. s = 1).
        seed: seed for L's initialisation.

    Returns:
        The new parameters, to be added to a running optimizer
        (``optimizer.add_param_group({"params": params})``).

    Raises:
        ValueError: no SparseLinear in the model, or a bad rank for some layer.
        RuntimeError: some layer already has an adapter.
    """
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(
            "add_adapters(): the model has no SparseLinear layer; call sparsify() first"
        )
    if any(layer.adapter is not None for _, layer in layers):
        raise RuntimeError("add_adapters(): the model already has adapters")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    params: list[nn.Parameter] = []
    for _, layer in layers:
        params += layer.add_adapter(rank, init=init, alpha=alpha, generator=generator)
    return params


def merge_for_inference(model: nn.Module) -> int:
    """Switch every SparseLinear to the fused sparse + low-rank inference path.

    Run the merged model under ``torch.no_grad()`` or ``torch.inference_mode()``: a forward
    with gradients enabled unmerges the layer (merged weights are not trained). Returns the
    number of layers merged.
    """
    layers = [layer for _, layer in sparse_layers(model)]
    already = [layer.name for layer in layers if layer.merged]
    if already:
        raise RuntimeError(
            f"{len(already)} layer(s) already merged (e.g. {already[0]!r}); call unmerge(model) "
            "first"
        )
    # Validate every layer before merging any: a NaN in a late layer leaves nothing merged.
    fused = [layer.fused_operand() for layer in layers]
    for layer, operand in zip(layers, fused, strict=True):
        layer.merge(operand)
    return len(layers)


def unmerge(model: nn.Module) -> int:
    """Undo :func:`merge_for_inference` on every merged SparseLinear; returns how many."""
    merged = [layer for _, layer in sparse_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    return len(merged)
