"""A decoder-only transformer in plain PyTorch: LLaMA-style or GPT-2-style by config.

Follows nanoGPT's ``model.py`` (one readable file, one config dataclass) with LLaMA's
RMSNorm, rotary embeddings (Su et al., RoFormer) and SwiGLU MLP (Shazeer, 2020), and
grouped-query attention (Ainslie et al., 2023).

Module names are part of the interface: the sparsifier finds layers by name and converts
every ``nn.Linear`` under ``blocks``. The forward pass only *calls* those layers (it never
reads ``.weight``), so any module with the same in/out features can replace them.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slope_lightning.models.config import TransformerConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Block",
    "CausalSelfAttention",
    "GeluMLP",
    "KVCache",
    "LayerCache",
    "SwiGLUMLP",
    "Transformer",
]


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------


def rope_cache(
    seq_len: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotary angles, both (seq_len, head_dim), in float32.

    Uses the "rotate half" layout (as in GPT-NeoX and Hugging Face LLaMA): dimension ``i``
    is paired with ``i + head_dim // 2``, and both share the frequency ``theta^(-2i/head_dim)``.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )  # (hs/2,)
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)  # (T,)
    angles = torch.outer(pos, inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the angles in ``cos``/``sin`` (T, hs).

    The arithmetic is done in float32 whatever the input dtype, then cast back to ``x.dtype``
    (the tables themselves follow the model's dtype, as in Hugging Face LLaMA).
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, nh, T, hs)
    return (xf * cos.float() + rotated * sin.float()).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Key/value cache for generation
# --------------------------------------------------------------------------------------------


class LayerCache:
    """Keys and values one attention layer has computed so far, for a batch of sequences.

    Preallocated to ``capacity`` positions on the first :meth:`append` (in the dtype and on the
    device of the keys it receives), then filled in place: no concatenation per token. The
    keys are stored after the rotary embedding and before GQA's repeat, so a cache holds
    ``n_kv_head`` heads, not ``n_head``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self._keys: Tensor | None = None  # (B, nkv, capacity, hs)
        self._values: Tensor | None = None  # (B, nkv, capacity, hs)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` (B, nkv, T, hs) after the cached positions; return all of them,
        (B, nkv, length + T, hs) each (views of the cache, valid until the next append).

        Raises:
            ValueError: the cache would exceed its capacity, or the batch or head shape changed.
        """
        B, nkv, T, hs = k.shape
        end = self.length + T
        if end > self.capacity:
            raise ValueError(
                f"KV cache holds {self.length} positions and cannot take {T} more "
                f"(capacity {self.capacity} = seq_len); start a new cache"
            )
        if self._keys is None or self._values is None:
            shape = (B, nkv, self.capacity, hs)
            self._keys = torch.empty(shape, dtype=k.dtype, device=k.device)
            self._values = torch.empty(shape, dtype=v.dtype, device=v.device)
        elif self._keys.shape[:2] != (B, nkv) or self._keys.shape[-1] != hs:
            raise ValueError(
                f"KV cache was built for (B, n_kv_head, hs) = "
                f"{(self._keys.shape[0], self._keys.shape[1], self._keys.shape[3])}, got "
                f"{(B, nkv, hs)}; start a new cache for a new batch"
            )
        self._keys[:, :, self.length : end] = k
        self._values[:, :, self.length : end] = v
        self.length = end
        return self._keys[:, :, :end], self._values[:, :, :end]


class KVCache:
    """One :class:`LayerCache` per block: what :meth:`Transformer.forward` reuses when it is
    given the cache of the tokens before ``idx``.

    Example:
        >>> model = Transformer(TransformerConfig.from_name("tiny", n_layer=2)).eval()
        >>> cache = KVCache(model.config)
        >>> logits, _ = model(torch.randint(0, 8192, (1, 5)), cache=cache, last_only=True)
        >>> cache.length, logits.shape
        (5, torch.Size([1, 1, 8192]))
    """

    def __init__(self, config: TransformerConfig) -> None:
        self.layers = [LayerCache(config.seq_len) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Positions cached so far (the position of the next token)."""
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        """Positions the cache can hold: the model's ``seq_len``."""
        return self.layers[0].capacity


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped key/value heads.

    Query, key, value and output projections are separate ``nn.Linear`` layers (not one
    fused QKV matrix), so that with GQA each has its own shape and can be sparsified alone.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        assert config.n_kv_head is not None  # filled by TransformerConfig.__post_init__
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Attend causally over ``x`` (B, T, C); ``rope`` is (cos, sin), each (T, hs), or None.

        With a ``cache``, ``x`` holds the T tokens that follow the ``cache.length`` tokens
        already seen: their keys and values are appended to the cache, and the queries attend
        to every cached position up to their own.
        """
        B, T, C = x.size()
        hs = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)

        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, nkv, past + T, hs) each

        if self.n_kv_head != self.n_head:
            # GQA: query head h reads key/value head h // group. Repeating materialises the
            # copies (a memory cost); SDPA's enable_gqa would avoid it but needs torch >= 2.5.
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)  # (B, nh, past + T, hs)
            v = v.repeat_interleave(group, dim=1)  # (B, nh, past + T, hs)

        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:
            # One new token attends to everything cached: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # SDPA's is_causal aligns the mask to the top left when T < past + T; the new
            # tokens sit at the bottom right: query i (position past + i) sees keys <= past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        # y: (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class SwiGLUMLP(nn.Module):
    """LLaMA's gated MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        assert config.mlp_hidden is not None  # filled by TransformerConfig.__post_init__
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, hidden)
        return self.dropout(self.down_proj(h))  # (B, T, C)


