"""A compact decoder for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5/3) and Gemma 3, gpt-fast style.

One forward pass serves prefill, single-token decode and token-tree verification: new tokens are written to the
static KV cache at consecutive slots, and each query attends to the committed prefix plus, inside the new block,
either the causal past (a chain) or its ancestors (a tree, given by `tree_mask`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import EMPTY, KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # Rounding order follows each reference: Gemma scales in float32, Llama casts first.
        if self.gemma:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def rope_inv_freq(config: ModelConfig, theta: float) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":  # Llama 3.1 frequency-dependent scaling
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(is_mid, mid, scaled).float()
    raise NotImplementedError(f"rope type {kind!r} is not supported by the native runtime")


def rope_table(config: ModelConfig, theta: float, max_len: int) -> torch.Tensor:
    """cos and sin for every position, stacked: `[2, max_len, head_dim]` float32."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(config, theta))
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


GEMV_MAX_WEIGHT = 8 << 20  # elements: up to here a fused reduction beats a GEMM call at batch 1 (H100, measured)
GEMV_MAX_ROWS = 1  # tokens per call written as a reduction (verify widths above it use the GEMM)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`. A single-token step of a small layer under torch.compile becomes multiply + row sum, which
    inductor fuses with its neighbours into one reduction kernel: 1.2x faster steps for SmolLM2-135M on an H100,
    while for 8B-sized layers cuBLAS reads the weights faster (docs/benchmarks.md)."""
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling() and rows <= GEMV_MAX_ROWS and layer.weight.numel() <= GEMV_MAX_WEIGHT:
        out = (x.unsqueeze(-2) * layer.weight).sum(-1)
        return out if layer.bias is None else out + layer.bias
    return layer(x)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Attention of one query per head `q` `[B, H, 1, D]` over `k`, `v` `[B, Hkv, L, D]`, written as products and
    reductions (query heads grouped by KV head, no repeat) for inductor to fuse: fewer, cheaper kernels than an
    SDPA call for a decode step (compiled path only)."""
    b, h, _, d = q.shape
    groups = k.shape[1]
    scores = (q.view(b, groups, h // groups, 1, d) * k[:, :, None]).sum(-1).float() * scale  # [B, Hkv, G, L]
    weights = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf")).softmax(-1)
    return (weights[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype).view(b, h, 1, d)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.window = config.layer_window(layer)
        self.local_rope = config.model_type == "gemma3_text" and self.window is not None
        c = config
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.wqkv = nn.Linear(c.hidden_size, q_out + 2 * kv_out, bias=c.attention_bias)
        self.wo = nn.Linear(q_out, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.gemma_norms)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.gemma_norms)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k_cache: torch.Tensor,
                v_cache: torch.Tensor, slots: torch.Tensor, kv_len: int, mask: torch.Tensor) -> torch.Tensor:
        """`k_cache`, `v_cache`: this layer's `[B, H, L, D]` cache (passed in, not looked up by layer index, so that
        one compiled block serves every layer)."""
        c = self.config
        b, t, _ = x.shape
        q, k, v = linear(self.wqkv, x).split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                       c.num_kv_heads * c.head_dim], dim=-1)
        q = q.view(b, t, c.num_heads, c.head_dim)
        k = k.view(b, t, c.num_kv_heads, c.head_dim)
        v = v.view(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v.transpose(1, 2))
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        if torch.compiler.is_compiling() and t == 1:
            out = single_query_attention(q, keys, values, mask, c.scale)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=c.scale,
                                                 enable_gqa=c.num_kv_heads != c.num_heads)
        return linear(self.wo, out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gelu = config.hidden_act.startswith("gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(self.w_gate_up, x).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return linear(self.w_down, act * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        eps, gemma = config.rms_norm_eps, config.gemma_norms
        self.attn_norm = RMSNorm(config.hidden_size, eps, gemma)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, eps, gemma)
        self.mlp = MLP(config)
        if gemma:  # Gemma 3 also normalizes each sublayer's output before the residual add
            self.post_attn_norm = RMSNorm(config.hidden_size, eps, gemma)
            self.post_mlp_norm = RMSNorm(config.hidden_size, eps, gemma)
        self.gemma = gemma

    def forward(self, x, rope, k_cache, v_cache, slots, kv_len, mask) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rope, k_cache, v_cache, slots, kv_len, mask)
        x = x + (self.post_attn_norm(h) if self.gemma else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(h) if self.gemma else h)


