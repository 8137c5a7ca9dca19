"""SparsityConfig: the settings of :func:`~slope_lightning.sparse.sparsify` as one typed value.

Torch-only like the rest of ``sparse/``: a plain-PyTorch user writes
``sparsify(model, SparsityConfig(n=2, m=4))``, the Lightning module reads the same dataclass
from YAML (``model.sparsity``), and an export stores its :meth:`SparsityConfig.to_dict` so
that a reload rebuilds the same layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.masks import MASK_METHODS, MaskMethod, check_nm

T = TypeVar("T")


@dataclass(frozen=True)
class SparsityConfig:
    """How a model's linear layers are sparsified (YAML section ``model.sparsity``).

    Every value is validated when the config is built; a bad one raises a ``ValueError``
    that names the field and the allowed values.

    Attributes:
        sparse: False trains the dense baseline under the same config (nothing is converted).
        n: kept entries per group (2 for 2:4).
        m: group size (4 for 2:4).
        backend: GEMM backend of every converted layer (see
            :class:`~slope_lightning.sparse.backends.names.BackendName`): ``reference`` (plain
            torch, any device) or a GPU backend. A name string is accepted and converted.
        include: fnmatch patterns of layer names to sparsify (None: every candidate layer).
        exclude: patterns left dense (None: ``DEFAULT_EXCLUDE``, the LM head and embeddings).
        max_aspect_ratio: leave layers with max(d_out/d_in, d_in/d_out) above this dense.
        transpose_mask_interval: optimizer steps between re-derivations of M_C when no
            MaskScheduler callback owns the schedule (None: only when asked).
        mask_method: row mask by ``"magnitude"`` (the paper) or ``"random"`` (``"wanda"``
            needs calibration batches: :func:`~slope_lightning.sparse.calibrate_and_sparsify`).

    Example:
        >>> SparsityConfig(n=2, m=4, backend="reference").to_dict()["backend"]
        'reference'
    """

    sparse: bool = True
    n: int = 2
    m: int = 4
    backend: BackendName = BackendName.reference
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_aspect_ratio: float | None = None
    transpose_mask_interval: int | None = 1
    mask_method: MaskMethod = "magnitude"

    def __post_init__(self) -> None:
        """Validate every field and normalise ``backend`` to the Enum, patterns to lists.

        Raises:
            ValueError: ``sparse`` is not a bool.
            ValueError: ``n``/``m`` are not an N:M pattern with 1 <= n < m <= 256.
            ValueError: ``backend`` is not a known backend name (the message lists them).
            ValueError: ``include``/``exclude`` is a bare string or holds a non-string.
            ValueError: ``max_aspect_ratio`` < 1, or ``transpose_mask_interval`` < 1.
            ValueError: ``mask_method`` is not "magnitude" or "random" ("wanda" needs
                calibration batches).
        """
        if not isinstance(self.sparse, bool):
            raise ValueError(f"sparsity.sparse must be true or false, got {self.sparse!r}")
        try:
            check_nm(self.n, self.m)
        except ValueError as error:
            raise ValueError(f"sparsity.n / sparsity.m: {error}") from None
        try:
            backend = BackendName.parse(self.backend)
        except ValueError as error:
            raise ValueError(f"sparsity.backend: {error}") from None
        object.__setattr__(self, "backend", backend)
        for name in ("include", "exclude"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))
        ratio = self.max_aspect_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 1
        ):
            raise ValueError(
                f"sparsity.max_aspect_ratio must be a number >= 1 (or null for no limit), "
                f"got {ratio!r}"
            )
        interval = self.transpose_mask_interval
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
        ):
            raise ValueError(
                "sparsity.transpose_mask_interval must be a positive number of optimizer steps "
                f"(or null: refresh only when asked), got {interval!r}"
            )
        if self.mask_method not in MASK_METHODS:
            raise ValueError(
                f"sparsity.mask_method must be one of {MASK_METHODS}, got {self.mask_method!r}"
            )
        if self.mask_method == "wanda":
            raise ValueError(
                "sparsity.mask_method='wanda' needs calibration batches, which a config cannot "
                "hold: keep 'magnitude' here and call calibrate_and_sparsify(model, batches, "
                "config), or use the SLoPe callback's mask_method='wanda'"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON/YAML values (the backend as its name string)."""
        data = dataclasses.asdict(self)
        data["backend"] = self.backend.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityConfig:
        """Rebuild a config from :meth:`to_dict` output (an export's ``config.json``, hparams).

        Raises:
            ValueError: a key that is not a field (the message lists the fields), or a bad value.
        """
        return config_from_dict(cls, data, "SparsityConfig")


