"""Peak host memory per rank at the start of a multi-process FSDP2 fit (:func:`host_memory_rows`):
the ordinary build (every rank builds the whole dense model, sparsifies it, then FSDP2 shards
it) against ``SLoPeModule(meta_init=True)`` (built on the meta device, each rank initialises
only its rows), each also continuing from a dense ``.safetensors`` file
(``InitFromPretrained(mask_method="magnitude")``: the ordinary build loads the whole file on
every rank, the meta build reads each rank's rows of it).

Each build runs as users run it, in fresh processes (peak RSS is per process lifetime): a real
Lightning fit on ``world`` CPU processes (gloo, ``ModelParallelStrategy`` through
``SLoPeModule.configure_model``, as ``configs/tiny-fsdp.yaml``), one optimizer step, then it
stops. Every rank records, from ``/proc/self/status``, its RSS right after the imports (the
libraries' share, before the model is built), its peak RSS (``VmHWM``, with
``getrusage``'s ``ru_maxrss`` beside it) at the first ``on_train_batch_start`` (the model
built, sharded, initialised or loaded, the optimizer created: right before the first
optimizer step), the anonymous and file-backed parts of its RSS then, the resident pages it
maps of the weights file (``/proc/self/smaps``), and its peak after the first step.

``python -m slope_lightning.bench host-memory --preset gpt2-medium --world-size 2 --seq-len 64
--batch 1`` writes the table (:data:`COLUMNS`). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slope_lightning.bench.common import Row, RowSink, emit

logger = logging.getLogger(__name__)

#: The builds compared: ``ordinary`` (the whole dense model on every rank, then sharded),
#: ``meta_init`` (meta device, each rank its rows), and each initialised from a dense
#: ``.safetensors`` file instead of the random init (``+pretrained``).
BUILDS: tuple[str, ...] = ("ordinary", "meta_init", "ordinary+pretrained", "meta_init+pretrained")

COLUMNS = [
    "preset",
    "build",
    "world",
    "rank",
    "imports_MiB",
    "peak_MiB",
    "peak_above_imports_MiB",
    "vs_ordinary",
    "ru_maxrss_MiB",
    "anon_MiB",
    "file_MiB",
    "weights_mapped_MiB",
    "peak_after_step_MiB",
    "start_s",
]

#: What the numbers include, recorded in the table's header.
INCLUDES = (
    "peak_MiB is VmHWM (peak resident set: anonymous memory, file-backed pages mapped and "
    "touched, shared memory) of one rank's process from its start to the first "
    "on_train_batch_start (model built, sharded, initialised or loaded, optimizer created, "
    "before the first optimizer step). ru_maxrss_MiB is getrusage's peak beside it, which "
    "Linux keeps across exec: a rank started by a larger process (rank 0 by the benchmark "
    "after it wrote the weights file, rank 1 by rank 0) may show that process's peak there, "
    "so the table uses VmHWM (this process image's own). imports_MiB is the RSS after "
    "importing torch, Lightning and slope_lightning, before the model is built (the "
    "libraries' share, in every peak). anon_MiB / file_MiB split the RSS at the first batch. "
    "vs_ordinary is peak_MiB over the ordinary build's on the same rank with the same "
    "weights source. peak_after_step_MiB adds the first step (activations, gradients, AdamW "
    "state). start_s is the rank's seconds from its process start to the first batch"
)

#: How the dense weights file is read, recorded in the table's header.
WEIGHTS_READ = (
    "safetensors maps the file (mmap) and copies each tensor read into anonymous memory. "
    "ordinary+pretrained: InitFromPretrained loads the whole file on every rank (load_file, "
    "the mapping closed after it), prunes a copy and loads it into the built model; "
    "meta_init+pretrained: each rank reads only its rows (safe_open slices, the mapping "
    "closed once they are read), so the pages it touched count in its peak while it loads "
    "(weights_mapped_MiB: those still mapped at the first batch, 0 since the module lets the "
    "file go). The page cache of pages never mapped is not RSS."
)


def _status_kib() -> dict[str, int]:
    """This process's memory counters from ``/proc/self/status`` (KiB), by name.

    Raises:
        RuntimeError: there is no ``/proc/self/status`` (not Linux).
    """
    path = Path("/proc/self/status")
    if not path.is_file():
        raise RuntimeError(
            "the host-memory benchmark reads /proc/self/status, which this system lacks; "
            "run it on Linux"
        )
    counters = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            counters[name] = int(value.split()[0])
    return counters


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of the file at ``path`` (``/proc/self/smaps``)."""
    target = str(path.resolve())
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == target
        elif inside and fields and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def _snapshot(weights: Path | None) -> dict[str, int]:
    """The counters a row needs, now (KiB)."""
    status = _status_kib()
    return {
        "rss": status["VmRSS"],
        "hwm": status["VmHWM"],
        "anon": status.get("RssAnon", 0),
        "file": status.get("RssFile", 0),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "weights_mapped": _mapped_kib(weights) if weights is not None else 0,
    }


