"""Checks on a parsed ``slope-lightning`` config that only the combination of values can tell,
run before anything is built: each failure is a :class:`~slope_lightning.cli_errors.ConfigError`
naming the keys and the fix (exit status 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from slope_lightning.callbacks import InitFromPretrained
from slope_lightning.cli_errors import ConfigError
from slope_lightning.cli_runs import callback_configs

logger = logging.getLogger(__name__)

#: Model hyperparameters the CLI links from the data module; never set them twice.
LINKED_KEYS = ("seq_len", "vocab_size")

#: The data settings that decide which documents are in which split: a checkpoint is tested
#: only with the settings it was trained with, so its test documents were never trained on.
SPLIT_KEYS = ("sources", "val_fraction", "test_fraction", "seed", "text_key")


def check_parsed_config(subcommand: str, config: Namespace) -> None:
    """Refuse a config of ``subcommand`` (``fit``, ``validate``, ``test``) that cannot work.

    Raises:
        ConfigError: a conflicting or unusable setting (the message names the keys).
    """
    _check_linked_overrides(config)
    _refuse_auto_resuming_callbacks(config)
    if subcommand == "fit":
        _refuse_pretrained_needing_a_dense_model(config)
    if config.get("weights_only") is False:
        raise ConfigError(
            "--weights_only false is refused: slope-lightning loads checkpoints with "
            "weights_only=True only (tensors and plain containers, never code); drop it"
        )
    if subcommand == "test" and not config.get("data.test_fraction"):
        raise ConfigError(
            "test: data.test_fraction is 0, so there is no test split; test a run that was "
            "trained with data.test_fraction > 0 (e.g. 0.05), passing the same value here"
        )
    if config.get("ckpt_path") is None and subcommand in ("validate", "test"):
        raise ConfigError(
            f"{subcommand} needs the weights to evaluate: pass --ckpt_path FILE, or "
            "--ckpt_path last for the latest run's checkpoint"
        )


def _check_linked_overrides(config: Namespace) -> None:
    """``model_overrides`` must not set what the data module decides (LINKED_KEYS)."""
    overrides = config.get("model.model_overrides") or {}
    if not isinstance(overrides, dict):
        return  # SLoPeModule reports a wrong type itself
    for key in LINKED_KEYS:
        if key not in overrides:
            continue
        data_value = config.get(f"data.{key}")
        if key == "vocab_size" and config.get("data.tokenizer_path") is not None:
            raise ConfigError(
                f"model.model_overrides.{key}={overrides[key]} conflicts with "
                f"data.tokenizer_path={config.get('data.tokenizer_path')}, whose vocabulary "
                f"size the model takes; drop {key} from model_overrides"
            )
        if overrides[key] != data_value:
            raise ConfigError(
                f"model.model_overrides.{key}={overrides[key]} conflicts with "
                f"data.{key}={data_value}, which the CLI links to the model; set data.{key} "
                f"instead and drop {key} from model_overrides"
            )


def _refuse_auto_resuming_callbacks(config: Namespace) -> None:
    """Lightning resumes every ``fit(ckpt_path=None)`` when an OnExceptionCheckpoint is set."""
    for cls, _ in callback_configs(config):
        if isinstance(cls, type) and issubclass(cls, OnExceptionCheckpoint):
            raise ConfigError(
                f"trainer.callbacks: {cls.__name__} makes Lightning resume every fit from the "
                "last checkpoint it finds, by itself; use "
                "slope_lightning.callbacks.CrashCheckpoint instead (the same crash checkpoint; "
                "resuming stays explicit with --ckpt_path)"
            )


def _refuse_pretrained_needing_a_dense_model(config: Namespace) -> None:
    """With ``model.meta_init`` no rank holds the dense model: refuse, before any data is
    prepared, an ``InitFromPretrained`` whose settings need it (Wanda, its default)."""
    if not config.get("model.meta_init"):
        return
    for cls, init_args in callback_configs(config):
        if isinstance(cls, type) and issubclass(cls, InitFromPretrained):
            refusal = cls(**init_args.as_dict()).meta_init_refusal()
            if refusal is not None:
                raise ConfigError(
                    f"trainer.callbacks: InitFromPretrained with model.meta_init: true: {refusal}"
                )


def check_test_split_unseen(path: Path, config: Namespace) -> None:
    """Refuse to test a checkpoint on documents it may have been trained on: the split
    settings (:data:`SPLIT_KEYS`) must be those of its run, recorded in the checkpoint.

    Raises:
        ConfigError: a split setting differs from the checkpoint's (the message names it).
    """
    if not path.is_file():
        logger.warning(
            "test: %s is not a single file; its data settings were not compared with "
            "data.%s (test only runs trained with the same data settings)",
            path,
            ", data.".join(SPLIT_KEYS),
        )
        return
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(saved, dict):
        raise ConfigError(
            f"test --ckpt_path {path}: the checkpoint records no data settings, so nothing shows "
            "that its training documents exclude the test split; test a checkpoint that "
            "slope-lightning fit wrote with data.test_fraction > 0"
        )
    saved = {"test_fraction": 0.0, **saved}  # written before the test split existed
    differ = [
        f"data.{key}={config.get(f'data.{key}')!r} but the run had {saved.get(key)!r}"
        for key in SPLIT_KEYS
        if key in saved and saved.get(key) != config.get(f"data.{key}")
    ]
    if differ:
        raise ConfigError(
            f"test --ckpt_path {path}: {'; '.join(differ)}. With other split settings the "
            "test documents may be ones the model was trained on; test with the run's data "
            "settings (a run trained with data.test_fraction 0 has no test split)"
        )
