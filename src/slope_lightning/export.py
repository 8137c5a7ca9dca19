"""Export a trained model as safetensors + config.json, and load it back without Lightning.

The sparse layers are exported in their packed form (kept values + 2-bit offsets), so the
file is about half the size of a dense export and reloads into an identical model.
``config.json`` holds :meth:`TransformerConfig.to_dict` and :meth:`SparsityConfig.to_dict`;
:func:`load_exported` rebuilds the model from them with the matching ``from_dict``. An export
can carry its tokenizer (``tokenizer.json``), so that ``slope-lightning generate`` needs
nothing else.

This format is for the project's own :class:`~slope_lightning.models.Transformer`. A Hugging
Face ``transformers`` model has its own: :func:`slope_lightning.hf.save_pretrained` (sparse,
reloads exactly) and :func:`slope_lightning.hf.export_dense`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slope_lightning.models import Transformer, TransformerConfig, build_model
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.config import SparsityConfig
from slope_lightning.utils import (
    atomic_path,
    atomic_write,
    load_safetensors,
    require_finite,
    unique_tensors,
)

FORMAT = "slope-lightning/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: The tokenizer an export may carry (a copy of the run's ``tokenizer.json``).
TOKENIZER = "tokenizer.json"


def _check_exportable(model: nn.Module, config: TransformerConfig) -> None:
    """Raise unless ``model`` is a :class:`Transformer`, or a stand-in whose ``state_dict()``
    has a Transformer's layout (the gathered state of a sharded one, which the Lightning
    module exports under FSDP2).

    Raises:
        TypeError: a model of another kind (the message names the exporter to use).
    """
    if isinstance(model, Transformer):
        return
    kind = type(model).__name__
    if callable(getattr(model, "save_pretrained", None)):  # a transformers PreTrainedModel
        raise TypeError(
            f"export_model writes this project's Transformer, not a {kind}: for a Hugging "
            "Face transformers model use slope_lightning.hf.save_pretrained(model, directory) "
            "(sparse, reloads with slope_lightning.hf.from_pretrained) or "
            "slope_lightning.hf.export_dense(model, directory) (a dense checkpoint for plain "
            "transformers)"
        )
    with torch.device("meta"):  # no memory: only the names of its top-level modules
        expected = {name for name, _ in Transformer(config).named_children()}
    found = {key.split(".")[0] for key in model.state_dict()}
    if not found or not found <= expected:
        raise TypeError(
            f"export_model writes this project's Transformer, but got a {kind} whose state "
            f"holds {sorted(found - expected)[:3] or 'nothing'} (a Transformer holds "
            f"{sorted(expected)}); save another model with its own format, e.g. "
            "slope_lightning.hf.save_pretrained for a Hugging Face transformers model"
        )


def export_model(
    model: nn.Module,
    config: TransformerConfig,
    sparsity: SparsityConfig | None,
    directory: Path,
    tokenizer: str | Path | None = None,
) -> None:
    """Write ``model.safetensors`` and ``config.json`` (model and sparsity settings), and a
    copy of the tokenizer when given.

    Args:
        model: the trained :class:`Transformer` (sparse layers and adapters are saved packed,
            as they are).
        config: the model's shape, stored with :meth:`TransformerConfig.to_dict`.
        sparsity: how the model was sparsified (None: a dense model).
        directory: created if missing; existing files in it are replaced.
        tokenizer: the ``tokenizer.json`` the model was trained with, copied into the export
            as ``tokenizer.json`` (``slope-lightning generate`` reads it from there).

    Raises:
        TypeError: ``model`` is not a Transformer (e.g. a Hugging Face model: use
            :func:`slope_lightning.hf.save_pretrained`).
        ValueError: a weight holds NaN or inf (nothing is written).
        FileNotFoundError: ``tokenizer`` does not exist (nothing is written).
    """
    _check_exportable(model, config)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"export_model: tokenizer {str(tokenizer)!r} does not exist")
    tensors, aliases = unique_tensors(model.state_dict())
    require_finite(tensors, "export", directory)
    meta = {
        "format": FORMAT,
        "model": config.to_dict(),
        "sparsity": sparsity.to_dict() if sparsity is not None else None,
        "aliases": aliases,
    }
    # Weights first, config last, each through a temporary name: a crash mid-export never
    # leaves a directory that load_exported takes for a finished export.
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    if tokenizer is not None:
        with atomic_path(directory / TOKENIZER) as tmp:
            shutil.copyfile(tokenizer, tmp)
    atomic_write(directory / CONFIG, json.dumps(meta, indent=2))


def load_exported(directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild an exported model (sparse layers, adapters and all) and load its weights.

    The model is sparsified with the exported :class:`SparsityConfig` on the ``reference``
    backend (any device; the GEMM backend is a runtime choice, not part of the weights).
    Adapters in the export come back with the weights (a SparseLinear attaches one when
    its state dict holds adapter weights).

    Raises:
        FileNotFoundError: if the directory lacks model.safetensors or config.json.
        ValueError: if a file is not a slope-lightning export (the message names the file),
            or the weights do not match the config.
    """
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a slope-lightning export")
    config_path = directory / CONFIG
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{config_path} is not valid JSON ({error}); re-export the model"
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{config_path} has format {found!r}, not {FORMAT!r}")
    try:
        config = TransformerConfig.from_dict(meta["model"])
        stored = meta.get("sparsity")  # None: exported dense
        sparsity = SparsityConfig.from_dict(stored) if stored is not None else None
    except (KeyError, ValueError) as error:
        raise ValueError(f"{config_path}: {error}") from error
    model, _ = build_model(config, sparsity, backend=BackendName.reference)
    tensors = load_safetensors(directory / WEIGHTS, "re-export the model")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed = set(meta.get("aliases", {}))
    missing = [k for k in missing if k not in allowed and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"export in {directory} does not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model.to(device)
