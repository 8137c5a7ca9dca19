"""The callbacks package: every callback is ``slope_lightning.callbacks.X`` in a file named for
it; the three coordination rules of ``callbacks/shared.py`` hold for any callback built on its
types; the old paths (``slope_lightning.faults``, ``slope_lightning.method_callbacks``) still
work with a deprecation warning, in Python and YAML; and a checkpoint written before the move
(``tests/fixtures/pre_move.ckpt``) resumes with the current code."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slope_lightning.callbacks as callbacks
from slope_lightning import checkpoints
from slope_lightning.callbacks import (
    SRSTE,
    CrashCheckpoint,
    LazyLoRA,
    MaskScheduleOwner,
    MaskScheduler,
    NonFiniteGuard,
    SLoPe,
    TokenThroughput,
    TrainingMethod,
)
from slope_lightning.callbacks.shared import mask_schedule_owned, sparse_layers_after_conversion
from slope_lightning.cli import main
from slope_lightning.module import OptimizerConfig, SLoPeModule, SparsityConfig
from slope_lightning.sparse import sparse_layers

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pre_move.ckpt"

#: Each callback and the file of ``callbacks/`` named for it.
FILES = {
    "SLoPe": "slope",
    "MaskScheduler": "mask_scheduler",
    "LazyLoRA": "lazy_lora",
    "InitFromPretrained": "init_from_pretrained",
    "TokenThroughput": "throughput",
    "SRSTE": "srste",
    "TransposableSparse": "transposable",
    "OneShotPrune": "oneshot",
    "NonFiniteGuard": "non_finite_guard",
    "CrashCheckpoint": "crash_checkpoint",
}


class Plain(pl.LightningModule):
    """A dense MLP; with ``in_configure_model`` its layers are built in configure_model."""

    def __init__(self, in_configure_model: bool = False, data_sgd: bool = False) -> None:
        super().__init__()
        self.in_configure_model = in_configure_model
        self.data_sgd = data_sgd
        self.net: nn.Module | None = None if in_configure_model else self._build()

    @staticmethod
    def _build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self._build()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.data_sgd:
            return DataSGD(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DataSGD(torch.optim.Optimizer):
    """SGD through ``.data``: the values' version counter does not move (as with a fused
    optimizer), so a layer only knows of a step when someone reports it."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-group["lr"])
        return loss


def loader(batches: int = 8) -> DataLoader:
    x = torch.randn(batches * 4, 16, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.flip(-1)), batch_size=4)


