"""The baseline 2:4 methods as callbacks: SRSTE, TransposableSparse and OneShotPrune train a
dense SLoPeModule, hand back plain nn.Linear layers before it exports, resume from
checkpoints, refuse what they cannot do, and are configurable from a LightningCLI YAML."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import reference_nm_mask
from lightning_helpers import LossRecorder
from slope_lightning.baselines import (
    FixedMaskLinear,
    SRSTELinear,
    TransposableSparseLinear,
    srste_sparsify,
    transposable_mask,
)
from slope_lightning.callbacks import SRSTE, OneShotPrune, SLoPe, TransposableSparse
from slope_lightning.export import load_exported
from slope_lightning.module import SLoPeModule

OVERRIDES = {"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1}
VOCAB, TIME = 96, 16
#: The block linears of the tiny model, as named in the LightningModule.
BLOCK = [
    f"model.blocks.0.{layer}"
    for layer in (
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def make_module(root: Path, sparse: bool = False) -> SLoPeModule:
    torch.manual_seed(0)
    return SLoPeModule(
        preset="tiny",
        vocab_size=VOCAB,
        seq_len=TIME,
        model_overrides=OVERRIDES,
        sparsity={"sparse": sparse},
        optimizer={"lr": 1e-2, "warmup": 0},
        export_dir=str(root / "export"),
    )


def tokens(batches: int = 6, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batches * batch_size, TIME), generator=g)
    return DataLoader(TensorDataset(x, x.roll(-1, dims=1)), batch_size=batch_size)


def fit(
    module: pl.LightningModule,
    callbacks: list[Callback],
    root: Path,
    data: DataLoader | None = None,
    ckpt_path: Path | None = None,
) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=6,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data if data is not None else tokens(), ckpt_path=ckpt_path)
    return trainer


class Probe(Callback):
    """Before every training batch: the class of each block linear, its weight, mask and
    Parameter identity, the batch's inputs, and a copy of the model (all by optimizer step);
    at on_train_end, the block weights as they are then."""

    def __init__(self) -> None:
        self.kinds: dict[int, set[str]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.param_ids: dict[int, set[int]] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.models: dict[int, nn.Module] = {}
        self.final: dict[str, nn.Module] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        layers = dict(pl_module.named_modules())
        self.kinds[step] = {type(layers[name]).__name__ for name in BLOCK}
        self.weights[step] = {name: layers[name].weight.detach().clone() for name in BLOCK}
        self.masks[step] = {
            name: layers[name].mask().clone() for name in BLOCK if hasattr(layers[name], "mask")
        }
        self.param_ids[step] = {id(layers[name].weight) for name in BLOCK}
        self.inputs[step] = batch[0]
        self.models[step] = copy.deepcopy(pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        layers = dict(pl_module.named_modules())
        self.final = {name: copy.deepcopy(layers[name]) for name in BLOCK}


def exported_block_weights(root: Path) -> dict[str, torch.Tensor]:
    """The exported model's block linear weights (by the module's names); checks that every
    block linear is a plain nn.Linear and that the embedding and LM head are dense."""
    model = load_exported(root / "export")
    layers = dict(model.named_modules())
    assert bool((model.tok_embed.weight != 0).all()) and bool((model.lm_head.weight != 0).all())
    weights = {}
    for name in BLOCK:
        layer = layers[name.removeprefix("model.")]
        assert type(layer) is nn.Linear, name
        weights[name] = layer.weight.detach()
    return weights


def max_kept_per_group(weight: torch.Tensor, m: int = 4) -> int:
    """The most nonzeros in any group of ``m`` consecutive entries along d_in."""
    return int((weight.reshape(-1, m) != 0).sum(-1).max())


def assert_n_m_sparse(weights: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> None:
    for name, weight in weights.items():
        assert max_kept_per_group(weight, m) <= n, name


# ------------------------------------------------------------------ SR-STE


def test_srste_trains_with_a_moving_mask_and_exports_the_n_m_model_it_trained(tmp_path):
    module, before, after = make_module(tmp_path), Probe(), Probe()
    callback = SRSTE()
    trainer = fit(module, [before, callback, after], tmp_path)
    assert callback.converted == BLOCK
    assert all(kinds == {"SRSTELinear"} for kinds in after.kinds.values())
    assert len(after.kinds) == 6 and trainer.global_step == 6
    # the shared Parameters are the ones the optimizer updates, every step
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert after.param_ids[0] <= optimized and after.param_ids[0] == after.param_ids[5]
    changed = [
        name for name in BLOCK if not torch.equal(after.masks[0][name], after.masks[5][name])
    ]
    assert changed, "the SR-STE mask is recomputed from the weights and moves as they train"
    exported = exported_block_weights(tmp_path)
    assert_n_m_sparse(exported)
    for name in BLOCK:
        layer = before.final[name]
        assert isinstance(layer, SRSTELinear)  # at on_train_end, before SRSTE hands back
        master = layer.weight.detach()
        assert torch.equal(exported[name], master * reference_nm_mask(master, 2, 4)), name
    assert all(type(module.get_submodule(name)) is nn.Linear for name in BLOCK)


# ------------------------------------------------------------------ transposable 2:4


def test_transposable_sparse_exports_a_transposable_2_4_model(tmp_path):
    module, before, after = make_module(tmp_path), Probe(), Probe()
    fit(module, [before, TransposableSparse(), after], tmp_path)
    assert all(kinds == {"TransposableSparseLinear"} for kinds in after.kinds.values())
    exported = exported_block_weights(tmp_path)
    assert_n_m_sparse(exported)
    assert_n_m_sparse({name: w.t().contiguous() for name, w in exported.items()})  # and d_out
    for name in BLOCK:
        layer = before.final[name]
        assert isinstance(layer, TransposableSparseLinear) and layer.chosen_backends == (
            "reference",
        )  # the default backend ("auto") runs the reference on CPU
        master = layer.weight.detach()
        assert torch.equal(exported[name], master * transposable_mask(master)), name


def test_transposable_sparse_dense_tail_trains_the_last_half_dense_and_exports_dense(tmp_path):
    module, before, after = make_module(tmp_path), Probe(), Probe()
    callback = TransposableSparse(dense_tail=0.5)
    fit(module, [before, callback, after], tmp_path)
    assert callback.dense_from == 3 and callback.densified_at == 3
    assert [after.kinds[step] for step in range(6)] == [{"TransposableSparseLinear"}] * 3 + [
        {"Linear"}
    ] * 3
    assert after.param_ids[0] == after.param_ids[5]  # the master weights train on, unmasked
    exported = exported_block_weights(tmp_path)
    assert all(max_kept_per_group(w) > 2 for w in exported.values())  # dense, not N:M
    for name in BLOCK:
        assert torch.equal(exported[name], before.final[name].weight.detach()), name


# ------------------------------------------------------------------ one-shot pruning


def test_oneshot_prune_halfway_prunes_at_step_3_then_fine_tunes_with_the_mask_fixed(tmp_path):
    module, before, after = make_module(tmp_path), Probe(), Probe()
    callback = OneShotPrune(at=0.5)
    trainer = fit(module, [before, callback, after], tmp_path)
    assert callback.pruned and callback.pruned_at == 3 and callback.pruned_layers == BLOCK
    assert [after.kinds[step] for step in range(6)] == [{"Linear"}] * 3 + [{"FixedMaskLinear"}] * 3
    # the dense Parameters became the pruned layers' ones: the optimizer keeps training them
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert after.param_ids[2] == after.param_ids[3] == after.param_ids[5] <= optimized
    for name in BLOCK:
        mask = after.masks[3][name]
        assert torch.equal(mask, reference_nm_mask(before.weights[3][name], 2, 4))  # dense
        assert torch.equal(after.masks[5][name], mask)  # fixed
        weight = before.final[name].weight.detach()
        assert bool((weight[~mask] == 0).all()), name  # pruned weights stay exactly zero
        assert not torch.equal(weight[mask], after.weights[3][name][mask])  # kept ones train
    exported = exported_block_weights(tmp_path)
    assert_n_m_sparse(exported)
    for name in BLOCK:
        assert torch.equal(exported[name], before.final[name].weight.detach()), name


def test_oneshot_prune_at_the_end_prunes_the_dense_final_weights(tmp_path):
    module, before, after = make_module(tmp_path), Probe(), Probe()
    callback = OneShotPrune(at=1.0)
    fit(module, [before, callback, after], tmp_path)
    assert all(kinds == {"Linear"} for kinds in after.kinds.values())
    assert callback.pruned_at == 6
    exported = exported_block_weights(tmp_path)
    for name in BLOCK:
        dense = before.final[name]
        assert type(dense) is nn.Linear  # still dense when on_train_end begins
        weight = dense.weight.detach()
        assert torch.equal(exported[name], weight * reference_nm_mask(weight, 2, 4)), name


def test_oneshot_prune_at_the_start_keeps_the_magnitude_mask_of_the_initial_weights(tmp_path):
    module, probe = make_module(tmp_path), Probe()
    initial = {name: module.get_submodule(name).weight.detach().clone() for name in BLOCK}
    callback = OneShotPrune(at=0.0)
    fit(module, [callback, probe], tmp_path)
    assert callback.pruned_at == 0
    assert all(kinds == {"FixedMaskLinear"} for kinds in probe.kinds.values())
    exported = exported_block_weights(tmp_path)
    for name in BLOCK:
        mask = reference_nm_mask(initial[name], 2, 4)
        assert torch.equal(probe.masks[0][name], mask) and torch.equal(probe.masks[5][name], mask)
        assert bool((exported[name][~mask] == 0).all()), name


def test_oneshot_wanda_scores_by_the_input_norms_of_the_last_training_batches(tmp_path):
    module, before, after = make_module(tmp_path), Probe(), Probe()
    callback = OneShotPrune(at=0.5, method="wanda", calibration_batches=2)
    fit(module, [before, callback, after], tmp_path)
    assert callback.pruned_at == 3
    # the dense model just before the prune, fed the inputs of steps 2 and 3 (the batch about
    # to be trained on included): Σ x_j² per input feature of every block linear
    dense = before.models[3].eval()
    squares: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0)

        return hook

    for name in BLOCK:
        dense.get_submodule(name.removeprefix("model.")).register_forward_hook(record(name))
    with torch.no_grad():
        for step in (2, 3):
            dense(before.inputs[step])
    differs = []
    for name in BLOCK:
        weight = dense.get_submodule(name.removeprefix("model.")).weight.detach().double()
        wanda = reference_nm_mask(weight.abs() * squares[name].sqrt()[None, :], 2, 4)
        assert torch.equal(after.masks[3][name], wanda), name
        differs.append(not torch.equal(wanda, reference_nm_mask(weight, 2, 4)))
    assert any(differs), "Wanda chose the same entries as magnitude everywhere: no evidence"
    assert_n_m_sparse(exported_block_weights(tmp_path))


# ------------------------------------------------------------------ resume


class SaveAt(Callback):
    """Saves a checkpoint after optimizer step ``step`` and stops (an interrupted run)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize(
    "make",
    [SRSTE, lambda: TransposableSparse(dense_tail=0.5), lambda: OneShotPrune(at=0.5)],
    ids=["srste", "transposable-dense-tail", "oneshot-after-pruning"],
)
def test_a_checkpoint_taken_mid_run_resumes_exactly(make, tmp_path):
    data = tokens(batches=2)  # epochs of 2 steps: the checkpoint at step 4 ends an epoch
    full, full_losses = LossRecorder(), None
    fit(make_module(tmp_path / "full"), [make(), full], tmp_path / "full", data)
    full_losses = full.losses
    ckpt = tmp_path / "step4.ckpt"
    first = LossRecorder()
    fit(make_module(tmp_path / "a"), [make(), first, SaveAt(4, ckpt)], tmp_path / "a", data)
    rest, probe, callback = LossRecorder(), Probe(), make()
    fit(make_module(tmp_path / "b"), [callback, rest, probe], tmp_path / "b", data, ckpt)
    assert sorted(rest.losses) == [4, 5]
    assert {**{s: first.losses[s] for s in range(4)}, **rest.losses} == full_losses
    if isinstance(callback, OneShotPrune):  # loaded pruned, not pruned again
        assert callback.pruned_at == 3 and probe.kinds[4] == {"FixedMaskLinear"}
    expected = exported_block_weights(tmp_path / "full")
    resumed = exported_block_weights(tmp_path / "b")
    for name in BLOCK:
        assert torch.equal(resumed[name], expected[name]), name


