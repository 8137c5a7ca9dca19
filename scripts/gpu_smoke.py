"""First-minute GPU smoke test: torch's sparse primitives in isolation, then the project's use
of them (written after a review of torch 2.11's sources for an H200).

It separates torch / cuSPARSELt behaviour from project bugs before any project test runs:

1. primitives alone (no project code): cuSPARSELt ``transpose_result``, its algorithm
   search, the transposable tile / apply-dense ops on sm_90, CUTLASS 2:4 refused on sm_90,
   whether fused AdamW bumps ``Parameter._version``;
2. the project's layer on them: operands after a fused AdamW step, host syncs in a step;
3. timings: per-call latency of cuSPARSELt vs dense, and the per-step rebuild of a layer.

Every check prints ``CHECK <name>: <status> <detail>`` and never stops the others. Status:
PASS / FAIL (a property the project relies on holds or not), INFO (a measurement), FACT (a
property of torch the project must live with, e.g. whether fused AdamW bumps ``_version``),
SKIP (the check needs what this run lacks). The results file is rewritten after every check,
so a timeout keeps the checks that finished. It needs no pytest: where pytest is missing on
the device, the project checks here (backends vs reference, host syncs, operands after a
fused step) are the GPU tests that still run. Run from the repository root
(``scripts/gpu_check.sh`` does)::

    PYTHONPATH=$PWD/src:$PWD/kernels python scripts/gpu_smoke.py --out DIR   # DIR/smoke.json

About 30-60 s on an H100 or H200. ``--dry-run`` runs every check on the CPU instead, through
the ``emulated`` backend and tiny shapes (checks of torch's CUDA operators are SKIPs), so
that CI runs this script end to end. Exits 0 whatever the checks find (a FAIL is a finding
to read in ``smoke.json``, not a crash); exits 1 only if it cannot run at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Result = tuple[str, str, dict[str, Any]]  # (status, detail, extra fields)
Check = Callable[["Setup"], Result]


class Recorder:
    """The checks' results, rewritten to ``path`` after each one.

    Written with a temporary file and ``os.replace`` here rather than through
    ``slope_lightning.utils``: the primitive checks must run, and be kept, even when the
    project itself does not import.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: list[dict[str, Any]] = []

    def add(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        line = f"CHECK {result['check']}: {result['status']} {result['detail']}"
        print(line, f"({result['seconds']} s)", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.path)

    def run(self, name: str, check: Callable[[], Result]) -> None:
        """Run one check; an exception is a FAIL with its first line, never the end."""
        start = time.perf_counter()
        try:
            status, detail, extra = check()
        except Skip as why:
            status, detail, extra = "SKIP", str(why), {}
        except Exception as error:  # every check is independent
            lines = str(error).strip().splitlines() or [""]
            status, detail, extra = "FAIL", f"{type(error).__name__}: {lines[0][:300]}", {}
            traceback.print_exc(limit=3)
        seconds = round(time.perf_counter() - start, 3)
        self.add({"check": name, "status": status, "detail": detail, "seconds": seconds, **extra})


BF16 = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Setup:
    """Where the checks run: the GPU with cuSPARSELt, or (``--dry-run``) the CPU through the
    emulated backend with every size divided by ``shrink``."""

    device: torch.device
    backend: str
    shrink: int

    @property
    def dry(self) -> bool:
        return self.device.type != "cuda"

    def auto(self) -> Any:
        """``auto``: on the GPU by name; in the dry run over the emulated backend (by name,
        ``auto`` refuses a machine without CUDA)."""
        if not self.dry:
            return "auto"
        from slope_lightning.sparse.backends import AutoBackend, SemiStructuredBackend
        from slope_lightning.sparse.backends.ops import EmulatedOps

        return AutoBackend([SemiStructuredBackend(EmulatedOps())])

    def size(self, n: int) -> int:
        """``n`` scaled down for the dry run, kept a multiple of 64 (the 2:4 kernels' rule)."""
        return max(64, n // self.shrink // 64 * 64)


class Skip(Exception):
    """Raised by a check that needs what this run lacks (e.g. CUDA in the dry run)."""


def needs_cuda(setup: Setup) -> None:
    if setup.dry:
        raise Skip("dry run on CPU: needs torch's CUDA 2:4 operators")


def prune24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 along the last dim (plain torch)."""
    g = w.reshape(w.shape[0], -1, 4)  # (rows, cols/4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape_as(w)


def cuda_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Mean milliseconds per call over ``repeats`` back-to-back calls (one event pair; on a
    CPU, the dry run, the wall clock)."""
    fn()
    if not torch.cuda.is_available():
        start_s = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start_s) / repeats * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()  # a sync point: the measurement ends here
    return start.elapsed_time(end) / repeats


def environment(setup: Setup) -> Result:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt_available": torch.backends.cusparselt.is_available(),
        "cusparselt_version": torch.backends.cusparselt.version(),
        "has_mm_search": hasattr(getattr(torch._C, "_cusparselt", None), "mm_search"),
        "cslt_sparse_mm_schema": str(torch.ops.aten._cslt_sparse_mm.default._schema),
        "dry_run": setup.dry,
    }
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        env |= {"device": torch.cuda.get_device_name(), "capability": f"sm_{cap[0]}{cap[1]}"}
    for module in ("triton", "lightning", "numpy", "matplotlib", "pytest"):
        try:
            env[module] = getattr(__import__(module), "__version__", "?")
        except Exception as error:  # a missing optional package is a fact, not a failure
            env[module] = f"missing ({type(error).__name__})"
    return "INFO", json.dumps(env, default=str), {"env": env}


