"""Hugging Face ``transformers`` models through SLoPe: sparse checkpoints that reload exactly,
and dense exports that plain ``transformers`` loads.

- :func:`save_pretrained` / :func:`from_pretrained`: the packed sparse model (kept values,
  packed offsets, adapters, biases and every dense tensor) in ``sparse_model.safetensors``,
  beside an ordinary ``config.json`` that carries a ``slope_lightning`` section (N:M, which
  layers are sparse, their M_C schedule and adapter ranks). A reload rebuilds the same model,
  bit for bit. transformers' own ``from_pretrained`` refuses such a directory (it holds no
  ``model.safetensors``) instead of silently initialising the sparse layers at random.
- :func:`export_dense`: an ordinary checkpoint written by the model's own ``save_pretrained``,
  with every sparse layer turned back into the layer it replaced: W_R with its N:M zeros kept
  exactly, or W_R plus the adapter's s·(L R)ᵀ when there is one, in transformers' layout
  (``Conv1D`` weights transposed). It loads in plain transformers, without slope-lightning.

transformers is imported inside the functions that need it, never by ``slope_lightning.sparse``
and not by importing this module.

Example:
    >>> from slope_lightning import sparsify, hf  # doctest: +SKIP
    >>> sparsify(model)  # a LlamaForCausalLM, GPT2LMHeadModel, ...
    >>> hf.save_pretrained(model, "ckpt")  # packed, reloads exactly
    >>> model = hf.from_pretrained("ckpt")
    >>> hf.export_dense(model, "dense")  # AutoModelForCausalLM.from_pretrained("dense")
"""

from __future__ import annotations

import glob
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slope_lightning.sparse.linear import SparseLinear
from slope_lightning.sparse.operations import sparse_layers
from slope_lightning.sparse.sparsify import sparsify
from slope_lightning.utils import (
    atomic_path,
    atomic_write,
    load_safetensors,
    require_finite,
    unique_tensors,
)

#: The section of ``config.json`` that describes the sparse layers.
SECTION = "slope_lightning"
#: Its format tag; a reload refuses any other.
FORMAT = "slope-lightning-hf/1"
#: The packed weights. Not ``model.safetensors``, so that transformers' own loader refuses the
#: directory rather than loading it with random sparse layers.
WEIGHTS = "sparse_model.safetensors"
CONFIG = "config.json"
#: Files of an ordinary (dense) transformers checkpoint; save_pretrained will not write a
#: sparse checkpoint beside one, which plain transformers would then load, stale.
DENSE_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _require_hf(model: object, what: str) -> Any:
    """``model`` if it looks like a transformers ``PreTrainedModel`` (typed Any: transformers'
    types are not imported here), else a TypeError."""
    config = getattr(model, "config", None)
    if not (
        isinstance(model, nn.Module)
        and callable(getattr(model, "save_pretrained", None))
        and callable(getattr(config, "to_json_string", None))
    ):
        raise TypeError(
            f"slope_lightning.hf.{what} takes a transformers PreTrainedModel, got "
            f"{type(model).__name__}; export this project's Transformer with "
            "slope_lightning.export.export_model"
        )
    return model


