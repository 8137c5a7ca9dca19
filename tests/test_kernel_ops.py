"""Where the Triton kernels plug into a SLoPe layer: each replaceable step gives the same
numbers as a kernel (run by Triton's CPU interpreter here) and as torch; ``auto`` keeps a
kernel only where it measured faster, and remembers the choice."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slope_kernels
from conftest import needs_triton_interpreter
from slope_lightning.sparse import KernelChoices, SparseLinear, backend_report
from slope_lightning.sparse.backends import (
    AutoBackend,
    DecisionStore,
    ReferenceBackend,
    SemiStructuredBackend,
)
from slope_lightning.sparse.backends import auto as auto_module
from slope_lightning.sparse.backends.ops import EmulatedOps
from slope_lightning.sparse.kernel_ops import add_bias, measure_kernels
from slope_lightning.sparse.layout import NMLayout
from test_gpu_backends import emulated

TRITON = KernelChoices.everywhere("triton")


def twins(backend_torch, backend_triton, d_in=64, d_out=48, bias=True, n=2, m=4):
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out, bias=bias)
    if bias:
        nn.init.normal_(dense.bias)
    plain = SparseLinear.from_linear(dense, n=n, m=m, backend=backend_torch)
    kernel = SparseLinear.from_linear(dense, n=n, m=m, backend=backend_triton)
    return plain, kernel


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)])
@needs_triton_interpreter
def test_a_layer_trains_identically_with_kernels_and_with_torch(n, m):
    plain, kernel = twins(ReferenceBackend(), ReferenceBackend(kernels=TRITON), n=n, m=m)
    assert torch.equal(kernel.col_index, plain.col_index)  # M_C derived by the kernel
    x = torch.randn(3, 5, 64)
    grad = torch.randn(3, 5, 48)
    plain(x).backward(grad)
    kernel(x).backward(grad)
    torch.testing.assert_close(kernel.values.grad, plain.values.grad, rtol=0, atol=0)
    torch.testing.assert_close(kernel.bias.grad, plain.bias.grad)
    with torch.no_grad():
        for layer in (plain, kernel):
            layer.values.mul_(-1.5)  # an "optimizer step" that reorders magnitudes
    plain.refresh_transpose_mask(with_stats=False)
    kernel.refresh_transpose_mask(with_stats=False)
    assert torch.equal(kernel.col_index, plain.col_index)


@pytest.mark.parametrize("rank", [0, 3, 20])
@needs_triton_interpreter
def test_merged_inference_is_the_same_with_the_fused_lowrank_kernel(rank):
    plain, kernel = twins(ReferenceBackend(), ReferenceBackend(kernels=TRITON))
    trained_up = torch.randn(rank, 48)  # a trained R, not the zero init
    for layer in (plain, kernel):
        if rank:
            layer.add_adapter(rank, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                layer.adapter.up.copy_(trained_up)
        layer.merge()
    x = torch.randn(7, 64)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_triton_interpreter
def test_the_sparse_gemm_bias_add_kernel_matches_torch():
    plain, kernel = twins(
        SemiStructuredBackend(EmulatedOps(fuses_bias=False)),
        SemiStructuredBackend(EmulatedOps(fuses_bias=False), kernels=TRITON),
    )
    x = torch.randn(13, 64)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), plain(x))


def test_kernel_choices_reject_unknown_implementations():
    with pytest.raises(ValueError, match="bias_add='cuda'.*torch, triton"):
        KernelChoices(bias_add="cuda")
    choices = KernelChoices(gather_grad="triton")
    assert (
        choices.describe() == "torch: lowrank_add, bias_add, transpose_index; triton: gather_grad"
    )


@needs_triton_interpreter
def test_measure_kernels_keeps_the_faster_implementation_per_step():
    layout = NMLayout(32, 64, 2, 4)
    # The timer sees torch then triton for each step, in the order lowrank_add, bias_add,
    # gather_grad, transpose_index: make triton win the 2nd and 4th steps only.
    fake_ms = iter([1.0, 2.0, 2.0, 1.0, 1.0, 3.0, 5.0, 4.0])
    choices, times = measure_kernels(
        layout, torch.float32, torch.device("cpu"), tokens=8, timer=lambda fn, dev: next(fake_ms)
    )
    assert choices == KernelChoices(bias_add="triton", transpose_index="triton")
    assert times["gather_grad"] == {"torch": 1.0, "triton": 3.0}


@needs_triton_interpreter
def test_a_kernel_that_fails_to_run_is_never_chosen(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(slope_kernels, "bias_add", broken)

    def timer(fn, device):
        fn()
        return 1.0

    choices, times = measure_kernels(NMLayout(32, 64, 2, 4), torch.float32, "cpu", 8, timer=timer)
    assert choices.bias_add == "torch" and times["bias_add"]["triton"] == float("inf")


@needs_triton_interpreter
def test_a_kernel_that_fails_to_compile_is_never_chosen(monkeypatch):
    class CompilationError(Exception):  # like triton's: not a RuntimeError
        pass

    def broken(*args, **kwargs):
        raise CompilationError("unsupported on this GPU")

    monkeypatch.setattr(slope_kernels, "fused_lowrank_add", broken)

    def timer(fn, device):
        fn()
        return 1.0

    choices, times = measure_kernels(NMLayout(32, 64, 2, 4), torch.float32, "cpu", 8, timer=timer)
    assert choices.lowrank_add == "torch" and times["lowrank_add"]["triton"] == float("inf")


@needs_triton_interpreter
def test_bias_add_on_a_transposed_gemm_output_uses_torch():
    # CUTLASS returns Y as a transposed view (stride(-1) = T), which the kernel refuses.
    y = torch.randn(48, 16).t()  # (16, 48), strides (1, 16)
    bias = torch.randn(48)
    torch.testing.assert_close(add_bias(y, bias, "triton"), y + bias)
    contiguous = y.contiguous()
    expected = contiguous + bias
    assert add_bias(contiguous, bias, "triton") is contiguous  # the kernel, in place
    torch.testing.assert_close(contiguous, expected)


def test_auto_uses_torch_compositions_on_cpu_and_says_why(tmp_path):
    auto = AutoBackend([emulated()])
    layer = SparseLinear(64, 32, backend=auto)
    layer(torch.randn(8, 64))
    assert auto.kernels == KernelChoices()
    assert "only timed on CUDA" in auto.kernel_reason
    assert "kernels torch: lowrank_add" in backend_report(nn.Sequential(layer))


@needs_triton_interpreter
def test_auto_measures_kernels_once_per_shape_and_caches_the_choice(tmp_path, monkeypatch):
    measured = []

    def fake_measure(layout, dtype, device, tokens):
        measured.append((layout.rows, layout.cols, tokens))
        return KernelChoices(gather_grad="triton"), {"gather_grad": {"torch": 2.0, "triton": 1.0}}

    monkeypatch.setattr(auto_module, "kernels_unavailable", lambda device: None)
    monkeypatch.setattr(auto_module, "measure_kernels", fake_measure)
    cache_file = tmp_path / "autotune.json"
    auto = AutoBackend([emulated()], DecisionStore(cache_file))
    layer = SparseLinear(64, 32, backend=auto, dtype=torch.float64)
    reference = SparseLinear(64, 32, dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(8, 64, dtype=torch.float64)
    layer(x).sum().backward()  # the gather of the values' gradient runs as a kernel
    reference(x).sum().backward()
    assert auto.kernels.gather_grad == "triton" and measured == [(32, 64, 8)]
    torch.testing.assert_close(layer.values.grad, reference.values.grad)
    assert "gather_grad torch 2.000 / triton 1.000 ms" in auto.kernel_reason
    assert "|kernels" in cache_file.read_text()

    again = AutoBackend([emulated()], DecisionStore(cache_file))
    SparseLinear(64, 32, backend=again, dtype=torch.float64)(x)
    assert again.kernels.gather_grad == "triton" and "stored" in again.kernel_reason
    assert len(measured) == 1

    # An entry written by another version (other steps) is measured again, not trusted.
    table = json.loads(cache_file.read_text())
    key = next(k for k in table if k.endswith("|kernels"))
    table[key] = {"old_step": "triton"}
    cache_file.write_text(json.dumps(table))
    third = AutoBackend([emulated()], DecisionStore(cache_file))
    SparseLinear(64, 32, backend=third, dtype=torch.float64)(x)
    assert len(measured) == 2 and "measured" in third.kernel_reason


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@needs_triton_interpreter
def test_measured_kernel_choices_on_a_gpu_keep_results_equal():
    layout = NMLayout(1024, 1024, 2, 4)
    _, times = measure_kernels(layout, torch.bfloat16, torch.device("cuda"), tokens=2048)
    assert set(times) == {"lowrank_add", "bias_add", "gather_grad", "transpose_index"}
    assert all(t["torch"] < float("inf") for t in times.values())
    torch.manual_seed(0)
    dense = nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16)
    plain = SparseLinear.from_linear(dense)
    kernel = SparseLinear.from_linear(dense, backend=ReferenceBackend(kernels=TRITON))
    assert torch.equal(plain.col_index, kernel.col_index)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    plain(x).float().sum().backward()
    kernel(x).float().sum().backward()
    torch.testing.assert_close(kernel.values.grad, plain.values.grad)
