"""First-minute GPU smoke test: torch's sparse primitives in isolation, then the project's use
of them (written after a review of torch 2.11's sources for an H200).

It separates torch / cuSPARSELt behaviour from project bugs before any project test runs:

1. primitives alone (no project code): cuSPARSELt ``transpose_result``, its algorithm
   search, the transposable tile / apply-dense ops on sm_90, CUTLASS 2:4 refused on sm_90,
   whether fused AdamW bumps ``Parameter._version``;
2. the project's layer on them: operands after a fused AdamW step, host syncs in a step;
3. timings: per-call latency of cuSPARSELt vs dense, and the per-step rebuild of a layer.

Every check prints ``CHECK <name>: PASS|FAIL|INFO <detail>`` and never stops the others. The
results file is rewritten after every check, so a timeout keeps the checks that finished.
Run from the repository root (``scripts/gpu_check.sh`` does)::

    PYTHONPATH=$PWD/src:$PWD/kernels python scripts/gpu_smoke.py --out DIR   # DIR/smoke.json

About 30-60 s on an H200. Exits 0 whatever the checks find (a FAIL is a finding to read in
``smoke.json``, not a crash); exits 1 only if it cannot run at all.
"""

from __future__ import annotations

import argparse
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
Check = Callable[[], Result]


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

    def run(self, name: str, check: Check) -> None:
        """Run one check; an exception is a FAIL with its first line, never the end."""
        start = time.perf_counter()
        try:
            status, detail, extra = check()
        except Exception as error:  # every check is independent
            lines = str(error).strip().splitlines() or [""]
            status, detail, extra = "FAIL", f"{type(error).__name__}: {lines[0][:300]}", {}
            traceback.print_exc(limit=3)
        seconds = round(time.perf_counter() - start, 3)
        self.add({"check": name, "status": status, "detail": detail, "seconds": seconds, **extra})


DEV = torch.device("cuda")
BF16 = torch.bfloat16


def prune24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 along the last dim (plain torch)."""
    g = w.reshape(w.shape[0], -1, 4)  # (rows, cols/4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape_as(w)


def cuda_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    """Mean milliseconds per call over ``repeats`` back-to-back calls (one event pair)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()  # a sync point: the measurement ends here
    return start.elapsed_time(end) / repeats


def environment() -> Result:
    cap = torch.cuda.get_device_capability()
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(),
        "capability": f"sm_{cap[0]}{cap[1]}",
        "cusparselt_available": torch.backends.cusparselt.is_available(),
        "cusparselt_version": torch.backends.cusparselt.version(),
        "has_mm_search": hasattr(getattr(torch._C, "_cusparselt", None), "mm_search"),
    }
    for module in ("triton", "lightning", "numpy", "matplotlib"):
        try:
            env[module] = getattr(__import__(module), "__version__", "?")
        except Exception as error:  # a missing optional package is a fact, not a failure
            env[module] = f"missing ({type(error).__name__})"
    return "INFO", json.dumps(env, default=str), {"env": env}


# ------------------------------------------------------------------ 1. primitives alone


def cslt_transpose_result() -> Result:
    """The project's call: Y = X Wᵀ as ``_cslt_sparse_mm(W, Xᵀ, transpose_result=True)``."""
    bad = []
    for rows, cols, t in [(256, 256, 8), (1024, 256, 64), (256, 1024, 104), (4096, 4096, 2048)]:
        w = prune24(torch.randn(rows, cols, device=DEV, dtype=BF16))
        x = torch.randn(t, cols, device=DEV, dtype=BF16)
        packed = torch._cslt_compress(w)
        y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)  # (t, rows)
        ref = x.float() @ w.float().t()
        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
        if tuple(y.shape) != (t, rows) or not y.is_contiguous() or err > 2e-2:
            bad.append((rows, cols, t, tuple(y.shape), y.stride(), err))
    return ("FAIL" if bad else "PASS"), str(bad), {}


