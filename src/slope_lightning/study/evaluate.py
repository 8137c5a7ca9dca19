"""The final numbers of every run: its exported model evaluated on the validation split (which
chooses the learning rate) and on the held-out test split (which reports), overall and per
source, by the study itself.

Every method is evaluated by the same code on the same windows: the first ``eval_windows`` of
each split's fixed stratified order (every window by default), from the run's
``export/`` (the final weights, loaded without Lightning by
:func:`~slope_lightning.export.load_exported`), in float32 on the CPU or the first GPU.
The number does not depend on the module's own validation (its ``limit_val_batches``, or
whether it logs per-source metrics), only on the split. A run trained with
``data.test_fraction: 0`` has no test split: its test evaluation is None, and the report says
that it shows validation numbers.

Perplexity is exp of the mean token loss: overall over every evaluated token, and per source
over that source's windows (a window never mixes sources).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slope_lightning.data import TextDataModule, ValidationWindows
from slope_lightning.export import load_exported
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.study.config import StudyConfig

logger = logging.getLogger(__name__)


def parameter_count(config: dict[str, Any]) -> int | None:
    """Parameters of the run's model as a dense model (embeddings included), from its resolved
    config; built on the meta device (no memory). None if the config names no model."""
    model = config.get("model") or {}
    data = config.get("data") or {}
    if model.get("preset") is None:
        return None
    linked = {key: model.get(key) or data.get(key) for key in ("vocab_size", "seq_len")}
    with torch.device("meta"):
        net = Transformer(TransformerConfig.from_hparams({**model, **linked}))
    seen: set[int] = set()
    count = 0
    for parameter in net.parameters():  # a tied head counts once
        if id(parameter) not in seen:
            seen.add(id(parameter))
            count += parameter.numel()
    return count


class Evaluator:
    """Evaluates exports on the validation or test split of their run's data config.

    The prepared data module of each distinct data config is kept for the next run (preparing
    checks every cached file's checksum, seconds per run otherwise).

    Args:
        study: gives ``eval_windows`` and ``eval_batch_size``.
        device: where the models run (default: the first GPU, else the CPU).
    """

    def __init__(self, study: StudyConfig, device: str | torch.device | None = None) -> None:
        self.windows = study.eval_windows
        self.batch_size = study.eval_batch_size
        self.device = torch.device(
            device if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
        )
        self._data: dict[str, TextDataModule] = {}

    def _datamodule(self, data_config: dict[str, Any]) -> TextDataModule:
        key = json.dumps(data_config, sort_keys=True, default=str)
        if key not in self._data:
            settings = {**data_config, "val_source_ids": True, "num_workers": 0}
            dm = TextDataModule(**settings)
            dm.prepare_data()
            dm.setup("validate")
            self._data[key] = dm
        return self._data[key]

    @staticmethod
    def has_test_split(config: dict[str, Any]) -> bool:
        """Whether the run's data config holds out a test split (``data.test_fraction > 0``)."""
        return float((config.get("data") or {}).get("test_fraction") or 0.0) > 0.0

    def _windows(self, dm: TextDataModule, split: str) -> ValidationWindows:
        """The split's windows, each with its source index."""
        if split == "validation":
            assert dm.val_dataset is not None  # set by setup
            return dm.val_dataset
        if split != "test":
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        if dm.test_dataset is None:
            dm.setup("test")
            assert dm.test_dataset is not None  # set by setup("test")
            # This data module is the evaluator's own: its test windows carry their source
            # (the module's test_step takes (x, y), so the data module leaves it out).
            dm.test_dataset.with_source = True
        return dm.test_dataset

    @torch.no_grad()
    def evaluate(
        self, export_dir: Path, config: dict[str, Any], split: str = "validation"
    ) -> dict[str, Any]:
        """Loss and perplexity of the export in ``export_dir`` on the windows of ``split``
        (``"validation"`` or ``"test"``), overall and per source, with the token counts and the
        model's dense parameter count.

        Raises:
            FileNotFoundError: the run wrote no export.
            ValueError: ``split`` is ``"test"`` and the run has no test split.
        """
        dm = self._datamodule(dict(config.get("data") or {}))
        dataset = self._windows(dm, split)
        model = load_exported(export_dir, self.device).eval()
        count = len(dataset) if self.windows is None else min(self.windows, len(dataset))
        names = dataset.source_names
        loss_sum = torch.zeros(len(names), dtype=torch.float64)
        tokens = torch.zeros(len(names), dtype=torch.int64)
        for start in range(0, count, self.batch_size):
            items = [dataset[i] for i in range(start, min(start + self.batch_size, count))]
            x = torch.stack([item[0] for item in items]).to(self.device)  # (B, T)
            y = torch.stack([item[1] for item in items]).to(self.device)  # (B, T)
            source = torch.stack([item[2] for item in items])  # (B,)
            logits, _ = model(x)
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="none"
            ).view_as(y)  # (B, T)
            per_window = nll.double().sum(1).cpu()  # (B,)
            loss_sum.index_add_(0, source, per_window)
            tokens.index_add_(0, source, torch.full_like(source, y.shape[1]))
        total_loss = float(loss_sum.sum() / tokens.sum())
        per_source = {
            name: {
                "loss": float(loss_sum[i] / tokens[i]),
                "ppl": math.exp(float(loss_sum[i] / tokens[i])),
                "tokens": int(tokens[i]),
            }
            for i, name in enumerate(names)
            if tokens[i] > 0
        }
        logger.info(
            "evaluated %s: %s ppl %.2f over %d windows",
            export_dir,
            split,
            math.exp(total_loss),
            count,
        )
        return {
            "split": split,
            "loss": total_loss,
            "ppl": math.exp(total_loss),
            "windows": count,
            "of_windows": len(dataset),
            "tokens": int(tokens.sum()),
            "per_source": per_source,
            "parameters": parameter_count(config),
        }
