"""An exact memory plan without the memory: per-rank bytes of a training run, counted on the
meta device, for models that do not fit this machine (:func:`plan_rows`).

Two counts, both exact where a real run can check them (``tests/test_memory_plan.py``):

* **Model state per rank** (:func:`state_plan`): the model is built and sparsified on the
  meta device (real shapes and dtypes, no storage), and every parameter, gradient, AdamW
  moment and step, mask and buffer is counted as :func:`~slope_lightning.sparse.memory_report`
  counts it after one AdamW step, with the categories it uses. Under FSDP2
  (``world > 1``) a parameter is sharded by dim 0 with ``torch.chunk``'s rule, as
  ``fully_shard`` shards it: ``ceil(rows / world)`` rows per rank, the trailing ranks fewer
  or none; its gradient and AdamW moments follow it, each AdamW ``step`` is a 4-byte fp32
  scalar on every rank. The adapters that LazyLoRA adds after sharding are sharded by rows
  the same way (:meth:`~slope_lightning.sparse.SparseLinear.add_adapter`); buffers (an
  adapter's packed index included) are replicated. Rank 0 holds the largest shard, and FSDP2
  pads every rank's parameter and gradient buffers to it, so rank 0's count is what each rank
  allocates.
* **Activations saved for backward** (:func:`saved_activations`): one forward of the same
  model with 1 and with 2 blocks under :class:`~torch._subclasses.fake_tensor.FakeTensorMode`
  (meta storage, the device's dispatch: autocast, the SDPA kernel choice), counted with
  :class:`~slope_lightning.bench.counting.StorageCounter` (as the real benchmarks count them),
  then scaled by the number of blocks (blocks are identical). With activation checkpointing
  a block keeps only its input; its recomputation in the backward holds one block's
  activations at a time (``recompute_block_MiB``). Activations do not depend on FSDP2: each
  rank runs its whole micro-batch.

``python -m slope_lightning.bench memory --meta --presets llama-8b,llama-70b --world-sizes
8,64,512`` writes the table (:data:`PLAN_COLUMNS`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from slope_lightning.bench.common import Row, RowSink, emit
from slope_lightning.bench.counting import StorageCounter, state_tensors
from slope_lightning.bench.methods import AutocastTransformer, bench_config, precision_dtypes
from slope_lightning.models import Transformer, TransformerConfig, checkpoint_blocks
from slope_lightning.sparse import LowRankAdapter, SparseLinear, add_adapters, sparsify
from slope_lightning.sparse.layout import byte_tables
from slope_lightning.sparse.masks import pairwise_table
from slope_lightning.sparse.memory import CATEGORIES

#: ``dense``; ``slope`` (:func:`~slope_lightning.sparse.sparsify`); ``slope+adapters``: SLoPe
#: with LazyLoRA's adapters on (the last 1% of training), rank :data:`PAPER_ADAPTER_RANK`.
PlanMethod = Literal["dense", "slope", "slope+adapters"]
PLAN_METHODS: tuple[PlanMethod, ...] = ("dense", "slope", "slope+adapters")

#: The paper's adapter rank, a fraction of the hidden size (LazyLoRA's ``rank: 0.0156``).
PAPER_ADAPTER_RANK = 0.0156

#: What the SLoPe paper reports for whole-model training memory vs dense (weights, gradients
#: and Adam states; no activations), OPT-2.6B to 66B and LLaMA-3-8B.
PAPER_TRAIN_RATIO = "0.63-0.68 (LLaMA-3-8B: 0.63)"

#: Bytes of one AdamW ``step`` counter: a 0-d fp32 tensor per parameter (torch's AdamW).
ADAM_STEP_BYTES = 4


def shard_rows(rows: int, world: int, rank: int) -> int:
    """Rows of a dim-0 size ``rows`` that FSDP2 gives ``rank`` of ``world``: ``torch.chunk``'s
    split, ``ceil(rows / world)`` per rank until they run out (trailing ranks may get none).

    Example:
        >>> [shard_rows(5, 4, r) for r in range(4)]
        [2, 2, 1, 0]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}: need world >= 1 and 0 <= rank < world")
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))


def _local_bytes(tensor: Tensor, world: int, rank: int, sharded: bool) -> int:
    """Bytes of ``tensor`` on ``rank``: its dim-0 shard if ``sharded``, else all of it."""
    if not sharded or tensor.dim() == 0:
        return tensor.numel() * tensor.element_size()
    rows = shard_rows(tensor.shape[0], world, rank)
    return rows * math.prod(tensor.shape[1:]) * tensor.element_size()


def adapter_rank(config: TransformerConfig, rank: float = PAPER_ADAPTER_RANK) -> int:
    """The adapter rank LazyLoRA resolves from a fraction: ``round(rank * d_model)``, at least 1,
    one rank for every layer."""
    return max(1, round(rank * config.d_model))


