"""Configs where they belong: SparsityConfig beside the method, one config-to-sparsify mapping,
TransformerConfig.to_dict/from_dict for export and load, and how LightningCLI parses them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_helpers import write_corpus
from slope_lightning.cli import SLoPeCLI
from slope_lightning.data import TextDataModule
from slope_lightning.export import export_model, load_exported
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.module import SLoPeModule
from slope_lightning.optim import OptimizerConfig
from slope_lightning.sparse import DEFAULT_EXCLUDE, sparse_layers, sparsify
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.config import SparsityConfig

TINY_YAML = Path(__file__).parents[1] / "configs" / "tiny.yaml"
SMALL = "--model.model_overrides={n_layer: 1, d_model: 64, n_head: 2, n_kv_head: 1}"


def small_config() -> TransformerConfig:
    return TransformerConfig.from_name(
        "tiny", vocab_size=300, seq_len=32, n_layer=1, d_model=64, n_head=2, n_kv_head=1
    )


# ---------------------------------------------------------------------- SparsityConfig


def test_sparsity_config_lives_beside_the_method_and_is_re_exported():
    import slope_lightning.module as module

    assert module.SparsityConfig is SparsityConfig
    assert SparsityConfig.__module__ == "slope_lightning.sparse.config"


def test_the_backend_is_the_enum_and_a_name_string_is_converted():
    assert SparsityConfig().backend is BackendName.reference
    assert SparsityConfig(backend="auto").backend is BackendName.auto  # type: ignore[arg-type]
    legacy = SparsityConfig(backend="cusparselt+tiled")  # type: ignore[arg-type]
    assert legacy.backend is BackendName.cusparselt_tiled  # the spelling of earlier releases


def test_sparsity_config_round_trips_through_plain_values():
    config = SparsityConfig(n=1, m=4, include=("*.attn.*",), max_aspect_ratio=4.0)  # type: ignore[arg-type]
    data = config.to_dict()
    assert data["backend"] == "reference" and data["include"] == ["*.attn.*"]
    assert json.loads(json.dumps(data)) == data
    assert SparsityConfig.from_dict(data) == config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 4, "m": 4}, r"sparsity.n / sparsity.m: invalid N:M pattern 4:4: need 1 <= n < m"),
        ({"m": 512}, "m=512 is too large"),
        ({"backend": "fastest"}, r"sparsity.backend: unknown backend 'fastest'; choose one of "),
        ({"include": "*.attn.*"}, r"sparsity.include must be a list.*write \['\*.attn.\*'\]"),
        ({"exclude": ["lm_head", 3]}, "sparsity.exclude must hold pattern strings only"),
        ({"max_aspect_ratio": 0.5}, "sparsity.max_aspect_ratio must be a number >= 1"),
        ({"transpose_mask_interval": 0}, "transpose_mask_interval must be a positive number"),
        ({"mask_method": "wanda"}, r"mask_method='wanda' needs calibration.*calibrate_and_"),
        ({"mask_method": "best"}, r"mask_method must be one of \('magnitude', 'random', 'wanda'\)"),
        ({"sparse": "yes"}, "sparsity.sparse must be true or false"),
    ],
)
def test_bad_sparsity_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_from_dict_refuses_unknown_keys_listing_the_fields():
    with pytest.raises(ValueError, match=r"unknown SparsityConfig field\(s\) \['N'\]; valid"):
        SparsityConfig.from_dict({"N": 2})
    with pytest.raises(ValueError, match="must be given as a mapping"):
        SparsityConfig.from_dict(["n", 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------- sparsify(model, config)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 8))


def test_sparsify_with_a_config_equals_sparsify_with_keywords():
    config = SparsityConfig(n=1, m=4, exclude=["3"], transpose_mask_interval=None)
    by_config, by_keywords = mlp(), mlp()
    report = sparsify(by_config, config)
    expected = sparsify(by_keywords, 1, 4, exclude=("3",), transpose_mask_interval=None)
    assert report.layers == expected.layers
    assert [n for n, _ in sparse_layers(by_config)] == ["0", "2"]
    for (_, a), (_, b) in zip(sparse_layers(by_config), sparse_layers(by_keywords), strict=True):
        assert torch.equal(a.values, b.values) and a.transpose_mask_interval is None


def test_a_config_without_exclude_uses_the_default_exclusions():
    model = nn.Sequential()
    model.add_module("lm_head", nn.Linear(8, 8))
    model.add_module("body", nn.Linear(8, 8))
    report = sparsify(model, SparsityConfig())
    assert [d.name for d in report.converted] == ["body"]
    assert "lm_head" in DEFAULT_EXCLUDE


@pytest.mark.parametrize(
    "keywords",
    [
        {"m": 4},
        {"backend": "reference"},
        {"exclude": ()},
        {"include": None, "mask_method": "random"},
    ],
    ids=["m-equal-to-its-default", "backend", "exclude", "two"],
)
def test_a_config_and_setting_keywords_together_is_a_type_error(keywords):
    with pytest.raises(TypeError, match="these keywords were given too: " + ", ".join(keywords)):
        sparsify(mlp(), SparsityConfig(), **keywords)


def test_a_dense_config_or_a_non_module_is_refused():
    with pytest.raises(ValueError, match="sparse=False .*check config.sparse before calling"):
        sparsify(mlp(), SparsityConfig(sparse=False))
    with pytest.raises(TypeError, match="sparsify\\(\\) takes an nn.Module, got str"):
        sparsify("a string")  # type: ignore[arg-type]
    report = sparsify(mlp(), SparsityConfig(), seed=3)  # seed is not a config setting
    assert len(report.converted) == 3


# ---------------------------------------------------------------------- TransformerConfig


def test_transformer_config_round_trips_through_a_dict():
    config = small_config()
    data = config.to_dict()
    assert data["mlp_hidden"] == config.mlp_hidden  # derived fields are stored, filled in
    assert TransformerConfig.from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"n_layers": 2}, r"unknown TransformerConfig field\(s\) \['n_layers'\] in the given"),
        ({"n_layer": 2}, r"field\(s\) \['d_model', 'n_head', 'seq_len', 'vocab_size'\] missing"),
        ([1, 2], "must be a mapping of its fields"),
    ],
)
def test_transformer_config_from_dict_names_the_bad_keys(data, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig.from_dict(data)


def test_optimizer_config_round_trips_and_validates():
    config = OptimizerConfig(lr=1e-3, betas=(0.8, 0.9))
    data = config.to_dict()
    assert data["betas"] == [0.8, 0.9]  # YAML/JSON friendly
    assert OptimizerConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"optimizer.schedule must be one of"):
        OptimizerConfig(schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"optimizer.betas must be two numbers in \[0, 1\)"):
        OptimizerConfig(betas=(0.9, 1.0))


# ---------------------------------------------------------------------- export and load


def test_export_and_load_share_the_config_mapping(tmp_path):
    config = small_config()
    sparsity = SparsityConfig(include=["*.attn.*"], backend="emulated")  # type: ignore[arg-type]
    model = Transformer(config)
    sparsify(model, sparsity)
    export_model(model, config, sparsity, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"] == config.to_dict() and meta["sparsity"] == sparsity.to_dict()
    loaded = load_exported(tmp_path)
    assert [n for n, _ in sparse_layers(loaded)] == [n for n, _ in sparse_layers(model)]
    assert all(layer.backend.name == "reference" for _, layer in sparse_layers(loaded))
    idx = torch.randint(0, 300, (2, 8))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_export_model_refuses_a_model_that_is_not_the_projects_transformer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extras")
    hf_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=32)
    )
    sparsify(hf_model)
    config = small_config()
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*slope_lightning\.hf\.save_pretrained"):
        export_model(hf_model, config, SparsityConfig(), tmp_path / "hf")
    with pytest.raises(TypeError, match=r"Sequential.*\['0', '1'\].*save_pretrained"):
        export_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), config, None, tmp_path / "x")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "x").exists()  # nothing written


def test_export_model_takes_the_gathered_state_of_a_sharded_transformer(tmp_path):
    """Under FSDP2 the module exports a stand-in that holds the gathered state dict."""
    from slope_lightning.module import _StateDict

    config = small_config()
    model = Transformer(config)
    export_model(_StateDict(model.state_dict()), config, None, tmp_path)
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path).eval()(idx)[0], model.eval()(idx)[0])


def test_load_exported_names_the_broken_file(tmp_path):
    config = small_config()
    export_model(Transformer(config), config, None, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=r"model.safetensors is not a readable safetensors.*re-export"
    ):
        load_exported(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load_exported(tmp_path)
    bad = {"format": "slope-lightning/1", "model": {**config.to_dict(), "depth": 3}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(
        ValueError, match=r"config.json: unknown TransformerConfig field\(s\) \['depth'\]"
    ):
        load_exported(tmp_path)


# ---------------------------------------------------------------------- through LightningCLI


def cli(args: list[str], run: bool = True) -> SLoPeCLI:
    """The CLI in-process, as the console script builds it (errors propagate)."""
    return SLoPeCLI(
        SLoPeModule, TextDataModule, save_config_kwargs={"overwrite": True}, args=args, run=run
    )


def parse(tmp_path: Path, extra_yaml: str, *args: str) -> SLoPeCLI:
    """Instantiate (not run) the CLI on tiny.yaml plus ``extra_yaml``."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(extra_yaml)
    return cli(
        run=False,
        args=[
            "--config",
            str(TINY_YAML),
            "--config",
            str(extra),
            SMALL,
            "--trainer.logger=false",
            *args,
        ],
    )


