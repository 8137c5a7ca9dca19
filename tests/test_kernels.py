"""Every Triton kernel against its plain-torch reference and against the library (NMLayout,
SparseLinear), on small odd shapes: exact for gathers and masks, tolerances for matmuls.

Each test runs twice: on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
below when there is no GPU, before slope_kernels is imported: triton.jit decides at
decoration time), and as the ``gpu`` group on CUDA tensors with compiled kernels. A process
runs one or the other: on a GPU machine, ``pytest -m gpu`` without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py sets it too, before any test module imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import slope_kernels._triton as kernel_runtime
from conftest import needs_triton_interpreter
from slope_kernels import (
    TRITON_AVAILABLE,
    bias_add,
    bias_add_reference,
    derive_transpose_index,
    derive_transpose_index_reference,
    fused_lowrank_add,
    fused_lowrank_add_reference,
    gather_grad,
    gather_packed_grad,
    gather_packed_grad_reference,
    packed_format,
    transpose_mask,
)
from slope_lightning.sparse import NMLayout, SparseLinear, packing

INTERPRET = kernel_runtime.INTERPRET
DEVICES = [
    pytest.param(
        "cpu",
        id="interpreter",
        marks=[
            pytest.mark.skipif(
                not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before the first import"
            ),
            needs_triton_interpreter,
        ],
    ),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                INTERPRET or not torch.cuda.is_available(),
                reason="compiled kernels need a CUDA GPU and TRITON_INTERPRET unset",
            ),
        ],
    ),
]
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Reproducible normal samples (made on the CPU, so every device gets the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def stored_exactly(dtype: torch.dtype, device: str) -> dict[str, float]:
    """Tolerance for an fp32 result stored in ``dtype``: exact, except that the interpreter
    truncates fp32 -> bf16 where compiled code rounds to nearest (one bf16 ulp apart)."""
    if dtype == torch.bfloat16 and device == "cpu":
        return {"atol": 1e-30, "rtol": 2**-7}
    return {"atol": 0.0, "rtol": 0.0}


# ---------------------------------------------------------------- the packed format

FORMAT_FUNCTIONS = (
    "bits_per_offset",
    "packed_width",
    "check_pattern",
    "pack_positions",
    "unpack_positions",
    "unpack_columns",
)
PATTERNS = [(1, 2), (1, 4), (2, 4), (3, 4), (2, 3), (2, 8), (3, 8), (5, 16), (7, 200)]


@pytest.mark.parametrize("name", FORMAT_FUNCTIONS)
def test_library_and_kernels_share_one_packed_format(name):
    """One definition: the library's packing module re-exports the kernels' format, and the
    kernels' references use it, so neither side can drift from the other."""
    assert getattr(packing, name) is getattr(packed_format, name)
    for module in (gather_grad, transpose_mask):
        if hasattr(module, name):
            assert getattr(module, name) is getattr(packed_format, name), module.__name__