def test_validate_loads_a_checkpoint_taken_after_pruning(tmp_path):
    ckpt = tmp_path / "step4.ckpt"
    fit(make_module(tmp_path), [OneShotPrune(at=0.5), SaveAt(4, ckpt)], tmp_path)
    module = make_module(tmp_path / "b")
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[OneShotPrune(at=0.5)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, tokens(batches=1), ckpt_path=ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for name in BLOCK:
        layer = module.get_submodule(name)
        assert isinstance(layer, FixedMaskLinear)
        assert torch.equal(layer.positions, state[f"{name}.positions"])


# ------------------------------------------------------------------ any LightningModule


class Regression(pl.LightningModule):
    """Not ours: an MLP built in configure_model, trained by SGD with momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Sequential | None = None

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def regression_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(24, 16, generator=g), torch.randn(24, 8)), 4)


@pytest.mark.parametrize(
    "make",
    [SRSTE, TransposableSparse, lambda: OneShotPrune(at=0.5, method="wanda")],
    ids=["srste", "transposable", "oneshot-wanda"],
)
def test_a_foreign_module_built_in_configure_model_trains_and_ends_n_m_sparse(make, tmp_path):
    module, callback = Regression(), make()
    layers = ["net.0", "net.2"]
    trainer = fit(module, [callback], tmp_path, regression_data())
    assert trainer.global_step == 6
    assert all(type(module.get_submodule(name)) is nn.Linear for name in layers)
    assert_n_m_sparse({name: module.get_submodule(name).weight for name in layers})
    if isinstance(callback, OneShotPrune):
        assert callback.pruned_at == 3
    else:  # converted at on_fit_start, after the optimizer was built over the dense layers
        assert callback.converted == layers


# ------------------------------------------------------------------ once, and refusals


def test_a_module_already_converted_is_not_converted_again_and_validate_converts_nothing(
    tmp_path,
):
    module = make_module(tmp_path)
    srste_sparsify(module)  # as an earlier, interrupted fit of the same module left it
    layers = {name: module.get_submodule(name) for name in BLOCK}
    callback, probe = SRSTE(), Probe()
    trainer = fit(module, [callback, probe], tmp_path)
    assert callback.converted == BLOCK
    assert probe.param_ids[0] == {id(layer.weight) for layer in layers.values()}
    assert all(type(module.get_submodule(name)) is nn.Linear for name in BLOCK)
    trainer.validate(module, tokens(batches=1))
    assert all(type(module.get_submodule(name)) is nn.Linear for name in BLOCK)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SRSTE(n=3, m=2), r"SRSTE\(n=3, m=2\).*1 <= n < m"),
        (lambda: SRSTE(decay=-1.0), r"SRSTE\(decay=-1.0\).*>= 0"),
        (lambda: SRSTE(include="*.mlp.*"), r"SRSTE\(include=.*list of fnmatch patterns"),
        (lambda: TransposableSparse(dense_tail=1.0), r"dense_tail=1.0.*\[0, 1\)"),
        (lambda: TransposableSparse(dense_tail=-0.1), r"dense_tail=-0.1.*\[0, 1\)"),
        (lambda: TransposableSparse(backend="cuda"), r"backend='cuda'.*reference, cutlass"),
        (lambda: OneShotPrune(at=1.5), r"at=1.5.*\[0, 1\]"),
        (lambda: OneShotPrune(method="random"), r"method='random'.*magnitude, wanda"),
        (lambda: OneShotPrune(n=0), r"OneShotPrune\(n=0, m=4\)"),
        (lambda: OneShotPrune(calibration_batches=0), r"calibration_batches=0.*positive"),
        (lambda: OneShotPrune(exclude=[1]), r"exclude=\[1\].*list of fnmatch"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_every_training_method_selects_the_same_layers_of_the_tiny_preset():
    torch.manual_seed(0)
    module = SLoPeModule(preset="tiny", vocab_size=VOCAB, seq_len=TIME, sparsity={"sparse": False})
    blocks = [f"model.blocks.{i}.{name.split('.', 3)[3]}" for i in range(4) for name in BLOCK]
    methods = [SLoPe(), SRSTE(), TransposableSparse(), OneShotPrune()]
    for method in methods:
        plan = method.plan(module)
        assert [d.name for d in plan.planned] == blocks, type(method).__name__
        assert [d.name for d in plan.skipped] == ["model.lm_head"]  # the tied head stays dense
    assert all(type(module.get_submodule(name)) is nn.Linear for name in blocks)  # planned only


@pytest.mark.parametrize("make", [SRSTE, TransposableSparse, OneShotPrune])
def test_a_module_with_slope_layers_is_refused(make, tmp_path):
    with pytest.raises(ValueError, match="already has 7 SLoPe SparseLinear layers.*sparse: false"):
        fit(make_module(tmp_path, sparse=True), [make()], tmp_path)


@pytest.mark.parametrize("other", [SLoPe, OneShotPrune])
def test_two_methods_in_one_run_are_refused(other, tmp_path):
    with pytest.raises(ValueError, match=f"SRSTE cannot train beside {other.__name__}"):
        fit(make_module(tmp_path), [SRSTE(), other()], tmp_path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SRSTE(exclude=["*"]),
        lambda: TransposableSparse(exclude=["*"]),
        lambda: OneShotPrune(exclude=["*"]),
    ],
)
def test_nothing_to_convert_is_a_clear_error(make, tmp_path):
    with pytest.raises(ValueError, match="no layer of SLoPeModule can be converted.*exclude"):
        fit(make_module(tmp_path), [make()], tmp_path)


# ------------------------------------------------------------------ configuration


def test_the_callbacks_are_configurable_from_a_lightning_cli_yaml():
    for cls in (SRSTE, TransposableSparse, OneShotPrune):
        parameters = inspect.signature(cls.__init__).parameters.values()
        assert all(
            p.annotation is not inspect.Parameter.empty for p in parameters if p.name != "self"
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(
        """
        callbacks:
          - class_path: slope_lightning.callbacks.SRSTE
            init_args: {decay: 1.0e-4, exclude: ["*lm_head"]}
          - class_path: slope_lightning.callbacks.TransposableSparse
            init_args: {dense_tail: 0.25, backend: reference}
          - class_path: slope_lightning.callbacks.OneShotPrune
            init_args: {at: 0.5, method: wanda, calibration_batches: 4}
        """
    )
    srste, transposable, oneshot = parser.instantiate(config).callbacks
    assert isinstance(srste, SRSTE) and srste.decay == 1e-4 and srste.exclude == ("*lm_head",)
    assert isinstance(transposable, TransposableSparse) and transposable.dense_tail == 0.25
    assert isinstance(oneshot, OneShotPrune) and oneshot.method == "wanda"
    # The mask methods are the library's one vocabulary (MaskMethod); OneShotPrune refuses
    # "random" when it is built, naming the two it takes.
    with pytest.raises(ValueError, match=r"method='random'.*choose one of magnitude, wanda"):
        parser.instantiate(
            parser.parse_string(
                "callbacks: [{class_path: slope_lightning.callbacks.OneShotPrune, "
                "init_args: {method: random}}]"
            )
        )