def sparsity_section(model: nn.Module) -> dict[str, Any]:
    """The ``slope_lightning`` section of ``config.json`` for a sparsified model.

    ``n`` and ``m`` at the top when every layer shares them; per layer (by qualified name):
    its N:M, ``transpose_mask_interval``, ``adapter_rank`` (None: no adapter) and
    ``weight_layout`` (``"conv1d"`` for a layer made from transformers' Conv1D).

    Raises:
        ValueError: the model has no SparseLinear layer.
    """
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(
            "the model has no SparseLinear layer: call sparsify(model) first, or save a dense "
            "model with its own save_pretrained"
        )
    section: dict[str, Any] = {"format": FORMAT}
    patterns = {(layer.n, layer.m) for _, layer in layers}
    if len(patterns) == 1:
        section["n"], section["m"] = next(iter(patterns))
    section["layers"] = {
        name: {
            "n": layer.n,
            "m": layer.m,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "transpose_mask_interval": layer.transpose_mask_interval,
            "adapter_rank": layer.adapter.rank if layer.adapter is not None else None,
            "weight_layout": layer.weight_layout,
        }
        for name, layer in layers
    }
    return section


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Write a sparsified transformers model so that :func:`from_pretrained` rebuilds it exactly.

    Writes ``sparse_model.safetensors`` (the state dict, packed; tied tensors once), the
    model's ``config.json`` with a ``slope_lightning`` section (:func:`sparsity_section`,
    plus the tied-tensor aliases) and, for generative models, ``generation_config.json``.
    Weights go first and the config last, each through a temporary name, so a crash never
    leaves a directory that looks complete.

    Args:
        model: a transformers ``PreTrainedModel`` with SparseLinear layers (adapters,
            merged or not, are saved with them).
        directory: created if missing.

    Raises:
        TypeError: ``model`` is not a transformers model.
        ValueError: the model has no SparseLinear layer, or a tensor holds NaN or inf.
        FileExistsError: ``directory`` holds a dense transformers checkpoint.
    """
    hf_model = _require_hf(model, "save_pretrained")
    directory = Path(directory)
    dense = [name for name in DENSE_FILES if (directory / name).exists()]
    if dense:
        raise FileExistsError(
            f"{directory} holds a dense checkpoint ({dense[0]}), which transformers would load "
            "instead of this sparse one; save to another directory or remove it"
        )
    section = sparsity_section(model)
    tensors, aliases = unique_tensors(model.state_dict())
    require_finite(tensors, "save", directory)
    section["aliases"] = aliases
    main, exceptions = _dtypes(model)
    section["dtype"] = _dtype_name(main)
    section["dtype_exceptions"] = {name: _dtype_name(d) for name, d in exceptions.items()}
    config = json.loads(hf_model.config.to_json_string(use_diff=True))
    config["architectures"] = [type(model).__name__]
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = section["dtype"]
    config[SECTION] = section
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(directory)
    atomic_write(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _read_section(directory: Path) -> dict[str, Any]:
    """The ``slope_lightning`` section of ``directory/config.json``, checked."""
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a saved transformers model")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from error
    section = meta.get(SECTION) if isinstance(meta, dict) else None
    if section is None:
        raise ValueError(
            f"{config_path} has no {SECTION!r} section: not a sparse checkpoint written by "
            "slope_lightning.hf.save_pretrained; load a dense checkpoint with transformers' "
            "from_pretrained, then sparsify it"
        )
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        found = section.get("format") if isinstance(section, dict) else section
        raise ValueError(f"{config_path}: {SECTION}.format is {found!r}, not {FORMAT!r}")
    if not isinstance(section.get("layers"), dict) or not section["layers"]:
        raise ValueError(f"{config_path}: {SECTION}.layers lists no sparse layer")
    return section


def _model_class(
    config: Any, model_class: type[nn.Module] | None, directory: Path
) -> type[nn.Module]:
    """The class to build: ``model_class``, else the config's first ``architectures`` entry.

    A transformers ``model_class`` must build the saved model type: one of another type reads
    config attributes the saved config does not have, and fails inside transformers with a
    bare ``AttributeError``.

    Raises:
        ValueError: ``model_class`` builds another model type than the saved one, or the
            config names an architecture transformers does not provide.
    """
    import transformers

    names = getattr(config, "architectures", None) or []
    if model_class is not None:
        saved_type = getattr(config, "model_type", None)
        class_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
        if saved_type and class_type and saved_type != class_type:
            saved = f"transformers.{names[0]}" if names else f"a {saved_type!r} class"
            architectures = ", ".join(names) or "no architectures entry"
            raise ValueError(
                f"{directory / CONFIG} holds a {saved_type!r} model ({architectures}), but "
                f"model_class={model_class.__name__} builds "
                f"{class_type!r} models; pass model_class={saved}, or leave model_class out "
                "to build the class the config names"
            )
        return model_class
    found = getattr(transformers, names[0], None) if names else None
    if not isinstance(found, type) or not issubclass(found, nn.Module):
        raise ValueError(
            f"config.json names architectures {names!r}, which transformers does not provide; "
            "pass model_class= (e.g. transformers.LlamaForCausalLM)"
        )
    return found


def _dtypes(model: nn.Module) -> tuple[torch.dtype, dict[str, torch.dtype]]:
    """The model's dtype (its first floating parameter's, as transformers reports it) and every
    floating parameter or buffer of another dtype, non-persistent buffers included (e.g. a
    rotary table kept in float32 under a bfloat16 model)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    floating = [(name, t.dtype) for name, t in tensors if t.is_floating_point()]
    main = floating[0][1] if floating else torch.float32
    return main, {name: dtype for name, dtype in floating if dtype != main}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _set_dtypes(model: nn.Module, main: torch.dtype, exceptions: dict[str, torch.dtype]) -> None:
    """Give every floating parameter and buffer the dtype it was saved with, each cast once
    from the dtype it was built in (a buffer kept in float32 is never rounded through bf16),
    so the load copies bit for bit and recomputed buffers match."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        target = exceptions.get(name, main)
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)


def _parse_dtype(name: object, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: {name!r} is not a torch dtype")
    return dtype


def from_pretrained(
    directory: str | Path,
    *,
    model_class: type[nn.Module] | None = None,
    backend: str = "reference",
    device: str | torch.device | None = None,
) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`: same layers, same tensors, same
    outputs, adapters included.

    The model is built from ``config.json`` (its ``architectures`` entry, or
    ``model_class``), the listed layers are sparsified with their N:M and M_C schedule, and
    the packed weights are loaded in the dtypes they were saved in. Returned in eval mode,
    as transformers returns models.

    Args:
        directory: the saved checkpoint.
        model_class: the transformers class to build (default: from the config).
        backend: GEMM backend of the sparse layers (a runtime choice, not part of the
            weights): ``reference`` runs anywhere.
        device: where to move the model (default: CPU, where it is built).

    Raises:
        FileNotFoundError: ``config.json`` or ``sparse_model.safetensors`` is missing.
        ValueError: the config has no valid ``slope_lightning`` section, names an unknown
            architecture, is of another model type than ``model_class``, or does not match
            the weights (the message names the keys).
    """
    import transformers

    directory = Path(directory)
    section = _read_section(directory)
    weights_path = directory / WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found: the sparse checkpoint in {directory} is incomplete; "
            "save it again with slope_lightning.hf.save_pretrained"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    if hasattr(config, SECTION):
        delattr(config, SECTION)  # the model's config holds the architecture only
    model = _model_class(config, model_class, directory)(config)

    layers: dict[str, dict[str, Any]] = section["layers"]
    groups: dict[tuple[int, int, int | None], list[str]] = defaultdict(list)
    for name, spec in layers.items():
        groups[(spec["n"], spec["m"], spec["transpose_mask_interval"])].append(name)
    converted: set[str] = set()
    for (n, m, interval), names in groups.items():
        report = sparsify(
            model,
            n,
            m,
            backend=backend,
            include=[glob.escape(name) for name in names],
            exclude=(),
            transpose_mask_interval=interval,
        )
        converted |= {d.name for d in report.converted}
    missing_layers = sorted(set(layers) - converted)
    if missing_layers:
        raise ValueError(
            f"{directory}: {len(missing_layers)} sparse layer(s) of the checkpoint are not in "
            f"the model built from its config (e.g. {missing_layers[0]!r}); pass the "
            "model_class it was saved from"
        )

    tensors = load_safetensors(weights_path, "save the model again")
    for dropped, kept in section.get("aliases", {}).items():
        tensors[dropped] = tensors[kept]
    where = f"{directory / CONFIG}: {SECTION}"
    _set_dtypes(
        model,
        _parse_dtype(section.get("dtype", "float32"), f"{where}.dtype"),
        {
            name: _parse_dtype(dtype, f"{where}.dtype_exceptions")
            for name, dtype in section.get("dtype_exceptions", {}).items()
        },
    )
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: the weights do not match the model built from its config: missing "
            f"{missing}, unexpected {unexpected}"
        )
    for name, layer in sparse_layers(model):
        rank = layer.adapter.rank if layer.adapter is not None else None
        if rank != layers[name]["adapter_rank"]:
            raise ValueError(
                f"{directory}: layer {name!r} has adapter rank {rank} in the weights but "
                f"{layers[name]['adapter_rank']} in config.json; save the model again"
            )
    model.eval()
    return model.to(device) if device is not None else model


