"""Wall time of a GPU or CPU operation, as ``auto`` measures its candidates."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` calls after one untimed warm-up call.

    On CUDA the calls are timed with events around the whole loop (no per-call sync), so
    the number is the device time a training step would see.
    """
    fn()  # builds caches, compiles kernels: setup, not timed
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats * 1e3