def write_dense_weights(preset: str, seq_len: int | None, path: Path) -> int:
    """A dense model of ``preset``'s shape as ``path`` (``.safetensors``, the tied head stored
    once): the ordinary dense build's random initialisation (seed 0), not pretrained weights
    (host memory does not depend on the values). Returns the file's size in bytes."""
    import torch
    from safetensors.torch import save_model

    from slope_lightning.models import TransformerConfig, build_model

    overrides = {} if seq_len is None else {"seq_len": seq_len}
    torch.manual_seed(0)
    dense, _ = build_model(TransformerConfig.from_name(preset, **overrides), None)
    save_model(dense, str(path))
    return path.stat().st_size


def _run_build(
    build: str,
    preset: str,
    world: int,
    seq_len: int | None,
    batch: int,
    weights: Path | None,
    workdir: Path,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Run one build's fit in fresh processes (:func:`worker_main`); return each rank's record.

    Raises:
        RuntimeError: the fit failed or timed out (the message ends with its log's tail).
    """
    results = workdir / build
    results.mkdir(parents=True)
    command = [sys.executable, "-m", __name__, "--build", build, "--preset", preset]
    command += ["--world", str(world), "--batch", str(batch), "--results", str(results)]
    if seq_len is not None:
        command += ["--seq-len", str(seq_len)]
    if weights is not None:
        command += ["--weights", str(weights)]
    log = workdir / f"{build}.log"
    logger.info("host-memory: %s on %d processes (log %s)", build, world, log)
    with log.open("w") as stream:
        try:
            code = subprocess.run(
                command, stdout=stream, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    records = [results / f"rank{rank}.json" for rank in range(world)]
    if code != 0 or not all(record.is_file() for record in records):
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"host-memory: the {build!r} fit exited with {code} (timeout {timeout_s:.0f} s: "
            f"-1) or wrote no record for every rank; its output ends with:\n{tail}"
        )
    return [json.loads(record.read_text()) for record in records]


def host_memory_rows(
    preset: str,
    world: int,
    seq_len: int | None = None,
    batch: int = 1,
    builds: Iterable[str] = BUILDS,
    on_row: RowSink | None = None,
    timeout_s: float = 1800.0,
) -> tuple[list[Row], dict[str, Any]]:
    """Peak host memory per rank of each build of ``preset`` on ``world`` CPU processes.

    Writes the dense weights file first when a ``+pretrained`` build is asked for (in a
    temporary directory, removed afterwards). Returns the rows (one per build and rank, in
    that order) and what to record about the weights file.

    Raises:
        ValueError: an unknown build, or ``world`` < 2.
        RuntimeError: a fit failed (its output's tail in the message).
    """
    builds = tuple(builds)
    unknown = [build for build in builds if build not in BUILDS]
    if unknown or not builds:
        raise ValueError(f"host-memory builds {builds}: choose from {', '.join(BUILDS)}")
    if world < 2:
        raise ValueError(f"host-memory --world-size {world}: give 2 or more processes")
    rows: list[Row] = []
    weights_info: dict[str, Any] = {}
    ordinary_peaks: dict[tuple[bool, int], int] = {}
    with tempfile.TemporaryDirectory(prefix="slope-host-memory-") as scratch:
        workdir = Path(scratch)
        weights = None
        if any(build.endswith("+pretrained") for build in builds):
            weights = workdir / f"{preset}-dense.safetensors"
            size = write_dense_weights(preset, seq_len, weights)
            weights_info = {"dense_weights_MiB": round(size / 2**20, 1)}
        for build in builds:
            pretrained = build.endswith("+pretrained")
            records = _run_build(
                build,
                preset,
                world,
                seq_len,
                batch,
                weights if pretrained else None,
                workdir,
                timeout_s,
            )
            for record in records:
                rank, imports, start = record["rank"], record["imports"], record["start"]
                if build.startswith("ordinary"):
                    ordinary_peaks[(pretrained, rank)] = start["hwm"]
                baseline = ordinary_peaks.get((pretrained, rank))
                row: Row = {
                    "preset": preset,
                    "build": build,
                    "world": world,
                    "rank": rank,
                    "imports_MiB": imports["rss"] / 1024,
                    "peak_MiB": start["hwm"] / 1024,
                    "peak_above_imports_MiB": (start["hwm"] - imports["rss"]) / 1024,
                    "vs_ordinary": start["hwm"] / baseline if baseline else None,
                    "ru_maxrss_MiB": start["ru_maxrss"] / 1024,
                    "anon_MiB": start["anon"] / 1024,
                    "file_MiB": start["file"] / 1024,
                    "weights_mapped_MiB": start["weights_mapped"] / 1024,
                    "peak_after_step_MiB": record["after_step"]["hwm"] / 1024,
                    "start_s": record["start_s"],
                }
                emit(rows, row, on_row)
    return rows, weights_info


def worker_main(argv: list[str] | None = None) -> None:
    """One rank of one build (run as ``python -m slope_lightning.bench.host_memory``; Lightning
    starts the other ranks with the same command): fit for one step, recording the memory
    counters after the imports, at the first batch and after the first step, as
    ``<results>/rank<rank>.json``."""
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=worker_main.__doc__)
    parser.add_argument("--build", choices=BUILDS, required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from slope_lightning.callbacks import InitFromPretrained
    from slope_lightning.module import SLoPeModule

    imports = _snapshot(args.weights)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    meta_init = args.build.startswith("meta_init")
    module = SLoPeModule(preset=args.preset, seq_len=args.seq_len, meta_init=meta_init)

    class Recorder(pl.Callback):
        """The counters right before the first optimizer step, and after it."""

        def __init__(self) -> None:
            self.record: dict[str, Any] = {"imports": imports}

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            if "start" not in self.record:
                self.record["start"] = _snapshot(args.weights)
                self.record["start_s"] = round(time.monotonic() - started, 1)

        def on_train_batch_end(
            self,
            trainer: pl.Trainer,
            pl_module: pl.LightningModule,
            outputs: Any,
            batch: Any,
            batch_idx: int,
        ) -> None:
            self.record["after_step"] = _snapshot(args.weights)
            self.record["rank"] = trainer.global_rank
            path = args.results / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps(self.record))

    callbacks: list[pl.Callback] = [Recorder()]
    if args.build.endswith("+pretrained"):
        if args.weights is None:
            parser.error(f"--build {args.build} needs --weights (a dense .safetensors file)")
        callbacks.append(InitFromPretrained(source=str(args.weights), mask_method="magnitude"))
    config = module.config
    tokens = torch.randint(0, config.vocab_size, (args.world * args.batch, config.seq_len + 1))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch)
    strategy = ModelParallelStrategy(data_parallel_size=args.world, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.world,
        strategy=strategy,
        max_steps=1,
        precision="32-true",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(args.results),
    )
    trainer.fit(module, train_dataloaders=data)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    worker_main()
