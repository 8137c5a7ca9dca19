"""Benchmarks: ``python -m slope_lightning.bench
{memory,host-memory,layers,kernels,step,inference,runs,unpack}``.

Each suite prints a markdown table and writes JSON + markdown under ``--out`` (default
``benchmarks/results``) naming the machine, the versions, the date and the command. Rows are
written as they are measured, so a suite stopped by a timeout keeps what it finished.
``unpack ARCHIVE`` brings a GPU check home: it unpacks the archive of
``scripts/gpu_check.sh`` into ``--out`` and renders its tables and plots on CPU.
``host-memory`` runs real multi-process CPU fits (FSDP2, gloo) and records each rank's peak
host memory at start, the ordinary build against ``meta_init``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from slope_lightning.bench import common
from slope_lightning.bench.host_memory import BUILDS
from slope_lightning.bench.layers import PHASES
from slope_lightning.bench.methods import BENCH_PRESETS, PRECISIONS
from slope_lightning.utils import machine_info

SUITES = ("memory", "host-memory", "layers", "kernels", "step", "inference", "runs", "unpack")


def build_parser() -> argparse.ArgumentParser:
    """The command line of every suite (also used to check ``scripts/gpu_check.sh``)."""
    parser = argparse.ArgumentParser(
        prog="python -m slope_lightning.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="runs: log dirs of finished runs; unpack: the archive of scripts/gpu_check.sh",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--no-plot",
        dest="plot",
        action="store_false",
        help="write JSON and markdown only, no PNG (the GPU check: plots are drawn on CPU "
        "afterwards by 'unpack')",
    )
    parser.add_argument(
        "--tag", default=None, help="unpack: directory name under --out (default gpu-<device>)"
    )
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
    parser.add_argument(
        "--dtype",
        default="float32",
        help="parameter dtype: float32, bfloat16 or float16 (layers, inference; step and "
        "memory when --precision is not given)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=list(PRECISIONS),
        help="train as the configs do (step, memory): bf16-mixed keeps fp32 master values "
        "and AdamW state and runs the forward under bf16 autocast (default: --dtype's "
        "'true' precision, e.g. bf16-true for bfloat16)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"layers: comma-separated phases from {', '.join(PHASES)}",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (step --compile): inductor, or eager to trace without "
        "generating code (the CPU dry run)",
    )
    parser.add_argument(
        "--preset",
        default="tiny",
        help=f"transformer preset (step, inference), or a bench preset: {', '.join(BENCH_PRESETS)}",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (step, memory)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (memory; default: preset's)"
    )
    parser.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile the models (step): off, on, or both side by side; 'on' writes "
        "the table step-compiled",
    )
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (inference)")
    parser.add_argument(
        "--new-tokens", type=int, default=16, help="tokens decoded after the prompt (inference)"
    )
    parser.add_argument("--presets", default="tiny,gpt2-small", help="transformers for 'memory'")
    parser.add_argument(
        "--meta",
        action="store_true",
        help="memory: the exact per-rank plan counted on the meta device, no model built "
        "(for models larger than this machine, e.g. --presets llama-8b,llama-70b)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=2,
        help="host-memory: CPU processes of each fit (FSDP2 over gloo)",
    )
    parser.add_argument(
        "--builds",
        default=",".join(BUILDS),
        help=f"host-memory: comma-separated builds from {', '.join(BUILDS)}",
    )
    parser.add_argument(
        "--world-sizes",
        default="8,64,512",
        help="memory --meta: comma-separated FSDP2 world sizes (ranks sharding the model)",
    )
    return parser


def _table_name(suite: str, info: dict[str, Any], compile_mode: str = "off") -> str:
    """The file name of a suite's table: CPU tables say so, so they never read as GPU ones."""
    if suite == "step" and compile_mode == "on":
        suite = "step-compiled"
    if info["device"] != "cpu":
        return suite
    return {"memory": "memory", "runs": "runs", "kernels": "kernels"}.get(
        suite, f"{suite}-cpu-reference"
    )


