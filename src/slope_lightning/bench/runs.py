"""Summarise finished training runs from their TensorBoard logs, side by side.

``python -m slope_lightning.bench runs runs/tiny/version_0 runs/tiny-dense/version_0``
reports final validation perplexity and loss, median training throughput (tokens/s), wall
time and model-state memory (from the ``memory/*`` scalars the SLoPeModule logs).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.glob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"no TensorBoard event file in {run_dir}")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend(
                (e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)
            )
    return series


def summarise(run_dir: Path) -> dict[str, Any]:
    series = _scalars(run_dir)
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    sparse = config.get("model", {}).get("sparsity", {}).get("sparse", None)
    throughput = [v for _, v, _ in series.get("train/device/items_per_sec", [])]
    losses = series.get("train/loss", [])
    wall = (losses[-1][2] - losses[0][2]) if len(losses) > 1 else float("nan")
    memory = series.get("memory/total_MiB", [])
    first_memory = memory[0][1] if memory else float("nan")
    return {
        "run": str(run_dir),
        "method": "SLoPe" if sparse else "dense" if sparse is not None else "?",
        "steps": int(losses[-1][0]) + 1 if losses else 0,
        "val_ppl": series["val/ppl"][-1][1] if "val/ppl" in series else float("nan"),
        "val_loss": series["val/loss"][-1][1] if "val/loss" in series else float("nan"),
        "tokens_per_s": statistics.median(throughput) if throughput else float("nan"),
        "train_wall_s": wall,
        "model_state_MiB": first_memory,
        "model_state_with_adapters_MiB": memory[-1][1] if memory else float("nan"),
    }


def run_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    rows = [summarise(d) for d in run_dirs]
    base = next((r for r in rows if r["method"] == "dense"), None)
    for row in rows:
        if base is not None:
            row["tokens_per_s_vs_dense"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["memory_vs_dense"] = row["model_state_MiB"] / base["model_state_MiB"]
    return rows


COLUMNS = [
    "method",
    "steps",
    "val_ppl",
    "val_loss",
    "tokens_per_s",
    "tokens_per_s_vs_dense",
    "train_wall_s",
    "model_state_MiB",
    "memory_vs_dense",
    "model_state_with_adapters_MiB",
]