def cslt_search() -> Result:
    """cuSPARSELt's algorithm search returns an id that runs and gives the right product."""
    w = prune24(torch.randn(1024, 1024, device=DEV, dtype=BF16))
    x = torch.randn(2048, 1024, device=DEV, dtype=BF16)
    packed = torch._cslt_compress(w)
    alg = int(torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True))
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=alg)
    ok = torch.allclose(y.float(), x.float() @ w.float().t(), atol=0.5, rtol=2e-2)
    extra = ""
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if mm_search is not None:  # newer torch: the search also reports split-k settings
        extra = f" mm_search={mm_search(packed, x.t(), None, None, None, True)}"
    return ("PASS" if ok else "FAIL"), f"alg_id={alg}{extra}", {}


def tile_apply_dense_sm90() -> Result:
    """The transposable baseline's ops: a mask 2:4 along rows and columns, and its products."""
    w = torch.randn(128, 256, device=DEV, dtype=BF16)
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
    x = torch.randn(64, 256, device=DEV, dtype=BF16)
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
    ok &= torch.allclose(y.float(), x.float() @ dense.float().t(), atol=0.5, rtol=2e-2)
    g = torch.randn(64, 128, device=DEV, dtype=BF16)
    dx = torch._cslt_sparse_mm(packed_t, g.t(), transpose_result=True)
    ok &= torch.allclose(dx.float(), g.float() @ dense.float(), atol=0.5, rtol=2e-2)
    return ("PASS" if ok else "FAIL"), f"kept |w| fraction {kept:.3f}", {}


def cutlass_mm_refused_on_sm90() -> Result:
    """PyTorch's CUTLASS 2:4 GEMM is built for sm_8x: on Hopper it must refuse, not misbehave."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
    )

    cap = torch.cuda.get_device_capability()
    w = prune24(torch.randn(64, 128, device=DEV, dtype=BF16))
    values, meta = sparse_semi_structured_from_dense_cutlass(w)
    x = torch.randn(128, 8, device=DEV, dtype=w.dtype)
    try:
        torch._sparse_semi_structured_mm(values, meta, x)
    except RuntimeError as error:
        return ("PASS" if cap[0] != 8 else "FAIL"), str(error)[:120], {}
    return "INFO", f"ran on sm_{cap[0]}{cap[1]} (expected only on sm_8x)", {}


def fused_adamw_bumps_version() -> Result:
    """Whether a fused optimizer step bumps ``_version`` (the project's caches keyed on it)."""
    p = torch.nn.Parameter(torch.randn(64, 64, device=DEV))
    p.grad = torch.randn_like(p)
    before = p._version
    torch.optim.AdamW([p], fused=True).step()
    bumped = p._version != before
    detail = f"_version {before} -> {p._version} (FAIL: a cache keyed on it goes stale)"
    return ("PASS" if bumped else "FAIL"), detail, {}


# ------------------------------------------------------------------ 2. the project on them


def slope_operands_after_fused_adamw() -> Result:
    """After one AdamW step (foreach, fused), a cusparselt layer's forward equals that of a
    fresh layer loaded with the same state: the kernel-side operands followed the update."""
    from torch import nn

    from slope_lightning.sparse import SparseLinear

    differences = {}
    for kind in ("foreach", "fused"):
        torch.manual_seed(0)
        dense = nn.Linear(512, 512, device=DEV, dtype=BF16)
        layer = SparseLinear.from_linear(dense, backend="cusparselt")
        x = torch.randn(64, 512, device=DEV, dtype=BF16)
        opt = torch.optim.AdamW(
            layer.parameters(),
            lr=1e-2,
            foreach=True if kind == "foreach" else None,
            fused=True if kind == "fused" else None,
        )
        layer(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
        fresh = SparseLinear.from_linear(dense, backend="cusparselt")
        fresh.load_state_dict(layer.state_dict())  # no cache yet: built from the new values
        y, y_fresh = layer(x).detach().float(), fresh(x).detach().float()
        differences[kind] = (y - y_fresh).abs().max().item()
    stale = any(d > 0 for d in differences.values())
    detail = f"max |layer - fresh| after one step: {differences}"
    return ("FAIL" if stale else "PASS"), detail, {"differences": differences}


def host_syncs_per_step() -> Result:
    """Stream syncs in one training step of a cusparselt and a reference layer (a blocking
    host-to-device copy in a step stops the CPU from running ahead of the GPU)."""
    from torch import nn

    from slope_lightning.sparse import SparseLinear

    counts = {}
    for backend in ("cusparselt", "reference"):
        torch.manual_seed(0)
        dense = nn.Linear(1024, 1024, device=DEV, dtype=BF16)
        layer = SparseLinear.from_linear(dense, backend=backend)
        x = torch.randn(256, 1024, device=DEV, dtype=BF16, requires_grad=True)
        layer(x).sum().backward()  # warm-up: algorithm search, caches
        with torch.no_grad():
            layer.values.add_(0)  # an optimizer step
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                layer(x).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[backend] = sum("synchroniz" in str(w.message) for w in caught)
    status = "PASS" if not any(counts.values()) else "INFO"
    return status, f"stream syncs in one step (after an update): {counts}", {"syncs": counts}


# ------------------------------------------------------------------ 3. timings


def latency() -> Result:
    """Per-call device time of dense vs cuSPARSELt, its host time per call (the plan is
    rebuilt on every call in torch 2.11), and the cost of one compression."""
    rows = []
    shapes = [(4096, 4096, 2048), (4096, 4096, 8192), (14336, 4096, 8192), (2048, 2048, 64)]
    for d_out, d_in, t in shapes:
        w = prune24(torch.randn(d_out, d_in, device=DEV, dtype=BF16))
        x = torch.randn(t, d_in, device=DEV, dtype=BF16)
        packed = torch._cslt_compress(w)
        alg = int(torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True))

        def sparse(packed: torch.Tensor = packed, x: torch.Tensor = x, alg: int = alg) -> None:
            torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=alg)

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
                "alg_id": alg,
            }
        )
    return "INFO", json.dumps(rows), {"rows": rows}


