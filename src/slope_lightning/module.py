"""SLoPeModule: a LightningModule that pretrains a (sparse) decoder-only transformer.

The same config trains the dense baseline with ``sparsity.sparse: false``, so the two runs
differ in nothing else. Its settings are three typed configs, each defined where it belongs:
:class:`~slope_lightning.models.TransformerConfig` (the model),
:class:`~slope_lightning.sparse.config.SparsityConfig` (the method, torch-only) and
:class:`~slope_lightning.optim.OptimizerConfig` (AdamW and the schedule); the latter two are
re-exported here for code that imports them as ``slope_lightning.module.*``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchmetrics.aggregation import MeanMetric
from torchmetrics.text import Perplexity
from typing_extensions import override

from slope_lightning.callbacks import NonFiniteError
from slope_lightning.checkpoints import optimizer_state_by_name
from slope_lightning.export import export_model
from slope_lightning.models import Transformer, TransformerConfig, build_model, checkpoint_blocks
from slope_lightning.models.meta_init import InitPlan, build_on_meta, materialize
from slope_lightning.optim import (
    OptimizerConfig,
    build_adamw,
    describe_param_groups,
    lr_multiplier,
)
from slope_lightning.sparse import (
    SparsifyReport,
    backend_report,
    follow_optimizer,
    memory_report,
    sparse_layers,
    use_decision_store,
)
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.config import SparsityConfig
from slope_lightning.sparse.dense_rows import DenseRows, is_on_meta

__all__ = ["OptimizerConfig", "SLoPeModule", "SparsityConfig", "lr_multiplier"]

logger = logging.getLogger(__name__)

C = TypeVar("C", SparsityConfig, OptimizerConfig)


@rank_zero_only
def _info(message: str, *args: object) -> None:
    logger.info(message, *args)


class SLoPeModule(pl.LightningModule):
    """Pretrain a LLaMA- or GPT-2-style transformer with SLoPe (or dense, for the baseline).

    ``hparams.yaml`` and TensorBoard's HPARAMS tab record every argument, ``sparsity`` and
    ``optimizer`` as plain dicts (so checkpoints load with ``weights_only=True`` and
    :meth:`load_from_checkpoint` rebuilds the module from them).

    Args:
        preset: model preset name ("tiny", "gpt2-small", "gpt2-medium", "llama-1b").
        vocab_size: vocabulary size (linked from the data module by the CLI).
        seq_len: context length (linked from the data module by the CLI).
        model_overrides: TransformerConfig fields that replace the preset's, e.g.
            ``{n_layer: 2, d_model: 128}``.
        sparsity: sparsification settings (see :class:`SparsityConfig`); a mapping of its
            fields (a checkpoint's hyperparameters) is accepted too.
        optimizer: AdamW and schedule settings (see :class:`OptimizerConfig`); a mapping of
            its fields is accepted too.
        export_dir: where the final model goes as safetensors + config.json when training
            ends (None: ``<log dir>/export``).
        activation_checkpointing: recompute each transformer block in the backward instead
            of keeping its activations (non-reentrant; parameter names are unchanged, so
            checkpoints load either way).
        compile: ``torch.compile`` the model (each SparseLinear runs eagerly inside it: one
            graph break per sparse layer, counted in the log after the first step).
        compile_backend: the ``torch.compile`` backend ("inductor"; "aot_eager" compiles
            the graphs without generating code, e.g. for tests).
        reshard_after_forward: under FSDP2, free each block's gathered parameters after its
            forward and gather them again for the backward (ZeRO-3; False keeps them until
            the backward: more memory, one all-gather less per block).
        meta_init: build and sparsify the model on the meta device, and allocate and
            initialise it in :meth:`configure_model`, after sharding: under FSDP2 each rank
            then holds about its shard, never the whole model, and gets exactly the
            parameters and masks of the ordinary build (magnitude masks only), or of the
            ordinary build with dense weights loaded (:meth:`initialise_from`).

    Under Lightning's ``ModelParallelStrategy`` (FSDP2), :meth:`configure_model` shards every
    transformer block, then the rest of the model, over the strategy's ``data_parallel``
    mesh dimension; set ``tensor_parallel_size: 1`` and ``data_parallel_size`` to the number
    of processes. A SparseLinear's packed values shard like any parameter (by rows), and its
    packed masks with them (held as frozen parameters, see
    :meth:`~slope_lightning.sparse.SparseLinear.hold_masks_as_parameters`); adapters added
    mid-run are sharded by rows too (see
    :meth:`~slope_lightning.sparse.SparseLinear.add_adapter`). The export is written once, by
    rank 0, from the gathered state.

    Raises:
        ValueError: on an unknown preset or override, or invalid sparsity or optimizer
            settings (the message names the field).
    """

    def __init__(
        self,
        preset: str = "tiny",
        vocab_size: int | None = None,
        seq_len: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        sparsity: SparsityConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        export_dir: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        reshard_after_forward: bool = True,
        meta_init: bool = False,
    ) -> None:
        super().__init__()
        self.sparsity = _as_config(sparsity, SparsityConfig)
        self.optim = _as_config(optimizer, OptimizerConfig)
        # Every argument, the two configs as plain dicts: they reach hparams.yaml and the
        # HPARAMS tab, and checkpoints stay loadable with weights_only.
        self.save_hyperparameters(
            {
                "preset": preset,
                "vocab_size": vocab_size,
                "seq_len": seq_len,
                "model_overrides": model_overrides,
                "sparsity": self.sparsity.to_dict(),
                "optimizer": self.optim.to_dict(),
                "export_dir": export_dir,
                "activation_checkpointing": activation_checkpointing,
                "compile": compile,
                "compile_backend": compile_backend,
                "reshard_after_forward": reshard_after_forward,
                "meta_init": meta_init,
            }
        )
        self.activation_checkpointing = activation_checkpointing
        self.compile_model = compile
        self.compile_backend = compile_backend
        self.reshard_after_forward = reshard_after_forward
        self._model_configured = False  # configure_model runs at every fit/validate/test
        self._graph_breaks_before: dict[str, Counter[str]] = {}
        self.config = TransformerConfig.from_hparams(self.hparams)
        self.model: Transformer
        self.sparsify_report: SparsifyReport | None
        self._init_plan: InitPlan | None = None  # meta_init: materialised in configure_model
        self._init_rows: DenseRows | None = None  # or from dense weights (initialise_from)
        if meta_init:
            self.model, self.sparsify_report, self._init_plan = build_on_meta(
                self.config, self.sparsity
            )
        else:
            self.model, self.sparsify_report = build_model(self.config, self.sparsity)
        self.export_dir = export_dir
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)
        # Mean validation loss per source (data.val_source_ids: true), set up in setup() from
        # the data module's source names; logged as val/ppl/<source>.
        self.val_source_loss = nn.ModuleDict()
        self._val_source_names: tuple[str, ...] = ()
        self._logged_param_count = -1

    # ------------------------------------------------------------------ steps

    @override
    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.model(idx, targets)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, T), (B, T)
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """Validation loss and perplexity; per source too when the batches carry each
        window's source index (``data.val_source_ids: true``)."""
        x, y = batch[0], batch[1]
        logits, loss = self.model(x, y)
        self.val_ppl.update(logits.float(), y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)
        if len(batch) == 3 and self._val_source_names:
            source = batch[2]  # (B,): each window's index into the source names
            per_token = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100
            ).view_as(y)
            per_window = per_token.mean(dim=1)  # (B,): windows never mix sources
            for index, name in enumerate(self._val_source_names):
                chosen = source == index
                if chosen.any():
                    self._source_metric(name).update(per_window[chosen])

    def _source_metric(self, name: str) -> MeanMetric:
        metric = self.val_source_loss[_metric_key(name)]
        assert isinstance(metric, MeanMetric)
        return metric

    @override
    def on_validation_epoch_end(self) -> None:
        # exp of each source's mean window loss, then reset. compute() reduces over ranks (a
        # collective): every rank calls it for every source, also one that saw none of its
        # windows (its share is 0/0; torchmetrics warns about that, harmlessly).
        for name in self._val_source_names:
            metric = self._source_metric(name)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                mean_loss = metric.compute()
            metric.reset()
            if torch.isfinite(mean_loss):
                self.log(f"val/ppl/{name}", mean_loss.exp(), sync_dist=False)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, loss = self.model(x, y)
        self.test_ppl.update(logits.float(), y)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/ppl", self.test_ppl)

    # ------------------------------------------------------------------ parallelism

    @override
    def configure_model(self) -> None:
        """Activation checkpointing per block, FSDP2 per block then the root (under
        ModelParallelStrategy), then ``torch.compile``: in this order, as torchtitan does.

        Idempotent (Lightning calls it at every fit, validate and test).

        Raises:
            ValueError: the strategy's mesh has a tensor-parallel dimension larger than 1
                (this module shards with FSDP2 alone).
        """
        if self._model_configured:
            return
        self._model_configured = True
        blocks = list(self.model.blocks)
        if self.activation_checkpointing:
            count = checkpoint_blocks(self.model.blocks)  # parameter names unchanged
            _info("activation checkpointing: %d blocks recompute in the backward", count)
        if self.device_mesh is not None:  # ModelParallelStrategy's; None for other strategies
            mesh = _data_parallel_mesh(self.device_mesh)
            for _, layer in sparse_layers(self.model):
                layer.hold_masks_as_parameters()  # sharded with the values, not replicated
            for block in blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
            fully_shard(self.model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
            _info(
                "FSDP2: %d blocks and the root sharded over %d ranks (sparse values and their "
                "packed masks by rows)",
                len(blocks),
                mesh.size(),
            )
        self._materialize()
        if self.compile_model:
            self.model.compile(backend=self.compile_backend)  # in place: names unchanged

    def initialise_from(self, rows: DenseRows) -> None:
        """Initialise the meta-built model (``meta_init``) from dense weights instead of the
        random init when :meth:`configure_model` materialises it: each rank reads and prunes
        (by magnitude) only its rows (what ``InitFromPretrained`` hands over at setup).

        Raises:
            ValueError: the model is not on the meta device (``meta_init`` is off, or the
                model is materialised already).
        """
        if self._init_plan is None or not is_on_meta(self.model):
            raise ValueError(
                f"initialise_from({rows.name!r}) needs a model still on the meta device "
                "(SLoPeModule(meta_init=True), before configure_model); load into a "
                "materialised model with slope_lightning.sparse.load_dense_safetensors"
            )
        self._init_rows = rows

    def _materialize(self) -> None:
        """Allocate and initialise a meta-built model (``meta_init``): each rank its own rows
        under FSDP2 (a collective), on the strategy's device (the CPU without a Trainer)."""
        if self._init_plan is None or not is_on_meta(self.model):
            return
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        source = self._init_rows if self._init_rows is not None else self._init_plan
        materialize(self.model, source, device)
        self._init_rows = None  # read: drop the source (an open file, or a whole state dict)

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> SLoPeModule:
        """As ``nn.Module``'s, leaving out a ``meta_init`` model not materialised yet (a run
        failed before ``configure_model``, and its teardown moves the module to the CPU)."""
        if not (recurse and self._init_plan is not None and is_on_meta(self.model)):
            return super()._apply(fn, recurse)
        super()._apply(fn, recurse=False)  # this module's own parameters and buffers
        for child in self.children():
            if child is not self.model:
                child._apply(fn)
        return self

    def _log_graph_breaks(self) -> None:
        """Say where ``torch.compile`` fell back to eager while compiling the first training
        step: what Dynamo counted between this module's first batch start and its end."""
        now = dynamo_counters()
        breaks = now["graph_break"]
        breaks.subtract(self._graph_breaks_before["graph_break"])
        skipped = now["unimplemented"]
        skipped.subtract(self._graph_breaks_before["unimplemented"])
        at_sparse = sum(n for reason, n in breaks.items() if "SparseLinear.forward" in reason)
        others = Counter(
            {
                reason.strip().splitlines()[0]: n
                for reason, n in breaks.items()
                if n > 0 and "SparseLinear.forward" not in reason
            }
        )
        frames = sorted(
            {
                reason.split("frame skipped:")[1].strip().splitlines()[0]
                for reason, n in skipped.items()
                if n > 0 and "frame skipped:" in reason
            }
        )
        _info(
            "torch.compile: %d graph breaks at SparseLinear calls (%d sparse layers, each run "
            "eagerly inside the compiled graph by design), %d elsewhere%s%s",
            at_sparse,
            len(sparse_layers(self.model)),
            sum(others.values()),
            "".join(f"\n  {n} x {reason}" for reason, n in others.items()),
            "".join(f"\n  frame left eager (its loop breaks): {frame}" for frame in frames),
        )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads a consolidated checkpoint into an FSDP2 model one parameter and
        # buffer at a time, which skips extra state: restore the SparseLinear layers' M_C
        # refresh counters and N:M check from the file (memory-mapped, read once).
        try:
            path = self.trainer.ckpt_path
        except RuntimeError:  # not attached to a Trainer (load_from_checkpoint): no FSDP2
            self._materialize()  # meta_init: real tensors for the state dict to load into
            return
        if path is None or not _is_sharded(self) or not Path(path).is_file():
            return
        state = torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"]
        for name, layer in sparse_layers(self):
            extra = state.get(f"{name}._extra_state")
            if extra is not None:
                layer.set_extra_state(extra)

    # ------------------------------------------------------------------ setup and logging

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        tokenizer_vocab = tokenizer.get_vocab_size() if tokenizer is not None else None
        if tokenizer_vocab is not None and tokenizer_vocab > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; set data.vocab_size (linked to the model) to at "
                f"least {tokenizer_vocab} or use a smaller tokenizer"
            )
        if self.sparsify_report is not None and stage == "fit":
            _info("%s", self.sparsify_report)
        names = tuple(getattr(datamodule, "val_source_names", ()) or ())
        if getattr(datamodule, "val_source_ids", False) and names:
            self._val_source_names = names
            for name in names:
                if _metric_key(name) not in self.val_source_loss:
                    self.val_source_loss[_metric_key(name)] = MeanMetric()
        if self.sparsify_report is not None and self.sparsity.backend is BackendName.auto:
            # auto's measured decisions belong to this run: kept in its own directory (rank 0
            # measures and writes, the others receive its decisions), never in a file that
            # other runs on the machine share. trainer.log_dir is a collective under DDP.
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            store = use_decision_store(self.model, log_dir / "autotune.json")
            _info("auto backend decisions are kept in %s", store.describe())

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # torch.compile compiles the training graphs in the first step: Dynamo's counters are
        # process-wide, so count what this step adds, not what other models compiled before.
        if self.compile_model and self.trainer.global_step == 0 and not self._graph_breaks_before:
            self._graph_breaks_before = dynamo_counters()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Model-state memory: once the optimizer state exists (after the first step) and
        # again whenever parameters are added (lazy adapters).
        if self.trainer.global_step == 1 and self.sparsity.backend is BackendName.auto:
            _info("backends chosen at first use:\n%s", backend_report(self.model))
        if self.trainer.global_step == 1 and self.compile_model and self._graph_breaks_before:
            self._log_graph_breaks()
        count = sum(1 for _ in self.parameters())
        if self.trainer.global_step >= 1 and count != self._logged_param_count:
            self._logged_param_count = count
            self._log_memory()

    def _log_memory(self) -> None:
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's wrapper
        report = memory_report(self.model, optimizer)
        metrics = {
            f"memory/{name.replace(' ', '_')}_MiB": count / 2**20
            for name, count in report.as_dict().items()
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            metrics["memory/cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=self.trainer.global_step)
        _info("model-state memory at step %d:\n%s", self.trainer.global_step, report)

    @override
    def on_train_end(self) -> None:
        # trainer.log_dir is a collective under DDP: every rank must ask for it.
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        # Under FSDP2 the export is consolidated: every rank takes part in gathering the
        # shards (a collective), rank 0 alone holds the result and writes it.
        model = self._consolidated_model()
        if not self.trainer.is_global_zero:
            return
        target = Path(self.export_dir) if self.export_dir else Path(log_dir) / "export"
        bad = next(
            (
                name
                for name, value in model.state_dict().items()
                if isinstance(value, Tensor)
                and value.is_floating_point()
                and not value.isfinite().all()
            ),
            None,
        )
        if bad is not None:  # also without NonFiniteGuard: never export NaN weights
            raise NonFiniteError(
                f"refusing to export: parameter {bad} holds NaN/inf at global step "
                f"{self.trainer.global_step}; resume from the last good checkpoint "
                "(--ckpt_path last) with a lower learning rate, or add NonFiniteGuard"
            )
        # The tokenizer goes with the weights, so `slope-lightning generate <export>` needs
        # nothing else (a foreign data module without one exports the weights alone).
        summary = getattr(getattr(self.trainer, "datamodule", None), "summary", None)
        tokenizer = summary.get("tokenizer") if isinstance(summary, dict) else None
        export_model(model, self.config, self.sparsity, target, tokenizer=tokenizer)
        _info("exported the final model to %s", target)

    def _consolidated_model(self) -> nn.Module:
        """The model to export: ``self.model``, or under FSDP2 a stand-in holding its full
        state on rank 0 (an empty one elsewhere). A collective under FSDP2: every rank calls."""
        if not _is_sharded(self.model):
            return self.model
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return _StateDict(get_model_state_dict(self.model, options=options))

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # ModelParallelStrategy's consolidated (non-sharded) checkpoint keys the optimizer
        # state by position in named_parameters(), which LazyLoRA's adapters shift: key it by
        # parameter name instead (Lightning's loader takes both), so a resume whose model has
        # no adapters yet maps every entry to its own parameter.
        if not _is_sharded(self):
            return
        states = checkpoint.get("optimizer_states", [])
        for index, state in enumerate(states):
            if state.get("state") and isinstance(next(iter(state["state"])), int):
                states[index] = optimizer_state_by_name(state, self)

    # ------------------------------------------------------------------ optimizer

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise ValueError(
                "SLoPeModule schedules the learning rate over trainer.max_steps; set "
                "trainer.max_steps to a positive number of optimizer steps"
            )
        optimizer, scheduler = build_adamw(self.model, self.optim, total_steps)
        # The step hook is the M_C refresh's one step counter: needed under FSDP2 (M_C
        # re-derived from the shards after each step) and for transpose_mask_interval > 1.
        follow_optimizer(self.model, optimizer)
        _info("AdamW: %s", describe_param_groups(optimizer))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


class _StateDict(nn.Module):
    """A module whose ``state_dict()`` is a given one: a gathered FSDP2 state on its way to
    :func:`~slope_lightning.export.export_model`, which reads nothing else."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__()
        self._state = state

    @override
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return dict(self._state)


def _data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: ModelParallelStrategy's ``data_parallel`` dimension.

    Raises:
        ValueError: the tensor-parallel dimension is larger than 1.
    """
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names:
        return mesh
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
    if tensor_parallel > 1:
        raise ValueError(
            f"ModelParallelStrategy has tensor_parallel_size={tensor_parallel}, but SLoPeModule "
            "shards with FSDP2 alone; set trainer.strategy.init_args.tensor_parallel_size: 1 "
            f"and data_parallel_size: {mesh.size()} (the number of processes)"
        )
    return mesh["data_parallel"]


def _metric_key(source: str) -> str:
    """A source's metric name as a module name (the data module's names hold no dots, but a
    module name must not, whatever a foreign data module gives)."""
    return source.replace(".", "_")


def _is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards ``module``'s parameters (some are DTensors)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def _as_config(value: object, cls: type[C]) -> C:
    """``value`` as a ``cls``: None gives the defaults, a mapping (a checkpoint's
    hyperparameters, which store the configs as dicts) goes through ``cls.from_dict``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    raise ValueError(f"expected a {cls.__name__} or a mapping of its fields, got {value!r}")


def dynamo_counters() -> dict[str, Counter[str]]:
    """Copies of Dynamo's graph-break and skipped-frame counters (reason -> count).

    ``torch._dynamo.utils.counters`` is private torch API, read here only: torch 2.13 has no
    public record of a compilation's graph breaks and their reasons. The counters are
    process-wide, so :class:`SLoPeModule` counts what its own first training step adds.
    ``tests/test_module.py`` fails with a message naming this function if torch changes them.
    """
    from torch._dynamo.utils import counters  # private: see the docstring

    return {key: Counter(counters[key]) for key in ("graph_break", "unimplemented")}
