"""sparsify() on real model code: transformers' LLaMA, Mistral, Qwen2, OPT, BERT and GPT-2
(Conv1D) built from tiny configs (no download), PEFT-wrapped models, and the time it takes on a
135M-parameter LLaMA."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slope_lightning import sparsify
from slope_lightning.sparse import SparseLinear, sparse_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# PEFT 0.21 on transformers 5.x (upstream, harmless).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

TINY = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny(architecture: str) -> nn.Module:
    """A two-layer model of ``architecture`` from a config, in eval mode, seeded."""
    torch.manual_seed(0)
    if architecture == "llama":
        config = transformers.LlamaConfig(**TINY, intermediate_size=128, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(config).eval()
    if architecture == "mistral":
        config = transformers.MistralConfig(**TINY, intermediate_size=128, num_key_value_heads=2)
        return transformers.MistralForCausalLM(config).eval()
    if architecture == "qwen2":
        config = transformers.Qwen2Config(**TINY, intermediate_size=128, num_key_value_heads=2)
        return transformers.Qwen2ForCausalLM(config).eval()
    if architecture == "opt":
        config = transformers.OPTConfig(
            vocab_size=128,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        )
        return transformers.OPTForCausalLM(config).eval()
    if architecture == "bert":
        config = transformers.BertConfig(**TINY, intermediate_size=128)
        return transformers.BertModel(config).eval()
    if architecture == "gpt2":
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
    raise ValueError(architecture)


ARCHITECTURES = ["llama", "mistral", "qwen2", "opt", "bert", "gpt2"]


def linear_like_names(model: nn.Module) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_block_linears_become_sparse_and_every_linear_layer_is_reported(architecture):
    model = tiny(architecture)
    names = linear_like_names(model)
    report = sparsify(model)
    assert {d.name for d in report.layers} == names  # nothing goes unmentioned
    per_block = {"gpt2": 4, "bert": 6, "opt": 6}.get(architecture, 7)
    blocks = [d.name for d in report.converted]  # BERT's pooler stays dense, as heads do
    assert len(blocks) == 2 * per_block
    assert all(".layers." in name or ".h." in name or ".layer." in name for name in blocks)
    assert all(not d.converted for d in report.layers if "lm_head" in d.name)
    ids = torch.randint(0, 128, (2, 9))
    assert output(model, ids).isfinite().all()


def test_berts_pooler_stays_dense_by_default_like_a_head_and_include_can_name_it():
    report = sparsify(tiny("bert"))
    pooler = next(d for d in report.layers if d.name == "pooler.dense")
    assert not pooler.converted and pooler.reason == "excluded by pattern '*pooler*'"
    assert len(report.converted) == 2 * 6  # q, k, v, attention output, intermediate, output
    named = sparsify(tiny("bert"), include=["pooler.dense"], exclude=())
    assert [d.name for d in named.converted] == ["pooler.dense"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_sparsified_model_saves_with_save_pretrained_and_safetensors(tmp_path, architecture):
    # Defect 1: SparseLinear's extra state was a dict, so both of these raised.
    model = tiny(architecture)
    sparsify(model)
    model.save_pretrained(tmp_path / "hf")
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert any(key.endswith(".values") for key in saved)
    unique = {}  # safetensors refuses tied tensors (lm_head = embedding), sparse or not
    for key, value in model.state_dict().items():
        if value.data_ptr() not in {v.data_ptr() for v in unique.values()}:
            unique[key] = value
    save_file(unique, tmp_path / "state.safetensors")
    state = load_file(tmp_path / "state.safetensors")
    assert all(isinstance(value, torch.Tensor) for value in state.values())


def test_gpt2_conv1d_layers_are_sparse_and_compute_what_the_pruned_conv1d_computes():
    # Defect 3: GPT-2's Conv1D layers were silently not sparsified.
    model = tiny("gpt2")
    reference = tiny("gpt2")  # same seed, same weights
    report = sparsify(model)
    assert {d.reason for d in report.converted} == {"converted (Conv1D)"}
    with torch.no_grad():
        for name, layer in sparse_layers(model):
            conv = reference.get_submodule(name)
            assert type(conv).__name__ == "Conv1D" and layer.weight_layout == "conv1d"
            conv.weight.copy_(layer.to_dense().t())  # the Conv1D with the pruned weight
            x = torch.randn(3, 4, layer.in_features)
            torch.testing.assert_close(layer(x), conv(x))
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(output(model, ids), output(reference, ids))


def test_gpt2_trains_through_its_sparse_conv1d_layers():
    model = tiny("gpt2").train()
    sparsify(model)
    ids = torch.randint(0, 128, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.transformer.h[0].attn.c_attn
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0


# ---------------------------------------------------------------------- PEFT


def peft_llama(**lora: object) -> nn.Module:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora)
    return peft.get_peft_model(tiny("llama"), config)


def test_sparsify_leaves_peft_adapters_and_their_base_layers_dense_and_says_why():
    # Defect 6: sparsify(peft_model) converted PEFT's own lora_A / lora_B.
    model = peft_llama()
    report = sparsify(model)
    found = {d.name: d for d in report.layers}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    assert not found[f"{prefix}.lora_A.default"].converted
    assert found[f"{prefix}.lora_A.default"].reason.startswith(
        f"PEFT adapter layer (lora_A of {prefix} (Linear)): adapters stay dense"
    )
    assert not found[f"{prefix}.lora_B.default"].converted
    base = found[f"{prefix}.base_layer"]
    assert not base.converted and "name it in include to sparsify it" in base.reason
    converted = {d.name.rsplit(".", 1)[-1] for d in report.converted}
    assert converted == {"k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lora_" in name for name, _ in sparse_layers(model))
    ids = torch.randint(0, 128, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()


def test_a_peft_base_layer_is_sparsified_when_include_names_it_and_peft_keeps_working():
    model = peft_llama()
    report = sparsify(model, include=["*.base_layer"])
    assert len(report.converted) == 4  # q_proj and v_proj of two blocks
    assert not any("lora_" in d.name for d in report.converted)
    ids = torch.randint(0, 128, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()  # PEFT calls its base layer
    # PEFT reads the base layer's weight for its device and dtype when it adds an adapter
    # (it raised AttributeError before SparseLinear had a weight).
    with pytest.warns(UserWarning, match="reading SparseLinear.weight builds a dense"):
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapper = model.base_model.model.model.layers[0].self_attn.q_proj
    assert wrapper.lora_A["second"].weight.dtype == torch.float32


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merging_a_peft_adapter_into_a_sparse_base_raises_instead_of_being_lost(safe_merge):
    model = peft_llama(init_lora_weights=False)
    sparsify(model, include=["*.base_layer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense-copy cost warning
        with pytest.raises(RuntimeError, match="read-only dense copy of W_R"):
            model.merge_and_unload(safe_merge=safe_merge)


def test_hf_utilities_that_read_weight_dtype_device_and_shape_work():
    model = tiny("llama")
    sparsify(model)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.get_memory_footprint() > 0
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.warns(UserWarning, match="q_proj"):
        weight = layer.weight
    assert (weight.dtype, weight.device.type) == (torch.float32, "cpu")
    assert weight.shape == (64, 64)
    assert torch.equal(weight, layer.to_dense())
    model.half()  # moving the model moves what the weight is built from
    assert layer.weight.dtype == torch.float16


# ---------------------------------------------------------------------- time


@pytest.mark.slow
def test_sparsify_takes_seconds_on_a_135m_llama():
    """SmolLM2-135M's shape (30 layers, width 576, 210 block linears), with torch's own thread
    count. Before: a full sort per group of 4, twice per layer, and ~30 parallel regions per
    layer: 4 s on 2 quiet cores, 45-70 s on 2 cores shared with other processes. Now about
    3 s of CPU on one thread, and no faster or slower on busy cores."""
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    report = sparsify(model)
    seconds = time.perf_counter() - start
    assert len(report.converted) == 210
    assert isinstance(model.model.layers[29].mlp.down_proj, SparseLinear)
    assert torch.get_num_threads() == threads
    assert seconds < 10, f"sparsify took {seconds:.1f} s for 135M parameters"
