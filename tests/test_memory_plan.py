"""The memory plan (``bench memory --meta``): counted on the meta device, it must agree byte for
byte with a real model after one AdamW step wherever both fit, per rank under FSDP2 too; and
the paper-scale presets have the public architectures' shapes."""

from __future__ import annotations

import json

import pytest
import torch

from slope_lightning.bench.__main__ import main as bench_main
from slope_lightning.bench.counting import StorageCounter, state_tensors
from slope_lightning.bench.methods import bench_config, method_model, precision_dtypes
from slope_lightning.bench.plan import (
    PLAN_METHODS,
    adapter_rank,
    count_saved,
    hold_masks_for_fsdp,
    planned_model,
    saved_activations,
    shard_rows,
    state_plan,
)
from slope_lightning.models import Transformer, TransformerConfig, checkpoint_blocks
from slope_lightning.sparse import add_adapters, memory_report

# --------------------------------------------------------------------------------------------
# Presets at the paper's scale
# --------------------------------------------------------------------------------------------

PUBLIC_SHAPES = {
    # preset: (d_model, n_layer, n_head, n_kv_head, mlp_hidden, vocab, rope_theta, parameters)
    "llama-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0, 8_030_261_248),
    "llama-13b": (5120, 40, 40, 40, 13824, 32000, 10000.0, 13_015_864_320),
    "llama-70b": (8192, 80, 64, 8, 28672, 128256, 500000.0, 70_553_706_496),
}


@pytest.mark.parametrize("preset", sorted(PUBLIC_SHAPES))
def test_paper_scale_presets_have_the_public_shapes_and_parameter_counts(preset):
    config = TransformerConfig.from_name(preset)
    d, layers, heads, kv_heads, hidden, vocab, theta, parameters = PUBLIC_SHAPES[preset]
    got = (config.d_model, config.n_layer, config.n_head, config.n_kv_head, config.mlp_hidden)
    assert got == (d, layers, heads, kv_heads, hidden)
    assert (config.vocab_size, config.rope_theta, config.style) == (vocab, theta, "llama")
    assert not config.tie_embeddings  # the public checkpoints ship an untied head
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == parameters


# --------------------------------------------------------------------------------------------
# Sharding rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 64, 512])
@pytest.mark.parametrize("rows", [1, 5, 8, 250, 1024, 128256])
def test_shard_rows_follow_torch_chunk_with_empty_trailing_ranks(rows, world):
    chunks = [len(c) for c in torch.chunk(torch.empty(rows, device="meta"), world)]
    expected = chunks + [0] * (world - len(chunks))
    assert [shard_rows(rows, world, rank) for rank in range(world)] == expected


def test_shard_rows_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 4 of world 4"):
        shard_rows(10, 4, 4)


# --------------------------------------------------------------------------------------------
# Agreement with real models (world size 1)
# --------------------------------------------------------------------------------------------