def _shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The layer shapes of ``--shapes`` then ``--models`` (first seen first), or the default."""
    from slope_lightning.bench import layers

    shapes: list[tuple[int, int]] = []
    for text in filter(None, args.shapes.split(",")):
        d_out, d_in = (int(v) for v in text.split("x"))
        shapes.append((d_out, d_in))
    if args.models:
        shapes += [s for s in layers.shapes_of(args.models.split(",")) if s not in shapes]
    return shapes or list(layers.DEFAULT_SHAPES)


def _true_precision(dtype: torch.dtype) -> str:
    """The precision that trains in ``dtype`` throughout (what --dtype alone asks for)."""
    return {torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, "32-true")


def _phases(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    phases = tuple(filter(None, text.split(",")))
    unknown = [phase for phase in phases if phase not in PHASES]
    if unknown or not phases:
        parser.error(f"--phases {text!r}: choose from {', '.join(PHASES)}")
    return phases


def _memory_plan(
    args: argparse.Namespace, info: dict[str, Any], parser: argparse.ArgumentParser
) -> str:
    """``memory --meta``: the plan of :mod:`slope_lightning.bench.plan`, written as
    ``memory-plan-<presets>`` (exact counts: the same on any machine)."""
    from slope_lightning.bench import plan

    try:
        worlds = [int(w) for w in args.world_sizes.split(",")]
    except ValueError:
        parser.error(f"--world-sizes {args.world_sizes!r}: give integers, e.g. 8,64,512")
    presets = tuple(filter(None, args.presets.split(",")))
    precisions = (args.precision,) if args.precision else ("bf16-mixed", "bf16-true")
    info["counted"] = "meta device (state) and fake tensors dispatched as CPU (activations)"
    info["paper_train_memory_vs_dense"] = plan.PAPER_TRAIN_RATIO
    info["micro_batch"] = f"{args.batch} sequences x {args.seq_len or 'preset'} tokens"
    name = "memory-plan-" + "-".join(presets)
    table = common.ResultsTable(name, args.out, info, plan.PLAN_COLUMNS, "state_vs_dense")
    plan.plan_rows(
        presets,
        worlds,
        precisions,
        batch=args.batch,
        seq_len=args.seq_len,
        on_row=table.add,
    )
    return table.close(plot=args.plot)


def _host_memory(
    args: argparse.Namespace, info: dict[str, Any], parser: argparse.ArgumentParser
) -> str:
    """``host-memory``: :mod:`slope_lightning.bench.host_memory`, written as
    ``host-memory-<preset>-w<world>`` (real processes on this machine's CPUs)."""
    from slope_lightning.bench import host_memory

    builds = tuple(filter(None, args.builds.split(",")))
    unknown = [build for build in builds if build not in host_memory.BUILDS]
    if unknown or not builds:
        parser.error(f"--builds {args.builds!r}: choose from {', '.join(host_memory.BUILDS)}")
    if args.world_size < 2:
        parser.error(f"--world-size {args.world_size}: host-memory needs 2 or more processes")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info["host_memory_GiB"] = round(total / 2**30, 1)
    info["micro_batch"] = f"{args.batch} sequences x {args.seq_len or 'preset'} tokens, fp32"
    info["includes"] = host_memory.INCLUDES
    info["weights_file"] = host_memory.WEIGHTS_READ
    name = f"host-memory-{args.preset}-w{args.world_size}"
    table = common.ResultsTable(name, args.out, info, host_memory.COLUMNS, "peak_MiB")
    _, weights = host_memory.host_memory_rows(
        args.preset,
        args.world_size,
        seq_len=args.seq_len,
        batch=args.batch,
        builds=builds,
        on_row=table.add,
    )
    table.info.update(weights)
    return table.close(plot=args.plot)


def run_suite(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> str:
    """Run one benchmark suite, writing its rows as they come; return its markdown.
    ``argv``: the arguments it was given (recorded as the command; default ``sys.argv``)."""
    given = sys.argv[1:] if argv is None else argv
    info = machine_info("python -m slope_lightning.bench " + shlex.join(given))
    dtype = getattr(torch, args.dtype)
    precision = args.precision or _true_precision(dtype)
    backend = args.backends.split(",")[0]
    name = _table_name(args.suite, info, args.compile)
    if args.suite == "host-memory":
        return _host_memory(args, info, parser)
    if args.suite == "memory" and args.meta:
        return _memory_plan(args, info, parser)
    if args.suite == "memory":
        from slope_lightning.bench import memory, peak

        presets = tuple(args.presets.split(","))
        table = common.ResultsTable(name, args.out, info, memory.COLUMNS, "ratio")
        memory.layer_rows(on_row=table.add)
        model_presets = [preset for preset in presets if preset not in BENCH_PRESETS]
        memory.transformer_rows(model_presets, on_row=table.add)
        text = table.close(plot=args.plot)
        peak_name = "memory-peak" if info["device"] != "cpu" else "memory-peak-cpu-count"
        peaks = common.ResultsTable(peak_name, args.out, info, peak.PEAK_COLUMNS, "vs_dense")
        peak.peak_rows(
            presets,
            batch=args.batch,
            seq_len=args.seq_len,
            backend=backend,
            on_row=peaks.add,
            precision=precision,
        )
        return text + "\n" + peaks.close(plot=args.plot)
    if args.suite == "step":
        from slope_lightning.bench import step

        table = common.ResultsTable(name, args.out, info, step.STEP_COLUMNS, "speedup_vs_dense")
        compile_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
        step.step_rows(
            args.preset,
            args.batch,
            backend,
            precision,
            args.repeats,
            compile_modes,
            table.add,
            compile_backend=args.compile_backend,
        )
        return table.close(plot=args.plot)
    if args.suite == "inference":
        from slope_lightning.bench import inference

        columns = inference.INFERENCE_COLUMNS
        table = common.ResultsTable(name, args.out, info, columns, "prefill_speedup")
        inference.inference_rows(
            args.preset,
            prompt=args.prompt,
            new_tokens=args.new_tokens,
            backend=backend,
            dtype=dtype,
            repeats=args.repeats,
            on_row=table.add,
        )
        return table.close(plot=args.plot)
    if args.suite == "runs":
        from slope_lightning.bench import runs

        if not args.paths:
            parser.error("runs: give the log directories of finished runs")
        rows = runs.run_rows(args.paths)  # ratios need every run: written at once
        return common.write_results(
            name, args.out, info, rows, runs.COLUMNS, "tokens_per_s_vs_dense", plot=args.plot
        )
    if args.suite == "kernels":
        from slope_lightning.bench import kernels

        why_not = kernels.kernels_unavailable(torch.device("cuda"))
        if why_not is not None:  # checked before a table is started: no empty files
            parser.error(f"the kernels benchmark cannot run here: {why_not}")
        table = common.ResultsTable(name, args.out, info, kernels.COLUMNS, "torch/triton")
        tokens = [int(t) for t in args.tokens.split(",")]
        kernels.kernel_rows(_shapes(args), tokens, dtype=dtype, on_row=table.add)
        return table.close(plot=args.plot)
    # layers
    from slope_lightning.bench import layers

    table = common.ResultsTable(name, args.out, info, layers.COLUMNS, "dense/slope")
    layers.layer_rows(
        _shapes(args),
        tokens=[int(t) for t in args.tokens.split(",")],
        repeats=args.repeats,
        dtype=dtype,
        backends=tuple(args.backends.split(",")),
        phases=_phases(args.phases, parser),
        on_row=table.add,
    )
    return table.close(plot=args.plot)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.suite == "unpack":
        from slope_lightning.bench.archive import unpack

        if len(args.paths) != 1:
            parser.error("unpack: give one archive (the .tar.gz of scripts/gpu_check.sh)")
        target = unpack(args.paths[0], args.out, tag=args.tag, plot=args.plot)
        print(f"unpacked into {target}; see {target / 'index.md'}")
        return
    print(run_suite(args, parser, argv))  # the table is the command's output


if __name__ == "__main__":
    main()
