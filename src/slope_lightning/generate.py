"""``slope-lightning generate``: sample text from a trained model.

    slope-lightning generate runs/tiny/version_0/checkpoints/last.ckpt --prompt "To be, or"
    slope-lightning generate runs/tiny/version_0/export --prompt "The king" --temperature 0
    slope-lightning generate my_export --tokenizer my_tokenizer.json --max_new_tokens 200

The model is a checkpoint written by ``slope-lightning fit`` (a ``.ckpt`` file of
:class:`~slope_lightning.module.SLoPeModule`, read with ``weights_only=True`` like every
checkpoint this project loads, or the sharded ``last.ckpt/`` folder ``fit`` writes under
FSDP2, read whole in this one process) or an export directory
(:func:`~slope_lightning.export.export_model`: ``model.safetensors`` and ``config.json``).

The tokenizer is, in this order: ``--tokenizer``; the export's own ``tokenizer.json``; or the
one the run's data module trained or was given, found again from the data settings the run
recorded (the data module's hyperparameters in the checkpoint, else the run's ``config.yaml``
in the version directory above ``checkpoints/``, ``crash/`` or ``export/``) with
:func:`~slope_lightning.data.prepare.find_tokenizer`. Relative paths in those settings are
read from the current directory, as the run read them.

Sparse layers are merged for inference (:func:`~slope_lightning.sparse.merge_for_inference`:
the fused sparse + low-rank path) and the model generates with its KV cache
(:meth:`~slope_lightning.models.Transformer.generate`). The prompt and the generated text go
to stdout, logs to stderr.

Errors follow the CLI (:func:`slope_lightning.cli.main`): a bad command line, and a model
whose tokenizer cannot be found, raise :class:`GenerateUsageError` (exit status 2, the fix in
one line); a missing or unreadable model or tokenizer file is a failure (exit status 1).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from tokenizers import Tokenizer

from slope_lightning.checkpoints import (
    SHARDED_METADATA,
    is_sharded_checkpoint,
    load_checkpoint_file,
    load_sharded_state_dict,
)
from slope_lightning.data.artifacts import CorruptCacheError
from slope_lightning.data.prepare import TokenSettings, find_tokenizer
from slope_lightning.data.tokenizer import load_tokenizer, separator_id
from slope_lightning.export import TOKENIZER, load_exported
from slope_lightning.models import Transformer, TransformerConfig, build_model
from slope_lightning.sparse import merge_for_inference, sparse_layers
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.config import SparsityConfig

__all__ = [
    "GenerateUsageError",
    "find_model_tokenizer",
    "generate_command",
    "generate_text",
    "load_checkpoint_model",
    "load_model",
    "prompt_ids",
]

logger = logging.getLogger(__name__)

#: Where a LightningCLI run keeps its settings: ``<version dir>/config.yaml``.
RUN_CONFIG = "config.yaml"
#: The data module's arguments that decide its tokenizer, with the defaults
#: ``TextDataModule`` gives them (a run records every argument; these only fill gaps).
TOKENIZER_SETTINGS: dict[str, Any] = asdict(TokenSettings())
#: The checkpoint key under which Lightning saves the data module's hyperparameters.
DATAMODULE_HPARAMS = "datamodule_hyper_parameters"


class GenerateUsageError(ValueError):
    """A command line that cannot work, or a model whose tokenizer cannot be found; the
    message names the fix (the CLI exits with status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`GenerateUsageError` instead of printing the usage and
    exiting, so the CLI prints one ``error:`` line."""

    def error(self, message: str) -> NoReturn:
        # (the CLI itself points an unrecognized option to --help)
        hint = "" if "unrecognized arguments" in message else " (--help lists the options)"
        raise GenerateUsageError(f"generate: {message}{hint}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="slope-lightning generate",
        description=(
            "Generate text from a checkpoint of `slope-lightning fit` (a .ckpt file, or the "
            "sharded last.ckpt/ folder of an FSDP2 run) or an export directory "
            "(model.safetensors + config.json)."
        ),
    )
    parser.add_argument(
        "model", help="a checkpoint written by fit (.ckpt file or sharded folder), or an export"
    )
    parser.add_argument(
        "--prompt", default="", help="text to continue (default: empty, a new document)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy"
    )
    parser.add_argument(
        "--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizer.json (default: the export's, or the one the run recorded)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: cuda when available)"
    )
    return parser


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def load_checkpoint_model(path: str | Path) -> tuple[Transformer, dict[str, Any] | None]:
    """Rebuild the model of a ``slope-lightning fit`` checkpoint and load its weights.

    The model is built as :class:`~slope_lightning.module.SLoPeModule` builds it, from the
    module's hyperparameters in the checkpoint (preset, overrides, vocabulary and sequence
    length, sparsity), sparsified on the ``reference`` backend (any device; the GEMM backend
    is a runtime choice, not part of the weights); adapters come back with the weights.

    Args:
        path: the checkpoint file, or a sharded checkpoint directory (FSDP2's ``last.ckpt/``:
            its shards are read whole in this one process).

    Returns:
        The model (on the CPU), and the data module's hyperparameters the checkpoint recorded
        (None when it recorded none).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is unsafe, truncated or not a checkpoint (for a sharded
            one: a shard is missing or unreadable).
        ValueError: the checkpoint is not one of a SLoPeModule, or its weights do not fit the
            model its hyperparameters describe.
    """
    sharded = is_sharded_checkpoint(path)
    # The optimizer state is never read: memory-mapped, or left in the shards.
    checkpoint = load_checkpoint_file(Path(path) / SHARDED_METADATA if sharded else path, mmap=True)
    hparams = checkpoint.get("hyper_parameters")
    state = load_sharded_state_dict(path) if sharded else checkpoint.get("state_dict")
    if not isinstance(hparams, Mapping) or "preset" not in hparams or not isinstance(state, dict):
        raise ValueError(
            f"{path} is not a checkpoint of slope-lightning's SLoPeModule (it records no "
            "model preset); generate from a checkpoint of `slope-lightning fit`, or from an "
            "export directory"
        )
    model, _ = build_model(
        TransformerConfig.from_hparams(hparams),
        SparsityConfig.from_dict(hparams.get("sparsity") or {}),
        backend=BackendName.reference,
    )
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the weights in {path} do not fit the model its hyperparameters describe: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}; generate from an export "
            "of that run instead"
        )
    recorded = checkpoint.get(DATAMODULE_HPARAMS)
    return model, dict(recorded) if isinstance(recorded, Mapping) else None


def load_model(path: Path) -> tuple[Transformer, dict[str, Any] | None]:
    """The model at ``path`` (a checkpoint file or an export directory), on the CPU, and the
    data settings a checkpoint recorded (None for an export)."""
    if path.is_dir() and not is_sharded_checkpoint(path):
        return load_exported(path), None
    return load_checkpoint_model(path)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


def _run_data_settings(model_path: Path) -> dict[str, Any] | None:
    """The ``data`` section of the run's ``config.yaml``: in the version directory, which is
    the parent of an export directory and the grandparent of a checkpoint in
    ``checkpoints/`` or ``crash/``."""
    for directory in (model_path.parent, model_path.parent.parent):
        config_path = directory / RUN_CONFIG
        if not config_path.is_file():
            continue
        try:
            config = yaml.safe_load(config_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            continue  # not a run's config: look no further than it
        data = config.get("data") if isinstance(config, dict) else None
        if isinstance(data, dict):
            logger.info("data settings from %s", config_path)
            return data
    return None


def find_model_tokenizer(
    model_path: Path, recorded: Mapping[str, Any] | None, given: str | None
) -> Path:
    """The tokenizer file of the model at ``model_path`` (see the module docstring).

    Args:
        model_path: the checkpoint file or export directory.
        recorded: the data module's hyperparameters the checkpoint recorded, if any.
        given: ``--tokenizer`` (wins when set).

    Raises:
        FileNotFoundError: ``given`` does not exist.
        GenerateUsageError: no tokenizer can be found; the message says why and to pass
            ``--tokenizer``.
    """
    if given is not None:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--tokenizer {given}: no such file")
        return Path(given)
    if model_path.is_dir() and (model_path / TOKENIZER).is_file():
        return model_path / TOKENIZER
    settings = dict(recorded) if recorded is not None else _run_data_settings(model_path)
    fix = (
        "pass --tokenizer PATH/tokenizer.json (the run's data.tokenizer_path, or the "
        "tokenizers/bpe*/tokenizer.json under its data.cache_dir)"
    )
    if settings is None:
        raise GenerateUsageError(
            f"no tokenizer found for {model_path}: it records no data settings and no "
            f"{RUN_CONFIG} of its run is beside it; {fix}"
        )
    merged = {**TOKENIZER_SETTINGS, **{k: v for k, v in settings.items() if v is not None}}
    try:
        run_settings = TokenSettings(
            sources=merged["sources"],
            cache_dir=merged["cache_dir"],
            tokenizer_path=merged["tokenizer_path"],
            vocab_size=int(merged["vocab_size"]),
            val_fraction=float(merged["val_fraction"]),
            seed=int(merged["seed"]),
            text_key=str(merged["text_key"]),
            test_fraction=float(merged["test_fraction"]),
        )
        return find_tokenizer(run_settings)
    except (OSError, ValueError, CorruptCacheError) as error:
        reason = " ".join(str(error).split())
        raise GenerateUsageError(
            f"no tokenizer found for {model_path} from its run's data settings ({reason}; "
            f"relative paths are read from the current directory); {fix}"
        ) from error


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _check_values(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise GenerateUsageError(f"--max_new_tokens {args.max_new_tokens}: give 0 or more")
    if args.temperature < 0:
        raise GenerateUsageError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    if args.top_k < 0:
        raise GenerateUsageError(f"--top_k {args.top_k}: give 0 (every token) or more")


def prompt_ids(tokenizer: Tokenizer, prompt: str, vocab_size: int) -> list[int]:
    """The prompt's token ids; an empty prompt starts a new document (the end-of-text token).

    Raises:
        GenerateUsageError: an empty prompt and a tokenizer without an end-of-text token.
        ValueError: the tokenizer has ids the model's embedding cannot look up.
    """
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary "
            f"has {vocab_size}: it is not the tokenizer the model was trained with; pass that "
            "one with --tokenizer"
        )
    ids = list(tokenizer.encode(prompt).ids) if prompt else []
    if ids:
        return ids
    start = separator_id(tokenizer)
    if start is None:
        raise GenerateUsageError(
            "the tokenizer has no end-of-text token to start from; give a --prompt"
        )
    return [start]


def generate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int | None = None,
) -> str:
    """The prompt and ``max_new_tokens`` generated tokens, decoded.

    Sparse layers are merged for inference first (the fused path), and everything runs under
    ``torch.inference_mode()`` on the model's device.

    Args:
        model: the model (put in eval mode here).
        tokenizer: the tokenizer it was trained with.
        prompt: text to continue; empty starts a new document.
        max_new_tokens: tokens to generate.
        temperature: 0 is greedy decoding.
        top_k: sample among the k most likely tokens (None: all).
        seed: seeds ``torch`` before sampling (None: not seeded).
    """
    ids = prompt_ids(tokenizer, prompt, model.config.vocab_size)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        if sparse_layers(model):
            merge_for_inference(model)
        if seed is not None:
            torch.manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return str(tokenizer.decode(out[0].tolist()))


def _device(name: str | None) -> torch.device:
    """``--device``, or CUDA when there is a GPU, else the CPU.

    Raises:
        GenerateUsageError: an unknown device, or CUDA without a GPU.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GenerateUsageError(f"--device {name}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateUsageError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return device


def generate_command(args: list[str]) -> int:
    """``slope-lightning generate ...``: print the prompt and its continuation.

    Args:
        args: the arguments after ``generate``.

    Returns:
        0 (the text was printed).

    Raises:
        GenerateUsageError: a bad command line, or no tokenizer found (exit status 2).
        FileNotFoundError: the model or ``--tokenizer`` does not exist.
        CheckpointError: the checkpoint is unsafe or unreadable.
        ValueError: not a SLoPeModule checkpoint or an export of one, or a tokenizer that
            does not fit the model.
        SystemExit: ``--help`` (status 0).
    """
    parsed = _parser().parse_args(args)
    _check_values(parsed)
    device = _device(parsed.device)
    path = Path(parsed.model)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a .ckpt file written by `slope-lightning fit` "
            "(e.g. runs/<name>/version_0/checkpoints/last.ckpt) or an export directory"
        )
    model, recorded = load_model(path)
    tokenizer_file = find_model_tokenizer(path, recorded, parsed.tokenizer)
    logger.info("generating with %s and the tokenizer %s on %s", path, tokenizer_file, device)
    tokenizer = load_tokenizer(tokenizer_file)
    text = generate_text(
        model.to(device),
        tokenizer,
        parsed.prompt,
        parsed.max_new_tokens,
        parsed.temperature,
        parsed.top_k or None,
        parsed.seed,
    )
    print(text, flush=True)
    return 0