def random_positions(rows: int, groups: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """Offsets (rows, groups, n): n distinct values of [0, m) per group, ascending."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(rows, groups, m, generator=g).argsort(-1)[..., :n]
    return chosen.sort(-1).values  # (rows, groups, n) int64


@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize(("rows", "groups"), [(1, 1), (3, 5), (13, 9)])
def test_packed_format_round_trips_and_matches_the_layout(n, m, rows, groups):
    positions = random_positions(rows, groups, n, m, seed=rows * groups + m)
    packed = packed_format.pack_positions(positions, m)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_format.packed_width(groups * n, m))
    unpacked = packed_format.unpack_positions(packed, m, groups, n)
    assert unpacked.dtype == torch.int64 and torch.equal(unpacked, positions)
    columns = packed_format.unpack_columns(packed, n, m, groups * n)  # (rows, groups·n)
    starts = torch.arange(groups)[:, None] * m
    assert torch.equal(columns, (positions + starts).flatten(1))
    # The library decodes the same bits (2:4-like patterns through its byte tables).
    assert torch.equal(NMLayout(rows, groups * m, n, m).columns(packed), columns)


def test_packed_format_pins_its_bits():
    """The bit layout itself, so that a change to it fails here and not in a checkpoint."""
    widths = {2: 1, 3: 2, 4: 2, 5: 4, 16: 4, 17: 8, 256: 8}
    assert {m: packed_format.bits_per_offset(m) for m in widths} == widths
    # 2:4, two groups: offsets 0, 1 | 2, 3 fill one byte from its lowest bits up.
    byte = packed_format.pack_positions(torch.tensor([[[0, 1], [2, 3]]]), 4)
    assert byte.tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6]]
    assert packed_format.packed_width(6, 4) == 2  # 6 offsets of 2 bits: 2 bytes, last padded
    assert packed_format.packed_width(3, 8) == 2  # 4 bits each, 2 per byte
    with pytest.raises(ValueError, match="m <= 256"):
        packed_format.bits_per_offset(257)
    with pytest.raises(ValueError, match="demo: invalid N:M pattern 4:4"):
        packed_format.check_pattern("demo", 4, 4)


LAZY_IMPORT_SCRIPT = """
import sys
import torch  # torch itself may import triton in some builds; what we import must not
before = "triton" in sys.modules
import slope_kernels.packed_format
import slope_kernels
loaded = sorted(k for k in sys.modules if k.startswith("slope_kernels."))
assert loaded == ["slope_kernels.packed_format"], loaded
assert before or "triton" not in sys.modules, "slope_kernels.packed_format imported triton"
import slope_kernels.bias  # the module first: the package attribute must stay the function
from slope_kernels import bias_add, gather_packed_grad
assert bias_add.__module__ == "slope_kernels.bias", bias_add
assert slope_kernels.bias_add is bias_add and callable(gather_packed_grad)
assert isinstance(slope_kernels.TRITON_AVAILABLE, bool)
try:
    slope_kernels.no_such_kernel
except AttributeError as error:
    assert "no_such_kernel" in str(error)
else:
    raise AssertionError("unknown names must raise AttributeError")
print("lazy ok")
"""


def test_kernel_package_imports_its_kernels_lazily():
    """``import slope_kernels.packed_format`` (what the library does) loads no kernel and no
    triton; the kernels load on first use and are the functions, never shadowed by their
    modules."""
    done = subprocess.run(
        [sys.executable, "-c", LAZY_IMPORT_SCRIPT], capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0 and "lazy ok" in done.stdout, done.stderr[-3000:]


SPARSE_IMPORT_SCRIPT = """
import sys
import slope_lightning.sparse
from slope_lightning.sparse import packing
ours = sorted(k for k in sys.modules if k.startswith("slope_kernels"))
assert ours == ["slope_kernels", "slope_kernels.packed_format"], ours
print("sparse ok")
"""


def test_the_library_loads_the_format_and_no_kernel():
    """``import slope_lightning.sparse`` loads the packed format and neither a kernel module nor
    ``slope_kernels._triton`` (the optional triton import); kernels load when a backend first
    uses one. (torch's own ``torch._dynamo``, imported by ``@torch.compiler.disable``, may still
    import triton: that is torch's probe, not ours.)"""
    done = subprocess.run(
        [sys.executable, "-c", SPARSE_IMPORT_SCRIPT], capture_output=True, text=True
    )
    assert done.returncode == 0 and "sparse ok" in done.stdout, done.stderr[-3000:]


def test_the_library_imports_without_triton():
    """A CPU install without triton: the method and its packed format still import."""
    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import slope_lightning.sparse as sparse, slope_kernels\n"
        "assert not slope_kernels.TRITON_AVAILABLE\n"
        "assert sparse.NMLayout(2, 8, 2, 4).kept_per_row == 4\n"
        "print('no triton ok')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "no triton ok" in done.stdout, done.stderr[-3000:]


def test_the_lazy_names_are_the_public_names():
    import slope_kernels

    assert sorted(slope_kernels._LAZY) == sorted(slope_kernels.__all__)
    assert set(slope_kernels.__all__) <= set(dir(slope_kernels))


def test_triton_is_available_where_the_kernel_tests_run():
    assert TRITON_AVAILABLE  # the module is skipped above without triton


# ---------------------------------------------------------------- fused_lowrank_add


@pytest.mark.parametrize(("tokens", "rank", "width"), [(2, 4, 8), (13, 5, 40), (67, 17, 36)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_lowrank_add_matches_reference_fp32(device, tokens, rank, width, with_bias):
    c, a, b = randn(tokens, width), randn(tokens, rank, seed=1), randn(rank, width, seed=2)
    bias = randn(width, seed=3) if with_bias else None
    expected = fused_lowrank_add_reference(c, a, b, 0.25, bias)
    on = [t.to(device) if t is not None else None for t in (c, a, b, bias)]
    out = fused_lowrank_add(on[0], on[1], on[2], 0.25, on[3])
    assert out.dtype == torch.float32 and out.shape == (tokens, width)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("dtype", HALF)
def test_fused_lowrank_add_half_precision_accumulates_in_fp32(device, dtype):
    c, a, b = (randn(13, 40, dtype=dtype), randn(13, 4, dtype=dtype, seed=1),
               randn(4, 40, dtype=dtype, seed=2))  # fmt: skip
    bias = randn(40, dtype=dtype, seed=3)
    out = fused_lowrank_add(c.to(device), a.to(device), b.to(device), 0.5, bias.to(device))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # One ulp for the final rounding (summation order), one more for the interpreter's bf16.
    tol = 2e-3 if dtype == torch.float16 else 2**-6
    expected = fused_lowrank_add_reference(c, a, b, 0.5, bias)
    torch.testing.assert_close(out.cpu(), expected, atol=tol, rtol=tol)


def test_fused_lowrank_add_reads_slices_of_one_fused_output(device):
    """[X W_Rᵀ | X L] is one GEMM output; C and A are its column slices, no copy needed."""
    fused = randn(13, 40 + 6).to(device)  # (T, d_out + r)
    c, a, b = fused[:, :40], fused[:, 40:], randn(6, 40, seed=1).to(device)
    assert not c.is_contiguous() and not a.is_contiguous()
    out = fused_lowrank_add(c, a, b, 1 / 6)
    expected = fused_lowrank_add_reference(c.cpu(), a.cpu(), b.cpu(), 1 / 6)
    torch.testing.assert_close(out.cpu(), expected)


def test_fused_lowrank_add_rank_zero_is_c_plus_bias(device):
    c, bias = randn(5, 8).to(device), randn(8, seed=1).to(device)
    a, b = c.new_zeros(5, 0), c.new_zeros(0, 8)
    torch.testing.assert_close(fused_lowrank_add(c, a, b, 3.0, bias), c + bias)


def test_fused_lowrank_add_is_the_merged_sparse_linear_forward(device):
    """The library's fused inference path: X W_Rᵀ, then + (X L)·(s R) + b in one kernel."""
    torch.manual_seed(0)
    layer = SparseLinear(36, 20)
    layer.add_adapter(5)
    with torch.no_grad():
        layer.adapter.up.normal_()
        layer.bias.normal_()
    layer.merge()
    x = randn(13, 36, seed=1)
    with torch.no_grad():
        expected = layer(x)  # the library's merged forward
        y = x @ layer.to_dense().t()  # (T, d_out): the sparse GEMM
        xl = x @ layer.adapter.down_dense().t()  # (T, r)
        up = layer.adapter.up * layer.adapter.scale  # s·R, (r, d_out)
    out = fused_lowrank_add(y.to(device), xl.to(device), up.to(device), 1.0, layer.bias.to(device))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bias_add


@pytest.mark.parametrize(("rows", "cols"), [(2, 8), (13, 36), (67, 132)])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_bias_add_matches_reference(device, rows, cols, dtype):
    y, bias = randn(rows, cols, dtype=dtype), randn(cols, dtype=dtype, seed=1)
    out = bias_add(y.to(device), bias.to(device))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(
        out.cpu(), bias_add_reference(y, bias), **stored_exactly(dtype, device)
    )


def test_bias_add_in_place_and_with_an_fp32_bias(device):
    y, bias = randn(13, 36, dtype=torch.float16).to(device), randn(36, seed=1).to(device)
    expected = bias_add_reference(y, bias)
    out = bias_add(y, bias, inplace=True)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


# ---------------------------------------------------------------- gather_packed_grad


def packed_index(rows: int, cols: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """M_R of a random (rows, cols) weight, from the library."""
    return NMLayout(rows, cols, n, m).prune(randn(rows, cols, seed=seed))[1]


@pytest.mark.parametrize(("rows", "cols"), [(2, 8), (13, 36), (67, 132)])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_gather_packed_grad_2_4_is_the_library_gather_exactly(device, rows, cols, dtype):
    index, grad = packed_index(rows, cols, 2, 4), randn(rows, cols, dtype=dtype, seed=1)
    out = gather_packed_grad(grad.to(device), index.to(device), 2, 4)
    expected = NMLayout(rows, cols, 2, 4).gather(grad, index)
    assert out.dtype == dtype and torch.equal(out.cpu(), expected)
    assert torch.equal(gather_packed_grad_reference(grad, index, 2, 4), expected)


@pytest.mark.parametrize(("n", "m"), [(1, 2), (1, 4), (3, 4), (2, 3), (2, 8), (3, 8), (5, 16)])
def test_gather_packed_grad_any_pattern_is_the_library_gather_exactly(device, n, m):
    for rows, groups in [(2, 2), (13, 9)]:
        cols = groups * m
        index, grad = packed_index(rows, cols, n, m), randn(rows, cols, seed=1)
        out = gather_packed_grad(grad.to(device), index.to(device), n, m)
        expected = NMLayout(rows, cols, n, m).gather(grad, index)
        assert torch.equal(out.cpu(), expected), (rows, cols, n, m)
        assert torch.equal(gather_packed_grad_reference(grad, index, n, m), expected)


# ---------------------------------------------------------------- derive_transpose_index


def layer_with(weight: torch.Tensor, n: int = 2, m: int = 4) -> SparseLinear:
    d_out, d_in = weight.shape
    return SparseLinear(d_in, d_out, n=n, m=m, weight=weight)


def check_col_index(layer: SparseLinear, device: str) -> None:
    """The kernel and the reference both give the layer's own M_C, bit for bit."""
    n, m, d_out, d_in = layer.n, layer.m, layer.out_features, layer.in_features
    values, index = layer.values.detach(), layer.row_index
    expected = layer._derive_col_index()
    out = derive_transpose_index(values.to(device), index.to(device), n, m, d_out, d_in)
    assert out.dtype == torch.uint8 and out.shape == expected.shape
    assert torch.equal(out.cpu(), expected), (n, m, d_out, d_in, values.dtype)
    assert torch.equal(derive_transpose_index_reference(values, index, n, m, d_out, d_in), expected)


@pytest.mark.parametrize(("d_out", "d_in"), [(4, 8), (12, 36), (20, 132), (68, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "integer-ties"])
def test_derive_transpose_index_2_4_equals_the_layer_mask(device, d_out, d_in, dtype, ties):
    g = torch.Generator().manual_seed(d_out * d_in)
    if ties:  # many equal magnitudes, and zeros that tie with the entries M_R dropped
        weight = torch.randint(-2, 3, (d_out, d_in), generator=g).float()
    else:
        weight = torch.randn(d_out, d_in, generator=g)
    layer = layer_with(weight.to(dtype))
    check_col_index(layer, device)
    assert torch.equal(layer.col_index, layer._derive_col_index())  # as built by the layer


@pytest.mark.parametrize(("n", "m"), [(1, 2), (1, 4), (3, 4), (2, 3), (2, 8), (3, 8), (5, 16)])
def test_derive_transpose_index_any_pattern_up_to_m16(device, n, m):
    for d_out, d_in, ties in [(m, 2 * m, True), (3 * m, m, False)]:
        g = torch.Generator().manual_seed(n * m)
        weight = (
            torch.randint(-1, 2, (d_out, d_in), generator=g).float()
            if ties
            else torch.randn(d_out, d_in, generator=g)
        )
        check_col_index(layer_with(weight, n, m), device)


def test_derive_transpose_index_follows_updated_values_nan_and_inf(device):
    """After values change in place (an optimizer step), M_C follows them; NaN counts as +inf
    (never dropped silently) and ties with inf go to the lower row, as in the library."""
    layer = layer_with(randn(12, 36))
    with torch.no_grad():
        layer.values.mul_(randn(*layer.values.shape, seed=5))
        layer.values[0, 0] = float("nan")
        layer.values[1, 0] = float("inf")
        layer.values[5, 3] = float("-inf")
        layer.values[6, 2] = 0.0
    check_col_index(layer, device)


# ---------------------------------------------------------------- refusals


X, A, B = torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(2, 8)  # C, A, B of rank 2
IDX = torch.zeros(4, 1, dtype=torch.uint8)  # 2:4 index of a (4, 8) weight: 4 offsets, 1 byte
BAD_CALLS = {
    "lowrank-chain": (lambda: fused_lowrank_add(X, A, B[:, :4]), "do not chain"),
    "lowrank-1d": (lambda: fused_lowrank_add(X, A[:, 0], B), "2-D"),
    "lowrank-mixed-dtype": (lambda: fused_lowrank_add(X, A.half(), B), "cast"),
    "lowrank-fp64": (lambda: fused_lowrank_add(X.double(), A.double(), B.double()), "float64"),
    "lowrank-bias": (lambda: fused_lowrank_add(X, A, B, bias=torch.zeros(7)), r"\(8,\)"),
    "bias-shape": (lambda: bias_add(X, torch.zeros(7)), r"bias \(7,\)"),
    "bias-int": (lambda: bias_add(X.int(), torch.zeros(8)), "int32"),
    "bias-strided": (lambda: bias_add(torch.zeros(8, 4).t(), torch.zeros(8)), "contiguous"),
    "gather-width": (lambda: gather_packed_grad(X, IDX.expand(4, 3)), r"\(4, 1\)"),
    "gather-dtype": (lambda: gather_packed_grad(X, IDX.int()), "uint8"),
    "gather-cols": (lambda: gather_packed_grad(torch.zeros(4, 6), IDX), "cols=6"),
    "gather-pattern": (lambda: gather_packed_grad(X, IDX, 4, 4), "4:4"),
    "derive-values": (lambda: derive_transpose_index(X, IDX, 2, 4, 4, 8), r"\(4, 4\)"),
    "derive-fp64": (lambda: derive_transpose_index(X[:, :4].double(), IDX, 2, 4, 4, 8), "float64"),
    "derive-m": (lambda: derive_transpose_index(X, IDX, 2, 32, 32, 32), "m=32"),
    "derive-sizes": (lambda: derive_transpose_index(X[:, :4], IDX, 2, 4, 6, 8), "d_out=6"),
    "derive-index": (lambda: derive_transpose_index(X[:, :4], IDX.t(), 2, 4, 4, 8), "row_index"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs_are_refused_with_the_sizes(case):
    call, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not INTERPRET, reason="needs CPU tensors that are otherwise launchable")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(kernel_runtime, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*bias_add_reference"):
        bias_add(torch.zeros(2, 8), torch.zeros(8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device next to the CPU")
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        bias_add(torch.zeros(2, 8, device="cuda"), torch.zeros(8))


def test_package_imports_without_triton_and_points_to_the_references(monkeypatch):
    for name in [k for k in sys.modules if k == "slope_kernels" or k.startswith("slope_kernels.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    fresh = importlib.import_module("slope_kernels")
    assert not fresh.TRITON_AVAILABLE
    y, bias = torch.ones(2, 8), torch.ones(8)
    assert torch.equal(fresh.bias_add_reference(y, bias), y + 1)
    with pytest.raises(RuntimeError, match="needs triton.*bias_add_reference"):
        fresh.bias_add(y, bias)


COMPILE_SCRIPT = """
import importlib
import triton
from triton.backends.compiler import GPUTarget

def compile_for(module, kernel, pointers, constexprs, arch):
    fn = getattr(importlib.import_module("slope_kernels." + module), kernel)
    signature = {a: pointers.get(a, "i32") for a in fn.arg_names}
    signature |= {a: "constexpr" for a in constexprs}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32))

io = ("c_ptr", "a_ptr", "b_ptr", "bias_ptr", "out_ptr")
for dtype, fp32 in (("fp32", True), ("bf16", False)):
    ptrs = {name: "*" + dtype for name in io} | {"scale": "fp32"}
    tiles = dict(HAS_BIAS=True, DOT_FP32=fp32, BLOCK_T=64, BLOCK_N=64, BLOCK_R=16)
    compile_for("fused_lowrank", "fused_lowrank_kernel", ptrs, tiles, 90)
ptrs = {"y_ptr": "*bf16", "bias_ptr": "*fp32", "out_ptr": "*bf16"}
compile_for("bias", "bias_add_kernel", ptrs, dict(BLOCK_T=16, BLOCK_N=128), 90)
ptrs = {"grad_ptr": "*bf16", "index_ptr": "*u8", "out_ptr": "*bf16"}
for n, m, bits in ((2, 4, 2), (3, 8, 4)):
    tiles = dict(N=n, M=m, BITS=bits, BLOCK_R=16, BLOCK_K=128)
    compile_for("gather_grad", "gather_packed_grad_kernel", ptrs, tiles, 90)
ptrs = {"values_ptr": "*bf16", "index_ptr": "*u8", "out_ptr": "*u8"}
span = importlib.import_module("slope_kernels.transpose_mask")._span
for n, m, bits, block in ((2, 4, 2, 128), (3, 8, 4, 32)):
    tiles = dict(N=n, M=m, BITS=bits, M_PAD=m, SPAN=span(n, 8 // bits), BLOCK_C=block)
    for arch in (80, 90):
        compile_for("transpose_mask", "derive_transpose_index_kernel", ptrs, tiles, arch)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper_without_a_gpu(tmp_path):
    """The interpreter accepts code the compiler may not; compile each kernel to a cubin
    (Triton's frontend and its bundled ptxas need no GPU), in a process without the
    interpreter switch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
