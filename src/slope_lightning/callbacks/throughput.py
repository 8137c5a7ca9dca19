"""TokenThroughput: Lightning's ThroughputMonitor counting tokens of (input, target) batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for (input, target) token batches: logs tokens/s.

    Metrics: ``train/items_per_sec`` (tokens per second, all devices; multi-device runs),
    ``train/device/items_per_sec`` (per device), ``train/batches_per_sec``,
    ``train/samples_per_sec``.

    Args:
        window_size: batches averaged per rate; rates appear once this many have run.
    """

    def __init__(self, window_size: int = 5) -> None:
        super().__init__(
            batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size
        )


def _batch_size(batch: Any) -> int:
    return int(batch[0].shape[0])


def _batch_tokens(batch: Any) -> int:
    return int(batch[0].numel())
