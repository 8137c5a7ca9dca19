"""Benchmarks: ``python -m slope_lightning.bench {memory,layers,kernels,step,inference,runs}``.

Each prints a markdown table and writes JSON + markdown under ``--out``
(default ``benchmarks/results``) naming the machine, torch version, date and command.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from slope_lightning.bench import common


def build_parser() -> argparse.ArgumentParser:
    """The command line of every suite (also used to check ``scripts/gpu_check.sh``)."""
    parser = argparse.ArgumentParser(prog="python -m slope_lightning.bench", description=__doc__)
    parser.add_argument(
        "suite", choices=["memory", "layers", "kernels", "step", "inference", "runs"]
    )
    parser.add_argument("run_dirs", nargs="*", type=Path, help="log dirs of finished runs (runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--tokens", default="2048", help="comma-separated tokens per batch (layers), e.g. 2048,8192"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (layers)")
    parser.add_argument(
        "--shapes",
        default="",
        help="comma-separated d_out x d_in shapes for 'layers', e.g. 4096x4096,11008x4096 "
        "(default 4096x4096 when --models is not given)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="layers: add the projection shapes of these models, comma-separated, from "
        "gpt2-small, gpt2-medium, opt-6.7b, opt-13b, llama-3-8b, mistral-7b",
    )
    parser.add_argument(
        "--backends", default="reference", help="comma-separated SparseLinear backends (layers)"
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (layers)")
    parser.add_argument("--preset", default="tiny", help="transformer preset (step, inference)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (step, memory)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (memory; default: preset's)"
    )
    parser.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile the models (step): off, on, or both side by side",
    )
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (inference)")
    parser.add_argument(
        "--new-tokens", type=int, default=16, help="tokens decoded after the prompt (inference)"
    )
    parser.add_argument("--presets", default="tiny,gpt2-small", help="transformers for 'memory'")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = common.machine_info()
    if args.suite == "memory":
        from slope_lightning.bench import memory

        presets = tuple(args.presets.split(","))
        rows = memory.layer_rows() + memory.transformer_rows(presets)
        text = common.write_results("memory", args.out, info, rows, memory.COLUMNS, "ratio")
        peaks = memory.peak_rows(
            presets,
            batch=args.batch,
            seq_len=args.seq_len,
            dtype=getattr(torch, args.dtype),
            backend=args.backends.split(",")[0],
        )
        name = "memory-peak" if info["device"] != "cpu" else "memory-peak-cpu-count"
        text += "\n" + common.write_results(
            name, args.out, info, peaks, memory.PEAK_COLUMNS, "vs_dense"
        )
    elif args.suite in ("step", "inference"):
        from slope_lightning.bench import model

        dtype = getattr(torch, args.dtype)
        backend = args.backends.split(",")[0]
        if args.suite == "step":
            compile_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
            rows = model.step_rows(
                args.preset, args.batch, backend, dtype, args.repeats, compile_modes
            )
            columns = model.STEP_COLUMNS
        else:
            rows = model.inference_rows(
                args.preset,
                prompt=args.prompt,
                new_tokens=args.new_tokens,
                backend=backend,
                dtype=dtype,
                repeats=args.repeats,
            )
            columns = model.INFERENCE_COLUMNS
        name = args.suite if info["device"] != "cpu" else f"{args.suite}-cpu-reference"
        plot_column = "speedup_vs_dense" if args.suite == "step" else "prefill_speedup"
        text = common.write_results(name, args.out, info, rows, columns, plot_column)
    elif args.suite == "runs":
        from slope_lightning.bench import runs

        if not args.run_dirs:
            parser.error("runs: give the log directories of finished runs")
        rows = runs.run_rows(args.run_dirs)
        text = common.write_results(
            "runs", args.out, info, rows, runs.COLUMNS, "tokens_per_s_vs_dense"
        )
    else:  # layers, kernels: per layer shape
        from slope_lightning.bench import layers

        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        if args.models:
            shapes += [s for s in layers.shapes_of(args.models.split(",")) if s not in shapes]
        shapes = shapes or list(layers.DEFAULT_SHAPES)
        tokens = [int(t) for t in args.tokens.split(",")]
        if args.suite == "kernels":
            from slope_lightning.bench import kernels

            try:
                rows = kernels.kernel_rows(shapes, tokens, dtype=getattr(torch, args.dtype))
            except RuntimeError as error:
                parser.error(str(error))
            text = common.write_results(
                "kernels", args.out, info, rows, kernels.COLUMNS, "torch/triton"
            )
            print(text)  # the table is the command's output
            return
        rows = layers.layer_rows(
            shapes,
            tokens=tokens,
            repeats=args.repeats,
            dtype=getattr(torch, args.dtype),
            backends=tuple(args.backends.split(",")),
        )
        name = "layers-cpu-reference" if info["device"] == "cpu" else "layers"
        text = common.write_results(name, args.out, info, rows, layers.COLUMNS, "dense/slope")
    print(text)  # the table is the command's output


if __name__ == "__main__":
    main()
