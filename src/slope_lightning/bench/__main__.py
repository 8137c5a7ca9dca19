"""Benchmarks: ``python -m slope_lightning.bench {memory,layers,step,inference,runs}``.

Each prints a markdown table and writes JSON + markdown under ``--out``
(default ``benchmarks/results``) naming the machine, torch version, date and command.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from slope_lightning.bench import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slope_lightning.bench", description=__doc__)
    parser.add_argument("suite", choices=["memory", "layers", "step", "inference", "runs"])
    parser.add_argument("run_dirs", nargs="*", type=Path, help="log dirs of finished runs (runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per batch (layers)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (layers)")
    parser.add_argument(
        "--shapes",
        default="4096x4096",
        help="comma-separated d_out x d_in shapes for 'layers', e.g. 4096x4096,11008x4096",
    )
    parser.add_argument(
        "--backends", default="reference", help="comma-separated SparseLinear backends (layers)"
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (layers)")
    parser.add_argument("--preset", default="tiny", help="transformer preset (step, inference)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (step)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (step)")
    parser.add_argument("--presets", default="tiny,gpt2-small", help="transformers for 'memory'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = common.machine_info()
    if args.suite == "memory":
        from slope_lightning.bench import memory

        rows = memory.layer_rows() + memory.transformer_rows(tuple(args.presets.split(",")))
        text = common.write_results("memory", args.out, info, rows, memory.COLUMNS)
    elif args.suite in ("step", "inference"):
        from slope_lightning.bench import model

        dtype = getattr(torch, args.dtype)
        backend = args.backends.split(",")[0]
        if args.suite == "step":
            rows = model.step_rows(
                args.preset, args.batch, backend, dtype, args.repeats, args.compile
            )
            columns = model.STEP_COLUMNS
        else:
            rows = model.inference_rows(
                args.preset, backend=backend, dtype=dtype, repeats=args.repeats
            )
            columns = model.INFERENCE_COLUMNS
        name = args.suite if info["device"] != "cpu" else f"{args.suite}-cpu-reference"
        text = common.write_results(name, args.out, info, rows, columns)
    elif args.suite == "runs":
        from slope_lightning.bench import runs

        if not args.run_dirs:
            parser.error("runs: give the log directories of finished runs")
        rows = runs.run_rows(args.run_dirs)
        text = common.write_results("runs", args.out, info, rows, runs.COLUMNS)
    else:
        from slope_lightning.bench import layers

        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
        rows = layers.layer_rows(
            shapes,
            tokens=args.tokens,
            repeats=args.repeats,
            dtype=getattr(torch, args.dtype),
            backends=tuple(args.backends.split(",")),
        )
        name = "layers-cpu-reference" if info["device"] == "cpu" else "layers"
        text = common.write_results(name, args.out, info, rows, layers.COLUMNS)
    print(text)  # the table is the command's output


if __name__ == "__main__":
    main()