def test_yaml_backend_reference_parses_to_the_enum(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = parse(tmp_path, "model:\n  sparsity:\n    backend: reference\n")
    assert cli.model.sparsity.backend is BackendName.reference
    cli = parse(tmp_path, "model:\n  sparsity:\n    backend: emulated\n")
    assert cli.model.sparsity.backend is BackendName.emulated


def test_help_lists_the_backend_choices(capsys):
    with pytest.raises(SystemExit):
        cli(["fit", "--model.sparsity.help", "SparsityConfig"])
    out = capsys.readouterr().out
    assert "{" + ",".join(member.value for member in BackendName) + "}" in out


def lazy_lora_yaml(rank: str) -> str:
    return (
        "trainer:\n  callbacks:\n    - class_path: slope_lightning.callbacks.LazyLoRA\n"
        f"      init_args:\n        start: 300\n        rank: {rank}\n"
    )


@pytest.mark.parametrize(("rank", "expected"), [("4", 4), ("0.0625", 0.0625)])
def test_yaml_integer_rank_is_an_int_and_a_fraction_a_float(tmp_path, monkeypatch, rank, expected):
    monkeypatch.chdir(tmp_path)
    cli = parse(tmp_path, lazy_lora_yaml(rank))
    (lazy,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "LazyLoRA"]
    assert lazy.rank == expected and type(lazy.rank) is type(expected)
    assert lazy.start == 300 and type(lazy.start) is int


def test_yaml_float_rank_of_one_or_more_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"LazyLoRA\(rank=4.0\).*give an int \(rank=4\)"):
        parse(tmp_path, lazy_lora_yaml("4.0"))