# ------------------------------------------------------------------ 1. primitives alone


def cslt_transpose_result(setup: Setup) -> Result:
    """The project's call: Y = X Wᵀ as ``_cslt_sparse_mm(W, Xᵀ, transpose_result=True)``."""
    needs_cuda(setup)
    bad = []
    for rows, cols, t in [(256, 256, 8), (1024, 256, 64), (256, 1024, 104), (4096, 4096, 2048)]:
        w = prune24(torch.randn(rows, cols, device=setup.device, dtype=BF16))
        x = torch.randn(t, cols, device=setup.device, dtype=BF16)
        packed = torch._cslt_compress(w)
        y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)  # (t, rows)
        ref = x.float() @ w.float().t()
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        if tuple(y.shape) != (t, rows) or not y.is_contiguous() or err > 2e-2:
            bad.append((rows, cols, t, tuple(y.shape), y.stride(), err))
    return ("FAIL" if bad else "PASS"), str(bad), {}


def cslt_search(setup: Setup) -> Result:
    """The project's algorithm search (``torch._C._cusparselt.mm_search`` where torch has it)
    returns settings that run and give the right product. Which entry point and signature
    the installed torch has is a fact recorded here, not a failure."""
    needs_cuda(setup)
    from slope_lightning.sparse.backends.ops import search_algorithm, sparse_mm_arguments

    w = prune24(torch.randn(1024, 1024, device=setup.device, dtype=BF16))
    x = torch.randn(2048, 1024, device=setup.device, dtype=BF16)
    packed = torch._cslt_compress(w)
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    api = "torch._C._cusparselt.mm_search" if mm_search else "torch._cslt_sparse_mm_search"
    try:
        choice = search_algorithm(packed, x.t())
    except TypeError as error:  # a signature this torch does not have: a fact to record
        return "INFO", f"{api} signature mismatch: {error}", {"api": api}
    arguments = sparse_mm_arguments(choice)
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, **arguments)
    ok = torch.allclose(y.float(), x.float() @ w.float().t(), atol=0.5, rtol=2e-2)
    detail = f"{api} -> {dataclasses.asdict(choice)}; _cslt_sparse_mm ran with {arguments}"
    return ("PASS" if ok else "FAIL"), detail, {"api": api, "choice": dataclasses.asdict(choice)}


