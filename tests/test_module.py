"""SLoPeModule trains, resumes exactly across the adapter start, exports, and validates config."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_helpers import LossRecorder, StopAt, write_corpus
from slope_lightning.callbacks import LazyLoRA, MaskScheduler
from slope_lightning.data import TextDataModule
from slope_lightning.export import load_exported
from slope_lightning.module import OptimizerConfig, SLoPeModule, SparsityConfig, lr_multiplier
from slope_lightning.sparse import SparseLinear, sparse_layers

SMALL = {"n_layer": 2, "d_model": 64, "n_head": 2, "n_kv_head": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "docs"), str(root / "cache")


def make_data(corpus, batch_size: int = 4) -> TextDataModule:
    sources, cache = corpus
    return TextDataModule(
        sources=[sources], cache_dir=cache, vocab_size=300, seq_len=32, batch_size=batch_size
    )


def make_module(sparse: bool = True, **kwargs) -> SLoPeModule:
    return SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides=SMALL,
        sparsity=SparsityConfig(sparse=sparse),
        optimizer=OptimizerConfig(lr=3e-3, warmup=2),
        **kwargs,
    )


def make_trainer(root: Path, callbacks, max_steps: int = 8) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def slope_callbacks(start: int = 5) -> list[pl.Callback]:
    return [MaskScheduler(every=1), LazyLoRA(start=start, rank=4)]


def run(corpus, root: Path, max_steps: int, stop_at: int | None = None, ckpt: Path | None = None):
    pl.seed_everything(7)
    module = make_module(export_dir=str(root / "export"))
    recorder = LossRecorder()
    callbacks = [*slope_callbacks(), recorder] + ([StopAt(stop_at)] if stop_at else [])
    trainer = make_trainer(root, callbacks, max_steps)
    trainer.fit(module, datamodule=make_data(corpus), ckpt_path=ckpt)
    return trainer, module, recorder.losses


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 6], ids=["before-adapters", "after-adapters"])
def test_resume_continues_exactly_like_an_uninterrupted_run(corpus, tmp_path, stop_at):
    _, full_module, full = run(corpus, tmp_path / "full", max_steps=8)
    trainer, _, first = run(corpus, tmp_path / "part", max_steps=8, stop_at=stop_at)
    ckpt = tmp_path / "interrupted.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed_module, rest = run(corpus, tmp_path / "resumed", max_steps=8, ckpt=ckpt)
    assert sorted(first) == list(range(stop_at))
    assert sorted(rest) == list(range(stop_at, 8))
    assert {**first, **rest} == full  # bit-exact losses, step by step
    for (name, a), (_, b) in zip(
        full_module.state_dict().items(), resumed_module.state_dict().items(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_training_reduces_loss_and_exports_a_loadable_model(corpus, tmp_path):
    _, module, losses = run(corpus, tmp_path, max_steps=8)
    assert losses[7] < losses[0]
    assert all(layer.adapter is not None for _, layer in sparse_layers(module))
    exported = load_exported(tmp_path / "export")
    idx = torch.randint(0, 300, (2, 16))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(idx)[0], module.model(idx)[0])
    assert any(isinstance(m, SparseLinear) for m in exported.modules())


def test_dense_baseline_has_no_sparse_layers_and_the_same_architecture():
    dense, sparse = make_module(sparse=False), make_module(sparse=True)
    assert not sparse_layers(dense)
    assert len(sparse_layers(sparse)) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert dense.config == sparse.config


def test_weight_decay_applies_to_matrices_only(corpus, tmp_path):
    module = make_module()
    trainer = make_trainer(tmp_path, [], max_steps=1)
    trainer.fit(module, datamodule=make_data(corpus))
    decayed, plain = trainer.optimizers[0].param_groups
    assert (decayed["name"], plain["name"]) == ("decay", "no_decay")
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])


def test_the_embedding_trains_at_its_own_scaled_lr_and_resumes_with_it(corpus, tmp_path):
    """optimizer.embedding_lr_scale: the token embedding (tied with the head) in a group of its
    own at that multiple of lr at every step of the schedule; a checkpoint resumes into it."""
    module = SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides=SMALL,
        optimizer=OptimizerConfig(lr=3e-3, warmup=2, embedding_lr_scale=4.0),
    )
    trainer = make_trainer(tmp_path, [], max_steps=3)
    trainer.fit(module, datamodule=make_data(corpus))
    groups = {group["name"]: group for group in trainer.optimizers[0].param_groups}
    assert list(groups) == ["decay", "no_decay", "embedding"]
    embedding = module.model.tok_embed.weight
    assert groups["embedding"]["params"] == [embedding]
    assert module.model.lm_head.weight is embedding  # the tied head: trained once, in it
    assert all(p is not embedding for p in groups["decay"]["params"])
    assert groups["embedding"]["weight_decay"] == groups["decay"]["weight_decay"] == 0.1
    assert groups["embedding"]["lr"] == pytest.approx(4 * groups["decay"]["lr"], rel=1e-12)
    assert groups["embedding"]["initial_lr"] == pytest.approx(1.2e-2)
    path = tmp_path / "scaled.ckpt"
    trainer.save_checkpoint(path)
    resumed = make_trainer(tmp_path / "resumed", [], max_steps=4)
    resumed.fit(
        SLoPeModule.load_from_checkpoint(path), datamodule=make_data(corpus), ckpt_path=path
    )
    (group,) = [g for g in resumed.optimizers[0].param_groups if g["name"] == "embedding"]
    assert group["lr"] == pytest.approx(4 * resumed.optimizers[0].param_groups[0]["lr"])


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimizerConfig(schedule="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(step, 10, 100, cfg) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))
    linear = OptimizerConfig(schedule="linear", min_lr_ratio=0.0)
    assert lr_multiplier(55, 10, 100, linear) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "gpt5"}, "gpt5"),
        (
            {"model_overrides": {"n_layers": 2}},
            "model_overrides: unknown .*field.*n_layers",
        ),
        # The configs validate themselves; mappings (a checkpoint's hparams) go through them.
        ({"optimizer": {"lr": 0.0}}, "optimizer.lr must be positive"),
        ({"optimizer": {"min_lr_ratio": 2.0}}, "min_lr_ratio"),
        ({"optimizer": {"learning_rate": 1.0}}, r"unknown OptimizerConfig field\(s\)"),
        ({"sparsity": {"n": 4, "m": 4}}, "n < m"),
        ({"sparsity": {"backend": "fastest"}}, "sparsity.backend: unknown backend 'fastest'"),
        ({"sparsity": 3}, "expected a SparsityConfig or a mapping"),
    ],
)
def test_bad_module_settings_are_clear_errors(kwargs, match):
    base = {"preset": "tiny", "vocab_size": 300, "seq_len": 32, "model_overrides": SMALL}
    with pytest.raises(ValueError, match=match):
        SLoPeModule(**{**base, **kwargs})


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(corpus, tmp_path):
    module = SLoPeModule(preset="tiny", vocab_size=64, seq_len=32, model_overrides=SMALL)
    trainer = make_trainer(tmp_path, [], max_steps=1)
    with pytest.raises(
        ValueError, match="tokenizer has .* tokens but the model's vocab_size is 64"
    ):
        trainer.fit(module, datamodule=make_data(corpus))


def test_max_steps_is_required_for_the_schedule(corpus, tmp_path):
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        trainer.fit(make_module(), datamodule=make_data(corpus))


@pytest.mark.slow
def test_validate_from_a_checkpoint_taken_after_the_adapter_start(corpus, tmp_path):
    trainer, module, _ = run(corpus, tmp_path / "train", max_steps=6)
    ckpt = tmp_path / "after.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = make_module()
    assert all(layer.adapter is None for _, layer in sparse_layers(fresh))
    evaluator = pl.Trainer(  # LazyLoRA restores the adapters, as in the CLI's validate
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=2,
        callbacks=[LazyLoRA(start=5, rank=4)],
    )
    evaluator.validate(fresh, datamodule=make_data(corpus), ckpt_path=ckpt)
    for (name, layer), (_, trained) in zip(
        sparse_layers(fresh), sparse_layers(module), strict=True
    ):
        assert layer.adapter is not None, name
        assert torch.equal(layer.adapter.up, trained.adapter.up)


def test_hparams_record_the_sparsity_and_optimizer_configs_and_reload(corpus, tmp_path):
    module = SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides=SMALL,
        sparsity=SparsityConfig(include=["*.attn.*"]),
        optimizer=OptimizerConfig(lr=3e-3, warmup=2),
    )
    assert module.hparams_initial["sparsity"] == module.sparsity.to_dict()
    assert module.hparams_initial["optimizer"]["lr"] == 3e-3
    trainer = make_trainer(tmp_path, [], max_steps=1)
    trainer.fit(module, datamodule=make_data(corpus))
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = SLoPeModule.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.sparsity == module.sparsity and loaded.optim == module.optim
    assert {name for name, _ in sparse_layers(loaded)} == {
        name for name, _ in sparse_layers(module)
    }
    for (name, a), (_, b) in zip(
        module.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


# ------------------------------------------------------------------ the private torch APIs it names


def test_optimizer_state_keyed_by_position_is_rekeyed_by_parameter_name_as_fsdp1_did():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    from slope_lightning.module import optimizer_state_by_name

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    # Positions in model.parameters(), as Lightning's consolidated FSDP2 checkpoint keys them.
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight]}]
    )
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    by_name = optimizer_state_by_name(state, model)
    assert set(by_name["state"]) == {"0.weight", "0.bias", "2.weight"}
    assert [g["params"] for g in by_name["param_groups"]] == [["0.weight", "0.bias"], ["2.weight"]]
    assert torch.equal(by_name["state"]["2.weight"]["exp_avg"], state["state"][2]["exp_avg"])
    # The same mapping as the FSDP1 function it replaces, on a model FSDP1 does not wrap.
    fsdp1 = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, model)
    assert by_name["state"].keys() == fsdp1["state"].keys()
    assert [sorted(g["params"]) for g in by_name["param_groups"]] == [
        sorted(g["params"]) for g in fsdp1["param_groups"]
    ]
    assert optimizer_state_by_name(by_name, model) == by_name  # names are kept
    with pytest.raises(ValueError, match="position 9, but the module has 4 parameters"):
        optimizer_state_by_name({"state": {9: {}}, "param_groups": []}, model)


def test_dynamo_counters_still_record_graph_breaks_by_reason():
    """``dynamo_counters`` reads the private ``torch._dynamo.utils.counters``: if this fails,
    torch moved or changed them; update ``slope_lightning.module.dynamo_counters``."""
    from slope_lightning.module import dynamo_counters

    @torch.compiler.disable
    def eager(x):
        return x + 1

    def f(x):
        return eager(x * 2) * 3

    torch._dynamo.reset()
    before = dynamo_counters()
    torch.compile(f, backend="eager")(torch.ones(2))
    after = dynamo_counters()
    after["graph_break"].subtract(before["graph_break"])
    assert sum(after["graph_break"].values()) >= 1, (
        "torch._dynamo.utils.counters['graph_break'] no longer counts graph breaks: update "
        "slope_lightning.module.dynamo_counters"
    )
    assert set(after) == {"graph_break", "unimplemented"}
