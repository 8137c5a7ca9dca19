"""Export a trained model as safetensors + config.json, and load it back without Lightning.

The sparse layers are exported in their packed form (kept values + 2-bit offsets), so the
file is about half the size of a dense export and reloads into an identical model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import DEFAULT_EXCLUDE, restore_adapters, sparsify

FORMAT = "slope-lightning/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _unique_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of the state dict, each piece of memory once; aliases map dropped -> kept."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            continue  # e.g. SparseLinear's step counter (extra state), meaningless at inference
        key = (value.data_ptr(), value.numel())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.detach().contiguous().cpu()
    return tensors, aliases


def export_model(
    model: nn.Module, config: TransformerConfig, sparsity: Any, directory: Path
) -> None:
    """Write ``model.safetensors`` and ``config.json`` (model and sparsity settings)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _unique_tensors(model)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(config),
        "sparsity": dataclasses.asdict(sparsity) if dataclasses.is_dataclass(sparsity) else None,
        "aliases": aliases,
    }
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))


def load_exported(directory: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild an exported model (sparse layers, adapters and all) and load its weights.

    Raises:
        FileNotFoundError: if the directory lacks model.safetensors or config.json.
        ValueError: if the files are not a slope-lightning export.
    """
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a slope-lightning export")
    meta = json.loads((directory / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG} has format {meta.get('format')!r}, not {FORMAT!r}")
    config = TransformerConfig(**meta["model"])
    model = Transformer(config)
    sparsity = meta.get("sparsity")
    if sparsity and sparsity.get("sparse", True):
        exclude = sparsity.get("exclude")
        sparsify(
            model,
            sparsity["n"],
            sparsity["m"],
            include=sparsity.get("include"),
            exclude=tuple(exclude) if exclude is not None else DEFAULT_EXCLUDE,
            max_aspect_ratio=sparsity.get("max_aspect_ratio"),
        )
    tensors = load_file(str(directory / WEIGHTS))
    restore_adapters(model, tensors)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed = set(meta.get("aliases", {}))
    missing = [k for k in missing if k not in allowed and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"export in {directory} does not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return model.to(device)
