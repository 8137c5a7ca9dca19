"""Model-level operations: sparsify, densify, add adapters, merge for inference, and loading a
dense checkpoint into a sparsified model.

All of them act in place on any ``nn.Module`` by swapping or visiting its ``nn.Linear`` /
``SparseLinear`` children (and transformers' ``Conv1D``, duck-typed: transformers is never
imported here); nothing is monkey-patched and nothing is registered globally.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from slope_lightning.sparse.adapters import AdapterInit
from slope_lightning.sparse.backends import BackendName, DecisionStore, SparseBackend
from slope_lightning.sparse.config import (
    KeywordDefault,
    SparsityConfig,
    given_or_default,
    keyword_default,
)
from slope_lightning.sparse.kernel_ops import derive_col_index
from slope_lightning.sparse.linear import SparseLinear
from slope_lightning.sparse.masks import MaskMethod, check_nm

logger = logging.getLogger(__name__)

#: Layers left dense by default: LM heads, embeddings and poolers (BERT's ``pooler.dense``, a
#: head-like layer on the first token): the method sparsifies only the linear layers inside
#: transformer blocks.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "*.lm_head",
    "output",
    "*embed*",
    "*wte",
    "*wpe",
    "*pooler*",
)


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
        deliberate = (
            "excluded by pattern",
            "not matched by include",
            "PEFT adapter layer",
            "base layer of the PEFT",
        )
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
            shape = f"{d.out_features} x {d.in_features}" if d.out_features else "?"
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


def _weight_of(module: nn.Module) -> Tensor | None:
    """``module.weight`` when it is a tensor (None for no weight, or one of another kind)."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2, GPT-J, ...): a linear layer
    that stores its weight transposed, (d_in, d_out), and computes ``x @ W + b``.

    Recognised by duck typing (class name ``Conv1D``, an int ``nf`` = d_out and a 2-D
    ``weight`` of shape (d_in, nf)), so ``sparse/`` never imports transformers.
    """
    if type(module).__name__ != "Conv1D":
        return False  # before reading .weight: a SparseLinear's builds a dense copy
    weight = _weight_of(module)
    nf = getattr(module, "nf", None)
    return (
        isinstance(nf, int) and weight is not None and weight.dim() == 2 and weight.shape[1] == nf
    )


def _is_adapter_wrapper(module: nn.Module) -> bool:
    """A PEFT wrapper (duck-typed, PEFT is never imported): a tuner layer such as LoRA's
    ``Linear`` (a ``base_layer`` plus ``lora_A``/``lora_B``...), or a ``modules_to_save``
    wrapper (``original_module`` plus trained copies)."""
    tuner = callable(getattr(module, "get_base_layer", None)) and isinstance(
        getattr(module, "base_layer", None), nn.Module
    )
    copies = isinstance(getattr(module, "original_module", None), nn.Module) and isinstance(
        getattr(module, "modules_to_save", None), nn.Module
    )
    return tuner or copies


def _linear_like(module: nn.Module) -> bool:
    """A module this library does not convert but whose name says it is a linear layer
    (e.g. TransformerEngine's ``Linear``); reported so that no linear layer goes unmentioned."""
    return type(module).__name__.endswith("Linear") and not _is_adapter_wrapper(module)


def _shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear-like module (0 where it cannot be told)."""
    if is_conv1d(module):
        weight = _weight_of(module)
        assert weight is not None
        return int(weight.shape[1]), int(weight.shape[0])  # stored (d_in, d_out)
    d_out, d_in = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(d_out, int) and isinstance(d_in, int):
        return d_out, d_in
    weight = _weight_of(module)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return 0, 0


class Candidate(NamedTuple):
    """One linear-like child of a model and why it stays as it is (``reason``; None: convert)."""

    name: str
    parent: nn.Module
    attr: str
    module: nn.Module
    out_features: int
    in_features: int
    reason: str | None


def _peft_role(name: str, wrappers: dict[str, nn.Module]) -> str | None:
    """Why a layer inside a PEFT wrapper stays dense (None: not inside one).

    The nearest enclosing wrapper decides: its ``base_layer`` is the frozen base weight (PEFT
    merges adapters into it, so it is converted only when ``include`` names it); anything
    else in it (``lora_A``, ``lora_B``, ``modules_to_save`` copies...) is PEFT's own adapter
    and is never converted.
    """
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        wrapper = wrappers.get(prefix)
        if wrapper is None:
            continue
        where = f"{prefix or '<model>'} ({type(wrapper).__name__})"
        if depth == len(parts) - 1 and parts[depth] == "base_layer":
            return (
                f"base layer of the PEFT adapter wrapper {where}: PEFT merges into its weight; "
                "name it in include to sparsify it (then never merge that adapter)"
            )
        return f"PEFT adapter layer ({parts[depth]} of {where}): adapters stay dense"
    return None


def linear_like_candidates(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str],
    multiple: int,
    what: str,
    multiple_name: str = "",
    transposed: bool = False,
    linear_only: bool = False,
) -> Iterator[Candidate]:
    """Every linear-like child of ``model`` and why it stays as it is (None: convert).

    Linear-like: ``nn.Linear`` (and subclasses), SparseLinear, transformers' ``Conv1D`` and
    any other module whose class name ends in ``Linear``. Only ``nn.Linear`` children, and
    ``Conv1D`` ones when ``transposed`` is true, can get None; every other child is yielded
    with its reason, so a report can list every linear layer it left alone
    (``linear_only``: only ``nn.Linear`` and SparseLinear children are looked at).

    The rules, in order: already sparse; inside a PEFT wrapper (see :func:`_peft_role`);
    ``exclude`` patterns; ``include`` patterns; read as a bare weight by its parent
    (``nn.MultiheadAttention.out_proj``); weights shared with another module (tied heads);
    non-float weights; sizes not divisible by ``multiple`` (``multiple_name`` in messages).

    Raises:
        ValueError: a layer matched by ``include`` cannot be converted (``what`` names the
            conversion in the message).
    """
    owners = _parameter_owners(model)
    wrappers = {name: mod for name, mod in model.named_modules() if _is_adapter_wrapper(mod)}
    context = _Context(owners, wrappers, include, exclude, multiple, what, multiple_name)
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            linear = isinstance(child, nn.Linear | SparseLinear)
            if not (linear or (not linear_only and (is_conv1d(child) or _linear_like(child)))):
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            d_out, d_in = _shape(child)
            reason = _reason(name, parent, attr, child, d_out, d_in, transposed, context)
            yield Candidate(name, parent, attr, child, d_out, d_in, reason)


class _Context(NamedTuple):
    """What :func:`_reason` needs besides the layer: the model's facts and the rules."""

    owners: dict[int, list[str]]
    wrappers: dict[str, nn.Module]
    include: Sequence[str] | None
    exclude: Sequence[str]
    multiple: int
    what: str
    multiple_name: str


def _reason(
    name: str,
    parent: nn.Module,
    attr: str,
    child: nn.Module,
    d_out: int,
    d_in: int,
    transposed: bool,
    context: _Context,
) -> str | None:
    """Why one linear-like child stays as it is (None: convert it).

    See :func:`linear_like_candidates` for the rules and their order.
    """
    if isinstance(child, SparseLinear):
        return f"already sparse ({child.n}:{child.m})"
    role = _peft_role(name, context.wrappers)
    included_by = _matches(name, context.include) if context.include is not None else None
    if role is not None and not (role.startswith("base layer") and included_by):
        return role
    excluded_by = _matches(name, context.exclude)
    if excluded_by is not None:
        return f"excluded by pattern {excluded_by!r}"
    if context.include is not None and included_by is None:
        return "not matched by include patterns"
    conv1d = is_conv1d(child)
    weight = _weight_of(child)
    problem = None
    if not (isinstance(child, nn.Linear) or (conv1d and transposed)):
        kind = "transformers Conv1D" if conv1d else type(child).__name__
        also = "" if conv1d else " or transformers Conv1D"
        problem = f"{kind} is not an nn.Linear{also}; it cannot be {context.what}"
    elif isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        problem = "nn.MultiheadAttention reads out_proj.weight directly instead of calling it"
    elif weight is None:
        problem = "it has no weight tensor"
    elif shared := [o for o in context.owners[id(weight)] if o != f"{name}.weight"]:
        problem = f"weight shared with {', '.join(shared)}"
    elif not weight.is_floating_point():
        problem = f"weight dtype {weight.dtype} is not floating point"
    elif d_in % context.multiple or d_out % context.multiple:
        divisor = context.multiple_name or str(context.multiple)
        problem = f"d_in={d_in} and d_out={d_out} must both be divisible by {divisor}"
    if problem is not None and included_by is not None:
        raise ValueError(
            f"layer {name!r} matches include pattern {included_by!r} but cannot be "
            f"{context.what}: {problem}; remove it from include or change the layer"
        )
    return problem


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
    :func:`sparsify` and the baselines (see :func:`linear_like_candidates`): PEFT adapter layers,
    ``exclude`` patterns, ``include`` patterns, ``nn.MultiheadAttention.out_proj``, weights
    shared with another module (tied heads), non-float weights, and sizes not divisible by
    ``multiple`` (called ``multiple_name`` in messages, e.g. "m=4"). A SparseLinear child
    is yielded with its "already sparse" reason. transformers' ``Conv1D`` and other
    linear-like modules are not yielded (only :func:`sparsify` converts ``Conv1D``).

    Raises:
        ValueError: a layer matched by ``include`` cannot be converted (``what`` names the
            conversion in the message).
    """
    for found in linear_like_candidates(
        model, include, exclude, multiple, what, multiple_name, linear_only=True
    ):
        assert isinstance(found.module, nn.Linear | SparseLinear)
        yield found.name, found.parent, found.attr, found.module, found.reason


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

    What is converted: ``nn.Linear`` layers, and transformers' ``Conv1D`` (GPT-2's transposed
    linear, recognised by duck typing) with its weight transposed. What stays dense, each
    with its reason in the report: LM heads and embeddings (``exclude``), weights shared with
    another module (tied heads), sizes not divisible by m, ``nn.MultiheadAttention.out_proj``
    (the attention reads its weight directly), PEFT's own adapter layers (``lora_A``,
    ``lora_B``, ``modules_to_save`` copies: always) and the ``base_layer`` under a PEFT
    adapter (unless ``include`` names it), and any other module whose class name ends in
    ``Linear``. Layers of up to 2**24 entries are converted on one intra-op thread (see
    :func:`_conversion_threads`): SmolLM2-135M takes about 3 s of CPU.

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
        mask_method: "magnitude" or "random" row masks.
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

    # Every reason first: an include error leaves the model unchanged.
    what = f"sparsified {n}:{m}"
    candidates = list(
        linear_like_candidates(model, include, exclude, m, what, f"m={m}", transposed=True)
    )
    largest = max(
        (c.out_features * c.in_features for c in candidates if c.reason is None), default=0
    )
    with _conversion_threads(largest):
        for name, parent, attr, child, d_out, d_in, reason in candidates:
            if reason is None:
                ratio = max(d_out, d_in) / min(d_out, d_in)
                if max_aspect_ratio is not None and ratio > max_aspect_ratio:
                    reason = f"aspect ratio {ratio:.2f} > max_aspect_ratio {max_aspect_ratio}"
            if reason is not None:
                converted = isinstance(child, SparseLinear)
                report.layers.append(LayerDecision(name, d_out, d_in, converted, reason))
                continue
            if isinstance(child, nn.Linear):
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
            else:  # transformers' Conv1D: the one other kind that gets no reason
                sparse = SparseLinear.from_conv1d(
                    child,
                    n,
                    m,
                    backend=backend,
                    transpose_mask_interval=transpose_mask_interval,
                    mask_method=mask_method,
                    generator=generator,
                    name=name,
                )
            weight = _weight_of(child)
            sparse.values.requires_grad_(weight is not None and weight.requires_grad)
            sparse.train(child.training)
            setattr(parent, attr, sparse)
            how = "converted" if isinstance(child, nn.Linear) else "converted (Conv1D)"
            report.layers.append(LayerDecision(name, d_out, d_in, True, how))

    if not report.converted:
        counts: dict[str, int] = defaultdict(int)
        for d in report.layers:
            counts[d.reason] += 1
        reasons = [f"{c} x {r}" if c > 1 else r for r, c in sorted(counts.items())] or [
            "the model has no nn.Linear or Conv1D layer"
        ]
        warnings.warn(
            f"sparsify() converted no layer ({'; '.join(reasons)}); print the returned report "
            "for every layer's reason",
            stacklevel=2,
        )
    logger.info("%s", report)
    return report


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """Every SparseLinear in ``model`` with its qualified name."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]


def prune_dense_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    mask_method: MaskMethod = "magnitude",
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """``state_dict`` with every dense weight of a sparsified layer pruned into packed form.

    For each SparseLinear of ``model`` whose dense ``<layer>.weight`` the state dict holds
    (a dense checkpoint: ``nn.Linear`` layout (d_out, d_in), or transformers' Conv1D layout
    (d_in, d_out) for a layer made by ``SparseLinear.from_conv1d``), the weight is cast to the
    layer's dtype and pruned N:M as :func:`sparsify` prunes (M_R by ``mask_method``, then M_C
    from W_R), and replaced by ``values``, ``row_index``, ``col_index`` and the layer's extra
    state. Every other entry (biases, norms, embeddings, packed layers) is kept as it is. So
    loading the result gives exactly the model that loading the dense checkpoint into the
    dense model and then calling :func:`sparsify` would give.

    Raises:
        ValueError: a dense weight has the wrong shape for its layer, or a layer has both a
            dense weight and packed values in ``state_dict``.
    """
    pruned = dict(state_dict)
    for name, layer in sparse_layers(model):
        prefix = f"{name}." if name else ""
        dense = pruned.pop(f"{prefix}weight", None)
        if dense is None:
            continue
        if f"{prefix}values" in pruned:
            raise ValueError(
                f"layer {name!r}: the state dict holds both a dense {prefix}weight and packed "
                f"{prefix}values; keep one of them"
            )
        expected = (layer.out_features, layer.in_features)
        conv1d = layer.weight_layout == "conv1d"
        if not isinstance(dense, Tensor) or tuple(dense.t().shape if conv1d else dense.shape) != (
            expected
        ):
            found = tuple(dense.shape) if isinstance(dense, Tensor) else type(dense).__name__
            layout = "(d_in, d_out) = " + str(expected[::-1]) if conv1d else str(expected)
            raise ValueError(
                f"layer {name!r}: the dense weight {prefix}weight has shape {found}, the layer "
                f"needs {layout}; load a checkpoint of this architecture"
            )
        weight = (dense.t() if conv1d else dense).detach()
        weight = weight.to(device=layer.row_index.device, dtype=layer.values.dtype)
        with torch.no_grad():
            values, row_index = layer.layout.prune(weight, mask_method, generator)
            col_index = derive_col_index(values, row_index, layer.layout, "torch")
        pruned[f"{prefix}values"] = values
        pruned[f"{prefix}row_index"] = row_index
        pruned[f"{prefix}col_index"] = col_index
        # No optimizer step since M_C was derived, and the layer's N:M (see get_extra_state).
        pruned[f"{prefix}_extra_state"] = torch.tensor([0, layer.n, layer.m])
    return pruned


def load_dense_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    mask_method: MaskMethod = "magnitude",
    generator: torch.Generator | None = None,
) -> Any:
    """Load a dense checkpoint's state dict into a sparsified ``model``: the supported way to
    start SLoPe from a dense model (sparse continued pretraining).

    Each dense weight of a SparseLinear is pruned N:M into it (see
    :func:`prune_dense_state_dict`); everything else loads as ``model.load_state_dict`` loads
    it. The result equals loading the checkpoint into the dense model, then sparsifying.

    Args:
        model: the sparsified model (or the LightningModule holding it: the keys are
            qualified names from ``model``).
        state_dict: e.g. ``torch.load(path, weights_only=True)["state_dict"]`` of a dense
            Lightning checkpoint, or a transformers model's ``state_dict()``.
        strict: as in ``load_state_dict``: every key must match.
        mask_method: how M_R is chosen from the dense weights (as in :func:`sparsify`).
        generator: random source for ``mask_method="random"``.

    Returns:
        ``load_state_dict``'s named tuple of missing and unexpected keys.

    Raises:
        ValueError: a dense weight does not fit its layer (see :func:`prune_dense_state_dict`).
        RuntimeError: ``strict`` and keys that do not match (``load_state_dict``'s error).

    Example:
        >>> dense = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        >>> _ = sparsify(model)
        >>> load_dense_state_dict(model, dense.state_dict())
        <All keys matched successfully>
    """
    sparse_state = prune_dense_state_dict(
        model, state_dict, mask_method=mask_method, generator=generator
    )
    return model.load_state_dict(sparse_state, strict=strict)


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
