"""FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes (gloo) trains like 1 process
with the same global batch, adapters switched on mid-run included; resumes exactly from its
sharded and its consolidated checkpoints (a module with its own SequentialLR and a declared
adapters group included); refreshes M_C from sharded values bit for bit; and
keeps compiled and activation-checkpointed training equal to eager.

The multi-process tests run tests/fsdp_train.py (Lightning re-launches it for rank 1) and
compare what each rank wrote. The in-process tests at the end check ``configure_model`` on a
single process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_helpers import write_corpus
from slope_lightning.data import TextDataModule
from slope_lightning.export import load_exported
from slope_lightning.module import OptimizerConfig, SLoPeModule
from slope_lightning.sparse import SparseLinear, sparse_layers
from slope_lightning.sparse.kernel_ops import derive_col_index
from slope_lightning.sparse.layout import NMLayout
from test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_train.py")
TIMEOUT_S = int(os.environ.get("SLOPE_DDP_TEST_TIMEOUT", "240"))
STEPS = [str(step) for step in range(8)]  # the worker trains 8 steps, adapters from step 4


def launch(command: list[str], what: str) -> str:
    """Run a worker command in a session of its own (rank 0 launches rank 1 as its child:
    a hang is ended for both), fail with its stderr if it fails, return its stderr."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["OMP_NUM_THREADS"] = "1"  # two ranks share two cores
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{what} hung for {TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert process.returncode == 0, f"{what} failed:\n{stderr[-4000:]}"
    return stderr


class Runs:
    """Trains with tests/fsdp_train.py on a shared corpus; reads back what the ranks wrote."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sources = write_corpus(root / "docs")
        self.cache = str(root / "cache")
        # Prepared once, so ranks never race on the tokenizer or token files.
        TextDataModule(
            sources=[self.sources], cache_dir=self.cache, vocab_size=300, seq_len=32
        ).prepare_data()

    def train(self, name: str, *args: str, devices: int = 2, batch_size: int = 0) -> Path:
        """Train with the worker; 8 sequences per optimizer step unless ``batch_size`` (per
        process and micro-batch) says otherwise."""
        out = self.root / name
        command = [sys.executable, str(WORKER), f"--devices={devices}", f"--out={out}"]
        command += [f"--sources={self.sources}", f"--cache={self.cache}"]
        command += [f"--batch-size={batch_size or 8 // devices}", *args]
        if devices == 1:
            command.append("--strategy=auto")
        launch(command, f"{name} ({devices} process(es))")
        return out

    @staticmethod
    def losses(out: Path, rank: int = 0) -> dict[str, float]:
        return json.loads((out / f"losses{rank}.json").read_text())

    @staticmethod
    def state(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
        return torch.load(out / f"state{rank}.pt")

    @staticmethod
    def memory(out: Path, rank: int = 0) -> dict[str, int]:
        return json.loads((out / f"memory{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def fsdp_run(runs: Runs) -> Path:
    """The uninterrupted 2-process FSDP2 run every other run is compared with."""
    return runs.train("fsdp")


@pytest.fixture(scope="module")
def single_run(runs: Runs) -> Path:
    """The same run on 1 process, with the same global batch (8 sequences per step)."""
    return runs.train("single", devices=1)


def mean_loss(out: Path, step: str) -> float:
    """The global batch's loss: each rank's is the mean over its half."""
    return (Runs.losses(out, 0)[step] + Runs.losses(out, 1)[step]) / 2


def assert_same_run(expected: Path, got: Path, steps: list[str]) -> None:
    """Bit-equal losses at ``steps`` and bit-equal final state (both ranks, all tensors)."""
    for rank in (0, 1):
        want, have = Runs.losses(expected, rank), Runs.losses(got, rank)
        assert {s: have[s] for s in steps} == {s: want[s] for s in steps}, f"rank {rank}"
    reference, state = Runs.state(expected), Runs.state(got)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------------------------
# Exactness: 2-process FSDP2 = 1 process with the same global batch
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process_with_the_same_global_batch(fsdp_run, single_run):
    expected = Runs.losses(single_run)
    assert sorted(expected, key=int) == sorted(Runs.losses(fsdp_run), key=int) == STEPS
    # Only float summation order differs (fp32): ~1e-7 relative; 1e-5 leaves room for 8 steps
    # of drift, before (steps 0-3) and after (4-7) the adapters switch on at step 4.
    for step, loss in expected.items():
        assert mean_loss(fsdp_run, step) == pytest.approx(loss, rel=1e-5), f"step {step}"

    reference = Runs.state(single_run)
    rank0, rank1 = Runs.state(fsdp_run, 0), Runs.state(fsdp_run, 1)
    assert rank0.keys() == reference.keys()
    assert any(".adapter.up" in key for key in rank0), "adapters were not switched on"
    for key, value in reference.items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ in {key}"
        if value.is_floating_point():
            torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:  # packed masks, refresh counters: exactly the single process's
            assert torch.equal(rank0[key], value), f"{key} differs from 1 process"


@pytest.mark.slow
def test_fsdp2_shards_values_masks_and_optimizer_state_per_rank(fsdp_run, single_run):
    whole, ranks = Runs.memory(single_run), [Runs.memory(fsdp_run, r) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # even shards: 64-wide layers split 32 + 32 rows
    per_rank = ranks[0]
    # Everything is halved, the adapters added mid-run included (r = 4: 2 rows of L's values
    # and of R per rank); only their packed index, a buffer, is held whole on every rank.
    adapters = Runs.state(fsdp_run)
    assert any(k.endswith("adapter.up") for k in adapters), "adapters were not switched on"
    adapter_index = sum(v.numel() for k, v in adapters.items() if k.endswith("adapter.down_index"))
    assert per_rank["sparse values"] == whole["sparse values"] // 2
    assert per_rank["metadata"] == (whole["metadata"] - adapter_index) // 2 + adapter_index
    assert per_rank["dense parameters"] == whole["dense parameters"] // 2
    assert per_rank["optimizer state"] < 0.6 * whole["optimizer state"]


@pytest.mark.slow
def test_fsdp2_exports_once_from_rank_0_consolidated(fsdp_run):
    state = Runs.state(fsdp_run)
    exported = load_exported(fsdp_run / "export")
    for key, value in exported.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
    assert any(isinstance(m, SparseLinear) and m.adapter is not None for m in exported.modules())
    assert sorted(p.name for p in (fsdp_run / "export").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",  # fit's export carries the run's tokenizer
    ]


@pytest.mark.slow
def test_fsdp2_without_mask_scheduler_refreshes_between_steps_like_one_process(runs):
    # No callbacks: each layer re-derives M_C every optimizer step by itself. One process does
    # it at the next forward; FSDP2 right after the step, in the optimizer's step hook, from
    # the sharded values (the forward's gathered copy is freed after it): the same W_R, so
    # every backward uses the same M_C, and the losses agree.
    single = runs.train("single-plain", "--adapter-start=-1", devices=1)
    sharded = runs.train("fsdp-plain", "--adapter-start=-1")
    for step, loss in Runs.losses(single).items():
        assert mean_loss(sharded, step) == pytest.approx(loss, rel=1e-5), f"step {step}"
    reference, state = Runs.state(single), Runs.state(sharded)
    for key, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)
        elif key.endswith("col_index"):
            # After the last step one process has a refresh pending: derive it here.
            prefix = key.removesuffix("col_index")
            values, rows = reference[f"{prefix}values"], reference[f"{prefix}row_index"]
            layout = NMLayout(values.shape[0], values.shape[1] * 2, 2, 4)
            assert torch.equal(value, derive_col_index(values, rows, layout, "torch")), key
        elif key.endswith("_extra_state"):  # (updates since the refresh, N, M)
            assert value.tolist() == [0, 2, 4] and reference[key].tolist() == [1, 2, 4], key
        else:
            assert torch.equal(value, reference[key]), key


@pytest.mark.slow
def test_fsdp2_bf16_mixed_matches_one_process_and_keeps_fp32_masters(runs):
    # Autocast under FSDP2: the values are gathered in fp32 and the GEMMs run in bf16, the
    # sharded masters, gradients and AdamW state stay fp32 (what the GPU configs run).
    single = runs.train("single-bf16", "--precision=bf16-mixed", devices=1)
    sharded = runs.train("fsdp-bf16", "--precision=bf16-mixed")
    for step, loss in Runs.losses(single).items():
        # bf16 GEMMs round differently when the batch is split: 1e-4 relative, not 1e-5.
        assert mean_loss(sharded, step) == pytest.approx(loss, rel=1e-4), f"step {step}"
    for key, value in Runs.state(sharded).items():
        assert not value.is_floating_point() or value.dtype == torch.float32, key


@pytest.mark.slow
def test_fsdp2_gradient_accumulation_matches_the_global_batch(runs, fsdp_run):
    # 2 processes x 2 sequences x 2 micro-batches = the same 8 sequences per optimizer step.
    accumulated = runs.train("fsdp-accumulate", "--accumulate=2", batch_size=2)
    reference = Runs.state(fsdp_run)
    for key, value in Runs.state(accumulated).items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)
        else:  # M_C refreshed once per optimizer step, not per micro-batch
            assert torch.equal(value, reference[key]), key


# --------------------------------------------------------------------------------------------
# Memory per rank (the benchmark's rows) and saved activations
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_benchmark_rows_per_rank_keep_the_sparse_layers_ratio():
    from slope_lightning.bench.sharded import fsdp_rows

    rows = fsdp_rows(("tiny",), world=2, n_layer=2, d_model=64, n_head=2, n_kv_head=1)
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        # Values and their packed masks shard alike: the sparse layers keep SLoPe's 0.516x
        # of dense on every rank (half, plus 2 + 2 bits per kept value), as unsharded.
        assert row["sparse_layers_ratio"] <= 0.60
        assert row["sparse_layers_ratio"] == pytest.approx(0.516, abs=0.01)
        assert row["ratio"] < 1.0


def test_activation_checkpointing_saves_fewer_activations():
    from slope_lightning.bench.sharded import checkpointing_rows

    rows = checkpointing_rows(
        ("tiny",), vocab_size=256, n_layer=2, d_model=64, n_head=2, n_kv_head=1
    )
    plain, checkpointed = rows
    assert checkpointed["method"] == "slope + activation checkpointing"
    assert checkpointed["saved_activations_MiB"] < 0.6 * plain["saved_activations_MiB"]
    assert checkpointed["state_MiB"] == plain["state_MiB"]


# --------------------------------------------------------------------------------------------
# Resume: sharded (distributed) and consolidated checkpoints, before and after the adapters
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("checkpoint", "stop_at"),
    [("sharded", 3), ("sharded", 6), ("full", 6), ("sharded-meta", 3)],
    ids=[
        "sharded-before-adapters",
        "sharded-after-adapters",
        "full-after-adapters",
        "meta-init-sharded-before-adapters",
    ],
)
def test_fsdp2_resume_continues_the_same_trajectory(runs, fsdp_run, checkpoint, stop_at):
    # meta-init: both runs built on the meta device and materialised after sharding (the
    # resumed one before the checkpoint replaces it all), equal to the ordinary build.
    name = f"{checkpoint}-{stop_at}"
    path = runs.root / f"{name}.ckpt"
    flags = ["--full-ckpt"] if checkpoint == "full" else []
    flags += ["--meta-init"] if checkpoint.endswith("meta") else []
    first = runs.train(f"{name}-first", f"--stop-at={stop_at}", f"--save-ckpt={path}", *flags)
    assert path.is_dir() == checkpoint.startswith("sharded")  # a folder of shards, or one file
    resumed = runs.train(f"{name}-resumed", f"--ckpt-path={path}", *flags)
    assert sorted(Runs.losses(first), key=int) == STEPS[:stop_at]
    assert sorted(Runs.losses(resumed), key=int) == STEPS[stop_at:]
    # Bit for bit: the resumed steps' losses and the final weights, adapters, masks and
    # refresh counters equal the uninterrupted run's.
    assert_same_run(fsdp_run, resumed, STEPS[stop_at:])


@pytest.fixture(scope="module")
def sequential_run(runs: Runs) -> Path:
    """The uninterrupted 2-process FSDP2 run of a module with its own optimizer: the adapters'
    group declared empty (adapter_param_group) and SequentialLR warmup then cosine."""
    return runs.train("sequential", "--scheduler=sequential")


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 6], ids=["before-adapters", "after-adapters"])
def test_fsdp2_resume_with_sequential_lr_and_a_declared_adapters_group(
    runs, sequential_run, stop_at
):
    # torch's distributed-checkpoint loader refuses an empty group against a checkpoint whose
    # adapters' group is filled: LazyLoRA keeps the declared group out while the checkpoint
    # loads, then loads it again into the whole structure. Both sides of the start, bit for bit.
    name = f"sequential-{stop_at}"
    path = runs.root / f"{name}.ckpt"
    runs.train(
        f"{name}-first", "--scheduler=sequential", f"--stop-at={stop_at}", f"--save-ckpt={path}"
    )
    resumed = runs.train(f"{name}-resumed", "--scheduler=sequential", f"--ckpt-path={path}")
    assert sorted(Runs.losses(resumed), key=int) == STEPS[stop_at:]
    assert any(".adapter.up" in key for key in Runs.state(resumed))
    assert_same_run(sequential_run, resumed, STEPS[stop_at:])


# --------------------------------------------------------------------------------------------
# M_C from sharded values
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transpose_mask_refreshed_from_sharded_values_equals_the_unsharded_one(tmp_path):
    # 3 processes: even and uneven row shards, an empty trailing rank, shards that fill whole
    # bytes of M_C (derived locally) and ones that do not (the values are gathered), with the
    # masks sharded with the values and replicated.
    out = tmp_path / "masks"
    command = [sys.executable, str(WORKER), f"--out={out}", "--check-masks=3"]
    launch([*command, f"--port={free_port()}"], "the mask check")
    for rank in range(3):
        results = json.loads((out / f"masks{rank}.json").read_text())
        assert len(results) == 14
        for result in results:
            assert result["col_index"] and result["row_index"], result
            assert result["stats"], result


# --------------------------------------------------------------------------------------------
# Activation checkpointing and torch.compile under FSDP2
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_with_activation_checkpointing_trains_bit_for_bit_like_without(runs, fsdp_run):
    # Non-reentrant recomputation runs the same kernels on the same inputs.
    assert_same_run(fsdp_run, runs.train("fsdp-ac", "--activation-checkpointing"), STEPS)


@pytest.mark.slow
def test_fsdp2_compiled_training_equals_eager(runs, fsdp_run):
    # aot_eager: Dynamo and AOTAutograd as in every backend, without inductor's code
    # generation (minutes on 2 CPU cores); the graph breaks are the same.
    compiled = runs.train("fsdp-compiled", "--compile=aot_eager")
    for step in STEPS:
        assert mean_loss(compiled, step) == pytest.approx(mean_loss(fsdp_run, step), rel=1e-5)
    expected = Runs.state(fsdp_run)
    for key, value in Runs.state(compiled).items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, expected[key]), key


# --------------------------------------------------------------------------------------------
# The shipped config
# --------------------------------------------------------------------------------------------


def test_tiny_fsdp_config_shards_over_two_cpu_processes():
    config = yaml.safe_load((ROOT / "configs" / "tiny-fsdp.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy["init_args"]["data_parallel_size"] == config["trainer"]["devices"] == 2
    assert strategy["init_args"]["tensor_parallel_size"] == 1
    assert config["trainer"]["accelerator"] == "cpu"
    # The same global batch as tiny.yaml, so the two runs compare step for step.
    assert 2 * config["data"]["batch_size"] == tiny["data"]["batch_size"]
    assert config["model"]["sparsity"] == tiny["model"]["sparsity"]


@pytest.mark.slow
def test_tiny_fsdp_config_runs_a_few_steps(runs, tmp_path):
    command = [sys.executable, "-m", "slope_lightning.cli", "fit"]
    command += ["--config", str(ROOT / "configs" / "tiny-fsdp.yaml")]
    command += [
        f"--data.sources=[{runs.sources}]",
        f"--data.cache_dir={runs.cache}",
        "--data.vocab_size=300",
        "--data.seq_len=32",
        "--data.batch_size=2",
        "--model.model_overrides={n_layer: 1, d_model: 64, n_head: 2, n_kv_head: 1}",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    launch(command, "slope-lightning fit --config configs/tiny-fsdp.yaml")
    run_dir = tmp_path / "runs" / "tiny-fsdp" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt" / ".metadata").is_file()  # sharded
    assert (run_dir / "export" / "model.safetensors").is_file()
    check_device_side_metrics(run_dir)
    # --ckpt_path last finds the sharded checkpoint (a directory) and resumes it in the same
    # run, through the real console entry point.
    resumed = launch(
        [*command, "--trainer.max_steps=6", "--ckpt_path=last"],
        "slope-lightning fit --config configs/tiny-fsdp.yaml --ckpt_path last",
    )
    expected = f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} (global step 4)"
    assert expected in resumed
    assert not (tmp_path / "runs" / "tiny-fsdp" / "version_1").exists()


def check_device_side_metrics(run_dir: Path) -> None:
    """Logging every step on two processes, the callbacks' device-side checks and statistics
    all ran: NonFiniteGuard's reduced reading, MaskScheduler's statistics of sharded layers,
    TokenThroughput's all-device rate (twice one device's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "sparsity/wrc_kept_fraction",
        "sparsity/mc_flipped",
        "train/device/items_per_sec",
        "train/items_per_sec",  # all devices: two processes
    ):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    kept = [e.value for e in events.Scalars("sparsity/wrc_kept_fraction")]
    assert kept and all(0.5 < value < 1.0 for value in kept)
    device = events.Scalars("train/device/items_per_sec")[-1].value
    total = events.Scalars("train/items_per_sec")[-1].value
    assert total == pytest.approx(2 * device)