def slope_step_overhead() -> Result:
    """What one optimizer step costs a cusparselt SparseLinear beyond its GEMMs: the rebuild
    of its operands and M_C, against the same layer with its operands cached."""
    from torch import nn

    from slope_lightning.sparse import SparseLinear

    dense = nn.Linear(4096, 14336, device=DEV, dtype=BF16)
    layer = SparseLinear.from_linear(dense, backend="cusparselt")
    x = torch.randn(8192, 4096, device=DEV, dtype=BF16, requires_grad=True)

    def cached() -> None:
        layer(x).sum().backward()

    def rebuilt() -> None:
        with torch.no_grad():
            layer.values.add_(0)  # bumps _version: what a (foreach) optimizer step does
        layer(x).sum().backward()

    cached_ms, rebuilt_ms = cuda_ms(cached, 5), cuda_ms(rebuilt, 5)
    dense_ms = cuda_ms(lambda: dense(x).sum().backward(), 5)
    detail = (
        f"dense fwd+bwd {dense_ms:.3f} ms; slope cached {cached_ms:.3f} ms; "
        f"slope with per-step rebuild + M_C refresh {rebuilt_ms:.3f} ms"
    )
    times = {"dense_ms": dense_ms, "cached_ms": cached_ms, "rebuilt_ms": rebuilt_ms}
    return "INFO", detail, times


CHECKS: tuple[tuple[str, Check], ...] = (
    ("env", environment),
    ("cslt_transpose_result", cslt_transpose_result),
    ("cslt_search", cslt_search),
    ("tile_apply_dense_sm90", tile_apply_dense_sm90),
    ("cutlass_mm_refused_on_sm90", cutlass_mm_refused_on_sm90),
    ("fused_adamw_bumps_version", fused_adamw_bumps_version),
    ("slope_operands_after_fused_adamw", slope_operands_after_fused_adamw),
    ("host_syncs_per_step", host_syncs_per_step),
    ("latency", latency),
    ("slope_step_overhead", slope_step_overhead),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    recorder = Recorder(args.out / "smoke.json")
    for name, check in CHECKS:
        recorder.run(name, check)
    failed = sum(r["status"] == "FAIL" for r in recorder.results)
    print(f"smoke done: {failed} FAIL of {len(recorder.results)} checks", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
