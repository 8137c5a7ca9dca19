"""GPU backend logic (padding, tiling, operand caching, dispatch, auto-tuning), proved on CPU
through the emulated 2:4 ops; the real kernels are checked in the `gpu` group."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slope_lightning import add_adapters, merge_for_inference, sparsify
from slope_lightning.sparse import (
    SparseLinear,
    backend_report,
    follow_optimizer,
    sparse_layers,
    use_decision_store,
)
from slope_lightning.sparse.backends import (
    AutoBackend,
    BackendName,
    Decision,
    DecisionStore,
    ReferenceBackend,
    SemiStructuredBackend,
    make_backend,
    resolve_backend,
    row_tiles,
)
from slope_lightning.sparse.backends.ops import (
    ALGORITHM_IDS,
    DEFAULT_ALGORITHM,
    AlgorithmChoice,
    CuSparseLtOps,
    CutlassOps,
    EmulatedOps,
    sparse_mm_arguments,
)


def emulated(tiled: bool = False) -> SemiStructuredBackend:
    return SemiStructuredBackend(EmulatedOps(), tiled=tiled)


def twin_layers(d_in, d_out, backend, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out, dtype=torch.float64)
    return SparseLinear.from_linear(dense), SparseLinear.from_linear(dense, backend=backend)


@pytest.mark.parametrize("tokens", [13, 16, 1])
@pytest.mark.parametrize(
    ("d_in", "d_out", "tiles"),
    [(32, 32, False), (16, 64, True), (64, 16, True)],
)
def test_sparse_gemm_backend_matches_reference(tokens, d_in, d_out, tiles):
    reference, layer = twin_layers(d_in, d_out, emulated(tiled=tiles))
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(tokens, d_out, dtype=torch.float64)
    layer(x).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.values.grad, reference.values.grad)
    torch.testing.assert_close(layer(x), reference(x_ref))


def test_tiles_are_square_row_blocks():
    assert row_tiles(64, 16, tile=True) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert row_tiles(40, 16, tile=True) == [(0, 16), (16, 32), (32, 40)]
    assert row_tiles(16, 64, tile=True) == [(0, 16)]
    assert row_tiles(64, 16, tile=False) == [(0, 64)]
    backend = emulated(tiled=True)
    _, layer = twin_layers(16, 64, backend)
    layer(torch.randn(8, 16, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert backend.ops.compressed_shapes == [(16, 16)] * 4 + [(16, 64)]  # W_R tiled, W_RCᵀ not


def test_training_keeps_no_kernel_operand_between_steps():
    backend = emulated()
    _, layer = twin_layers(32, 32, backend)
    layer.transpose_mask_interval = None
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    for step in range(3):
        layer(x).sum().backward()
        assert len(backend.ops.compressed_shapes) == 2 * (step + 1)  # W_R, then W_RCᵀ
        assert layer.cached_tensors() == []  # nothing held next to the values


def test_inference_operands_are_reused_until_the_weight_or_mask_changes():
    backend = emulated()
    _, layer = twin_layers(32, 32, backend)
    layer.transpose_mask_interval = None
    x = torch.randn(8, 32, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert layer._operands.builds == 1 and len(layer.cached_tensors()) == 2  # values, index
    with torch.no_grad():
        layer.values.mul_(2)  # an in-place update moves the version
        layer(x)
    assert layer._operands.builds == 2
    layer(x.requires_grad_()).sum().backward()  # a training forward drops the copies
    assert layer.cached_tensors() == []


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False),
        lambda p: torch.optim.SGD(p, lr=0.1),
    ],
    ids=["adamw-fused", "adamw-foreach", "adamw-loop", "sgd"],
)
@pytest.mark.parametrize("backend", ["reference", "emulated", "emulated_tiled"])
def test_after_an_optimizer_step_inference_equals_a_freshly_built_layer(make_optimizer, backend):
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(32, 64), backend=backend)
    x = torch.randn(8, 32)
    optimizer = make_optimizer(layer.parameters())
    with torch.no_grad():
        layer(x)  # evaluation before the step fills the inference cache
    layer(x).pow(2).sum().backward()
    optimizer.step()
    fresh = SparseLinear(32, 64, backend="reference")
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(x))


def test_a_hand_written_update_to_and_load_state_dict_invalidate_the_inference_cache():
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(32, 32), backend="emulated")
    other = SparseLinear.from_linear(nn.Linear(32, 32), backend="emulated")
    x = torch.randn(8, 32)
    with torch.no_grad():
        layer(x)
        for param in layer.parameters():
            param.data.add_(1.0)  # .data: no version bump, but a new key is not needed...
        layer.values.add_(0.0)  # ...once any in-place op on the Parameter moves it
        expected = nn.functional.linear(x, layer.to_dense(), layer.bias)
        torch.testing.assert_close(layer(x), expected)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x))
        moved = layer.to(torch.float64)
        torch.testing.assert_close(moved(x.double()), other(x).double())


def test_merged_inference_pads_adapter_rows_for_the_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48, dtype=torch.float64))
    sparsify(model, backend=emulated())
    add_adapters(model, rank=3)
    with torch.no_grad():
        model[0].adapter.up.normal_()
        x = torch.randn(5, 32, dtype=torch.float64)
        unmerged = model(x)
        merge_for_inference(model)
        torch.testing.assert_close(model(x), unmerged)
    fused = model[0]._fused
    assert fused.values.shape[0] % 32 == 0 and fused.up.shape[0] == fused.values.shape[0] - 48


def test_tiled_merged_inference_keeps_the_adapter_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96, dtype=torch.float64))  # tall: 3 square row tiles
    ops = EmulatedOps()
    sparsify(model, backend=SemiStructuredBackend(ops, tiled=True))
    add_adapters(model, rank=5)
    with torch.no_grad():
        model[0].adapter.up.normal_()
        x = torch.randn(6, 32, dtype=torch.float64)
        unmerged = model(x)
        merge_for_inference(model)
        torch.testing.assert_close(model(x), unmerged)
    # [W_R; Lᵀ; zero padding] = 96 + 5 + 27 rows, compressed as four 32-row tiles
    assert ops.compressed_shapes[-4:] == [(32, 32)] * 4


@pytest.mark.parametrize(
    ("kwargs", "dtype", "match"),
    [
        ({"n": 1, "m": 4}, torch.float64, "runs 2:4 only, not 1:4"),
        ({"d_out": 48, "d_in": 20}, torch.float64, "multiple of 16"),
        ({"d_out": 40}, torch.float64, "multiple of 16"),
    ],
)
def test_an_explicit_backend_that_cannot_run_a_layer_names_it(kwargs, dtype, match):
    d_out, d_in = kwargs.pop("d_out", 32), kwargs.pop("d_in", 32)
    layer = SparseLinear(
        d_in, d_out, backend=emulated(), name="blocks.0.mlp.up_proj", dtype=dtype, **kwargs
    )
    with pytest.raises(RuntimeError, match=f"blocks.0.mlp.up_proj.*{match}"):
        layer(torch.randn(4, d_in, dtype=dtype))


def fixed_timer(timings, log=None):
    """A timer that reports ``timings[backend name]`` instead of measuring."""

    def timer(fn, device):
        backend = fn.__closure__ and next(
            c.cell_contents for c in fn.__closure__ if hasattr(c.cell_contents, "unsupported")
        )
        if log is not None:
            log.append(backend.name)
        value = timings[backend.name]
        return value() if callable(value) else value

    return timer


def test_auto_keeps_the_fastest_candidate_and_remembers_it_in_its_store(tmp_path):
    store_file = tmp_path / "autotune.json"
    fast, slow = emulated(), emulated(tiled=True)
    timings = {"emulated": 1.0, "emulated_tiled": 2.0, "reference": 3.0}
    auto = AutoBackend([fast, slow], DecisionStore(store_file), timer=fixed_timer(timings))
    _, layer = twin_layers(32, 64, auto)
    layer(torch.randn(8, 32, dtype=torch.float64))
    assert auto.choice.name == "emulated" and auto.choice.ops is fast.ops
    assert "measured" in auto.reason
    assert "emulated" in store_file.read_text()

    def no_timing(fn, device):
        raise AssertionError("a stored choice must not be re-measured")

    again = AutoBackend([emulated(), emulated(tiled=True)], DecisionStore(store_file), no_timing)
    _, layer = twin_layers(32, 64, again)
    layer(torch.randn(8, 32, dtype=torch.float64))
    assert again.choice.name == "emulated" and "stored" in again.reason


def test_auto_keeps_its_decisions_in_memory_unless_given_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    auto = make_backend("auto")
    assert auto.store.path is None
    model = nn.Sequential(nn.Linear(32, 32))
    sparsify(model, backend="emulated")
    store = use_decision_store(model, tmp_path / "run" / "autotune.json")
    assert store.path == tmp_path / "run" / "autotune.json"
    assert not (tmp_path / ".cache").exists()


def test_a_corrupt_decision_file_is_remeasured_not_trusted(tmp_path, caplog):
    store_file = tmp_path / "autotune.json"
    store_file.write_text("{not json")
    store = DecisionStore(store_file)
    assert store.get("anything") is None
    assert "ignoring unreadable" in caplog.text
    store.put("k", "reference")
    assert json.loads(store_file.read_text()) == {"k": "reference"}


def test_measuring_draws_nothing_from_the_global_random_generator():
    auto = AutoBackend([emulated()], timer=lambda fn, device: (fn(), 1.0)[1])
    _, layer = twin_layers(32, 32, auto)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    layer(torch.randn(8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(torch.rand(3), expected)


def test_auto_times_training_operands_with_their_per_step_rebuild():
    ops = EmulatedOps()
    pick = fixed_timer({"emulated": 1.0, "reference": 2.0})

    def timer(fn, device):
        fn()
        fn()
        return pick(fn, device)

    auto = AutoBackend([SemiStructuredBackend(ops)], timer=timer)
    _, layer = twin_layers(32, 32, auto)
    layer(torch.randn(8, 32, dtype=torch.float64, requires_grad=True)).sum().backward()
    # two timed calls, each compressing W_R and W_RCᵀ anew; then the real step's two
    assert auto.choice.name == "emulated"
    assert len(ops.compressed_shapes) == 2 * 2 + 2


def test_auto_decides_again_for_another_token_bucket_or_operand_shape(tmp_path):
    measured = []

    def fake_timer(fn, device):
        cells = [c.cell_contents for c in fn.__closure__]
        backend = next(c for c in cells if hasattr(c, "unsupported"))
        x = next(
            c for c in cells if isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[1] == 32
        )
        measured.append((x.shape[0], backend.name))
        tokens = x.shape[0]  # sparse wins on big batches, dense when decoding
        return {"emulated": 1.0 if tokens > 8 else 3.0, "reference": 2.0}[backend.name]

    auto = AutoBackend([emulated()], DecisionStore(tmp_path / "a.json"), timer=fake_timer)
    reference, layer = twin_layers(32, 64, auto)
    for tokens in (64, 40, 1, 2):  # buckets 64, 64, 1, 2
        x = torch.randn(tokens, 32, dtype=torch.float64, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(layer(x), reference(x))
    picked = {key.bucket: backend.name for key, backend in auto.choices.items()}
    assert picked == {64: "emulated", 1: "reference", 2: "reference"}
    assert {key.phase for key in auto.choices} == {"training"}  # the no-grad calls came after
    assert len(measured) == 6  # two candidates for each of three buckets
    with torch.no_grad():
        add_adapters(nn.Sequential(layer), rank=4)
        merge_for_inference(nn.Sequential(layer))
        layer(torch.randn(64, 32, dtype=torch.float64))
    # [W_R; Lᵀ; padding]: its own decision
    assert Decision(96, 32, torch.float64, 64, "inference") in auto.choices
    assert "T<=64|training" in (tmp_path / "a.json").read_text()
    assert "64x32 T<=1 training: reference" in backend_report(nn.Sequential(layer))
    layer.unmerge()
    layer(torch.randn(64, 32, dtype=torch.float64)).sum().backward()  # training again
    assert auto.choice is auto.choices[Decision(64, 32, torch.float64, 64, "training")]
    assert auto.running is auto.choice
    assert "auto -> emulated" in backend_report(nn.Sequential(layer))


def test_auto_falls_back_to_the_dense_gemm_with_the_reason():
    auto = AutoBackend([emulated()])
    layer = SparseLinear(32, 32, n=1, m=4, backend=auto)  # 1:4: no 2:4 kernel applies
    layer(torch.randn(4, 32))
    assert isinstance(auto.choice, ReferenceBackend)
    assert "runs 2:4 only" in auto.reason


class FailingBackend(SemiStructuredBackend):
    """A candidate that supports every layer on paper and fails when it runs, as cuSPARSELt
    does for some shapes on some GPUs."""

    def __init__(self) -> None:
        super().__init__(EmulatedOps())
        self.name = "failing"

    def forward(self, x, weight, bias, cache):
        raise RuntimeError(
            "cuSPARSELt: CUSPARSE_STATUS_NOT_SUPPORTED (operation not supported)\nmore"
        )


def test_auto_skips_a_candidate_that_fails_and_records_why():
    auto = AutoBackend([FailingBackend()])
    reference, layer = twin_layers(32, 32, auto)
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).sum().backward()
    reference(x_ref).sum().backward()
    assert auto.choice.name == "reference"
    assert "failing failed: RuntimeError: cuSPARSELt: CUSPARSE_STATUS_NOT_SUPPORTED" in auto.reason
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.no_grad():  # and for inference, its own decision, the same fallback
        torch.testing.assert_close(layer(x), reference(x))
    assert {key.phase: chosen.name for key, chosen in auto.choices.items()} == {
        "training": "reference",
        "inference": "reference",
    }


def test_a_first_no_grad_forward_does_not_decide_for_training():
    """bench/layers times the inference forward first: the training step must still be
    decided with its per-step rebuild (compress W_R and W_RCᵀ, every call)."""
    ops = EmulatedOps()
    timed: list[tuple[str, int]] = []

    def timer(fn, device):
        before = len(ops.compressed_shapes)
        fn()
        name = next(
            c.cell_contents.name for c in fn.__closure__ if hasattr(c.cell_contents, "unsupported")
        )
        timed.append((name, len(ops.compressed_shapes) - before))
        return 1.0 if name == "emulated" else 2.0

    auto = AutoBackend([SemiStructuredBackend(ops)], timer=timer)
    _, layer = twin_layers(32, 32, auto)
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        layer(x)
    assert [key.phase for key in auto.choices] == ["inference"]
    assert dict(timed) == {"emulated": 1, "reference": 0}  # W_R only, cached between calls
    layer(x).sum().backward()
    assert [key.phase for key in auto.choices] == ["inference", "training"]
    assert dict(timed[2:]) == {"emulated": 2, "reference": 0}  # W_R and W_RCᵀ, rebuilt


def test_auto_measures_for_real_on_cpu_and_reports_its_choice():
    auto = AutoBackend([emulated()])
    reference, layer = twin_layers(32, 32, auto)
    model = nn.Sequential(layer)
    assert "auto -> ? (not chosen yet" in backend_report(model)
    x = torch.randn(8, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x))
    assert auto.choice is not None and "ms" in auto.reason
    assert f"auto -> {auto.choice.name} (measured" in backend_report(model)


def test_each_kernel_library_names_the_gpus_it_cannot_run_on(monkeypatch):
    assert CutlassOps().unsupported_gpu((8, 0)) is None
    assert CutlassOps().unsupported_gpu((8, 9)) is None
    assert "sm80-sm89 only, this GPU is sm90" in CutlassOps().unsupported_gpu((9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert CuSparseLtOps().unsupported_gpu((9, 0)) is None
    assert "sm80+" in CuSparseLtOps().unsupported_gpu((7, 5))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert "no cuSPARSELt" in CuSparseLtOps().unsupported_gpu((9, 0))


def bind_to_schema(schema, args, kwargs):
    """The arguments of a call by name, as torch binds them against ``schema``; a TypeError
    for a keyword the operator does not have or a missing positional argument."""
    names = [argument.name for argument in schema.arguments]
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"{schema.name} has no argument(s) {sorted(unknown)}")
    bound = dict(zip(names, args, strict=False))
    if set(bound) & set(kwargs):
        raise TypeError(f"{schema.name}: {sorted(set(bound) & set(kwargs))} given twice")
    bound |= kwargs
    required = [a.name for a in schema.arguments if not a.has_default_value()]
    if missing := [name for name in required if name not in bound]:
        raise TypeError(f"{schema.name}: missing {missing}")
    return bound


class FakeCuSparseLt:
    """Stands in for torch's cuSPARSELt entry points on CPU: ``mm_search`` with the binding's
    positional signature, ``_cslt_sparse_mm`` checked against the installed schema."""

    def __init__(self, found=(3, 2, 1, 7)):
        self.found = found
        self.searches: list[tuple[int, ...]] = []
        self.calls: list[dict] = []

    def mm_search(self, *args):
        assert len(args) == 6, "mm_search takes (A, B, bias, alpha, out_dtype, transpose_result)"
        _packed, dense, bias, alpha, out_dtype, transpose_result = args
        assert transpose_result is True and bias is None and alpha is None and out_dtype is None
        assert not dense.is_contiguous()  # x.t(): column-major (k, T)
        self.searches.append(tuple(dense.shape))
        return self.found

    def sparse_mm(self, *args, **kwargs):
        bound = bind_to_schema(torch.ops.aten._cslt_sparse_mm.default._schema, args, kwargs)
        self.calls.append({k: v for k, v in bound.items() if not isinstance(v, torch.Tensor)})
        return (bound["compressed_A"] @ bound["dense_B"]).t().contiguous()  # (T, rows)


@pytest.fixture
def fake_cusparselt(monkeypatch):
    fake = FakeCuSparseLt()
    monkeypatch.setattr(ALGORITHM_IDS, "choices", {})
    monkeypatch.setattr(torch._C, "_cusparselt", fake, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.sparse_mm)
    return fake


def test_cusparselt_searches_once_per_shape_and_token_bucket_for_all_layers(fake_cusparselt):
    weight = torch.randn(32, 16)
    for tokens in (8, 8, 6, 1504, 2000, 2048):  # two layers of one shape share each search
        x = torch.randn(tokens, 16)
        torch.testing.assert_close(CuSparseLtOps().matmul(weight, x, 32), x @ weight.t())
    # buckets 8, 8, 8, 2048, 2048, 2048: a new prompt length does not search again
    assert fake_cusparselt.searches == [(16, 8), (16, 1504)]
    assert ALGORITHM_IDS.searches == 2


def test_cusparselt_runs_the_searched_algorithm_with_its_split_k_settings(fake_cusparselt):
    """torch._C._cusparselt.mm_search, not the deprecated torch._cslt_sparse_mm_search: its
    split-k findings reach the GEMM, through keywords the installed schema has."""
    CuSparseLtOps().matmul(torch.randn(32, 16), torch.randn(8, 16), 32, bias=torch.randn(32))
    call = fake_cusparselt.calls[-1]
    assert (call["alg_id"], call["split_k"], call["split_k_mode"]) == (3, 2, 1)
    assert call["transpose_result"] is True


def test_the_sparse_mm_keywords_exist_in_torchs_schema():
    schema = torch.ops.aten._cslt_sparse_mm.default._schema
    names = {argument.name for argument in schema.arguments}
    choice = AlgorithmChoice(alg_id=5, split_k=4, split_k_mode=0)
    arguments = sparse_mm_arguments(choice)
    assert set(arguments) <= names and arguments["alg_id"] == 5
    assert {"bias", "transpose_result"} <= names
    if {"split_k", "split_k_mode"} <= names:  # torch 2.11 and 2.13 have them
        assert (arguments["split_k"], arguments["split_k_mode"]) == (4, 0)


def test_without_mm_search_the_old_search_gives_the_algorithm_alone(monkeypatch, fake_cusparselt):
    monkeypatch.setattr(torch._C, "_cusparselt", object())  # no mm_search attribute
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda p, d, transpose_result: 6)
    CuSparseLtOps().matmul(torch.randn(32, 16), torch.randn(8, 16), 32)
    assert fake_cusparselt.calls[-1]["alg_id"] == 6
    assert fake_cusparselt.calls[-1].get("split_k", 1) == 1


def test_a_failing_search_or_searched_algorithm_falls_back_to_the_default(
    monkeypatch, fake_cusparselt
):
    def failing_search(*args):
        raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(fake_cusparselt, "mm_search", failing_search)
    CuSparseLtOps().matmul(torch.randn(32, 16), torch.randn(16, 16), 32)
    assert fake_cusparselt.calls[-1]["alg_id"] == 0  # cuSPARSELt's default algorithm

    fake = FakeCuSparseLt(found=(9, 1, -1, 9))
    real_sparse_mm = fake.sparse_mm

    def refuses_algorithm_9(*args, **kwargs):
        if kwargs.get("alg_id") == 9 and args[1].shape[1] > 8:  # only at 16 tokens
            raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")
        return real_sparse_mm(*args, **kwargs)

    monkeypatch.setattr(torch._C, "_cusparselt", fake)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", refuses_algorithm_9)
    weight = torch.randn(32, 32)
    CuSparseLtOps().matmul(weight, torch.randn(8, 32), 32)  # searched at 8 tokens: bucket 8
    x = torch.randn(16, 32)  # bucket 16: searched again (9), which fails here: default
    torch.testing.assert_close(CuSparseLtOps().matmul(weight, x, 32), x @ weight.t())
    assert [call["alg_id"] for call in fake.calls] == [9, 0]
    assert ALGORITHM_IDS.choices[ALGORITHM_IDS.key(x, 32)] == DEFAULT_ALGORITHM


def test_backend_names_are_one_enum_that_parses_values_and_old_spellings():
    assert BackendName.parse("cusparselt_tiled") is BackendName.cusparselt_tiled
    assert BackendName.parse("cusparselt+tiled") is BackendName.cusparselt_tiled  # old spelling
    assert all(member.name == member.value for member in BackendName)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose one of reference"):
        make_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        sparsify(nn.Sequential(nn.Linear(8, 8)), backend="tensorrt")


def test_tiled_backends_can_be_asked_for_by_name():
    backend = make_backend("cusparselt_tiled")
    assert backend.name == "cusparselt_tiled" and backend.tiled
    assert not make_backend("cutlass").tiled
    assert make_backend("emulated").name == "emulated"


def test_gpu_backends_by_name_need_cuda_but_emulated_runs_anywhere():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cusparselt' runs 2:4 sparse GEMMs on a CUDA GPU"):
            resolve_backend("cusparselt")
    reference, layer = twin_layers(32, 32, "emulated")
    x = torch.randn(8, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x))
    assert layer.backend.row_multiple == 32 and reference.backend.row_multiple == 1


def test_a_backend_subclass_that_skips_the_base_init_still_works():
    class Mine(ReferenceBackend):
        def __init__(self) -> None:  # no super().__init__()
            self.calls = 0

    layer = SparseLinear(32, 16, backend=Mine())
    layer(torch.randn(4, 32)).sum().backward()
    assert layer.values.grad is not None


def test_sparsify_shares_a_backend_instance():
    backend = emulated()
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    report = sparsify(model, backend=backend)
    assert report.backend == "emulated"
    assert all(layer.backend is backend for _, layer in sparse_layers(model))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["cusparselt", "cutlass", "auto"])
@pytest.mark.parametrize(
    ("d_in", "d_out", "tokens"), [(256, 256, 100), (256, 1024, 64), (1024, 256, 8)]
)
def test_gpu_backends_match_reference_in_bf16(name, d_in, d_out, tokens, tmp_path, monkeypatch):
    if name == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels run on sm8x only")
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out, device="cuda", dtype=torch.bfloat16)
    reference = SparseLinear.from_linear(dense)
    layer = SparseLinear.from_linear(dense, backend=name)
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
    layer(x).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(layer(x), reference(x_ref), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=3e-2, rtol=3e-2)


def test_the_sparsify_report_of_auto_points_to_the_choices_made_later():
    from slope_lightning.sparse import SparsifyReport

    assert "backend_report(model)" in str(SparsifyReport(n=2, m=4, backend="auto"))
    assert "backend_report" not in str(SparsifyReport(n=2, m=4, backend="reference"))


def col_index_trajectory(backend: str, make_optimizer, follow: bool, steps: int = 4):
    """M_C after each of ``steps`` optimizer steps of a layer refreshing it every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64))
    sparsify(model, backend=backend)
    optimizer = make_optimizer(model.parameters())
    if follow:
        follow_optimizer(model, optimizer)
    x = torch.randn(16, 32)
    masks = []
    for _ in range(steps):
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model(x)  # the next training forward refreshes M_C
        masks.append(model[0].col_index.clone())
    return masks


