"""Specification of the plain-PyTorch transformer and its config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slope_lightning.models import Transformer, TransformerConfig, available_presets

STYLES = ("llama", "gpt2")


def small_config(style: str = "llama", **overrides: object) -> TransformerConfig:
    """A model small enough that a forward pass takes milliseconds."""
    fields: dict[str, object] = dict(
        style=style, vocab_size=67, seq_len=16, n_layer=2, n_head=4, d_model=32
    )
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def small_model(style: str = "llama", **overrides: object) -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(style, **overrides)).eval()


def tokens(batch: int, time: int, vocab: int = 67, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


def build_on_meta(config: TransformerConfig) -> Transformer:
    """Build a model without allocating memory, to inspect shapes and parameter counts."""
    with torch.device("meta"):
        return Transformer(config)


# --------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_forward_returns_logits_per_position_and_no_loss_without_targets(style: str) -> None:
    model = small_model(style)
    logits, loss = model(tokens(3, 11))
    assert logits.shape == (3, 11, 67)
    assert loss is None


@pytest.mark.parametrize("style", STYLES)
def test_loss_is_mean_cross_entropy_of_the_logits(style: str) -> None:
    model = small_model(style)
    idx, targets = tokens(2, 9, seed=1), tokens(2, 9, seed=2)
    targets[0, :3] = -100  # ignored positions
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.view(-1, 67), targets.view(-1), ignore_index=-100)
    assert loss is not None
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("style", STYLES)
def test_attention_is_causal(style: str) -> None:
    model = small_model(style)
    idx = tokens(2, 12)
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 67
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t:], before[:, t:])


@pytest.mark.parametrize("style", STYLES)
def test_input_longer_than_seq_len_is_rejected_naming_both_lengths(style: str) -> None:
    model = small_model(style)
    with pytest.raises(ValueError, match=r"T=17.*seq_len=16"):
        model(tokens(1, 17))


@pytest.mark.parametrize("style", STYLES)
def test_bf16_autocast_forward_is_finite(style: str) -> None:
    model = small_model(style)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens(2, 16), tokens(2, 16, seed=3))
    assert loss is not None
    assert torch.isfinite(logits).all()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("style", STYLES)
def test_model_cast_to_bf16_runs_and_keeps_dtype(style: str) -> None:
    model = small_model(style).to(torch.bfloat16)
    logits, loss = model(tokens(2, 16), tokens(2, 16, seed=3))
    assert logits.dtype == torch.bfloat16
    assert loss is not None and loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("style", STYLES)
def test_backward_reaches_every_parameter(style: str) -> None:
    model = small_model(style).train()
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=4))
    assert loss is not None
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


class _CallOnlyLinear(nn.Module):
    """Same in/out features as an nn.Linear, but not one and with no ``weight`` attribute."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.values = nn.Parameter(linear.weight.detach().t().clone())  # (d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.values


@pytest.mark.parametrize("style", STYLES)
def test_linears_in_blocks_can_be_replaced_by_any_module_of_same_shape(style: str) -> None:
    model = small_model(style)
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _CallOnlyLinear(child))
    assert not any(isinstance(m, nn.Linear) for m in model.blocks.modules())
    logits, _ = model(tokens(2, 8))
    assert logits.shape == (2, 8, 67)


# --------------------------------------------------------------------------------------------
# Structure: module names, GQA, tied embeddings, init
# --------------------------------------------------------------------------------------------


def test_module_names_follow_the_documented_layout() -> None:
    llama, gpt2 = small_model("llama"), small_model("gpt2")
    llama_names = {n for n, _ in llama.named_modules()}
    gpt2_names = {n for n, _ in gpt2.named_modules()}
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"blocks.1.attn.{suffix}" in llama_names
        assert f"blocks.1.attn.{suffix}" in gpt2_names
    assert {"blocks.0.mlp.gate_proj", "blocks.0.mlp.up_proj", "blocks.0.mlp.down_proj"} <= (
        llama_names
    )
    assert {"blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out"} <= gpt2_names
    for names in (llama_names, gpt2_names):
        assert {"tok_embed", "blocks.0.attn_norm", "blocks.0.mlp_norm", "norm", "lm_head"} <= names
    assert "pos_embed" in gpt2_names and "pos_embed" not in llama_names
    assert isinstance(llama.norm, nn.RMSNorm) and isinstance(gpt2.norm, nn.LayerNorm)
    assert llama.lm_head.bias is None and gpt2.lm_head.bias is None


def test_rope_tables_are_not_saved_in_the_state_dict() -> None:
    model = small_model("llama")
    assert not any("rope" in key for key in model.state_dict())
    restored = Transformer(small_config("llama"))
    restored.load_state_dict(model.state_dict())  # strict: no missing or unexpected keys
    idx = tokens(1, 8)
    torch.testing.assert_close(restored.eval()(idx)[0], model(idx)[0])