class GeluMLP(nn.Module):
    """GPT-2's MLP: ``fc_out(gelu(fc_in(x)))``, with the tanh approximation GPT-2 used."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        assert config.mlp_hidden is not None  # filled by TransformerConfig.__post_init__
        self.fc_in = nn.Linear(config.d_model, config.mlp_hidden, bias=config.bias)
        self.fc_out = nn.Linear(config.mlp_hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc_in(x), approximate="tanh")  # (B, T, hidden)
        return self.dropout(self.fc_out(h))  # (B, T, C)


def _norm(config: TransformerConfig) -> nn.Module:
    """RMSNorm for LLaMA style, LayerNorm for GPT-2 style."""
    if config.style == "llama":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)  # in torch since 2.4
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = _norm(config)
        self.mlp: nn.Module = SwiGLUMLP(config) if config.style == "llama" else GeluMLP(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache)  # (B, T, C)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, C)
        return x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


#: The residual output projections, initialised with :meth:`Transformer.residual_std`
#: (GPT-2: each block adds two branches to the residual stream).
RESIDUAL_PROJECTIONS: tuple[str, ...] = ("o_proj", "down_proj", "fc_out")


class Transformer(nn.Module):
    """Decoder-only language model built from a :class:`TransformerConfig`.

    Module layout (names are relied upon by the sparsifier)::

        tok_embed            nn.Embedding(vocab_size, d_model)
        pos_embed            nn.Embedding(seq_len, d_model)          gpt2 style only
        blocks[i].attn_norm  RMSNorm (llama) / LayerNorm (gpt2)
        blocks[i].attn       q_proj, k_proj, v_proj, o_proj           nn.Linear
        blocks[i].mlp_norm   RMSNorm / LayerNorm
        blocks[i].mlp        gate_proj, up_proj, down_proj (llama)    nn.Linear
                             fc_in, fc_out (gpt2)                     nn.Linear
        norm                 final RMSNorm / LayerNorm
        lm_head              nn.Linear(d_model, vocab_size, bias=False), tied to tok_embed
                             when config.tie_embeddings

    Example:
        >>> model = Transformer(TransformerConfig.from_name("tiny"))
        >>> logits, loss = model(torch.randint(0, 8192, (2, 16)))
        >>> logits.shape
        torch.Size([2, 16, 8192])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = (
            nn.Embedding(config.seq_len, config.d_model) if config.style == "gpt2" else None
        )
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = _norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

        # Non-persistent: derived from the config, so not saved in checkpoints (and not
        # expected when loading one). Filled by init_weights().
        self.rope_cos: Tensor | None
        self.rope_sin: Tensor | None
        if config.style == "llama":
            shape = (config.seq_len, config.head_dim)
            self.register_buffer("rope_cos", torch.empty(shape), persistent=False)  # (T, hs)
            self.register_buffer("rope_sin", torch.empty(shape), persistent=False)  # (T, hs)
        else:
            self.rope_cos = self.rope_sin = None

        self.init_weights()
        logger.info(
            "Transformer(%s): %.2fM parameters (%.2fM without embeddings)",
            config.style,
            self.num_parameters() / 1e6,
            self.num_parameters(exclude_embeddings=True) / 1e6,
        )

    def residual_std(self) -> float:
        """The init std of the residual output projections (:data:`RESIDUAL_PROJECTIONS`)."""
        return self.config.init_std / math.sqrt(2 * self.config.n_layer)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rotary buffers.

        Called by ``__init__``; call it again after materialising a model built on the
        ``meta`` device (``model.to_empty(device=...)``), whose tensors hold garbage.

        Linear and Embedding weights ~ N(0, init_std), biases zero, norms at identity. The
        residual output projections (``o_proj``, ``down_proj``, ``fc_out``) use
        init_std / sqrt(2 * n_layer), as in the GPT-2 paper: each block adds two branches to
        the residual stream, and this keeps its variance from growing with depth.
        """
        if self.config.tie_embeddings:
            # Re-tie: Module.to_empty() moving off the meta device gives each module its own
            # new Parameter, which silently unties the head from the embedding.
            self.lm_head.weight = self.tok_embed.weight
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(module.weight, mean=0.0, std=self.residual_std())
        if self.rope_cos is not None and self.rope_sin is not None:
            cos, sin = rope_cache(
                self.config.seq_len,
                self.config.head_dim,
                self.config.rope_theta,
                device=self.rope_cos.device,
            )
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, counting a tied embedding/head matrix once.

        Args:
            exclude_embeddings: leave out the token and position embedding tables. With tied
                embeddings the output head is that same table, so it is left out too; an
                untied output head is counted.
        """
        params = {id(p): p for p in self.parameters()}  # dedupes shared tensors
        if exclude_embeddings:
            params.pop(id(self.tok_embed.weight), None)
            if self.pos_embed is not None:
                params.pop(id(self.pos_embed.weight), None)
        return sum(p.numel() for p in params.values())

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits for every position, and the mean next-token loss when ``targets`` is given.

        Args:
            idx: token ids, LongTensor (B, T) with T <= config.seq_len.
            targets: token ids to predict, LongTensor (B, T); positions equal to -100 are
                ignored. The caller shifts them (targets[:, t] is the token after idx[:, t]).
            cache: keys and values of the tokens before ``idx`` (an empty :class:`KVCache`
                for a prompt); ``idx`` is then read at positions ``cache.length`` onwards, and
                its own keys and values are appended to the cache.
            last_only: project only the last position through the LM head, (B, 1, vocab):
                what generation needs, and far cheaper than every position when the
                vocabulary is large. Not with ``targets``.

        Returns:
            ``(logits, loss)``: logits (B, T, vocab_size) (or (B, 1, vocab_size) with
            ``last_only``) in the model's compute dtype, and the mean cross-entropy (computed
            in float32) or None without targets.

        Raises:
            ValueError: if ``idx`` is not 2-D, T (plus the cached positions) exceeds
                ``config.seq_len``, or ``last_only`` is combined with ``targets``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        past = cache.length if cache is not None else 0
        if past + idx.size(1) > self.config.seq_len:
            cached = f" after {past} cached positions" if past else ""
            raise ValueError(
                f"input length T={idx.size(1)}{cached} exceeds the model's maximum context "
                f"seq_len={self.config.seq_len}; crop the input or build a config with a "
                f"larger seq_len"
            )
        if last_only and targets is not None:
            raise ValueError("last_only=True gives logits for one position; the loss needs all")

        B, T = idx.size()
        x = self.tok_embed(idx)  # (B, T, C)
        if self.pos_embed is not None:
            pos = torch.arange(past, past + T, device=idx.device)  # (T,)
            x = x + self.pos_embed(pos)  # (B, T, C)
        x = self.embed_dropout(x)

        rope = None
        if self.rope_cos is not None and self.rope_sin is not None:
            rope = (self.rope_cos[past : past + T], self.rope_sin[past : past + T])  # (T, hs)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache.layers[i] if cache is not None else None)  # (B, T, C)
        if last_only:
            x = x[:, [-1], :]  # (B, 1, C): nanoGPT's inference-time saving
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, vocab) or (B, 1, vocab)

        loss = None
        if targets is not None:
            # float32 for the softmax: bf16 logits lose too much precision over a large vocab.
            loss = F.cross_entropy(
                logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); returns (B, T + max_new_tokens).

        With ``use_cache`` (the default) the prompt is encoded once into a :class:`KVCache`
        and each new token costs one position's forward; only the last position goes
        through the LM head. A prompt that leaves no room for the new tokens in
        ``config.seq_len`` positions is cropped at its start, once, to its last
        ``seq_len - max_new_tokens + 1`` tokens, so that the whole generation still runs
        from one cache (a prompt of ``seq_len`` tokens is not re-encoded at every step).
        Only when ``max_new_tokens`` alone exceeds ``seq_len`` does the context slide: once
        the cache is full, every step re-encodes the last ``seq_len`` tokens (the positions
        of a sliding context shift by one each step, so cached keys would sit at the wrong
        positions). ``use_cache=False`` crops the same way and re-encodes the context at
        every step: the same tokens, more slowly. Call
        ``model.eval()`` first if the config has dropout; merge sparse layers
        (:func:`~slope_lightning.sparse.merge_for_inference`) for their fused path.

        Args:
            idx: prompt token ids, LongTensor (B, T), T >= 1.
            max_new_tokens: number of tokens to append.
            temperature: divides the logits; 0 means greedy (argmax) decoding.
            top_k: if set, sample only among the ``top_k`` most likely tokens.
            use_cache: reuse keys and values across steps (False: recompute the context).

        Raises:
            ValueError: if ``idx`` is empty, ``max_new_tokens`` < 0, ``temperature`` < 0 or
                ``top_k`` < 1.
        """
        if idx.dim() != 2 or idx.size(1) < 1:
            raise ValueError(
                f"idx must be a (batch, time) prompt of >= 1 token, got {tuple(idx.shape)}"
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None")
        seq_len = self.config.seq_len
        # Positions the generation needs: the prompt and every new token but the last one
        # (the last is sampled, never fed back). Crop the prompt so that they fit.
        keep = seq_len - max_new_tokens + 1
        prompt_len = idx.size(1)
        if max_new_tokens > 0 and prompt_len > keep >= 1:
            out_prefix, idx = idx[:, : prompt_len - keep], idx[:, prompt_len - keep :]
        else:
            out_prefix = idx[:, :0]
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.length < seq_len:
                logits, _ = self(idx[:, -1:], cache=cache, last_only=True)  # one new position
            else:
                context = idx[:, -seq_len:]  # (B, <=seq_len)
                # A fresh cache for the (re-)encoded context, while there is room after it.
                cache = KVCache(self.config) if use_cache and context.size(1) < seq_len else None
                logits, _ = self(context, cache=cache, last_only=True)
            logits = logits[:, -1, :].float()  # (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)  # (B, vocab)
                next_id = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)  # (B, T+1)
        return torch.cat((out_prefix, idx), dim=1) if out_prefix.size(1) else idx