def _dense_layer(layer: SparseLinear, conv1d_class: type[nn.Module]) -> nn.Module:
    """The dense layer ``layer`` replaced: an nn.Linear, or a transformers Conv1D for a layer
    made from one, holding W_R (+ the adapter's delta) and the bias."""
    linear = layer.to_linear()  # adapter folded in, exact zeros without one
    if layer.weight_layout != "conv1d":
        return linear
    conv = conv1d_class(layer.out_features, layer.in_features)  # Conv1D(nf, nx)
    conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.get_parameter("weight").copy_(linear.weight.t())  # (d_in, d_out)
        if linear.bias is not None:  # a Conv1D always has one
            conv.get_parameter("bias").copy_(linear.bias)
    return conv


def export_dense(model: nn.Module, directory: str | Path, **save_kwargs: Any) -> None:
    """Write ``model`` as an ordinary transformers checkpoint that loads without slope-lightning.

    Every SparseLinear is swapped, for the duration of the save, for the dense layer it
    replaced (:func:`_dense_layer`); the model's own ``save_pretrained`` then writes the
    checkpoint (its format, sharding, tied weights and generation config). The model is
    unchanged afterwards, also when the save fails.

    Args:
        model: a transformers ``PreTrainedModel``, sparsified or not.
        directory: the checkpoint directory.
        save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Raises:
        TypeError: ``model`` is not a transformers model.
        ValueError: a sparse layer holds NaN or inf (nothing is written).
    """
    hf_model = _require_hf(model, "export_dense")
    from transformers.pytorch_utils import Conv1D

    dense: list[tuple[nn.Module, str, SparseLinear, nn.Module]] = []
    for name, layer in sparse_layers(model):
        parent_name, _, attr = name.rpartition(".")
        replacement = _dense_layer(layer, Conv1D)
        if not replacement.get_parameter("weight").isfinite().all():
            raise ValueError(
                f"refusing to export {directory}: layer {name!r} holds NaN/inf; export the "
                "last good checkpoint instead"
            )
        dense.append((model.get_submodule(parent_name), attr, layer, replacement))
    try:
        for parent, attr, _, replacement in dense:
            setattr(parent, attr, replacement)
        hf_model.save_pretrained(directory, **save_kwargs)
    finally:
        for parent, attr, layer, _ in dense:
            setattr(parent, attr, layer)