@pytest.mark.slow
def test_dense_override_with_the_slope_callbacks_trains_and_records_hparams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = write_corpus(tmp_path / "docs")
    args = [
        "fit",
        "--config",
        str(TINY_YAML),
        "--model.sparsity.sparse=false",
        f"--data.sources=[{sources}]",
        "--data.vocab_size=300",
        "--data.seq_len=32",
        "--data.batch_size=4",
        SMALL,
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    with pytest.warns(UserWarning) as warned:
        finished = cli(args)
    idle = sorted(str(w.message).split(" ")[0] for w in warned if " is idle: " in str(w.message))
    assert idle == ["LazyLoRA", "MaskScheduler"]
    assert finished.trainer.global_step == 3 and not sparse_layers(finished.model)
    run_dir = Path(finished.trainer.log_dir)
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["sparsity"]["sparse"] is False and hparams["sparsity"]["backend"] == "reference"
    assert hparams["optimizer"]["lr"] == pytest.approx(3e-3)
    tensorboard_keys = _tensorboard_hparams(next(run_dir.glob("events.out.tfevents.*")))
    assert {
        "sparsity/sparse",
        "sparsity/n",
        "optimizer/lr",
        "optimizer/schedule",
    } <= tensorboard_keys
    exported = json.loads((run_dir / "export" / "config.json").read_text())
    assert exported["sparsity"]["sparse"] is False
    assert not sparse_layers(load_exported(run_dir / "export"))


def _tensorboard_hparams(path: Path) -> set[str]:
    """The hyperparameter names TensorBoard's HPARAMS tab shows for a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    return set(data.session_start_info.hparams)


def test_dataclasses_replace_keeps_a_config_valid():
    config = dataclasses.replace(SparsityConfig(), backend="auto")  # type: ignore[arg-type]
    assert config.backend is BackendName.auto
    with pytest.raises(ValueError, match="n < m"):
        dataclasses.replace(config, n=4)
