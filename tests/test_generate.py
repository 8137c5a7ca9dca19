"""Generation with a KV cache: the same tokens as recomputing the context, one position of
logits per step, and positions that continue across incremental calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slope_lightning.models import KVCache, Transformer, TransformerConfig
from slope_lightning.sparse import add_adapters, merge_for_inference, sparsify

STYLES = ("llama", "gpt2")
VOCAB = 67


def model_of(style: str, **overrides: object) -> Transformer:
    fields: dict[str, object] = dict(
        style=style, vocab_size=VOCAB, seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**fields)).eval()  # type: ignore[arg-type]


def tokens(batch: int, time: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, time), generator=torch.Generator().manual_seed(seed))


class HeadShapes:
    """Records the output shape of every LM head call."""

    def __init__(self, head: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.handle = head.register_forward_hook(self.record)

    def record(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        self.shapes.append(tuple(output.shape))


@pytest.mark.parametrize("style", STYLES)
def test_cached_greedy_generation_equals_uncached_token_for_token(style: str) -> None:
    model = model_of(style)
    prompt = tokens(3, 5)
    # 5 + 20 > seq_len=16: crosses the point where the context is cropped.
    cached = model.generate(prompt, max_new_tokens=20, temperature=0.0)
    uncached = model.generate(prompt, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, uncached)


def positions_per_step(model: Transformer) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Token positions fed to the model at each forward (the token embedding's input width)."""
    seen: list[int] = []
    handle = model.tok_embed.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    return seen, handle


@pytest.mark.parametrize("style", STYLES)
def test_a_prompt_filling_the_context_is_encoded_once_then_one_token_per_step(style: str) -> None:
    """A prompt of seq_len tokens (the GPU check's decode) does not re-encode the context at
    every step: it is cropped once to leave room for the new tokens, then read from the cache."""
    model = model_of(style)
    prompt = tokens(2, 16)  # = seq_len
    seen, handle = positions_per_step(model)
    cached = model.generate(prompt, max_new_tokens=4, temperature=0.0)
    handle.remove()
    assert seen == [13, 1, 1, 1]  # 13 + 3 fed-back tokens = 16 positions: one cache
    assert cached.shape == (2, 20) and torch.equal(cached[:, :16], prompt)
    uncached = model.generate(prompt, max_new_tokens=4, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("style", STYLES)
def test_a_prompt_with_room_for_the_new_tokens_is_not_cropped(style: str) -> None:
    model = model_of(style)
    seen, handle = positions_per_step(model)
    model.generate(tokens(1, 12), max_new_tokens=5, temperature=0.0)
    handle.remove()
    assert seen == [12, 1, 1, 1, 1]


@pytest.mark.parametrize("style", STYLES)
def test_generation_projects_only_the_last_position_through_the_lm_head(style: str) -> None:
    model = model_of(style)
    for use_cache in (True, False):
        spy = HeadShapes(model.lm_head)
        model.generate(tokens(2, 7), max_new_tokens=12, temperature=0.0, use_cache=use_cache)
        spy.handle.remove()
        assert spy.shapes == [(2, 1, VOCAB)] * 12


def test_cached_sampling_matches_uncached_under_the_same_seed() -> None:
    model = model_of("llama")
    prompt = tokens(2, 4)
    torch.manual_seed(5)
    cached = model.generate(prompt, max_new_tokens=10, temperature=0.9, top_k=7)
    torch.manual_seed(5)
    uncached = model.generate(prompt, max_new_tokens=10, temperature=0.9, top_k=7, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("style", STYLES)
def test_incremental_forward_with_a_cache_equals_one_full_forward(style: str) -> None:
    """Chunks of 5, 1, 4 and 3 tokens (a chunk of several tokens after cached ones needs the
    bottom-right causal mask) give the logits of one pass over all 13."""
    model = model_of(style)
    idx = tokens(2, 13, seed=3)
    full, _ = model(idx)  # (B, 13, V)
    cache = KVCache(model.config)
    pieces, start = [], 0
    for size in (5, 1, 4, 3):
        logits, _ = model(idx[:, start : start + size], cache=cache)
        pieces.append(logits)
        start += size
    assert cache.length == 13
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_last_only_returns_the_last_position_of_the_full_logits() -> None:
    model = model_of("llama")
    idx = tokens(2, 9)
    full, _ = model(idx)
    last, loss = model(idx, last_only=True)
    assert last.shape == (2, 1, VOCAB) and loss is None
    torch.testing.assert_close(last, full[:, [-1]], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)


def test_a_full_cache_refuses_more_positions_naming_the_limit() -> None:
    model = model_of("llama")
    cache = KVCache(model.config)
    model(tokens(1, 14), cache=cache)
    with pytest.raises(ValueError, match=r"T=3 after 14 cached positions exceeds .* seq_len=16"):
        model(tokens(1, 3), cache=cache)


def test_a_cache_is_tied_to_its_batch() -> None:
    model = model_of("llama")
    cache = KVCache(model.config)
    model(tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match="start a new cache for a new batch"):
        model(tokens(3, 1), cache=cache)


def test_generate_rejects_an_empty_prompt() -> None:
    with pytest.raises(ValueError, match=">= 1 token"):
        model_of("llama").generate(torch.zeros(1, 0, dtype=torch.long), 3)


def test_a_sparse_merged_model_generates_the_same_tokens_with_and_without_the_cache() -> None:
    model = model_of("llama", d_model=64, n_head=4)
    sparsify(model)
    add_adapters(model, rank=4, seed=0)
    merge_for_inference(model)
    prompt = tokens(2, 6)
    cached = model.generate(prompt, max_new_tokens=14, temperature=0.0)
    uncached = model.generate(prompt, max_new_tokens=14, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_under_bf16_keeps_the_cache_in_the_compute_dtype() -> None:
    model = model_of("llama").to(torch.bfloat16)
    cache = KVCache(model.config)
    model(tokens(1, 4), cache=cache, last_only=True)
    keys, _ = cache.layers[0].append(
        torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16)
    )
    assert keys.dtype == torch.bfloat16 and keys.shape == (1, 2, 5, 8)
    out = model.generate(tokens(1, 4), max_new_tokens=3, temperature=0.0)
    assert out.shape == (1, 7)
