"""`slope-lightning generate`: text from a checkpoint of `fit` or from an export, with the
run's tokenizer found again, and errors as one `error:` line with the CLI's exit status.

One tiny sparse run (two steps of `fit` on a generated corpus) serves every test; the console
script itself runs as a subprocess for the main paths, the other cases go through ``main``.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path

import pytest
import torch

from console import console, error_line
from lightning_helpers import write_corpus
from slope_lightning.cli import main, run_cli
from slope_lightning.data import TextDataModule, load_tokenizer, train_tokenizer
from slope_lightning.data.corpus import load_documents
from slope_lightning.export import TOKENIZER, export_model, load_exported
from slope_lightning.generate import (
    DATAMODULE_HPARAMS,
    TOKENIZER_SETTINGS,
    find_model_tokenizer,
    generate_text,
    load_checkpoint_model,
)
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import SparsityConfig, sparse_layers, sparsify

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
PROMPT = "The king speaks"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it sees pytest's own arguments beside ``args``."""
    monkeypatch.setattr(sys, "argv", ["slope-lightning"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of a finished two-step sparse `fit` (relative cache and corpus
    paths, as a user's run has): ``runs/tiny/version_0`` holds its checkpoint and export."""
    root = tmp_path_factory.mktemp("generate")
    write_corpus(root / "docs", documents=8, words=400)
    args = [
        "fit",
        "--config",
        TINY,
        "--data.sources=[docs/*.txt]",
        "--data.cache_dir=cache",
        "--data.vocab_size=300",
        "--data.seq_len=16",
        "--data.batch_size=2",
        "--data.val_source_ids=false",
        "--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["slope-lightning"])
        run_cli(args)
    assert (root / "runs" / "tiny" / "version_0" / "export" / "config.json").is_file()
    return root


def version_dir(run: Path) -> Path:
    return run / "runs" / "tiny" / "version_0"


def run_tokenizer(run: Path) -> Path:
    (path,) = (run / "cache" / "tokenizers").glob("bpe300-*/tokenizer.json")
    return path


def expected_greedy(model_path: Path, run: Path, tokens: int) -> str:
    """The greedy continuation of PROMPT, computed in-process from the checkpoint."""
    model, _ = load_checkpoint_model(model_path)
    return generate_text(model, load_tokenizer(run_tokenizer(run)), PROMPT, tokens, 0.0, None)


# --------------------------------------------------------------------------------------------
# The console script
# --------------------------------------------------------------------------------------------


def test_generate_from_a_checkpoint_prints_the_prompt_and_its_continuation(run):
    checkpoint = version_dir(run) / "checkpoints" / "last.ckpt"
    done = console(
        "generate",
        str(checkpoint.relative_to(run)),
        "--prompt",
        PROMPT,
        "--max_new_tokens",
        "12",
        "--temperature",
        "0",
        "--device",
        "cpu",
        cwd=run,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout.rstrip("\n")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert text == expected_greedy(checkpoint, run, 12)  # stdout holds the text alone


def test_generate_from_the_runs_export_samples_reproducibly_with_a_seed(run):
    export = str((version_dir(run) / "export").relative_to(run))
    sampled = [
        console(
            "generate",
            export,
            "--prompt",
            PROMPT,
            "--max_new_tokens",
            "10",
            "--temperature",
            "1.0",
            "--top_k",
            "20",
            "--seed",
            "7",
            "--device",
            "cpu",
            cwd=run,
        )
        for _ in range(2)
    ]
    for done in sampled:
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith(PROMPT)
    assert sampled[0].stdout == sampled[1].stdout  # the same seed, the same sample
    # fit's export carries the run's tokenizer: it generates wherever it is copied to.
    exported = version_dir(run) / "export" / TOKENIZER
    assert exported.read_bytes() == run_tokenizer(run).read_bytes()


def test_a_missing_checkpoint_fails_with_one_line_and_status_1(run):
    done = console("generate", "runs/tiny/version_0/checkpoints/gone.ckpt", cwd=run)
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert "gone.ckpt does not exist" in line and ".ckpt file" in line


# --------------------------------------------------------------------------------------------
# The sharded checkpoint of an FSDP2 run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of a two-step `fit` with configs/tiny-fsdp.yaml on one process
    (the console script, through ModelParallelStrategy's own sharded save):
    ``runs/tiny-fsdp/version_0`` holds the sharded ``checkpoints/last.ckpt/`` and the export."""
    root = tmp_path_factory.mktemp("generate-sharded")
    write_corpus(root / "docs", documents=8, words=400)
    done = console(
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny-fsdp.yaml"),
        "--data.sources=[docs/*.txt]",
        "--data.cache_dir=cache",
        "--data.vocab_size=300",
        "--data.seq_len=16",
        "--data.batch_size=2",
        "--data.val_source_ids=false",
        "--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}",
        "--trainer.devices=1",
        "--trainer.strategy.init_args.data_parallel_size=1",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "runs" / "tiny-fsdp" / "version_0" / "checkpoints" / "last.ckpt").is_dir()
    return root


@pytest.mark.slow
def test_generate_takes_the_sharded_checkpoint_folder_that_fit_writes_under_fsdp2(sharded_run):
    run_dir = sharded_run / "runs" / "tiny-fsdp" / "version_0"
    folder = run_dir / "checkpoints" / "last.ckpt"
    args = ["--prompt", PROMPT, "--max_new_tokens", "12", "--temperature", "0", "--device", "cpu"]
    done = console("generate", str(folder.relative_to(sharded_run)), *args, cwd=sharded_run)
    assert done.returncode == 0, done.stderr[-3000:]
    # The shards hold the final weights, as the export does: the same model, the same text.
    model, recorded = load_checkpoint_model(folder)
    assert recorded is not None and recorded["sources"] == ["docs/*.txt"]
    exported = load_exported(run_dir / "export").state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == exported.keys()
    for key, tensor in exported.items():
        assert torch.equal(loaded[key], tensor), key
    tokenizer = load_tokenizer(run_dir / "export" / TOKENIZER)
    expected = generate_text(model, tokenizer, PROMPT, 12, 0.0, None)
    assert done.stdout.rstrip("\n") == expected


@pytest.mark.slow
def test_a_sharded_checkpoint_with_a_missing_shard_fails_with_one_line(sharded_run, tmp_path):
    folder = sharded_run / "runs" / "tiny-fsdp" / "version_0" / "checkpoints" / "last.ckpt"
    broken = tmp_path / "runs" / "x" / "version_0" / "checkpoints" / "last.ckpt"
    shutil.copytree(folder, broken)
    for shard in broken.glob("*.distcp"):
        shard.unlink()
    done = console(
        "generate", str(broken), "--tokenizer", str(run_tokenizer(sharded_run)), cwd=tmp_path
    )
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert f"sharded checkpoint {broken} is incomplete" in line and "is missing" in line
    assert "use another checkpoint of the run, or its export" in line


# --------------------------------------------------------------------------------------------
# Finding the tokenizer
# --------------------------------------------------------------------------------------------


def strip_data_settings(source: Path, target: Path) -> Path:
    """A copy of a checkpoint without the data module's hyperparameters (as a run of a
    module trained without the data module would have)."""
    checkpoint = torch.load(source, weights_only=True)
    del checkpoint[DATAMODULE_HPARAMS]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


def test_the_tokenizer_comes_from_the_checkpoint_else_the_runs_config(run, monkeypatch):
    monkeypatch.chdir(run)
    checkpoint = version_dir(run) / "checkpoints" / "last.ckpt"
    tokenizer = run_tokenizer(run).resolve()
    _, recorded = load_checkpoint_model(checkpoint)
    assert recorded is not None and recorded["sources"] == ["docs/*.txt"]
    assert find_model_tokenizer(checkpoint, recorded, None).resolve() == tokenizer
    stripped = strip_data_settings(checkpoint, checkpoint.with_name("stripped.ckpt"))
    assert find_model_tokenizer(stripped, None, None).resolve() == tokenizer  # config.yaml
    export = version_dir(run) / "export"
    assert find_model_tokenizer(export, None, None).resolve() == (export / TOKENIZER).resolve()


def test_a_checkpoint_with_no_tokenizer_found_fails_with_status_2_naming_the_fix(
    run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(run)
    alone = strip_data_settings(
        version_dir(run) / "checkpoints" / "last.ckpt", tmp_path / "elsewhere" / "alone.ckpt"
    )
    assert main(["generate", str(alone), "--max_new_tokens", "3", "--device", "cpu"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "no tokenizer found" in line and "--tokenizer" in line

    tokenizer = str(run_tokenizer(run))
    assert main(["generate", str(alone), "--tokenizer", tokenizer, "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()  # an empty prompt starts a new document


def test_recorded_settings_that_no_longer_lead_to_a_tokenizer_say_so(
    run, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # from here the run's relative corpus and cache paths lead nowhere
    checkpoint = version_dir(run) / "checkpoints" / "last.ckpt"
    assert main(["generate", str(checkpoint), "--max_new_tokens", "2"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "from its run's data settings" in line and "--tokenizer" in line


def test_the_default_data_settings_are_the_data_modules():
    parameters = inspect.signature(TextDataModule.__init__).parameters
    assert {key: parameters[key].default for key in TOKENIZER_SETTINGS} == TOKENIZER_SETTINGS


def test_an_export_carries_its_tokenizer_and_generates_anywhere(tmp_path, capsys):
    sources = write_corpus(tmp_path / "docs", documents=4, words=200)
    tokenizer = train_tokenizer(load_documents([sources]), 300)
    tokenizer.save(str(tmp_path / "tok.json"))
    config = TransformerConfig(
        vocab_size=300, seq_len=16, n_layer=1, n_head=2, n_kv_head=1, d_model=32
    )
    model = Transformer(config)
    sparsity = SparsityConfig()
    sparsify(model, sparsity)
    export_model(model, config, sparsity, tmp_path / "export", tokenizer=tmp_path / "tok.json")
    assert (tmp_path / "export" / TOKENIZER).read_bytes() == (tmp_path / "tok.json").read_bytes()

    assert main(["generate", str(tmp_path / "export"), "--prompt", "A", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("A")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(model, config, sparsity, tmp_path / "other", tokenizer=tmp_path / "no.json")
    assert not (tmp_path / "other").exists()  # nothing written


# --------------------------------------------------------------------------------------------
# The model and the command line
# --------------------------------------------------------------------------------------------


def test_a_sparse_model_generates_through_its_merged_layers(run):
    checkpoint = version_dir(run) / "checkpoints" / "last.ckpt"
    model, _ = load_checkpoint_model(checkpoint)
    layers = sparse_layers(model)
    assert layers and not any(layer.merged for _, layer in layers)
    unmerged = model.generate(torch.tensor([[1, 2, 3]]), 6, temperature=0.0)
    generate_text(model, load_tokenizer(run_tokenizer(run)), "x", 1, 0.0, None)
    assert all(layer.merged for _, layer in layers)
    with torch.inference_mode():
        merged = model.generate(torch.tensor([[1, 2, 3]]), 6, temperature=0.0)
    assert torch.equal(merged, unmerged)
    exported = load_exported(version_dir(run) / "export")
    assert exported.config == model.config


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--max_new_tokens", "-1"], ["--max_new_tokens -1", "0 or more"]),
        (["--temperature", "-0.5"], ["--temperature -0.5", "greedy"]),
        (["--top_k", "-3"], ["--top_k -3"]),
        (["--top_k", "many"], ["--top_k", "invalid int value"]),
        (["--tokens", "5"], ["unrecognized arguments", "--help"]),
        (["--device", "gpu7"], ["--device gpu7"]),
    ],
)
def test_a_bad_command_line_fails_with_status_2(extra, needles, run, capsys):
    assert main(["generate", str(version_dir(run) / "export"), *extra]) == 2
    line = error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line, line


def test_generate_without_a_model_names_the_missing_argument(capsys):
    assert main(["generate"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "model" in line and "--help" in line


def test_help_exits_0(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--max_new_tokens" in capsys.readouterr().out
