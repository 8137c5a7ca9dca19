"""Worker for tests/test_fsdp.py: trains the small SLoPe model on 1 process or on N CPU processes
under FSDP2 (Lightning's ModelParallelStrategy, gloo), or checks M_C's sharded refresh.

Run as a script (Lightning re-launches this file for the other ranks). Each rank writes its
per-step losses, the whole model's state (sharded parameters gathered) and its per-rank
memory report to --out. ``--check-masks N`` and ``--check-dense-load N`` instead spawn N
plain torch.distributed processes (see :func:`check_masks` and :func:`check_dense_load`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

# Lightning and the Lightning layer are imported by train() only: --check-masks spawns
# processes that re-import this file and need nothing but torch and slope_lightning.sparse
# (and bench.sharded.end_rank, torch-only too).

MODEL = {"n_layer": 2, "d_model": 64, "n_head": 2, "n_kv_head": 1}

#: Layer shapes (d_out, d_in) for --check-masks: row shards that fill whole bytes of M_C
#: (derived locally) and ones that do not (the values are gathered), even and uneven, with
#: an empty trailing rank at 3 processes (16 rows: 8, 8, 0; 20 rows: 8, 8, 4).
MASK_SHAPES = ((16, 64), (20, 32), (24, 64), (48, 32), (40, 64), (8, 32), (64, 64))


def check_masks(rank: int, world: int, port: int, out: Path) -> None:
    """One rank of --check-masks: M_C refreshed from FSDP2-sharded values (masks sharded with
    them, and masks replicated) equals an unsharded layer's, bit for bit, statistics
    included."""
    import os

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slope_lightning.bench.sharded import end_rank
    from slope_lightning.sparse import SparseLinear

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = []
    for hold in (True, False):
        torch.manual_seed(0)
        linears = [nn.Linear(d_in, d_out) for d_out, d_in in MASK_SHAPES]
        reference = [SparseLinear.from_linear(linear) for linear in linears]
        sharded = [SparseLinear.from_linear(linear) for linear in linears]
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():  # "a step": new values, so M_C changes
            for a, b in zip(reference, sharded, strict=True):
                a.values.add_(torch.randn(a.values.shape, generator=noise))
                b.values.copy_(a.values)
        for layer in sharded:
            if hold:
                layer.hold_masks_as_parameters()
            fully_shard(layer, mesh=mesh)
        for a, b in zip(reference, sharded, strict=True):
            expected = a.refresh_transpose_mask(with_stats=True)
            got = b.refresh_transpose_mask(with_stats=True)
            col = b.col_index.full_tensor() if hold else b.col_index
            row = b.row_index.full_tensor() if hold else b.row_index
            results.append(
                {
                    "layer": f"{a.out_features}x{a.in_features} masks sharded={hold}",
                    "col_index": bool(torch.equal(col, a.col_index)),
                    "row_index": bool(torch.equal(row, a.row_index)),
                    "stats": got == expected,
                }
            )
    (out / f"masks{rank}.json").write_text(json.dumps(results))
    end_rank()


def config() -> Any:
    """The TransformerConfig of every run here: SLoPeModule(preset="tiny", ...) with MODEL."""
    from slope_lightning.models import TransformerConfig

    return TransformerConfig.from_name("tiny", vocab_size=300, seq_len=32, **MODEL)


class SpyRows:
    """A DenseRows that records every (key, start, stop) it is asked for, then reads it."""

    def __init__(self, rows: Any) -> None:
        self.rows_source, self.name = rows, rows.name
        self.reads: list[tuple[str, int, int]] = []

    def keys(self) -> Any:
        return self.rows_source.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.rows_source.shape(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        self.reads.append((key, start, stop))
        return self.rows_source.rows(key, start, stop)

    def columns(self, key: str, start: int, stop: int) -> torch.Tensor:
        raise AssertionError(f"{key}: no Conv1D layer here, columns are never read")


def check_dense_load(rank: int, world: int, port: int, out: Path) -> None:
    """One rank of --check-dense-load: out/dense.safetensors loaded into FSDP2-sharded models
    (built, or on meta and materialised from a spied row source) equals it loaded into the
    unsharded model; out/nan.safetensors (NaN in the last rank's rows only) fails on every
    rank, and so does a model whose masks are replicated. Writes dense{rank}.json:
    mismatching keys per path, the rows read, the errors."""
    import os

    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slope_lightning.bench.sharded import end_rank
    from slope_lightning.models import build_model
    from slope_lightning.models.meta_init import build_on_meta, materialize
    from slope_lightning.sparse import (
        SafetensorsRows,
        load_dense_safetensors,
        load_dense_state_dict,
        sparse_layers,
    )
    from slope_lightning.sparse.config import SparsityConfig
    from slope_lightning.sparse.dtensor import full_tensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    path = out / "dense.safetensors"
    state = load_file(str(path))  # the tied head stored once, as lm_head.weight
    state["tok_embed.weight"] = state["lm_head.weight"]
    expected, _ = build_model(config(), SparsityConfig())
    load_dense_state_dict(expected, state)

    def sharded(model: Any, hold_masks: bool = True) -> Any:
        for _, layer in sparse_layers(model):
            if hold_masks:
                layer.hold_masks_as_parameters()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def mismatches(model: Any) -> list[str]:
        want = expected.state_dict()
        got = {key: full_tensor(value) for key, value in model.state_dict().items()}
        bad = [key for key, value in want.items() if not torch.equal(got[key], value)]
        rope = ("rope_cos", "rope_sin")  # not in the state dict: recomputed
        bad += [k for k in rope if not torch.equal(getattr(model, k), getattr(expected, k))]
        return bad + ([] if got.keys() == want.keys() else ["<keys>"])

    results: dict[str, Any] = {}
    built, _ = build_model(config(), SparsityConfig())
    load_dense_safetensors(sharded(built), path)
    results["safetensors"] = mismatches(built)
    built, _ = build_model(config(), SparsityConfig())
    load_dense_state_dict(sharded(built), state)
    results["state_dict"] = mismatches(built)
    meta, _, _ = build_on_meta(config(), SparsityConfig())
    spy = SpyRows(SafetensorsRows(path))
    materialize(sharded(meta), spy, torch.device("cpu"))
    results["meta"] = mismatches(meta)
    results["tied"] = meta.lm_head.weight is meta.tok_embed.weight
    results["reads"] = spy.reads
    built, _ = build_model(config(), SparsityConfig())
    try:
        load_dense_safetensors(sharded(built), out / "nan.safetensors")
    except ValueError as error:
        results["nan_error"] = str(error)
    built, _ = build_model(config(), SparsityConfig())
    try:
        load_dense_safetensors(sharded(built, hold_masks=False), path)
    except ValueError as error:
        results["replicated_masks_error"] = str(error)
    (out / f"dense{rank}.json").write_text(json.dumps(results))
    end_rank()


def check_adapters(rank: int, world: int, port: int, out: Path) -> None:
    """One rank of --check-adapters: an adapter of rank 2 added to an FSDP2-sharded
    SparseLinear on 3 processes (rows 1, 1 and none) holds its rows of the unsharded layer's
    adapter; each rank's backward on its own batch leaves, gathered, the gradient of the mean
    loss over every rank's batch on one process; an AdamW step runs on the empty shard too.
    Writes adapters{rank}.json."""
    import os

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slope_lightning.bench.sharded import end_rank
    from slope_lightning.sparse import SparseLinear
    from slope_lightning.sparse.dtensor import full_tensor, is_dtensor, local_part

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    reference, sharded = SparseLinear.from_linear(linear), SparseLinear.from_linear(linear)
    sharded.hold_masks_as_parameters()
    fully_shard(sharded, mesh=mesh)
    for layer in (reference, sharded):
        layer.add_adapter(2, generator=torch.Generator().manual_seed(5))
    assert sharded.adapter is not None and reference.adapter is not None
    up = torch.randn(2, 48, generator=torch.Generator().manual_seed(6))  # R = 0 at the start
    with torch.no_grad():  # this rank's rows of R: torch.chunk's split, as FSDP2's
        reference.adapter.up.copy_(up)
        local = local_part(sharded.adapter.up)
        local.copy_(up[rank : rank + local.shape[0]])
    seeds = [torch.Generator().manual_seed(10 + i) for i in range(world)]
    batches = [torch.randn(5, 64, generator=seed) for seed in seeds]
    (sum(reference(x).pow(2).mean() for x in batches) / world).backward()
    sharded(batches[rank]).pow(2).mean().backward()
    results: dict[str, Any] = {}
    for name in ("down_values", "up"):
        param, want = getattr(sharded.adapter, name), getattr(reference.adapter, name)
        results[name] = {
            "sharded": is_dtensor(param),
            "rows": local_part(param).shape[0],
            "values_equal": bool(torch.equal(full_tensor(param.detach()), want.detach())),
            "grad_max_diff": float((full_tensor(param.grad) - want.grad).abs().max()),
        }
    torch.optim.AdamW(sharded.parameters(), lr=1e-2).step()
    results["stepped_shape"] = list(full_tensor(sharded.adapter.up.detach()).shape)
    (out / f"adapters{rank}.json").write_text(json.dumps(results))
    end_rank()


def full_state(module: Any) -> dict[str, torch.Tensor]:
    """The whole model's state on every rank (sharded parameters gathered)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for key, value in module.model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            state[key] = value.detach().clone()
    return state


def train(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_helpers import LossRecorder, StopAt
    from slope_lightning.callbacks import InitFromPretrained, LazyLoRA, MaskScheduler
    from slope_lightning.data import TextDataModule
    from slope_lightning.module import OptimizerConfig, SLoPeModule
    from slope_lightning.optim import adapter_param_group, decay_groups
    from slope_lightning.sparse import follow_optimizer, memory_report

    class WarmupCosine(SLoPeModule):
        """A user's own optimizer: AdamW with the adapters' group declared (empty), and
        SequentialLR warmup then cosine, which LazyLoRA could not extend mid-run."""

        def configure_optimizers(self) -> Any:
            decay, no_decay = decay_groups(self.model)
            groups = [
                {"params": decay, "weight_decay": 0.1},
                {"params": no_decay, "weight_decay": 0.0},
                adapter_param_group(),
            ]
            optimizer = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
            follow_optimizer(self.model, optimizer)
            warmup_steps = 2
            scheduler = torch.optim.lr_scheduler.SequentialLR(
                optimizer,
                [
                    torch.optim.lr_scheduler.LinearLR(optimizer, 0.5, total_iters=warmup_steps),
                    torch.optim.lr_scheduler.CosineAnnealingLR(
                        optimizer, T_max=self.trainer.max_steps - warmup_steps, eta_min=3e-4
                    ),
                ],
                milestones=[warmup_steps],
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    class MemoryRecorder(pl.Callback):
        """Per-rank model-state bytes after the last step (optimizer state included)."""

        def __init__(self) -> None:
            self.report: dict[str, int] = {}

        def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.report = memory_report(pl_module.model, trainer.optimizers[0]).as_dict()

    class InitialState(pl.Callback):
        """The whole model's state when training starts (after every setup-time load)."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.state = full_state(pl_module)

    torch.set_num_threads(1)
    pl.seed_everything(11)
    data = TextDataModule(
        sources=[args.sources],
        cache_dir=args.cache,
        vocab_size=300,
        seq_len=32,
        batch_size=args.batch_size,
    )
    module_class = WarmupCosine if args.scheduler == "sequential" else SLoPeModule
    module = module_class(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides=MODEL,
        optimizer=OptimizerConfig(lr=3e-3, warmup=2),
        export_dir=str(args.out / "export"),
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile is not None,
        compile_backend=args.compile or "inductor",
        meta_init=args.meta_init,
    )
    strategy: Any = args.strategy
    if args.strategy == "fsdp":
        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices,
            tensor_parallel_size=1,
            save_distributed_checkpoint=not args.full_ckpt,
        )
    recorder, memory = LossRecorder(), MemoryRecorder()
    callbacks: list[pl.Callback] = [recorder, memory]
    if args.adapter_start >= 0:
        callbacks += [MaskScheduler(every=1), LazyLoRA(start=args.adapter_start, rank=4)]
    if args.stop_at is not None:
        callbacks.append(StopAt(args.stop_at))
    initial = InitialState()
    if args.init_from:
        callbacks += [InitFromPretrained(args.init_from, mask_method="magnitude"), initial]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,
        precision=args.precision,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path)
    if args.save_ckpt:
        trainer.save_checkpoint(args.save_ckpt)
    rank = trainer.global_rank
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"losses{rank}.json").write_text(json.dumps(recorder.losses))
    (args.out / f"memory{rank}.json").write_text(json.dumps(memory.report))
    torch.save(full_state(module), args.out / f"state{rank}.pt")
    if args.init_from and hasattr(initial, "state"):
        torch.save(initial.state, args.out / f"initial{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["fsdp", "ddp", "auto"], default="fsdp")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sources", default="")
    parser.add_argument("--cache", default="")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--adapter-start", type=int, default=4, help="-1: no SLoPe callbacks")
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--save-ckpt", default=None, help="file or folder saved at the end")
    parser.add_argument("--full-ckpt", action="store_true", help="consolidated, not sharded")
    parser.add_argument("--compile", default=None, help="a torch.compile backend")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--meta-init", action="store_true", help="SLoPeModule(meta_init=True)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--init-from", default=None, help="InitFromPretrained(magnitude) source")
    parser.add_argument(
        "--scheduler",
        choices=["own", "sequential"],
        default="own",
        help="sequential: the module's own AdamW with adapter_param_group() and SequentialLR",
    )
    parser.add_argument("--check-masks", type=int, default=0, help="N processes: check_masks")
    parser.add_argument("--check-dense-load", type=int, default=0, help="N: check_dense_load")
    parser.add_argument("--check-adapters", type=int, default=0, help="N: check_adapters")
    parser.add_argument("--port", type=int, default=0, help="--check-masks: MASTER_PORT")
    args = parser.parse_args()
    if args.check_masks:
        import torch.multiprocessing as mp

        args.out.mkdir(parents=True, exist_ok=True)
        world = args.check_masks
        mp.spawn(check_masks, args=(world, args.port, args.out), nprocs=world)
        return
    if args.check_adapters:
        import torch.multiprocessing as mp

        args.out.mkdir(parents=True, exist_ok=True)
        world = args.check_adapters
        mp.spawn(check_adapters, args=(world, args.port, args.out), nprocs=world)
        return
    if args.check_dense_load:
        import torch.multiprocessing as mp

        world = args.check_dense_load
        mp.spawn(check_dense_load, args=(world, args.port, args.out), nprocs=world)
        return
    train(args)


if __name__ == "__main__":
    main()