@pytest.mark.parametrize("backend", ["reference", "emulated"])
def test_with_follow_optimizer_a_fused_optimizer_refreshes_mc_like_a_plain_one(backend):
    def plain(params):
        return torch.optim.AdamW(params, lr=0.5, foreach=False)

    def fused(params):
        return torch.optim.AdamW(params, lr=0.5, fused=True)

    expected = col_index_trajectory(backend, plain, follow=False)
    assert not torch.equal(expected[0], expected[-1]), "the test needs M_C to move"
    for got, want in zip(col_index_trajectory(backend, fused, follow=True), expected, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(col_index_trajectory(backend, plain, follow=True), expected, strict=True):
        assert torch.equal(got, want)  # never counted twice


def test_the_refresh_counter_survives_a_checkpoint_under_follow_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    sparsify(model, transpose_mask_interval=3)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    follow_optimizer(model, optimizer)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    state = model.state_dict()
    assert state["0._extra_state"].tolist() == [1, 2, 4]  # (updates since refresh, N, M)


@pytest.mark.parametrize("fuses_bias", [True, False])
def test_the_bias_is_fused_into_the_gemm_where_the_ops_can_and_added_after_elsewhere(fuses_bias):
    ops = EmulatedOps(fuses_bias=fuses_bias)
    reference, layer = twin_layers(32, 64, SemiStructuredBackend(ops, tiled=True))
    with torch.no_grad():
        reference.bias.normal_()
        layer.bias.copy_(reference.bias)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x))  # tiles get their slice of the bias


def test_an_emulated_compressed_operand_costs_what_cusparselt_stores():
    layer = SparseLinear(256, 128, backend="emulated", dtype=torch.float16)
    with torch.no_grad():
        layer(torch.randn(8, 256, dtype=torch.float16))
    cached = sum(t.numel() * t.element_size() for t in layer.cached_tensors())
    dense_bytes = 128 * 256 * 2
    assert cached == dense_bytes // 2 + dense_bytes // 16  # values + 2-bit positions: 0.5625x
