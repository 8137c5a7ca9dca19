"""slope_lightning.hf: sparse transformers checkpoints that reload exactly, and dense exports that
plain transformers loads without slope-lightning (tiny models built from configs, no download)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slope_lightning import add_adapters, hf, sparsify
from slope_lightning.sparse import SparseLinear, sparse_layers

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).parents[1]


def llama(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    return transformers.LlamaForCausalLM(config).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return transformers.BertModel(config).eval()


def with_adapters(model: nn.Module) -> nn.Module:
    """Adapters with a non-zero R, so that they change the outputs."""
    add_adapters(model, 4, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            assert layer.adapter is not None
            layer.adapter.up.copy_(torch.randn(layer.adapter.up.shape, generator=generator))
    return model


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- sparse round trip


@pytest.mark.parametrize(
    ("build", "adapters"),
    [(llama, True), (llama, False), (gpt2, True), (bert, False)],
    ids=["llama-adapters", "llama", "gpt2-adapters", "bert"],
)
def test_a_sparse_checkpoint_reloads_bit_exactly(tmp_path, build, adapters):
    # Defect 2: there was no way back in; transformers randomly initialised the sparse layers.
    model = build()
    sparsify(model, transpose_mask_interval=3)
    if adapters:
        with_adapters(model)
    expected = output(model, IDS)
    hf.save_pretrained(model, tmp_path)

    loaded = hf.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(output(loaded, IDS), expected)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for (name, layer), (_, again) in zip(sparse_layers(model), sparse_layers(loaded), strict=True):
        assert again.transpose_mask_interval == 3 and again.weight_layout == layer.weight_layout
        assert (again.adapter is None) == (layer.adapter is None), name
    assert not hasattr(loaded.config, hf.SECTION)  # the config describes the architecture only


def test_the_config_carries_the_sparsity_section(tmp_path):
    model = gpt2()
    sparsify(model)
    with_adapters(model)
    hf.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    section = config["slope_lightning"]
    assert section["format"] == hf.FORMAT and (section["n"], section["m"]) == (2, 4)
    layer = section["layers"]["transformer.h.0.attn.c_attn"]
    assert layer == {
        "n": 2,
        "m": 4,
        "in_features": 64,
        "out_features": 192,
        "transpose_mask_interval": 1,
        "adapter_rank": 4,
        "weight_layout": "conv1d",
    }
    assert len(section["layers"]) == 8
    assert section["aliases"] == {"lm_head.weight": "transformer.wte.weight"}  # tied, saved once
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    stored = load_file(tmp_path / hf.WEIGHTS)
    assert stored["transformer.h.0.attn.c_attn.row_index"].dtype == torch.uint8
    assert "transformer.h.0.attn.c_attn.weight" not in stored


@pytest.mark.parametrize("rotary", ["bfloat16", "float32"])
def test_a_bf16_checkpoint_reloads_in_bf16_bit_exactly(tmp_path, rotary):
    model = llama()
    inv_freq = model.model.rotary_emb.inv_freq.clone()  # float32
    model.to(torch.bfloat16)
    if rotary == "float32":  # as transformers' from_pretrained(dtype=bf16) leaves it
        model.model.rotary_emb.inv_freq = inv_freq
    sparsify(model)
    expected = output(model, IDS)
    hf.save_pretrained(model, tmp_path)
    loaded = hf.from_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == getattr(torch, rotary)
    assert torch.equal(output(loaded, IDS), expected)


def test_plain_transformers_refuses_the_sparse_checkpoint_instead_of_initialising_it(tmp_path):
    model = llama()
    sparsify(model)
    hf.save_pretrained(model, tmp_path)
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_save_pretrained_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match=r"takes a transformers PreTrainedModel.*export_model"):
        hf.save_pretrained(nn.Sequential(nn.Linear(8, 8)), tmp_path)
    with pytest.raises(ValueError, match=r"no SparseLinear layer: call sparsify\(model\)"):
        hf.save_pretrained(llama(), tmp_path)
    model = llama()
    model.save_pretrained(tmp_path / "dense")
    sparsify(model)
    with pytest.raises(FileExistsError, match=r"holds a dense checkpoint \(model\.safetensors\)"):
        hf.save_pretrained(model, tmp_path / "dense")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.values[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"up_proj\.values.*NaN"):
        hf.save_pretrained(model, tmp_path / "nan")
    assert not (tmp_path / "nan" / "config.json").exists()


def test_from_pretrained_refuses_what_it_cannot_rebuild(tmp_path):
    model = llama()
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no 'slope_lightning' section: not a sparse checkpoint"):
        hf.from_pretrained(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.from_pretrained(tmp_path / "nowhere")
    sparsify(model)
    hf.save_pretrained(model, tmp_path / "sparse")
    (tmp_path / "sparse" / hf.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"sparse_model\.safetensors not found"):
        hf.from_pretrained(tmp_path / "sparse")


def test_a_model_class_of_another_model_type_is_refused_naming_both(tmp_path):
    model = llama()
    sparsify(model)
    hf.save_pretrained(model, tmp_path)
    # GPT-2 reads config attributes a Llama config lacks: transformers itself would fail with
    # a bare AttributeError.
    with pytest.raises(
        ValueError,
        match=r"holds a 'llama' model \(LlamaForCausalLM\), but model_class=GPT2LMHeadModel "
        r"builds 'gpt2' models; pass model_class=transformers\.LlamaForCausalLM",
    ):
        hf.from_pretrained(tmp_path, model_class=transformers.GPT2LMHeadModel)
    # A class of the saved type is accepted.
    rebuilt = hf.from_pretrained(tmp_path, model_class=transformers.LlamaForCausalLM)
    assert isinstance(rebuilt, transformers.LlamaForCausalLM)


def test_the_sparse_layers_must_exist_in_the_model_the_config_builds(tmp_path):
    model = llama()
    sparsify(model)
    hf.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["slope_lightning"]["layers"]["model.layers.0.mlp.missing_proj"] = config[
        "slope_lightning"
    ]["layers"]["model.layers.0.mlp.up_proj"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not in the model built from its config.*missing_proj"):
        hf.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- dense export


PLAIN_LOAD = textwrap.dedent(
    """
    import sys

    class NoSlope:  # slope-lightning must not be needed to read the export
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("slope_lightning", "slope_kernels"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoSlope())
    import torch
    import transformers

    ids = torch.load(sys.argv[1])
    for directory, out_path in zip(sys.argv[2::2], sys.argv[3::2]):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, out_path)
    ours = ("slope_lightning", "slope_kernels")
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in ours)
    assert not loaded, loaded
    """
)


def load_in_plain_transformers(directories: list[Path], tmp_path: Path) -> list[torch.Tensor]:
    """Logits of each of ``directories`` loaded by AutoModelForCausalLM in one fresh
    interpreter that cannot import slope_lightning (``-I``, and an import blocker for the
    editable install)."""
    script, ids_path = tmp_path / "load.py", tmp_path / "ids.pt"
    script.write_text(PLAIN_LOAD)
    torch.save(IDS, ids_path)
    outs = [tmp_path / f"out{i}.pt" for i in range(len(directories))]
    pairs = [str(p) for pair in zip(directories, outs, strict=True) for p in pair]
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(ids_path), *pairs],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out) for out in outs]


@pytest.mark.slow
def test_export_dense_loads_in_plain_transformers_with_the_same_logits(tmp_path):
    """A LLaMA without adapters (2:4 zeros) and a GPT-2 (Conv1D) with adapters folded in."""
    directories, expected = [], []
    for build, adapters in ((llama, False), (gpt2, True)):
        model = build()
        sparsify(model)
        if adapters:
            with_adapters(model)
        expected.append(output(model, IDS))
        directory = tmp_path / type(model).__name__
        hf.export_dense(model, directory)
        assert not (directory / hf.WEIGHTS).exists()
        assert "slope_lightning" not in json.loads((directory / "config.json").read_text())
        directories.append(directory)
    for logits, want in zip(
        load_in_plain_transformers(directories, tmp_path), expected, strict=True
    ):
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


def test_export_dense_writes_exact_zeros_in_transformers_layout_and_restores_the_model(tmp_path):
    model = gpt2()
    sparsify(model)
    layers = dict(sparse_layers(model))
    hf.export_dense(model, tmp_path)
    assert dict(sparse_layers(model)) == layers  # the same layer objects are back
    weights = load_file(tmp_path / "model.safetensors")
    conv = weights["transformer.h.1.mlp.c_proj.weight"]  # Conv1D layout: (d_in, d_out)
    sparse = layers["transformer.h.1.mlp.c_proj"]
    assert conv.shape == (256, 64) and torch.equal(conv, sparse.to_dense().t())
    assert (conv.t().reshape(64, -1, 4) == 0).sum(-1).ge(2).all()  # 2:4 along d_in, exact
    dense = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(dense, IDS), output(model, IDS), rtol=1e-4, atol=1e-5)


def test_export_dense_folds_the_adapter_in(tmp_path):
    model = with_adapters(sparsify_llama())
    hf.export_dense(model, tmp_path)
    layer = model.model.layers[0].self_attn.q_proj
    weights = load_file(tmp_path / "model.safetensors")
    folded = weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(folded, layer.to_dense(include_adapter=True))
    assert not torch.equal(folded, layer.to_dense())
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(output(dense, IDS), output(model, IDS), rtol=1e-4, atol=1e-5)


def sparsify_llama() -> nn.Module:
    model = llama()
    sparsify(model)
    return model


def test_export_dense_leaves_the_model_sparse_when_the_save_fails(tmp_path, monkeypatch):
    model = sparsify_llama()

    def fail(directory, **kwargs):
        assert not sparse_layers(model)  # dense while it saves
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        hf.export_dense(model, tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear)
    assert len(sparse_layers(model)) == 14


def test_export_dense_refuses_nan_before_writing(tmp_path):
    model = sparsify_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.values[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj' holds NaN/inf"):
        hf.export_dense(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_importing_the_module_does_not_import_transformers():
    code = "import sys, slope_lightning.hf; print('transformers' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "False"


def test_no_weight_is_read_from_a_sparse_layer_while_saving(tmp_path):
    model = sparsify_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading SparseLinear.weight would warn
        hf.save_pretrained(model, tmp_path / "sparse")
        hf.from_pretrained(tmp_path / "sparse")