def test_grouped_query_attention_shrinks_only_key_and_value_projections() -> None:
    mha = small_model("llama", n_head=4)
    gqa = small_model("llama", n_head=4, n_kv_head=2)
    attn = gqa.blocks[0].attn
    head_dim = 32 // 4
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * head_dim
    assert attn.q_proj.out_features == attn.o_proj.out_features == 32
    # Each layer loses (n_head - n_kv_head) * head_dim output rows in k_proj and in v_proj.
    saved_per_layer = 2 * (4 - 2) * head_dim * 32
    assert mha.num_parameters() - gqa.num_parameters() == 2 * saved_per_layer
    logits, _ = gqa(tokens(2, 10))
    assert logits.shape == (2, 10, 67) and torch.isfinite(logits).all()


def test_multi_query_attention_with_a_single_kv_head_runs() -> None:
    logits, _ = small_model("llama", n_kv_head=1)(tokens(1, 5))
    assert logits.shape == (1, 5, 67)


def test_tied_embeddings_share_storage_and_count_once() -> None:
    tied = small_model("llama", tie_embeddings=True)
    untied = small_model("llama", tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_embed.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 67 * 32
    # Embedding tables (and a head tied to them) are excluded; an untied head is not.
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 67 * 32
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - 67 * 32


def test_model_built_on_meta_can_be_materialised_and_initialised() -> None:
    config = small_config("llama", tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_embed.weight  # to_empty unties; init re-ties
    torch.testing.assert_close(model.rope_cos, Transformer(config).rope_cos)
    logits, _ = model.eval()(tokens(1, 8))
    assert torch.isfinite(logits).all()


def test_gpt2_excludes_position_embeddings_from_non_embedding_count() -> None:
    model = small_model("gpt2", tie_embeddings=True)
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - (67 + 16) * 32


def test_residual_output_projections_use_smaller_init() -> None:
    n_layer = 4
    model = small_model("llama", n_layer=n_layer, d_model=256, n_head=4, vocab_size=512)
    block = model.blocks[0]
    for linear in (block.attn.o_proj, block.mlp.down_proj):
        expected = 0.02 / math.sqrt(2 * n_layer)
        assert linear.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    gpt2 = small_model("gpt2", bias=True)
    biases = [m.bias for m in gpt2.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert biases and all(int(torch.count_nonzero(b)) == 0 for b in biases)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def test_available_presets_lists_the_documented_names() -> None:
    assert available_presets() == [
        "tiny",
        "gpt2-small",
        "smollm2-135m",
        "gpt2-medium",
        "llama-1b",
        "llama-8b",
        "llama-13b",
        "llama-70b",
    ]


@pytest.mark.parametrize(
    ("name", "expected_params"),
    [
        ("tiny", 5.05e6),
        ("gpt2-small", 124.5e6),  # 124M with tied embeddings and a 50304-token vocabulary
        ("gpt2-medium", 354.9e6),
        ("smollm2-135m", 134.5e6),  # HuggingFaceTB/SmolLM2-135M: 134,515,008
        ("llama-1b", 1.039e9),  # LLaMA-3.2-1B shape with a 32000-token vocabulary
    ],
)
def test_preset_parameter_counts(name: str, expected_params: float) -> None:
    model = build_on_meta(TransformerConfig.from_name(name))
    assert model.num_parameters() == pytest.approx(expected_params, rel=0.002)


def test_gpt2_small_matches_the_published_size() -> None:
    # GPT-2 small has 124,439,808 parameters with its 50257-token vocabulary.
    model = build_on_meta(TransformerConfig.from_name("gpt2-small", vocab_size=50257))
    assert model.num_parameters() == 124_439_808


@pytest.mark.parametrize("name", available_presets())
def test_every_linear_in_blocks_is_divisible_by_4_for_2_4_sparsity(name: str) -> None:
    model = build_on_meta(TransformerConfig.from_name(name))
    linears = [(n, m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == model.config.n_layer * (7 if model.config.style == "llama" else 6)
    for linear_name, linear in linears:
        assert linear.in_features % 4 == 0, (linear_name, linear.in_features)
        assert linear.out_features % 4 == 0, (linear_name, linear.out_features)


def test_from_name_applies_overrides() -> None:
    config = TransformerConfig.from_name("gpt2-small", dropout=0.1, vocab_size=50257)
    assert (config.dropout, config.vocab_size, config.n_layer) == (0.1, 50257, 12)


def test_from_name_rejects_unknown_preset_listing_known_ones() -> None:
    with pytest.raises(ValueError, match=r"gpt5.*tiny.*llama-1b"):
        TransformerConfig.from_name("gpt5")


def test_from_name_rejects_unknown_override_field() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        TransformerConfig.from_name("tiny", n_layers=3)


# --------------------------------------------------------------------------------------------
# Config: derived fields and validation
# --------------------------------------------------------------------------------------------


def test_derived_fields_are_filled() -> None:
    llama = small_config("llama", d_model=256, n_head=4)
    assert llama.n_kv_head == 4
    assert llama.mlp_hidden == 704  # smallest multiple of 64 >= 8/3 * 256
    assert small_config("gpt2").mlp_hidden == 4 * 32
    assert small_config("llama", mlp_hidden=100).mlp_hidden == 100


@pytest.mark.parametrize("d_model", [64, 96, 256, 768, 2048, 4096])
def test_default_swiglu_width_is_a_multiple_of_64_near_8_thirds(d_model: int) -> None:
    hidden = small_config("llama", d_model=d_model, n_head=4).mlp_hidden
    assert hidden is not None
    assert hidden % 64 == 0
    assert 8 * d_model / 3 <= hidden < 8 * d_model / 3 + 64


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(d_model=30, n_head=4), "d_model"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(d_model=20, n_head=4), "head_dim"),  # head_dim 5 is odd: RoPE rotates pairs
        (dict(vocab_size=0), "vocab_size"),
        (dict(seq_len=-1), "seq_len"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(mlp_hidden=0), "mlp_hidden"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(style="mamba"), "style"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(init_std=0.0), "init_std"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(
    overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)  # type: ignore[arg-type]


def test_odd_head_dim_is_allowed_without_rope() -> None:
    assert small_config("gpt2", d_model=20, n_head=4).head_dim == 5


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_generate_appends_the_requested_number_of_tokens(style: str) -> None:
    model = small_model(style)
    prompt = tokens(2, 5)
    # 5 + 14 tokens exceeds seq_len=16: the context must be cropped, not rejected.
    out = model.generate(prompt, max_new_tokens=14, temperature=0.8, top_k=5)
    assert out.shape == (2, 19)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 67


def test_greedy_generation_is_deterministic() -> None:
    model = small_model("llama")
    prompt = tokens(1, 4)
    first = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    second = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert torch.equal(first, second)


# ------------------------------------------------------------------ from_hparams, build_model


def test_from_hparams_applies_overrides_then_the_linked_vocab_and_seq_len():
    hparams = {
        "preset": "tiny",
        "model_overrides": {"n_layer": 2, "seq_len": 32},
        "vocab_size": 100,
        "seq_len": 64,
    }
    config = TransformerConfig.from_hparams(hparams)
    assert (config.n_layer, config.vocab_size, config.seq_len) == (2, 100, 64)
    kept = TransformerConfig.from_hparams({"preset": "tiny", "vocab_size": None})
    assert kept == TransformerConfig.from_name("tiny")


@pytest.mark.parametrize(
    "hparams, named",
    [
        ({"preset": "nope"}, "'nope'"),
        ({"preset": "tiny", "model_overrides": {"n_layers": 2}}, "n_layers"),
        ({}, "None"),
    ],
)
def test_from_hparams_names_the_setting_to_change(hparams, named):
    with pytest.raises(ValueError, match="model.preset / model.model_overrides") as error:
        TransformerConfig.from_hparams(hparams)
    assert named in str(error.value)


def test_build_model_sparsifies_on_the_given_backend_and_refuses_a_dense_sparse_model():
    from slope_lightning.models import build_model
    from slope_lightning.sparse import NothingSparsifiedError, sparse_layers
    from slope_lightning.sparse.backends.names import BackendName
    from slope_lightning.sparse.config import SparsityConfig

    config = small_config()
    dense, report = build_model(config, SparsityConfig(sparse=False))
    assert report is None and not sparse_layers(dense)
    sparse, report = build_model(config, SparsityConfig(), backend=BackendName.reference)
    assert report is not None and len(report.converted) == len(sparse_layers(sparse)) > 0
    assert {layer.backend.running.name for _, layer in sparse_layers(sparse)} == {"reference"}
    with pytest.raises(NothingSparsifiedError):
        build_model(config, SparsityConfig(m=3, n=1))


def test_checkpointed_blocks_keep_their_parameter_names_and_gradients():
    """``checkpoint_blocks`` uses torch's private composable checkpoint: if this fails, torch
    moved or changed ``torch.distributed._composable.checkpoint``; update
    ``slope_lightning.models.checkpointing``."""
    from slope_lightning.models import checkpoint_blocks

    plain, checkpointed = small_model(), small_model()
    names = [name for name, _ in checkpointed.named_parameters()]
    assert checkpoint_blocks(checkpointed.blocks) == 2
    assert [name for name, _ in checkpointed.named_parameters()] == names
    idx = torch.randint(0, 67, (2, 16))
    for model in (plain, checkpointed):
        model.train()
        model(idx, idx)[1].backward()
    pairs = zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