def _patterns(name: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"sparsity.{name} must be a list of fnmatch patterns (or null), got {value!r}; "
            f"write [{value!r}] for a single pattern"
        )
    if not all(isinstance(pattern, str) for pattern in value):
        raise ValueError(f"sparsity.{name} must hold pattern strings only, got {list(value)!r}")
    return list(value)


def config_from_dict(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    """Build the dataclass ``cls`` from ``data``, refusing keys that are not its fields.

    The one rule every ``from_dict`` of the torch-side configs follows (``what`` names the
    config in messages).

    Raises:
        ValueError: ``data`` is not a mapping, or has an unknown key.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be given as a mapping of its fields, got {data!r}")
    fields = {f.name for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid fields: {sorted(fields)}")
    return cls(**data)


class KeywordDefault:
    """The default of a keyword argument, marked so that the function can tell it apart from
    the same value given by the caller (``sparsify(model, config, m=4)`` is an error even
    though 4 is the default). Its ``repr`` is the value's, so signatures read normally.
    """

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def keyword_default(value: T) -> T:
    """``value`` marked as a keyword's default (typed as the value, for signatures)."""
    return cast(T, KeywordDefault(value))


def given_or_default(value: T) -> T:
    """The caller's value, or the marked default's own value."""
    return cast(T, value.value) if isinstance(value, KeywordDefault) else value


def config_from_call(
    caller: str,
    first: int | SparsityConfig,
    keywords: Mapping[str, object],
    accepted: Collection[str] | None = None,
) -> tuple[SparsityConfig, object | None]:
    """The settings of a call that takes either a SparsityConfig or keywords, never both: the
    one rule of ``sparsify(model, config)`` / ``sparsify(model, n=2, m=4, ...)`` and of
    :func:`~slope_lightning.sparse.wanda_sparsify`.

    Args:
        caller: the function's name, for messages.
        first: the config, or ``n`` of the keyword form.
        keywords: the call's setting keywords; those left at their :func:`keyword_default`
            count as not given. A ``backend`` that is not a name (a SparseBackend instance)
            is returned apart: a config holds backend names only.
        accepted: the keywords the caller takes (its ``**settings``); None: any field of
            SparsityConfig.

    Returns:
        (the config, the backend instance or None).

    Raises:
        TypeError: a keyword the caller does not take, or a config and a setting keyword
            both given.
        ValueError: a config with ``sparse=False``, or a bad keyword value (named).
    """
    unknown = sorted(set(keywords) - set(accepted)) if accepted is not None else []
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword(s) {', '.join(unknown)}; its settings are "
            f"{', '.join(sorted(accepted or ()))}"
        )
    if isinstance(first, SparsityConfig):
        given = [key for key, value in keywords.items() if not isinstance(value, KeywordDefault)]
        if given:
            raise TypeError(
                f"{caller}(model, config) takes every setting from the SparsityConfig, but "
                f"these keywords were given too: {', '.join(given)}; put them in the config "
                "(dataclasses.replace(config, ...)) or pass keywords only"
            )
        if not first.sparse:
            raise ValueError(
                f"{caller}(model, config) got a config with sparse=False (the dense baseline); "
                "check config.sparse before calling, or set sparse=True"
            )
        return first, None
    settings = {key: given_or_default(value) for key, value in keywords.items()}
    backend = settings.get("backend")
    instance = None
    if backend is not None and not isinstance(backend, str):  # str: names and BackendName
        instance = backend
        settings["backend"] = BackendName.reference  # unused: the instance runs the layers
    for name in ("include", "exclude"):
        value = settings.get(name)
        if isinstance(value, Sequence) and not isinstance(value, str):
            settings[name] = list(value)
    return SparsityConfig(n=first, **cast(dict[str, Any], settings)), instance