def attention_mask(slot_pos: torch.Tensor, positions: torch.Tensor, start: torch.Tensor | int,
                   tree_mask: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Boolean `[B, 1, T, L]`: may query t attend to slot l?

    Derived from the cache's slot positions: a slot is visible if it holds a token at a position <= the query's
    (which is exactly causal for a chain). Inside a tree block positions repeat across siblings, so there the
    ancestor matrix `tree_mask` `[T, T]` decides instead.
    """
    kv = slot_pos[:, None, :]  # [B, 1, L]
    q = positions[:, :, None]  # [B, T, 1]
    t, length = positions.shape[1], slot_pos.shape[1]
    rel = torch.arange(length, device=slot_pos.device) - start  # slot index relative to the new block
    mask = (kv != EMPTY) & (kv <= q)
    if tree_mask is not None:
        in_block = (rel >= 0) & (rel < t)
        mask = torch.where(in_block, tree_mask[:, rel.clamp(0, t - 1)], mask)
    if window is not None:
        mask = mask & (kv > q - window)
    # A query always sees its own slot: padding tokens (position EMPTY) then attend to themselves only, which keeps
    # their values finite (an all-masked softmax row is NaN, and NaN values poison even masked-out products).
    return (mask | (rel == torch.arange(t, device=rel.device)[:, None]))[:, None]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.gemma_norms)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.cache: KVCache | None = None
        self.compiled_blocks: list | None = None  # set by compile_blocks(); used on the static-shape path only
        self.windows = sorted({w for i in range(config.num_layers) if (w := config.layer_window(i))}, key=str)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache shaped for this model (the model's own is `self.cache`; drafters may keep another)."""
        c = self.config
        with torch.inference_mode(False):  # normal tensors: updated in place both inside and outside inference mode
            return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_len, c.head_dim, self.dtype, self.device)

    def setup_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Allocate the static KV cache and the rotary tables once, for `max_len` slots."""
        c = self.config
        # Round up so that prompts of similar lengths reuse one allocation (and one captured graph on the GPU).
        max_len = min(-(-max_len // 256) * 256, c.max_position_embeddings)
        if self.cache is None or self.cache.batch_size != batch_size or self.cache.max_len < max_len:
            self.cache = None  # free the old buffers before allocating new ones
            self.cache = self.make_cache(batch_size, max_len)
            self.rope_global = rope_table(c, c.rope_theta, max_len).to(self.device)
            self.rope_local = rope_table(c, c.local_rope_theta, max_len).to(self.device)
        self.cache.reset()
        return self.cache

    def compile_blocks(self) -> None:
        """Fuse each block's small kernels with torch.compile (regional compilation).

        Blocks hold no per-layer constants that their forward reads, so one compiled graph serves every layer (one
        compilation per step width and layer kind, not per layer). Only static-shape callers (CUDA-graph capture,
        which passes `start` as a tensor) use them: eager steps change `kv_len` every call and would recompile.
        """
        import torch._dynamo

        # Automatic dynamic shapes: a width or a cache size seen a second time is compiled once more, as a symbol
        # (size 1 stays specialized: the single-token step keeps its own kernels), so a new cache size does not
        # trigger a compilation per step width.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled_blocks = [torch.compile(block, dynamic=None) for block in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        start: int | torch.Tensor | None = None,
        kv_len: int | None = None,
        tree_mask: torch.Tensor | None = None,
        num_logits: int | None = None,
        cache: KVCache | None = None,
        skip_layers: frozenset[int] | set[int] = frozenset(),
        hidden_layers: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, T', V]` for `input_ids` `[B, T]` at `positions` `[B, T]` (T' = num_logits or T).

        Writes the new tokens' keys and values at cache slots `start...start+T` (default: the cache's length, which
        then advances) and attends over the first `kv_len` slots (default: start + T). A CUDA-graph caller passes
        `start` as a device tensor and `kv_len` = the cache size so that every shape is static. Drafters
        that run the target's own weights (self-speculation) pass their own `cache` and the layers to `skip_layers`.
        `hidden_layers` (trained draft heads read the target's features): when non-empty, return `(logits, hidden)`,
        hidden `[B, T', len(hidden_layers) * hidden_size]` (same rows as the logits), the layers in the order given;
        index i < num_layers is the output of block i (0-based), index num_layers the final normed hidden state
        (what the LM head reads).
        """
        cache = self.cache if cache is None else cache
        b, t = input_ids.shape
        eager = start is None
        if eager:
            cache.check_room(t)
            start = cache.length
        if kv_len is None:
            kv_len = start + t
        slots = start + torch.arange(t, device=input_ids.device)
        cache.slot_pos.index_copy_(1, slots, positions)
        slot_pos = cache.slot_pos[:, :kv_len]
        masks = {w: attention_mask(slot_pos, positions, start, tree_mask, w) for w in [None, *self.windows]}
        idx = positions.clamp_min(0)  # padding tokens (position EMPTY) get any rotation: nobody attends to them
        rope_global = (self.rope_global[0][idx][:, None].to(self.dtype), self.rope_global[1][idx][:, None].to(self.dtype))
        rope_local = (self.rope_local[0][idx][:, None].to(self.dtype),
                      self.rope_local[1][idx][:, None].to(self.dtype)) if self.windows else rope_global
        x = self.embed(input_ids)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        run = self.compiled_blocks if self.compiled_blocks is not None and not eager else self.layers
        kept = {}
        for i, block in enumerate(self.layers):
            if i not in skip_layers:
                rope = rope_local if block.attn.local_rope else rope_global
                x = run[i](x, rope, cache.k[i], cache.v[i], slots, kv_len, masks[block.attn.window])
            if i in hidden_layers:
                kept[i] = x
        if num_logits is not None:
            x = x[:, -num_logits:]
        kept[len(self.layers)] = x = self.norm(x)
        logits = self.lm_head(x)
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        if eager:
            cache.length = start + t
        if hidden_layers:
            return logits, torch.cat([kept[i][:, -x.shape[1]:] for i in hidden_layers], dim=-1)
        return logits


