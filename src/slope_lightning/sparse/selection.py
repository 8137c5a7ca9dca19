"""The one layer-selection core: which layers of a model a conversion swaps, and why.

Every conversion of this library (``sparsify``, Wanda calibration, the SR-STE, transposable
and one-shot baselines) works in two steps, as PEFT matches its targets once for every tuner:

1. :func:`plan_layers` visits the model once and gives a :class:`SparsifyReport`, the plan:
   one :class:`LayerDecision` (name, module, decision, reason) for every linear-like child.
   Every rule is written here once, in this order: already converted; inside a PEFT wrapper;
   ``exclude`` patterns (None: :data:`DEFAULT_EXCLUDE`); ``include`` patterns; a kind the
   conversion cannot take (transformers' ``Conv1D`` for nn.Linear-only conversions, any other
   ``*Linear`` class); ``nn.MultiheadAttention.out_proj``; no weight; a weight shared with
   another module (tied heads); a non-float weight; sizes not divisible by M; the aspect
   ratio. A layer that ``include`` names but a rule refuses is an error, before anything is
   swapped.
2. :func:`swap_layers` swaps each planned layer for the one a ``build`` function makes of
   it, once, and turns the plan into the report of what was done.

The report IS the plan: ``print(report)`` shows every linear layer, converted or not, with
its reason. Torch only; transformers and PEFT layers are recognised by duck typing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Literal

from torch import nn

from slope_lightning.sparse.config import SparsityConfig
from slope_lightning.sparse.conv1d import is_conv1d, weight_of
from slope_lightning.sparse.linear import SparseLinear
from slope_lightning.sparse.masks import check_nm

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

#: What a conversion does with one layer: swap it (``convert``), leave it dense (``keep``), or
#: leave it alone because it is sparse already (``sparse``).
Decision = Literal["convert", "keep", "sparse"]


@dataclass(frozen=True)
class LayerDecision:
    """What a conversion does (or did) with one linear-like layer, and why.

    Attributes:
        name: qualified name in the model.
        out_features, in_features: d_out and d_in (0 where they cannot be told).
        decision: ``convert``, ``keep`` (stays dense) or ``sparse`` (sparse already).
        reason: why, in words (``"converted"`` once swapped).
        module: the layer as it is in the model (the new one once swapped); not compared.
    """

    name: str
    out_features: int
    in_features: int
    decision: Decision
    reason: str
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def converted(self) -> bool:
        """Sparse after the conversion: converted by it, or sparse already."""
        return self.decision != "keep"


class NothingSparsifiedError(ValueError):
    """A sparse configuration converted no layer; the message says why for each layer."""


@dataclass
class SparsifyReport:
    """The plan of a conversion and, once :func:`swap_layers` ran, its per-layer outcome;
    ``print(report)`` shows a table.

    Attributes:
        n, m: the N:M pattern.
        backend: the GEMM backend of the converted layers ("" where the method has none).
        layers: one decision per linear-like layer, in the model's order.
        method: the conversion, for the table's title (``sparsify``, ``srste_sparsify``...).
    """

    n: int
    m: int
    backend: str = ""
    layers: list[LayerDecision] = field(default_factory=list)
    method: str = "sparsify"

    @property
    def converted(self) -> list[LayerDecision]:
        """The layers sparse after the conversion (planned, converted or sparse already)."""
        return [d for d in self.layers if d.converted]

    @property
    def skipped(self) -> list[LayerDecision]:
        """The layers left dense."""
        return [d for d in self.layers if not d.converted]

    @property
    def planned(self) -> list[LayerDecision]:
        """The layers this conversion swaps (or swapped)."""
        return [d for d in self.layers if d.decision == "convert"]

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

    def reasons_left_dense(self) -> list[str]:
        """Every distinct reason a layer stayed dense, counted (``"2 x excluded by ..."``)."""
        counts: dict[str, int] = defaultdict(int)
        for d in self.skipped:
            counts[d.reason] += 1
        return [f"{c} x {r}" if c > 1 else r for r, c in sorted(counts.items())]

    def __str__(self) -> str:
        width = max([len("layer"), *(len(d.name) for d in self.layers)])
        backend = f", backend={self.backend}" if self.backend else ""
        lines = [
            f"{self.method} {self.n}:{self.m}{backend}: "
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


@dataclass(frozen=True)
class LayerRules:
    """The settings :func:`plan_layers` selects layers by (every rule is in the module doc).

    Attributes:
        n, m: the N:M pattern; d_in and d_out must both be divisible by ``m``.
        include: fnmatch patterns of layer names to convert (None: every candidate); a layer
            named here that a rule refuses is an error.
        exclude: patterns of layers left dense (None: :data:`DEFAULT_EXCLUDE`).
        max_aspect_ratio: leave layers with max(d_out/d_in, d_in/d_out) above this dense.
        conv1d: whether the conversion takes transformers' ``Conv1D`` besides ``nn.Linear``
            (``sparsify`` and Wanda do; the baselines take ``nn.Linear`` only, and list the
            other linear-like layers without an include error).
        method: the conversion's function name, for messages (``"sparsify"``).
        action: what it does to a layer, for messages (``"sparsified"``: "cannot be
            sparsified 2:4").
        single_layer: what to call instead for one bare layer (the model itself a Linear).

    Raises:
        ValueError: a bad N:M pattern or ``max_aspect_ratio`` < 1.
    """

    n: int = 2
    m: int = 4
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    max_aspect_ratio: float | None = None
    conv1d: bool = True
    method: str = "sparsify"
    action: str = "sparsified"
    single_layer: str = "SparseLinear.from_linear(linear, n, m)"

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    @classmethod
    def from_config(cls, config: SparsityConfig, method: str = "sparsify") -> LayerRules:
        """The rules of a :class:`SparsityConfig` (n, m, include, exclude, aspect ratio;
        ``nn.Linear`` and ``Conv1D`` layers), for ``method`` (named in messages)."""
        return cls(
            n=config.n,
            m=config.m,
            include=config.include,
            exclude=config.exclude,
            max_aspect_ratio=config.max_aspect_ratio,
            method=method,
        )

    @property
    def excluded(self) -> tuple[str, ...]:
        """The exclude patterns in force: ``exclude``, or :data:`DEFAULT_EXCLUDE` for None."""
        return tuple(self.exclude) if self.exclude is not None else DEFAULT_EXCLUDE

    @property
    def what(self) -> str:
        """The conversion in messages, e.g. ``"sparsified 2:4"``."""
        return f"{self.action} {self.n}:{self.m}"


def plan_layers(model: nn.Module, rules: LayerRules, backend: str = "") -> SparsifyReport:
    """The plan of a conversion of ``model``: a decision and a reason for every linear-like
    child, by ``rules``; nothing in the model changes.

    Linear-like: ``nn.Linear`` (and subclasses), SparseLinear, transformers' ``Conv1D`` and
    any other module whose class name ends in ``Linear`` (so that no linear layer goes
    unmentioned), except PEFT's wrappers, whose children are listed instead.

    Args:
        model: the model (not itself a single layer).
        rules: the selection rules.
        backend: the backend name the report shows ("" for none).

    Raises:
        ValueError: ``model`` is itself a linear layer, or a layer matched by ``include``
            cannot be converted (the message names the layer, the pattern and the rule).
    """
    if isinstance(model, nn.Linear | SparseLinear) or is_conv1d(model):
        raise ValueError(
            f"{rules.method}() swaps layers inside a model; for a single layer use "
            f"{rules.single_layer}"
        )
    context = _Context(
        owners=_parameter_owners(model),
        wrappers={name: mod for name, mod in model.named_modules() if _is_adapter_wrapper(mod)},
        rules=rules,
    )
    report = SparsifyReport(rules.n, rules.m, backend, method=rules.method)
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not (isinstance(child, nn.Linear | SparseLinear) or _linear_like(child)):
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            report.layers.append(_decide(name, parent, attr, child, context))
    return report


def swap_layers(
    model: nn.Module,
    plan: SparsifyReport,
    build: Callable[[LayerDecision], nn.Module],
    tag: str = "",
) -> list[str]:
    """Swap every layer ``plan`` converts for ``build(decision)``, once each, in plan order,
    and record the outcome in ``plan`` (reason ``"converted"``, ``"converted (Conv1D)"``, or
    with ``tag``: ``"converted (wanda, Conv1D)"``).

    ``build`` gets the decision (its ``module`` is the dense layer) and returns the new layer.
    Validate everything that can fail before calling this: a ``build`` that raises leaves
    the layers before it swapped.

    Returns:
        The qualified names of the swapped layers.
    """
    swapped: list[str] = []
    for index, decision in enumerate(plan.layers):
        if decision.decision != "convert":
            continue
        dense = decision.module
        assert dense is not None, "a planned layer carries its module"
        parent_name, _, attr = decision.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = build(decision)
        setattr(parent, attr, new)
        tags = [t for t in (tag, "Conv1D" if is_conv1d(dense) else "") if t]
        reason = "converted" + (f" ({', '.join(tags)})" if tags else "")
        plan.layers[index] = replace(decision, reason=reason, module=new)
        swapped.append(decision.name)
    return swapped


# ---------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class _Context:
    """What :func:`_decide` needs besides the layer: the model's facts and the rules."""

    owners: dict[int, list[str]]
    wrappers: dict[str, nn.Module]
    rules: LayerRules


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Map id(parameter) to every qualified name it is registered under."""
    owners: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners[id(param)].append(f"{module_name}.{param_name}" if module_name else param_name)
    return owners


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
    """Conv1D, or a module whose class name says it is a linear layer (e.g. TransformerEngine's
    ``Linear``), other than a PEFT wrapper: listed so that no linear layer goes unmentioned."""
    if is_conv1d(module):
        return True
    return type(module).__name__.endswith("Linear") and not _is_adapter_wrapper(module)


def _shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear-like module (0 where it cannot be told)."""
    if is_conv1d(module):
        weight = weight_of(module)
        assert weight is not None
        return int(weight.shape[1]), int(weight.shape[0])  # stored (d_in, d_out)
    d_out, d_in = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(d_out, int) and isinstance(d_in, int):
        return d_out, d_in
    weight = weight_of(module)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return 0, 0


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


def _decide(
    name: str, parent: nn.Module, attr: str, child: nn.Module, context: _Context
) -> LayerDecision:
    """The decision for one linear-like child (the rules in their order: see the module doc)."""
    rules = context.rules
    d_out, d_in = _shape(child)

    def keep(reason: str) -> LayerDecision:
        return LayerDecision(name, d_out, d_in, "keep", reason, child)

    if isinstance(child, SparseLinear):
        return LayerDecision(
            name, d_out, d_in, "sparse", f"already sparse ({child.n}:{child.m})", child
        )
    role = _peft_role(name, context.wrappers)
    included_by = _matches(name, rules.include) if rules.include is not None else None
    if role is not None and not (role.startswith("base layer") and included_by):
        return keep(role)
    excluded_by = _matches(name, rules.excluded)
    if excluded_by is not None:
        return keep(f"excluded by pattern {excluded_by!r}")
    if rules.include is not None and included_by is None:
        return keep("not matched by include patterns")
    conv1d = is_conv1d(child)
    if not (isinstance(child, nn.Linear) or (conv1d and rules.conv1d)):
        kind = "transformers Conv1D" if conv1d else type(child).__name__
        also = " or transformers Conv1D" if rules.conv1d else ""
        wrong_kind = f"{kind} is not an nn.Linear{also}; it cannot be {rules.what}"
        if rules.conv1d:  # a conversion of nn.Linear only leaves other kinds to others
            _refuse_included(name, included_by, rules, wrong_kind)
        return keep(wrong_kind)
    problem = _weight_problem(name, parent, attr, child, d_out, d_in, context)
    if problem is not None:
        _refuse_included(name, included_by, rules, problem)
        return keep(problem)
    if rules.max_aspect_ratio is not None:
        ratio = max(d_out, d_in) / min(d_out, d_in)
        if ratio > rules.max_aspect_ratio:
            return keep(f"aspect ratio {ratio:.2f} > max_aspect_ratio {rules.max_aspect_ratio}")
    return LayerDecision(name, d_out, d_in, "convert", "to convert", child)


def _weight_problem(
    name: str,
    parent: nn.Module,
    attr: str,
    child: nn.Module,
    d_out: int,
    d_in: int,
    context: _Context,
) -> str | None:
    """Why the weight of a convertible kind of layer cannot be converted (None: it can)."""
    weight = weight_of(child)
    m = context.rules.m
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        return "nn.MultiheadAttention reads out_proj.weight directly instead of calling it"
    if weight is None:
        return "it has no weight tensor"
    shared = [owner for owner in context.owners[id(weight)] if owner != f"{name}.weight"]
    if shared:
        return f"weight shared with {', '.join(shared)}"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if d_in % m or d_out % m:
        return f"d_in={d_in} and d_out={d_out} must both be divisible by m={m}"
    return None


def _refuse_included(name: str, included_by: str | None, rules: LayerRules, problem: str) -> None:
    """Raise when ``include`` names a layer that a rule refuses."""
    if included_by is not None:
        raise ValueError(
            f"layer {name!r} matches include pattern {included_by!r} but cannot be "
            f"{rules.what}: {problem}; remove it from include or change the layer"
        )


def replace_children(
    model: nn.Module,
    kind: type[nn.Module] | tuple[type[nn.Module], ...],
    build: Callable[[nn.Module], nn.Module],
) -> list[str]:
    """Swap every child of ``model`` of type ``kind`` for ``build(child)``, in place: the
    swap back of a conversion (``densify``, a baseline's ``finalize``), which needs no plan.

    Returns:
        The qualified names of the swapped layers.
    """
    found = [
        (f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child)
        for parent_name, parent in model.named_modules()
        for attr, child in parent.named_children()
        if isinstance(child, kind)
    ]
    for _, parent, attr, child in found:
        setattr(parent, attr, build(child))
    return [name for name, *_ in found]