def tile_apply_dense_sm90(setup: Setup) -> Result:
    """The transposable baseline's ops: a mask 2:4 along rows and columns, and its products."""
    needs_cuda(setup)
    dev = setup.device
    w = torch.randn(128, 256, device=dev, dtype=BF16)
    out = torch._sparse_semi_structured_tile(
        w, algorithm="largest_abs_values_greedy", use_cutlass=True
    )
    dense = torch._sparse_semi_structured_apply_dense(w, out[4])
    nz = dense != 0
    tiles = nz.reshape(32, 4, 64, 4).permute(0, 2, 1, 3)  # (32, 64, 4, 4) 4x4 tiles
    ok = bool((tiles.sum(-1) <= 2).all() and (tiles.sum(-2) <= 2).all() and nz.any())
    kept = (dense.float().abs().sum() / w.float().abs().sum()).item()
    packed = torch._cslt_compress(dense)
    packed_t = torch._cslt_compress(dense.t().contiguous())
    x = torch.randn(64, 256, device=dev, dtype=BF16)
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
    ok &= torch.allclose(y.float(), x.float() @ dense.float().t(), atol=0.5, rtol=2e-2)
    g = torch.randn(64, 128, device=dev, dtype=BF16)
    dx = torch._cslt_sparse_mm(packed_t, g.t(), transpose_result=True)
    ok &= torch.allclose(dx.float(), g.float() @ dense.float(), atol=0.5, rtol=2e-2)
    return ("PASS" if ok else "FAIL"), f"kept |w| fraction {kept:.3f}", {}


def cutlass_mm_refused_on_sm90(setup: Setup) -> Result:
    """PyTorch's CUTLASS 2:4 GEMM is built for sm_8x: on Hopper it must refuse, not misbehave."""
    needs_cuda(setup)
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
    )

    cap = torch.cuda.get_device_capability()
    w = prune24(torch.randn(64, 128, device=setup.device, dtype=BF16))
    values, meta = sparse_semi_structured_from_dense_cutlass(w)
    x = torch.randn(128, 8, device=setup.device, dtype=w.dtype)
    try:
        torch._sparse_semi_structured_mm(values, meta, x)
    except RuntimeError as error:
        return ("PASS" if cap[0] != 8 else "FAIL"), str(error)[:120], {}
    return "INFO", f"ran on sm_{cap[0]}{cap[1]} (expected only on sm_8x)", {}


def fused_adamw_bumps_version(setup: Setup) -> Result:
    """Whether a fused optimizer step bumps ``_version``: a fact about torch. The project
    re-derives M_C through ``follow_optimizer``'s hook and drops training operands at every
    forward, so it does not rely on the answer; a cache keyed on ``_version`` alone would."""
    p = torch.nn.Parameter(torch.randn(64, 64, device=setup.device))
    p.grad = torch.randn_like(p)
    before = p._version
    torch.optim.AdamW([p], fused=True).step()
    bumped = p._version != before
    detail = (
        f"fused AdamW {'bumps' if bumped else 'does not bump'} _version ({before} -> {p._version})"
    )
    return "FACT", detail, {"bumped": bumped}


# ------------------------------------------------------------------ 2. the project on them


def slope_backends_match_reference(setup: Setup) -> Result:
    """The project's 2:4 backends against the reference layer in bf16, forward and input
    gradient (the ``gpu`` tests' main check, for a device without pytest)."""
    from torch import nn

    from slope_lightning.sparse import SparseLinear

    dev, errors = setup.device, {}
    for make_backend in (lambda: setup.backend, setup.auto):
        for d_in, d_out, tokens in [(256, 1024, 64), (1024, 256, 100)]:
            backend = make_backend()
            d_in, d_out, tokens = setup.size(d_in), setup.size(d_out), setup.size(tokens)
            torch.manual_seed(0)
            dense = nn.Linear(d_in, d_out, device=dev, dtype=BF16)
            reference = SparseLinear.from_linear(dense)
            layer = SparseLinear.from_linear(dense, backend=backend)
            x = torch.randn(tokens, d_in, device=dev, dtype=BF16, requires_grad=True)
            x_ref = x.detach().clone().requires_grad_()
            grad = torch.randn(tokens, d_out, device=dev, dtype=BF16)
            y, y_ref = layer(x), reference(x_ref)
            y.backward(grad)
            y_ref.backward(grad)
            assert x.grad is not None and x_ref.grad is not None
            scale = y_ref.float().abs().max().item()
            errors[f"{layer.backend.running.name} {d_out}x{d_in}"] = max(
                (y - y_ref).float().abs().max().item() / scale,
                (x.grad - x_ref.grad).float().abs().max().item()
                / x_ref.grad.float().abs().max().item(),
            )
    bad = {name: err for name, err in errors.items() if err > 3e-2}
    return ("FAIL" if bad else "PASS"), f"max relative error {errors}", {"errors": errors}