def convert_hf_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse q|k|v and gate|up of) a transformers checkpoint into this module's parameters."""
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in hf) else "model."
    out = {"embed.weight": hf[prefix + "embed_tokens.weight"], "norm.weight": hf[prefix + "norm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if config.tie_word_embeddings else hf["lm_head.weight"]
    for i in range(config.num_layers):
        p, q = f"{prefix}layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        out[q + "attn.wqkv.weight"] = torch.cat([hf[attn + f"{n}_proj.weight"] for n in "qkv"])
        if config.attention_bias:
            out[q + "attn.wqkv.bias"] = torch.cat([hf[attn + f"{n}_proj.bias"] for n in "qkv"])
        out[q + "attn.wo.weight"] = hf[attn + "o_proj.weight"]
        if config.qk_norm:
            out[q + "attn.q_norm.weight"] = hf[attn + "q_norm.weight"]
            out[q + "attn.k_norm.weight"] = hf[attn + "k_norm.weight"]
        out[q + "mlp.w_gate_up.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[q + "mlp.w_down.weight"] = hf[p + "mlp.down_proj.weight"]
        out[q + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        if config.gemma_norms:
            out[q + "post_attn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
            out[q + "mlp_norm.weight"] = hf[p + "pre_feedforward_layernorm.weight"]
            out[q + "post_mlp_norm.weight"] = hf[p + "post_feedforward_layernorm.weight"]
        else:
            out[q + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out