def real_run(preset: str, method: str, precision: str, seq_len: int, checkpointing: bool):
    """(memory_report after one AdamW step, bytes saved for backward) of a real model."""
    config = bench_config(preset, seq_len=seq_len)
    base = "dense" if method == "dense" else "slope"
    model, _ = method_model(preset, base, precision=precision, seq_len=seq_len)
    if method == "slope+adapters":
        add_adapters(model, adapter_rank(config), seed=0)
    if checkpointing:
        checkpoint_blocks(model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # The real tensors' storages, held (no address is reused while counting); model state
    # is left out after the forward, when the freshly derived M_C is the layers' own.
    saved = StorageCounter()

    def keep_input(module, args):
        if args[0].requires_grad:
            saved.add(args[0])  # what a checkpointed block holds on to

    handles = [b.register_forward_pre_hook(keep_input) for b in model.blocks if checkpointing]
    idx = torch.randint(0, config.vocab_size, (2, seq_len))
    with saved:
        _, loss = model(idx, idx)
    for handle in handles:
        handle.remove()
    saved_bytes = saved.bytes_excluding(state_tensors(model))
    loss.backward()
    optimizer.step()
    return memory_report(model, optimizer).as_dict(), saved_bytes


def planned(preset: str, method: str, precision: str, seq_len: int, checkpointing: bool):
    config = bench_config(preset, seq_len=seq_len)
    with torch.device("meta"):
        model = planned_model(config, method, precision_dtypes(precision)[0])
    full, _ = saved_activations(config, method, precision, 2, checkpointing)
    return state_plan(model), full


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("method", PLAN_METHODS)
def test_plan_equals_a_real_tiny_model_after_one_adamw_step(method, precision, checkpointing):
    real = real_run("tiny", method, precision, 32, checkpointing)
    assert planned("tiny", method, precision, 32, checkpointing) == real


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense", "slope"])
def test_plan_equals_a_real_gpt2_small_model(method):
    for precision, checkpointing in (("32-true", False), ("bf16-mixed", True)):
        real = real_run("gpt2-small", method, precision, 64, checkpointing)
        assert planned("gpt2-small", method, precision, 64, checkpointing) == real


@pytest.mark.slow
def test_plan_equals_a_real_gpt2_medium_model():
    real = real_run("gpt2-medium", "slope", "bf16-mixed", 32, False)
    assert planned("gpt2-medium", "slope", "bf16-mixed", 32, False) == real


def test_saved_activations_scale_by_blocks_exactly():
    config = bench_config("tiny", seq_len=32)
    total, block = saved_activations(config, "slope", "bf16-mixed", 1, False)
    three = TransformerConfig.from_name("tiny", seq_len=32, n_layer=3)
    model, _ = method_model("tiny", "slope", precision="bf16-mixed", seq_len=32, n_layer=3)
    assert block > 0
    real_three = count_saved(model, torch.zeros(1, 32, dtype=torch.long), checkpointing=False)
    assert saved_activations(three, "slope", "bf16-mixed", 1, False)[0] == real_three
    assert total == real_three + (config.n_layer - 3) * block


# --------------------------------------------------------------------------------------------
# Per rank under FSDP2 (2 CPU processes)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_per_rank_equals_two_process_fsdp2_counts():
    from slope_lightning.bench.sharded import fsdp_rows

    # 251 embedding rows: 126 on rank 0, 125 on rank 1
    shape = {"n_layer": 2, "d_model": 64, "n_head": 2, "n_kv_head": 1, "vocab_size": 251}
    rows = fsdp_rows(("tiny",), world=2, **shape)
    config = bench_config("tiny", **shape)
    for row in rows:
        plans = {}
        for method in ("dense", "slope"):
            with torch.device("meta"):
                model = planned_model(config, method)
            hold_masks_for_fsdp(model)
            plans[method] = state_plan(model, world=2, rank=row["rank"])
        assert plans["dense"]["total"] / 2**20 == row["dense_MiB"]
        assert plans["slope"]["total"] / 2**20 == row["slope_MiB"]
        assert plans["slope"]["metadata"] / 2**20 == row["metadata_MiB"]
    assert rows[0]["slope_MiB"] > rows[1]["slope_MiB"]


def test_plan_shards_parameters_by_rows_adapters_included_and_replicates_buffers():
    config = bench_config("tiny", seq_len=32, vocab_size=250)  # 250 rows: 84, 84, 82
    with torch.device("meta"):
        model = planned_model(config, "slope+adapters")
    hold_masks_for_fsdp(model)
    one = state_plan(model, world=1)
    ranks = [state_plan(model, world=3, rank=r) for r in range(3)]
    index = sum(
        t.numel() * t.element_size()
        for n, t in model.named_buffers()
        if n.endswith("adapter.down_index")
    )
    assert index and any(n.endswith("adapter.up") for n, _ in model.named_parameters())
    # Every parameter (LazyLoRA's adapters too, sharded like the values they ride on) is split
    # by rows: the ranks' shares add up to the whole. An adapter's packed index is a buffer,
    # held whole on every rank.
    for category in ("sparse values", "dense parameters", "gradients"):
        assert sum(r[category] for r in ranks) == one[category], category
    assert sum(r["metadata"] for r in ranks) == one["metadata"] + 2 * index
    for category in ("buffers", "caches"):  # replicated: rope tables, adapter scales
        assert [r[category] for r in ranks] == [one[category]] * 3
    assert ranks[0]["total"] > ranks[2]["total"]  # the trailing rank has fewer embedding rows


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_memory_meta_command_writes_the_plan_per_world_size(tmp_path, capsys):
    bench_main(
        [
            "memory",
            "--meta",
            "--presets",
            "tiny",
            "--world-sizes",
            "1,4",
            "--precision",
            "bf16-mixed",
            "--batch",
            "1",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path),
            "--no-plot",
        ]
    )
    document = json.loads((tmp_path / "memory-plan-tiny.json").read_text())
    assert document["complete"]
    assert "--meta" in document["info"]["command"]
    rows = {(r["method"], r["world"]): r for r in document["rows"]}
    assert set(rows) == {(m, w) for m in PLAN_METHODS for w in (1, 4)}
    assert rows["dense", 4]["state_vs_dense"] == 1.0
    assert rows["slope", 4]["state_vs_dense"] < 0.75
    assert rows["slope", 4]["state_MiB"] < rows["slope", 1]["state_MiB"] / 2
    assert rows["slope", 1]["activations_ckpt_MiB"] < rows["slope", 1]["activations_MiB"]
    assert "| slope |" in capsys.readouterr().out