# --------------------------------------------------------------------------------------------
# configure_model in one process
# --------------------------------------------------------------------------------------------


def small_module(**kwargs: Any) -> SLoPeModule:
    return SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides={"n_layer": 2, "d_model": 64, "n_head": 2, "n_kv_head": 1},
        optimizer=OptimizerConfig(lr=3e-3, warmup=2),
        **kwargs,
    )


def gradients(module: SLoPeModule, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    _, loss = module.model(idx, idx)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_names():
    torch.manual_seed(0)
    plain = small_module()
    torch.manual_seed(0)
    checkpointed = small_module(activation_checkpointing=True)
    checkpointed.configure_model()
    checkpointed.configure_model()  # idempotent: Lightning calls it at every fit/validate/test
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    for _, layer in sparse_layers(checkpointed):  # adapters inside recomputed blocks too
        layer.add_adapter(4, generator=torch.Generator().manual_seed(0))
    for _, layer in sparse_layers(plain):
        layer.add_adapter(4, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    expected, got = gradients(plain, idx), gradients(checkpointed, idx)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name  # recomputation runs the same kernels


def test_hold_masks_as_parameters_keeps_state_and_optimizer_groups():
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(torch.nn.Linear(64, 32))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.hold_masks_as_parameters()
    layer.hold_masks_as_parameters()  # idempotent
    assert layer.state_dict().keys() == before.keys()  # checkpoints load into either form
    assert {n for n, p in layer.named_parameters() if not p.requires_grad} == {
        "row_index",
        "col_index",
    }
    assert [n for n, _ in layer.named_buffers()] == []
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).sum().backward()
    with torch.no_grad():
        layer.values.add_(torch.randn(layer.values.shape))
    old = layer.col_index.clone()
    refresh = layer.refresh_transpose_mask()  # in place: the parameter object stays
    assert refresh is not None and refresh.flipped > 0
    assert not torch.equal(layer.col_index, old)
    reference = SparseLinear.from_linear(torch.nn.Linear(64, 32))
    reference.load_state_dict(layer.state_dict())  # a parameter form loads into a buffer form
    assert torch.equal(reference.col_index, layer.col_index)


@pytest.mark.slow
def test_compiled_model_logs_its_graph_breaks(caplog, tmp_path):
    import lightning.pytorch as pl

    module = small_module(compile=True, compile_backend="aot_eager")
    sources = write_corpus(tmp_path / "docs", documents=4)
    data = TextDataModule(
        sources=[sources], cache_dir=str(tmp_path / "cache"), vocab_size=300, seq_len=32
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="slope_lightning.module"):
        trainer.fit(module, datamodule=data)
    line = next(r.getMessage() for r in caplog.records if "torch.compile:" in r.getMessage())
    # A break per SparseLinear call site Dynamo compiles (q, k, v, o, gate, up, down; blocks
    # share code) and none elsewhere; the block loop leaves the top-level forward eager.
    assert "graph breaks at SparseLinear calls (14 sparse layers" in line
    assert int(line.split("torch.compile: ")[1].split(" ")[0]) >= 7
    assert " 0 elsewhere" in line


class FakeMesh:
    """What ``configure_model`` reads of ModelParallelStrategy's 2-D device mesh."""

    def __init__(self, data_parallel: int, tensor_parallel: int) -> None:
        self.sizes = {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel}
        self.mesh_dim_names = tuple(self.sizes)

    def __getitem__(self, name: str) -> FakeMesh:
        return FakeMesh(self.sizes[name], 1)  # a 1-D mesh of that dimension's size

    def size(self) -> int:
        return self.sizes["data_parallel"] * self.sizes["tensor_parallel"]


def test_configure_model_refuses_a_tensor_parallel_mesh_and_names_the_fix():
    module = small_module()
    module._device_mesh = FakeMesh(data_parallel=1, tensor_parallel=8)  # Lightning's default
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 1 and data_parallel_size: 8"):
        module.configure_model()


# --------------------------------------------------------------------------------------------
# Meta-device initialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_meta_init_trains_bit_for_bit_like_the_ordinary_build(runs, fsdp_run):
    # Built on the meta device, sharded, then each rank initialises its own rows: the same
    # parameters, masks and RNG stream as the ordinary build, so the same run bit for bit.
    assert_same_run(fsdp_run, runs.train("fsdp-meta", "--meta-init"), STEPS)


@pytest.mark.parametrize("preset", ["tiny", "gpt2-small"])
def test_meta_init_on_one_process_equals_the_ordinary_build(preset):
    overrides = {"n_layer": 2}
    torch.manual_seed(5)
    ordinary = SLoPeModule(preset=preset, model_overrides=overrides)
    after_ordinary = torch.random.get_rng_state()
    torch.manual_seed(5)
    meta = SLoPeModule(preset=preset, model_overrides=overrides, meta_init=True)
    assert torch.equal(torch.random.get_rng_state(), after_ordinary)  # the same stream after
    assert all(p.is_meta for p in meta.model.parameters())
    meta.configure_model()
    assert not any(t.is_meta for t in [*meta.model.parameters(), *meta.model.buffers()])
    expected, got = ordinary.model.state_dict(), meta.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for key, value in ordinary.model.named_buffers():  # rotary tables are not in the state
        assert torch.equal(meta.model.get_buffer(key), value), key
    if ordinary.config.tie_embeddings:
        assert meta.model.lm_head.weight is meta.model.tok_embed.weight


def test_meta_init_refuses_random_masks_and_names_the_fix():
    with pytest.raises(ValueError, match="mask_method='magnitude' only.*meta_init: false"):
        SLoPeModule(sparsity={"mask_method": "random"}, meta_init=True)


# --------------------------------------------------------------------------------------------
# Dense checkpoints in, by rows
# --------------------------------------------------------------------------------------------


def write_dense_weights(directory: Path, nan_at: str | None = None) -> Path:
    """A dense model of the workers' shape as ``dense.safetensors`` (the tied head stored once,
    as save_model does), or with ``nan_at`` ``nan.safetensors``: NaN in that weight's last row."""
    from safetensors.torch import save_file, save_model

    from fsdp_train import config
    from slope_lightning.models import build_model

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    dense, _ = build_model(config(), None)
    if nan_at is None:
        save_model(dense, str(directory / "dense.safetensors"))
        return directory / "dense.safetensors"
    state = {k: v.clone() for k, v in dense.state_dict().items() if k != "tok_embed.weight"}
    state[nan_at][-1, 0] = float("nan")
    save_file(state, str(directory / "nan.safetensors"))
    return directory / "nan.safetensors"


def own_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows FSDP2 gives ``rank`` of a tensor of ``rows`` rows (torch.chunk's split)."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


@pytest.mark.slow
def test_dense_weights_load_by_rows_into_sharded_and_meta_models_as_into_the_unsharded(tmp_path):
    # 3 processes: uneven row shards. load_dense_safetensors and load_dense_state_dict into
    # FSDP2-sharded models, and materialize of a meta model from a spied row source, against
    # load_dense_state_dict into the unsharded model; NaN in the last rank's rows only.
    from safetensors import safe_open

    out = tmp_path / "dense"
    path = write_dense_weights(out)
    write_dense_weights(out, nan_at="blocks.1.mlp.down_proj.weight")
    command = [sys.executable, str(WORKER), f"--out={out}", "--check-dense-load=3"]
    launch([*command, f"--port={free_port()}"], "the dense-load check")
    with safe_open(str(path), "pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}  # noqa: SIM118
    for rank in range(3):
        result = json.loads((out / f"dense{rank}.json").read_text())
        assert result["safetensors"] == result["state_dict"] == result["meta"] == [], rank
        assert result["tied"]
        # Each rank read exactly its own rows of every tensor, once: nothing of another's.
        expected = sorted((key, *own_rows(shape[0], rank, 3)) for key, shape in shapes.items())
        assert sorted(tuple(read) for read in result["reads"]) == expected, rank
        # Every rank refuses, naming the key: none is left waiting at M_C's collective.
        assert "blocks.1.mlp.down_proj.weight holds NaN/inf" in result["nan_error"], rank
        if rank != 2:
            assert "failed on rank 2" in result["nan_error"]
        # Masks replicated next to sharded values: refused before anything is read.
        assert "masks replicated" in result["replicated_masks_error"]
        assert (
            "hold_masks_as_parameters() on every SparseLinear before fully_shard"
            in (result["replicated_masks_error"])
        )


@pytest.mark.slow
def test_adapters_added_after_sharding_are_sharded_and_train_like_the_unsharded_ones(tmp_path):
    # 3 processes, adapter rank 2: rows 1, 1 and none. The gathered gradient is the one of
    # the mean loss over every rank's batch on one process (FSDP2's data-parallel mean).
    out = tmp_path / "adapters"
    command = [sys.executable, str(WORKER), f"--out={out}", "--check-adapters=3"]
    launch([*command, f"--port={free_port()}"], "the adapter check")
    for rank, rows in enumerate((1, 1, 0)):
        result = json.loads((out / f"adapters{rank}.json").read_text())
        for name in ("down_values", "up"):
            assert result[name]["sharded"] and result[name]["rows"] == rows, (rank, name)
            assert result[name]["values_equal"], (rank, name)
            assert result[name]["grad_max_diff"] < 1e-6, (rank, name)
        assert result["stepped_shape"] == [2, 48]


@pytest.fixture(scope="module")
def dense_weights(runs: Runs) -> Path:
    return write_dense_weights(runs.root / "pretrained")


@pytest.mark.slow
def test_fsdp2_meta_init_from_dense_weights_trains_bit_for_bit_like_the_ordinary_build(
    runs, dense_weights
):
    # InitFromPretrained(magnitude) into the ordinary build, and into a meta-initialised one
    # (each rank reading and pruning its rows after sharding): the file's weights pruned, the
    # same parameters and masks when training starts, the same steps and final state.
    init = [f"--init-from={dense_weights}", "--max-steps=4", "--adapter-start=2"]
    ordinary = runs.train("init-ordinary", *init)
    meta = runs.train("init-meta", *init, "--meta-init")
    expected = dense_state_pruned(dense_weights)
    for out in (ordinary, meta):
        initial = torch.load(out / "initial0.pt")
        assert initial.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(initial[key], value), key
    assert_same_run(ordinary, meta, STEPS[:4])


def dense_state_pruned(path: Path) -> dict[str, torch.Tensor]:
    """The workers' model with the dense file loaded whole and pruned by magnitude, as one
    process without FSDP2 would hold it."""
    from safetensors.torch import load_file

    from slope_lightning.sparse import load_dense_state_dict

    module = small_module()
    state = load_file(str(path))
    state["tok_embed.weight"] = state["lm_head.weight"]  # tied: stored once
    load_dense_state_dict(module.model, state)
    return {k: v for k, v in module.model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_init_from_pretrained_into_a_meta_model_on_one_process_equals_the_ordinary_load(
    tmp_path,
):
    from slope_lightning.callbacks import InitFromPretrained

    path = write_dense_weights(tmp_path)
    module = small_module(meta_init=True)
    InitFromPretrained(str(path), mask_method="magnitude").setup(None, module, "fit")
    assert all(p.is_meta for p in module.model.parameters())  # handed over, nothing read
    module.configure_model()  # materialised from the file's rows, pruned by magnitude
    got = module.model.state_dict()
    for key, value in dense_state_pruned(path).items():
        assert torch.equal(got[key], value), key
    # Once read, the file is let go: the module keeps no open mapping (it can be copied, as
    # StochasticWeightAveraging does, and holds no file pages for the rest of the run).
    copy = deepcopy(module)
    assert torch.equal(copy.model.tok_embed.weight, module.model.tok_embed.weight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_method": "wanda"}, "'wanda' needs the whole dense model.*mask_method='magnitude'"),
        ({"eval_batches": 2}, "eval_batches=2 measures the whole dense model.*eval_batches: 0"),
        ({"source": "dense.ckpt"}, r"\.ckpt is not read by rows.*export/model\.safetensors"),
        ({"attribute": "net"}, r"attribute='net'.*loads its model attribute"),
    ],
    ids=["wanda", "eval-batches", "ckpt", "attribute"],
)
def test_init_from_pretrained_into_a_meta_model_refuses_what_needs_the_dense_model(
    tmp_path, kwargs, match
):
    from slope_lightning.callbacks import InitFromPretrained

    arguments = {"source": str(write_dense_weights(tmp_path)), "mask_method": "magnitude"}
    callback = InitFromPretrained(**{**arguments, **kwargs})
    module = small_module(meta_init=True)
    module.net = module.model  # the model under another name (the attribute case)
    with pytest.raises(ValueError, match=f"meta device.*{match}.*model.meta_init: false"):
        callback.setup(None, module, "fit")


def test_init_from_pretrained_into_a_meta_model_names_a_key_of_another_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    from slope_lightning.callbacks import InitFromPretrained

    state = load_file(str(write_dense_weights(tmp_path)))
    state["blocks.0.mlp.up_proj.weight"] = torch.zeros(96, 32)
    save_file(state, str(tmp_path / "other.safetensors"))
    callback = InitFromPretrained(str(tmp_path / "other.safetensors"), mask_method="magnitude")
    module = small_module(meta_init=True)
    match = r"blocks\.0\.mlp\.up_proj\.weight is \(96, 32\) in the file but \(192, 64\)"
    with pytest.raises(ValueError, match=match):
        callback.setup(None, module, "fit")
    assert all(p.is_meta for p in module.model.parameters())  # refused before reading