def planned_model(
    config: TransformerConfig,
    method: PlanMethod,
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    adapters: float = PAPER_ADAPTER_RANK,
) -> Transformer:
    """The model a run of ``method`` trains, on the current default device (the meta device
    for a plan: ``with torch.device("meta")``): built, sparsified, cast to ``dtype`` as
    Lightning casts it for a ``*-true`` precision, then given LazyLoRA's adapters (which
    come mid-run, after the cast: their fp32 ``scale`` stays fp32)."""
    if method not in PLAN_METHODS:
        raise ValueError(f"unknown plan method {method!r}; choose one of {PLAN_METHODS}")
    torch.manual_seed(0)
    model = (
        Transformer(config)
        if autocast_dtype is None
        else AutocastTransformer(config, autocast_dtype)
    )
    if method != "dense":
        sparsify(model)
    cast_floating(model, dtype)
    if method == "slope+adapters":
        add_adapters(model, adapter_rank(config, adapters), seed=0)
    return model


def cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype``, as
    ``model.to(dtype)`` does (tied parameters stay tied), by assignment: ``to()`` swaps
    tensors in place, which fake tensors refuse."""
    cast: dict[int, Tensor] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                if id(param) not in cast:
                    new = nn.Parameter(param.detach().to(dtype), param.requires_grad)
                    cast[id(param)] = new
                setattr(module, name, cast[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))


def state_plan(model: nn.Module, world: int = 1, rank: int = 0) -> dict[str, int]:
    """This rank's bytes of ``model``'s state after one AdamW step, by the categories of
    :func:`~slope_lightning.sparse.memory_report` (plus ``"total"``), without running one.

    ``model`` may live on the meta device. ``world > 1``: sharded as
    :class:`~slope_lightning.module.SLoPeModule` shards it with FSDP2 (masks held as
    parameters, sharded with the values; adapters sharded too; buffers replicated). Every trainable
    parameter gets a gradient and AdamW state (two moments of its dtype and shard, one
    4-byte step); a frozen one (the masks under FSDP2) gets none.
    """
    counts = dict.fromkeys(CATEGORIES, 0)
    sparse_values: set[int] = set()
    metadata: set[int] = set()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            sparse_values.add(id(module.values))
            metadata.update({id(module.row_index), id(module.col_index)})
        elif isinstance(module, LowRankAdapter):
            sparse_values.add(id(module.down_values))
            metadata.add(id(module.down_index))
    for param in model.parameters():  # each once: a tied weight is one parameter
        size = _local_bytes(param, world, rank, sharded=world > 1)
        if id(param) in metadata:
            category = "metadata"
        elif id(param) in sparse_values:
            category = "sparse values"
        else:
            category = "dense parameters"
        counts[category] += size
        if param.requires_grad:
            counts["gradients"] += size
            counts["optimizer state"] += 2 * size + ADAM_STEP_BYTES
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    seen: set[int] = set()
    for buffer in model.buffers():
        if id(buffer) in seen:
            continue
        seen.add(id(buffer))
        size = buffer.numel() * buffer.element_size()  # buffers are replicated
        if id(buffer) in metadata:  # masks as buffers (not held as parameters)
            counts["metadata"] += size
        else:
            counts["buffers" if id(buffer) in persistent else "caches"] += size
    return {**counts, "total": sum(counts.values())}


def hold_masks_for_fsdp(model: nn.Module) -> None:
    """Hold every SparseLinear's masks as frozen parameters, as SLoPeModule does before
    ``fully_shard`` (they then shard with the values)."""
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.hold_masks_as_parameters()


def count_saved(model: Transformer, idx: Tensor, checkpointing: bool) -> int:
    """Bytes saved for backward by one training forward of ``model`` on ``idx`` (B, T),
    model state left out, with or without activation checkpointing per block (a
    checkpointed block keeps its input, which autograd's hooks do not see: counted too)."""
    model.train()
    counter = StorageCounter()
    handles = []
    if checkpointing:
        checkpoint_blocks(model.blocks)

        def keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            for arg in args:
                if isinstance(arg, Tensor) and arg.requires_grad:
                    counter.add(arg)

        handles = [block.register_forward_pre_hook(keep_input) for block in model.blocks]
    with counter:
        model(idx, idx)
    for handle in handles:
        handle.remove()
    return counter.bytes_excluding(state_tensors(model))


@contextmanager
def fake_tensors(n: int = 2, m: int = 4, device: str = "cpu") -> Iterator[None]:
    """A ``FakeTensorMode``: tensors with shapes, dtypes and the device's dispatch, but meta
    storage. The process-wide mask tables are built first, outside it, so that the mode
    never caches a fake table for later real use."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    target = torch.device(device)
    for where in {torch.device("cpu"), target}:
        byte_tables(n, m, where)
        pairwise_table(n, m, where)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(target):
        yield


def saved_activations(
    config: TransformerConfig,
    method: PlanMethod,
    precision: str,
    batch: int,
    checkpointing: bool,
    device: str = "cpu",
) -> tuple[int, int]:
    """(bytes saved for backward by one forward of the whole model, bytes of one block),
    on (batch, config.seq_len) tokens, counted under fake tensors on ``device`` with 1 and
    2 blocks and scaled to ``config.n_layer`` (exact: the blocks are identical)."""
    dtype, autocast_dtype = precision_dtypes(precision)
    counts = []
    for n_layer in (1, 2):
        shape = dataclasses.replace(config, n_layer=n_layer)
        with fake_tensors(device=device):
            model = planned_model(shape, method, dtype, autocast_dtype)
            idx = torch.zeros(batch, shape.seq_len, dtype=torch.long)  # (B, T)
            counts.append(count_saved(model, idx, checkpointing))
    per_block = counts[1] - counts[0]
    return counts[0] + (config.n_layer - 1) * per_block, per_block


PLAN_COLUMNS = [
    "preset",
    "trainable_params_B",
    "method",
    "precision",
    "world",
    "rank",
    "params_MiB",
    "metadata_MiB",
    "gradients_MiB",
    "optimizer_MiB",
    "buffers_MiB",
    "state_MiB",
    "state_vs_dense",
    "tokens",
    "activations_MiB",
    "activations_ckpt_MiB",
    "recompute_block_MiB",
    "train_MiB",
    "train_ckpt_MiB",
]


def _mib(count: int) -> float:
    return count / 2**20


def plan_rows(
    presets: Iterable[str] = ("llama-8b", "llama-70b"),
    world_sizes: Iterable[int] = (8, 64, 512),
    precisions: Iterable[str] = ("bf16-mixed", "bf16-true"),
    methods: Iterable[PlanMethod] = PLAN_METHODS,
    batch: int = 1,
    seq_len: int | None = None,
    device: str = "cpu",
    on_row: RowSink | None = None,
) -> list[Row]:
    """The memory plan of each preset, precision, world size and method, for rank 0 (the
    largest shard; FSDP2 pads every rank to it).

    ``state_MiB``: parameters, masks, gradients, AdamW state and buffers on the rank
    (:func:`state_plan`); ``state_vs_dense``: against dense at the same precision and world
    (the quantity of the paper's training-memory column, :data:`PAPER_TRAIN_RATIO`).
    ``activations_MiB`` / ``activations_ckpt_MiB``: saved for backward by one micro-batch of
    ``batch`` x ``seq_len`` tokens without / with activation checkpointing
    (:func:`saved_activations`); ``recompute_block_MiB``: one block's, which a checkpointed
    backward holds while it recomputes that block. ``train_MiB = state + activations``,
    ``train_ckpt_MiB = state + activations_ckpt + recompute_block``: exact sums of exact
    counts, not an allocator peak (gathered FSDP2 blocks, activation gradients and
    allocator slack come on top).

    Raises:
        ValueError: a world size, batch or seq_len below 1, or an unknown precision/method.
    """
    worlds = list(world_sizes)
    if any(w < 1 for w in worlds) or batch < 1 or (seq_len is not None and seq_len < 1):
        raise ValueError(
            f"world sizes {worlds}, batch {batch} and seq_len {seq_len} must be positive"
        )
    rows: list[Row] = []
    for preset in presets:
        overrides = {} if seq_len is None else {"seq_len": seq_len}
        config = bench_config(preset, **overrides)
        for precision in precisions:
            dtype, _ = precision_dtypes(precision)
            activations: dict[str, tuple[int, int, int]] = {}
            for method in methods:
                full, block = saved_activations(config, method, precision, batch, False, device)
                ckpt, _ = saved_activations(config, method, precision, batch, True, device)
                activations[method] = (full, ckpt, block)
            for world in worlds:
                dense_total = None
                ordered: list[PlanMethod] = ["dense", *(m for m in methods if m != "dense")]
                for method in ordered:
                    with torch.device("meta"):
                        model = planned_model(config, method, dtype)
                    if world > 1:
                        hold_masks_for_fsdp(model)
                    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
                    state = state_plan(model, world, rank=0)
                    del model
                    dense_total = dense_total or state["total"]
                    if method not in activations:  # dense as the base only
                        continue
                    full, ckpt, block = activations[method]
                    row: Row = {
                        "preset": preset,
                        "trainable_params_B": params / 1e9,
                        "method": method,
                        "precision": precision,
                        "world": world,
                        "rank": 0,
                        "params_MiB": _mib(state["sparse values"] + state["dense parameters"]),
                        "metadata_MiB": _mib(state["metadata"]),
                        "gradients_MiB": _mib(state["gradients"]),
                        "optimizer_MiB": _mib(state["optimizer state"]),
                        "buffers_MiB": _mib(state["buffers"] + state["caches"]),
                        "state_MiB": _mib(state["total"]),
                        "state_vs_dense": state["total"] / dense_total,
                        "tokens": batch * config.seq_len,
                        "activations_MiB": _mib(full),
                        "activations_ckpt_MiB": _mib(ckpt),
                        "recompute_block_MiB": _mib(block),
                        "train_MiB": _mib(state["total"] + full),
                        "train_ckpt_MiB": _mib(state["total"] + ckpt + block),
                    }
                    emit(rows, row, on_row)
    return rows