def trainer(callbacks_: list[Callback], max_steps: int = 3, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks_,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# One file per callback, one name each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_every_callback_is_slope_lightning_callbacks_x_from_a_file_named_for_it(name):
    cls = getattr(callbacks, name)
    assert name in callbacks.__all__
    assert issubclass(cls, Callback)
    assert cls.__module__ == f"slope_lightning.callbacks.{FILES[name]}"
    assert (ROOT / "src" / "slope_lightning" / "callbacks" / f"{FILES[name]}.py").is_file()


def test_every_callback_instantiates_from_its_yaml_class_path():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    text = yaml.safe_dump(
        {"callbacks": [{"class_path": f"slope_lightning.callbacks.{name}"} for name in FILES]}
    )
    built = parser.instantiate(parser.parse_string(text)).callbacks
    assert [type(c).__name__ for c in built] == list(FILES)


# --------------------------------------------------------------------------------------------
# Rule 1: one training method per run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope_first", [True, False], ids=["slope-first", "srste-first"])
def test_two_training_methods_in_one_run_are_refused(slope_first):
    methods: list[Callback] = [SLoPe(), SRSTE()] if slope_first else [SRSTE(), SLoPe()]
    first, second = (type(m).__name__ for m in methods)
    with pytest.raises(ValueError, match=f"{first} cannot train beside {second}"):
        trainer(methods).fit(Plain(), loader())


class AnotherMethod(TrainingMethod):
    """A training method from outside the package: it imports only the shared type."""


def test_any_training_method_is_refused_beside_slope_through_the_shared_type():
    with pytest.raises(ValueError, match="SLoPe cannot train beside AnotherMethod"):
        trainer([SLoPe(), AnotherMethod()]).fit(Plain(), loader())


# --------------------------------------------------------------------------------------------
# Rule 2: convert the model before others look at it
# --------------------------------------------------------------------------------------------


class Looker(Callback):
    """Reads the sparse layers when fitting starts, as MaskScheduler and LazyLoRA do."""

    def __init__(self) -> None:
        self.seen: list[str] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = sparse_layers_after_conversion(trainer, pl_module, "Looker")
        self.seen = [name for name, _ in layers]


def test_a_callback_before_slope_sees_the_layers_slope_converts_at_fit_start():
    looker, module = Looker(), Plain(in_configure_model=True)
    trainer([looker, SLoPe()], max_steps=1).fit(module, loader())
    assert looker.seen == ["net.0", "net.2"]  # converted first, though SLoPe comes later


def test_without_a_training_method_a_dense_module_leaves_the_looker_idle():
    looker = Looker()
    with pytest.warns(UserWarning, match="Looker is idle"):
        trainer([looker], max_steps=1).fit(Plain(), loader())
    assert looker.seen == []


# --------------------------------------------------------------------------------------------
# Rule 3: who owns the M_C schedule
# --------------------------------------------------------------------------------------------


class RefreshCounter(Callback):
    """Counts the steps at which any layer's transposed mask (its col_index) was rebuilt."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.refreshed = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = [layer.col_index for _, layer in sparse_layers(pl_module)]
        if self.before and any(a is not b for a, b in zip(now, self.before, strict=True)):
            self.refreshed += 1
        self.before = now


class SilentOwner(MaskScheduleOwner):
    """Owns the M_C schedule (switching the layers' own refresh off) and never refreshes."""

    def on_fit_start(self, trainer, pl_module) -> None:
        for _, layer in sparse_layers(pl_module):
            layer.transpose_mask_interval = None


@pytest.mark.parametrize("owner", [False, True], ids=["no-owner", "owner"])
def test_slope_reports_optimizer_steps_to_the_layers_unless_an_owner_has_the_schedule(owner):
    counter = RefreshCounter()
    extra: list[Callback] = [SilentOwner()] if owner else []
    t = trainer([SLoPe(transpose_mask_interval=2), counter, *extra], max_steps=5)
    t.fit(Plain(data_sgd=True), loader())
    assert mask_schedule_owned(t) is owner
    # An interval of 2 counts optimizer steps, and only SLoPe's step reports count them (a
    # layer no one reports to refuses to train): M_C is re-derived after steps 2 and 4.
    assert counter.refreshed == (0 if owner else 2)


def test_mask_scheduler_is_the_shipped_owner_of_the_schedule():
    assert issubclass(MaskScheduler, MaskScheduleOwner)
    assert not mask_schedule_owned(trainer([SLoPe(), LazyLoRA()]))
    assert mask_schedule_owned(trainer([SLoPe(), MaskScheduler()]))


# --------------------------------------------------------------------------------------------
# The old paths, for one release
# --------------------------------------------------------------------------------------------

OLD_PATHS = [
    ("slope_lightning.faults", "CrashCheckpoint", callbacks),
    ("slope_lightning.faults", "NonFiniteGuard", callbacks),
    ("slope_lightning.faults", "NonFiniteError", callbacks),
    ("slope_lightning.faults", "load_checkpoint_file", checkpoints),
    ("slope_lightning.faults", "find_resume_checkpoint", checkpoints),
    ("slope_lightning.method_callbacks", "SRSTE", callbacks),
    ("slope_lightning.method_callbacks", "TransposableSparse", callbacks),
    ("slope_lightning.method_callbacks", "OneShotPrune", callbacks),
]


@pytest.mark.parametrize(
    ("old", "name", "new"), OLD_PATHS, ids=[f"{o}.{n}" for o, n, _ in OLD_PATHS]
)
def test_an_old_python_path_still_works_and_warns_with_the_new_one(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new.__name__}\.{name}"):
        found = getattr(module, name)
    assert found is getattr(new, name)


def test_an_unknown_old_name_is_an_attribute_error():
    faults = importlib.import_module("slope_lightning.faults")
    with pytest.raises(AttributeError, match="has no attribute 'SLoPe'"):
        faults.SLoPe  # noqa: B018


def test_old_yaml_class_paths_still_instantiate_with_a_warning():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    with pytest.warns(DeprecationWarning, match="moved to slope_lightning.callbacks"):
        config = parser.parse_string(
            "callbacks:\n"
            "  - class_path: slope_lightning.faults.NonFiniteGuard\n"
            "    init_args: {action: skip}\n"
            "  - class_path: slope_lightning.method_callbacks.SRSTE\n"
        )
        guard, srste = parser.instantiate(config).callbacks
    assert isinstance(guard, NonFiniteGuard) and guard.action == "skip"
    assert isinstance(srste, SRSTE)


def test_a_config_with_the_old_class_paths_still_parses_in_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    old = text.replace(
        "slope_lightning.callbacks.CrashCheckpoint", "slope_lightning.faults.CrashCheckpoint"
    ).replace("slope_lightning.callbacks.NonFiniteGuard", "slope_lightning.faults.NonFiniteGuard")
    assert old.count("slope_lightning.faults.") == 2
    (tmp_path / "old.yaml").write_text(old)
    with pytest.warns(DeprecationWarning, match="slope_lightning.faults.CrashCheckpoint moved"):
        assert main(["fit", "--config", "old.yaml", "--print_config"]) == 0


# --------------------------------------------------------------------------------------------
# A checkpoint written before the move resumes
# --------------------------------------------------------------------------------------------


def fixture_batches() -> DataLoader:
    """The data of tests/fixtures/make_pre_move_checkpoint.py (vocabulary 64, seq_len 16)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (16, 17), generator=generator)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)


def test_a_checkpoint_written_before_the_move_resumes_with_every_callbacks_state(tmp_path):
    saved = torch.load(FIXTURE, weights_only=True)
    assert saved["global_step"] == 3
    module = SLoPeModule(
        preset="tiny",
        vocab_size=64,
        seq_len=16,
        model_overrides={"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1},
        sparsity=SparsityConfig(sparse=False),
        optimizer=OptimizerConfig(lr=3e-3, warmup=1),
        export_dir=str(tmp_path / "export"),
    )
    mask, lazy = MaskScheduler(every=1), LazyLoRA(start=2, rank=4)
    guard = NonFiniteGuard(action="skip", max_skips=10)
    ours: list[Callback] = [
        SLoPe(),
        mask,
        lazy,
        TokenThroughput(),
        guard,
        CrashCheckpoint(dirpath=str(tmp_path / "crash")),
    ]
    # The state keys of the callbacks that saved state did not change with the move.
    assert {"LazyLoRA", "MaskScheduler", "NonFiniteGuard"} <= {c.state_key for c in ours}
    assert {"LazyLoRA", "MaskScheduler", "NonFiniteGuard"} <= set(saved["callbacks"])
    t = trainer(
        ours, max_steps=5, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=True
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Be aware that when using `ckpt_path`")
        t.fit(module, fixture_batches(), ckpt_path=FIXTURE)
    assert t.global_step == 5
    assert lazy.active and lazy.started_at == 2  # restored, not switched on again
    assert mask.refreshes == saved["callbacks"]["MaskScheduler"]["refreshes"] + 2
    assert guard.skipped == 0
    layers = sparse_layers(module)
    assert layers and all(layer.adapter is not None for _, layer in layers)
    assert all(torch.isfinite(p).all() for p in module.parameters())