def slope_operands_after_fused_adamw(setup: Setup) -> Result:
    """After one AdamW step (foreach, fused), a 2:4 layer's forward equals that of a fresh
    layer loaded with the same state: the kernel-side operands followed the update."""
    from torch import nn

    from slope_lightning.sparse import SparseLinear

    differences = {}
    for kind in ("foreach", "fused"):
        torch.manual_seed(0)
        width = setup.size(512)
        dense = nn.Linear(width, width, device=setup.device, dtype=BF16)
        layer = SparseLinear.from_linear(dense, backend=setup.backend)
        x = torch.randn(64, width, device=setup.device, dtype=BF16)
        opt = torch.optim.AdamW(
            layer.parameters(),
            lr=1e-2,
            foreach=True if kind == "foreach" else None,
            fused=True if kind == "fused" else None,
        )
        layer(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
        fresh = SparseLinear.from_linear(dense, backend=setup.backend)
        fresh.load_state_dict(layer.state_dict())  # no cache yet: built from the new values
        y, y_fresh = layer(x).detach().float(), fresh(x).detach().float()
        differences[kind] = (y - y_fresh).abs().max().item()
    stale = any(d > 0 for d in differences.values())
    detail = f"max |layer - fresh| after one step: {differences}"
    return ("FAIL" if stale else "PASS"), detail, {"differences": differences}


def host_syncs_per_step(setup: Setup) -> Result:
    """Stream syncs in one training step (bf16 autocast, fused AdamW following the layers, an
    M_C refresh) of a 2:4 and a reference layer: a sync stops the CPU from running ahead."""
    needs_cuda(setup)
    from torch import nn

    from slope_lightning.sparse import follow_optimizer, sparsify

    counts = {}
    for backend in (setup.backend, "reference"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024))
        model = model.to(setup.device)
        sparsify(model, backend=backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        follow_optimizer(model, optimizer)
        x = torch.randn(256, 1024, device=setup.device)

        def step(model: nn.Module = model, optimizer: Any = optimizer, x: Any = x) -> None:
            with torch.autocast("cuda", dtype=BF16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step()  # warm-up: algorithm search, lookup tables, optimizer state
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[backend] = sum("synchroniz" in str(w.message) for w in caught)
    status = "PASS" if not any(counts.values()) else "FAIL"
    return status, f"stream syncs in one training step: {counts}", {"syncs": counts}


# ------------------------------------------------------------------ 3. timings


def latency(setup: Setup) -> Result:
    """Per-call device time of dense vs cuSPARSELt (searched algorithm), its host time per
    call, and the cost of one compression."""
    needs_cuda(setup)
    from slope_lightning.sparse.backends.ops import search_algorithm, sparse_mm_arguments

    dev, rows = setup.device, []
    shapes = [(4096, 4096, 2048), (4096, 4096, 8192), (14336, 4096, 8192), (2048, 2048, 64)]
    for d_out, d_in, t in shapes:
        w = prune24(torch.randn(d_out, d_in, device=dev, dtype=BF16))
        x = torch.randn(t, d_in, device=dev, dtype=BF16)
        packed = torch._cslt_compress(w)
        choice = search_algorithm(packed, x.t())
        arguments = sparse_mm_arguments(choice)

        def sparse(packed: torch.Tensor = packed, x: torch.Tensor = x, a: Any = arguments) -> None:
            torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, **a)

        def dense(x: torch.Tensor = x, w: torch.Tensor = w) -> None:
            x @ w.t()

        def compress(w: torch.Tensor = w) -> None:
            torch._cslt_compress(w)

        dense_ms = cuda_ms(dense)
        sparse_ms = cuda_ms(sparse)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            sparse()
        host_ms = (time.perf_counter() - start) / 20 * 1e3  # host time per call
        torch.cuda.synchronize()
        compress_ms = cuda_ms(compress, repeats=5)
        rows.append(
            {
                "shape": f"{d_out}x{d_in}",
                "T": t,
                "dense_ms": round(dense_ms, 4),
                "cslt_ms": round(sparse_ms, 4),
                "cslt_host_ms_per_call": round(host_ms, 4),
                "compress_ms": round(compress_ms, 4),
                **dataclasses.asdict(choice),
            }
        )
    return "INFO", json.dumps(rows), {"rows": rows}


def slope_step_overhead(setup: Setup) -> Result:
    """What one training step of a 2:4 SparseLinear (4096 -> 14336) costs beyond its GEMMs:
    the layer's real step (W_R and W_RCᵀ compressed anew, M_C re-derived) against the same
    backend's three GEMMs on operands compressed once and cached."""
    from torch import nn

    from slope_lightning.sparse import SparseLinear
    from slope_lightning.sparse.backends import OperandCache, SparseWeight

    dev = setup.device
    d_in, d_out, tokens = setup.size(4096), setup.size(14336), setup.size(8192)
    dense = nn.Linear(d_in, d_out, device=dev, dtype=BF16)
    layer = SparseLinear.from_linear(dense, backend=setup.backend)
    x = torch.randn(tokens, d_in, device=dev, dtype=BF16, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=dev, dtype=BF16)
    backend = layer.backend.running
    weight = SparseWeight(
        layer.values.detach(),
        layer.row_index,
        layer.layout,
        BF16,
        layer.col_index,
        key="fixed",  # a key: the operands are compressed at the first call, then reused
    )
    cache = OperandCache()

    def cached() -> None:
        backend.forward(x.detach(), weight, None, cache)
        backend.grad_input(grad, weight, cache)
        backend.grad_values(grad, x.detach(), weight)

    def rebuilt() -> None:
        layer(x).backward(grad)  # the real step: every operand and M_C rebuilt

    rebuilt_ms = cuda_ms(rebuilt, 5)
    backend = layer.backend.running  # auto: decided by now
    cached_ms = cuda_ms(cached, 5)
    builds = cache.builds
    dense_ms = cuda_ms(lambda: dense(x).backward(grad), 5)
    detail = (
        f"{d_out}x{d_in}, {tokens} tokens, {backend.name}: dense fwd+bwd {dense_ms:.3f} ms; "
        f"slope GEMMs on cached operands {cached_ms:.3f} ms ({builds} operand builds in "
        f"{5 + 1} calls); slope layer step with per-step rebuild + M_C refresh "
        f"{rebuilt_ms:.3f} ms"
    )
    times = {"dense_ms": dense_ms, "cached_ms": cached_ms, "rebuilt_ms": rebuilt_ms}
    return "INFO", detail, {**times, "cached_builds": builds}


CHECKS: tuple[tuple[str, Check], ...] = (
    ("env", environment),
    ("cslt_transpose_result", cslt_transpose_result),
    ("cslt_search", cslt_search),
    ("tile_apply_dense_sm90", tile_apply_dense_sm90),
    ("cutlass_mm_refused_on_sm90", cutlass_mm_refused_on_sm90),
    ("fused_adamw_bumps_version", fused_adamw_bumps_version),
    ("slope_backends_match_reference", slope_backends_match_reference),
    ("slope_operands_after_fused_adamw", slope_operands_after_fused_adamw),
    ("host_syncs_per_step", host_syncs_per_step),
    ("latency", latency),
    ("slope_step_overhead", slope_step_overhead),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check on the CPU through the emulated backend and tiny shapes",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        setup = Setup(torch.device("cpu"), "emulated", shrink=64)
    elif torch.cuda.is_available():
        setup = Setup(torch.device("cuda"), "cusparselt", shrink=1)
    else:
        print("no CUDA device: nothing to check (--dry-run runs the checks on the CPU)")
        return 1
    recorder = Recorder(args.out / "smoke.json")
    for name, check in CHECKS:
        recorder.run(name, functools.partial(check, setup))
    failed = sum(r["status"] == "FAIL" for r in recorder.results)
    print(f"smoke done: {failed} FAIL of {len(recorder.results)} checks", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
