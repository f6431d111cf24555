"""A compact decoder for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5/3) and Gemma 3, gpt-fast style.

One forward pass serves prefill chunks, decode steps and token-tree verification of many sequences at once
(`batch.py`): new tokens are written into the paged KV pool, and each query attends to its sequence's committed
entries plus, inside its new block, either the causal past (a chain) or its ancestors (a tree).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .batch import ForwardBatch, Rows, RowSpec, build_batch
from .kv_cache import KVPool, SeqKV
from .rope import rope_table


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

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k_store: torch.Tensor,
                v_store: torch.Tensor, write_slots: torch.Tensor, groups: list,
                observers: list | None = None) -> torch.Tensor:
        """`x` `[N, hidden]` flat tokens; `k_store`, `v_store`: this layer's `[slots, kv_heads, head_dim]` pool
        (passed in, not looked up by layer index, so that one compiled block serves every layer); `groups`: per
        attention group `(start, rows, width, slot_table [rows, L], mask [rows, 1, width, L], ctx [rows], lo, tree,
        through)` (`lo` `[rows]`: first entry inside this layer's sliding window for a single-token row, or None;
        `mask` None: the tree kernel serves the group, reading `tree`, the group's ancestor matrices or None for
        chains; `through`: a pass wider than its ring, whose rows read the entries before them at `slot_table`, read
        before this pass writes, then the pass's own keys and values, `mask` covering both: `_ring_view`);
        `observers`: per group, the rows a KV press takes part in (`observe_rows`), or None."""
        c = self.config
        n = x.shape[0]
        q, k, v = linear(self.wqkv, x).split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                              c.num_kv_heads * c.head_dim], dim=-1)
        q = q.view(n, c.num_heads, c.head_dim)
        k = k.view(n, c.num_kv_heads, c.head_dim)
        v = v.view(n, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Rows wider than their ring read its entries before them first: this pass's writes may overwrite those.
        before = {gi: (k_store[table], v_store[table])
                  for gi, (_, _, _, table, *_, through) in enumerate(groups) if through}
        k_store.index_copy_(0, write_slots, k)
        v_store.index_copy_(0, write_slots, v)
        outs = []
        for gi, (start, rows, width, table, mask, ctx, lo, tree, through) in enumerate(groups):
            observed = observers[gi] if observers is not None else None
            if mask is None and width == 1:  # `Transformer._group_views` chose the decode kernel
                # One token a row: it sees entries [lo, ctx], read in place from the pool. The window's first entry
                # comes from the entries' positions (a press may have evicted some: entry index != position).
                hi = ctx + 1
                og = kernels.paged_decode(q[start:start + rows], k_store, v_store, table,
                                          lo if lo is not None else torch.zeros_like(hi), hi, c.scale)
                outs.append(og.reshape(rows, c.num_heads * c.head_dim))
                continue
            if mask is None:  # several tokens a row (`Transformer._group_views` chose the kernel): read in place too
                og = kernels.paged_tree(q[start:start + rows * width], k_store, v_store, table, lo, ctx, tree,
                                        c.scale)
                outs.append(og.reshape(rows * width, c.num_heads * c.head_dim))
                continue
            qg = q[start:start + rows * width].view(rows, width, c.num_heads, c.head_dim).transpose(1, 2)
            if through:
                own = (t[start:start + rows * width].view(rows, width, *t.shape[1:]) for t in (k, v))
                keys, values = (torch.cat([old, new], dim=1).transpose(1, 2) for old, new in zip(before[gi], own))
            else:
                keys, values = k_store[table].transpose(1, 2), v_store[table].transpose(1, 2)  # [rows, Hkv, L, D]
            if observed:
                keys, values, mask = observe_rows(self.layer, observed, qg, keys, values, mask, c.scale)
            if torch.compiler.is_compiling() and width == 1:
                og = single_query_attention(qg, keys, values, mask, c.scale)
            else:
                og = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=c.scale,
                                                    enable_gqa=c.num_kv_heads != c.num_heads)
            outs.append(og.transpose(1, 2).reshape(rows * width, c.num_heads * c.head_dim))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return linear(self.wo, out)


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

    def forward(self, x, rope, k_store, v_store, write_slots, groups, observers=None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rope, k_store, v_store, write_slots, groups, observers)
        x = x + (self.post_attn_norm(h) if self.gemma else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(h) if self.gemma else h)


def attention_mask(group: Rows, q_pos: torch.Tensor, kv_pos: torch.Tensor | None,
                   window: int | None, first: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """Boolean `[rows, 1, width, L]`: may query t of a row read column l (logical entry `first + l`: a ring's table
    starts at `first` `[rows]`; the full table at 0)?

    Entries committed before this pass (entry < ctx) are visible to every query; inside the new block the ancestor
    matrix decides (causal for chains); a sliding `window` then drops what lies too far back, by position. Padding
    queries see only their own entry, which keeps every softmax row finite.
    """
    rows, width = group.rows, group.width
    length = group.slot_table.shape[1] if length is None else length
    rel = torch.arange(length, device=q_pos.device)[None] - group.ctx[:, None]  # [rows, L]: entry - ctx
    if first is not None:
        rel = rel + first[:, None]
    seen = (rel < 0)[:, None, :].expand(rows, width, length)
    tree = group.tree
    if tree is None:
        tree = torch.ones(width, width, dtype=torch.bool, device=q_pos.device).tril_().expand(rows, width, width)
    inside = tree.gather(2, rel.clamp(0, width - 1)[:, None, :].expand(rows, width, length))
    in_block = ((rel >= 0) & (rel < width))[:, None, :]
    mask = torch.where(in_block, inside, seen)
    if window is not None:  # a query always sees itself (position - position = 0 < window)
        mask = mask & (kv_pos[:, None, :] > q_pos[:, :, None] - window)
    return mask[:, None]


def observe_rows(layer: int, observed: list, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Let each observed row's KV press see (and change) its attention inputs in this layer.

    `observed`: (row, observer) pairs; `q` `[rows, H, W, D]`, `keys`/`values` `[rows, Hkv, L, D]`, `mask`
    `[rows, 1, W, L]`. `observer.attend(layer, q, keys, values, mask, scale)` gets one row's slices (`[H, W, D]`,
    `[Hkv, L, D]`, `[1, W, L]`) and returns them, possibly replaced (a quantized prefix dequantized, a per-head
    mask `[H, W, L]` of sparse attention). Other rows are untouched; nothing is changed in place."""
    rows, heads = q.shape[0], q.shape[1]
    changed = {}
    for r, obs in observed:
        given = (keys[r], values[r], mask[r])
        got = obs.attend(layer, q[r], *given, scale)
        if any(a is not b for a, b in zip(got, given)):
            changed[r] = got
    if not changed:
        return keys, values, mask
    keys, values = keys.clone(), values.clone()
    mask = mask.expand(rows, heads, *mask.shape[2:]).clone()
    for r, (k, v, m) in changed.items():
        keys[r], values[r], mask[r] = k, v, m
    return keys, values, mask


def window_lo(kv_pos: torch.Tensor, q_pos: torch.Tensor, ctx: torch.Tensor, window: int) -> torch.Tensor:
    """The first entry a query at `q_pos` (`[rows]`, or `[rows, width]`: a pass's queries) reads under a sliding
    `window`, from the entries' positions `kv_pos` `[rows, L]` (ascending within a row; entries from `ctx` on are not
    counted): the entries at or before `q_pos - window` fall outside. With entry index = position this is
    `ctx + 1 - window` for a single token, clamped at 0. Shaped as `q_pos`."""
    idx = torch.arange(kv_pos.shape[1], device=kv_pos.device)
    before = (idx < ctx[:, None])[:, None]  # [rows, 1, L]
    outside = (kv_pos[:, None] <= q_pos.view(len(q_pos), -1, 1) - window) & before  # [rows, W, L]
    return outside.sum(-1).view(q_pos.shape)


def ring_capacity(window: int, max_pass: int, block_size: int) -> int:
    """Entries a sliding-window layer's ring holds per sequence: the window plus twice the widest pass, in whole
    blocks (a pass reads `capacity - max_pass` of them: its window and its own entries, never a slot that a dropped
    entry written past the sequence's length overwrote; `kv_cache.py`)."""
    return -(-(window + 2 * max_pass) // block_size) * block_size


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
        self.compiled_blocks: list | None = None  # set by compile_blocks(); used on the static-shape path only
        self.windows = sorted({w for i in range(config.num_layers) if (w := config.layer_window(i))}, key=str)
        self.rope_len = 0

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def make_pool(self, num_blocks: int, block_size: int, ring_pass: int | None = None,
                  ring_blocks: int | None = None) -> KVPool:
        """KV memory shaped for this model. With `ring_pass`, sliding-window layers keep only their window: a ring
        of `ring_capacity(window, ring_pass)` entries per sequence and window, `ring_blocks` blocks per ring storage
        (default: as many as the full pool; at least one ring's)."""
        c = self.config
        capacity = None
        if ring_pass is not None and self.windows:
            capacity = [None if (w := c.layer_window(i)) is None else ring_capacity(w, ring_pass, block_size)
                        for i in range(c.num_layers)]
            most = max(x for x in capacity if x is not None) // block_size + 1
            ring_blocks = max(ring_blocks or num_blocks, most)
        return KVPool(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device,
                      capacity, ring_pass if capacity else None, ring_blocks)

    def ensure_rope(self, positions: int) -> None:
        """Rotary tables (cos and sin) covering `positions`, built once."""
        if self.rope_len >= positions:
            return
        c = self.config
        n = min(-(-positions // 256) * 256, c.max_position_embeddings)
        # In the weights' dtype (cast once here rather than after every pass's gather: the same values, fewer kernels
        # in a captured step); `forward` still casts, a no-op unless the weights changed dtype since.
        self.rope_global = rope_table(c, "global", n).to(self.device, self.dtype)
        self.rope_local = rope_table(c, "local", n).to(self.device, self.dtype) if self.windows else self.rope_global
        self.rope_len = n

    def compile_blocks(self) -> None:
        """Fuse each block's small kernels with torch.compile (regional compilation).

        Blocks hold no per-layer constants that their forward reads, so one compiled graph serves every layer (one
        compilation per shape kind and layer kind, not per layer). Only static-shape callers (CUDA-graph capture)
        use them: eager steps change shapes every call and would recompile.
        """
        import torch._dynamo

        # Automatic dynamic shapes: a size seen a second time is compiled once more as a symbol (size 1 stays
        # specialized: the single-token step keeps its own kernels).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled_blocks = [torch.compile(block, dynamic=None) for block in self.layers]

    def forward(self, batch: ForwardBatch, pool: KVPool, skip_layers: frozenset[int] | set[int] = frozenset(),
                compiled: bool = False):
        """Logits `[M, V]` of `batch.logit_rows` (every token if None), after writing every token's key and value
        into `pool`; with `batch.hidden_layers`, also those layers' outputs `[M, len(layers) * hidden]` (layer
        `num_layers` = the final normed state), as `(logits, hidden)`. `compiled` runs the torch.compile'd blocks
        (static shapes only: CUDA-graph capture). Self-speculation passes the layers it skips in `skip_layers`."""
        if not self.rope_len:  # an engine builds them for its context window (`ensure_rope`)
            self.ensure_rope(self.config.max_position_embeddings)
        pos = batch.positions
        rings = getattr(pool, "rings", ())
        # Positions of the ring entries before a pass wider than its ring, read before its writes land.
        before_pos = [[ring.slot_pos[rr.before] if rr.before is not None else None for rr, ring in zip(g.rings, rings)]
                      for g in batch.groups]
        pool.slot_pos.index_copy_(0, batch.write_slots, pos)
        for ring, writes in zip(rings, batch.ring_writes):
            ring.slot_pos.index_copy_(0, writes, pos)
        # What each layer reads: its storage (the full pool, or its ring: `ring_of`) and its window.
        kinds = [(pool.ring_of(i) if rings else None, block.attn.window) for i, block in enumerate(self.layers)]
        groups = [self._group_views(g, pos, pool, set(kinds), old) for g, old in zip(batch.groups, before_pos)]
        observers = [g.observers for g in batch.groups] if any(g.observers for g in batch.groups) else None
        # Ring layers' columns are their ring's entries: only a press that reads rings (`observes_rings`) sees them.
        ring_observers = [[(r, o) for r, o in g or () if o.state.observes_rings] or None
                          for g in observers] if observers and rings else None
        if ring_observers is not None and not any(ring_observers):
            ring_observers = None
        cos_g, sin_g = self.rope_global[0][pos][:, None].to(self.dtype), self.rope_global[1][pos][:, None].to(self.dtype)
        rope_global = (cos_g, sin_g)
        rope_local = (self.rope_local[0][pos][:, None].to(self.dtype),
                      self.rope_local[1][pos][:, None].to(self.dtype)) if self.windows else rope_global
        x = self.embed(batch.tokens)
        if self.config.embed_scale != 1.0:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        # Rows a press observes run the plain blocks (the compiled ones are for the static shapes of graph capture).
        run = self.compiled_blocks if compiled and self.compiled_blocks is not None and not observers else self.layers
        keep = batch.logit_rows
        hidden = []
        for i, block in enumerate(self.layers):
            if i not in skip_layers:
                rope = rope_local if block.attn.local_rope else rope_global
                kind = kinds[i]
                layer_groups = [views[kind] for views in groups]
                k_store, v_store = pool.layer_store(i) if rings else (pool.k[i], pool.v[i])
                writes = batch.write_slots if kind[0] is None else batch.ring_writes[kind[0]]
                seen = observers if kind[0] is None else ring_observers
                if seen:
                    x = run[i](x, rope, k_store, v_store, writes, layer_groups, seen)
                else:
                    x = run[i](x, rope, k_store, v_store, writes, layer_groups)
            if i in batch.hidden_layers:
                hidden.append(x if keep is None else x[keep])
        x = x if keep is None else x[keep]
        x = self.norm(x)
        if self.config.num_layers in batch.hidden_layers:
            hidden.append(x)
        logits = self.lm_head(x)
        if self.config.final_logit_softcap:
            cap = self.config.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        if batch.hidden_layers:
            order = sorted(batch.hidden_layers)
            return logits, torch.cat([hidden[order.index(i)] for i in batch.hidden_layers], dim=-1)
        return logits

    def _group_views(self, g: Rows, pos: torch.Tensor, pool: KVPool, kinds: set,
                     before_pos: list[torch.Tensor | None]) -> dict:
        """Per (ring or None, window) a layer may have: the tuple its attention reads for group `g`: (start, rows,
        width, table, mask (None: the tree kernel's), ctx in the table's columns, window's first column for the decode
        kernel or None, ancestor matrices or None, whether the rows read through their ring: `_ring_view`)."""
        q_pos = pos[g.start:g.start + g.rows * g.width].view(g.rows, g.width)
        kernel = kernels.available(pos)
        views = {}
        for r, w in kinds:
            if r is not None and g.rings[r].before is not None:
                views[(r, w)] = self._ring_view(g, q_pos, g.rings[r].before, before_pos[r], w)
                continue
            if r is None:
                table, first, store = g.slot_table, None, pool
            else:
                table, first, store = g.rings[r].table, g.rings[r].first, pool.rings[r]
            kv_pos = store.slot_pos[table] if w is not None else None
            # Verify passes (root + draft tree) read the pool in place through the tree kernel, as steps do through
            # the decode kernel: no copy of every entry per layer, no dense mask (under a sliding window each query
            # gets its own first entry). The masked path stays for the rest (and for passes wider than a window):
            # - a KV press's rows: it sees and may replace the gathered keys, values and mask (`observe_rows`);
            # - prefill chunks wider than the widest captured verify pass: there SDPA's tensor-core kernels win (the
            #   copy of the entries is small next to the chunk's own work; the kernel is tuned for few queries a row);
            # - short verify passes outside fused draft rounds, unless TREE_MAX_WIDTH says otherwise (long ones: the
            #   kernel, TREE_LONG_KV).
            long = table.shape[1] >= kernels.TREE_LONG_KV
            widest = kernels.TREE_WIDEST if g.tree_kernel or long else kernels.TREE_MAX_WIDTH
            # Under a sliding window the kernel applies each query's start to the committed entries only: the pass's
            # own entries must all lie inside every query's window (no wider than the window).
            tree_kernel = kernel and 1 < g.width <= widest and (w is None or g.width <= w) and not g.observers
            decode_kernel = kernel and g.width == 1 and not g.observers
            # No mask where a kernel reads the entries (inside a captured graph its kernels would run every replay):
            # `Attention.forward` takes a kernel wherever the mask is None.
            mask = None if tree_kernel or decode_kernel else attention_mask(g, q_pos, kv_pos, w, first, table.shape[1])
            ctx = g.ctx if first is None else g.ctx - first  # the row's first new entry, as a column of `table`
            # The kernels read columns [lo, ctx) (and the new entries); the window's first one comes from the entries'
            # positions: one a row for a step, one a query for a verify pass.
            lo = None
            if w is not None and (tree_kernel or decode_kernel):
                lo = window_lo(kv_pos, q_pos, ctx, w).flatten()  # [rows] (a step) or [rows * width]
            views[(r, w)] = (g.start, g.rows, g.width, table, mask, ctx, lo, g.tree, False)
        return views

    @staticmethod
    def _ring_view(g: Rows, q_pos: torch.Tensor, before: torch.Tensor, before_pos: torch.Tensor, window: int):
        """A chain of rows wider than its ring (a prefill chunk; `batch.layout_group` keeps only its last entries in
        the ring): each query reads the ring's entries before the pass (`before`, `[rows, span]`: those from `ctx`
        on are scratch) that lie inside its window, then the pass's own keys causally, inside its window."""
        span = before.shape[1]
        entry = (g.ctx - span).clamp_min(0)[:, None] + torch.arange(span, device=before.device)[None]
        seen = (entry < g.ctx[:, None])[:, None, :] & (before_pos[:, None, :] > q_pos[:, :, None] - window)
        own = torch.ones(g.width, g.width, dtype=torch.bool, device=before.device).tril_()[None] & \
            (q_pos[:, None, :] > q_pos[:, :, None] - window)
        mask = torch.cat([seen, own], dim=2)[:, None]  # [rows, 1, width, span + width]
        return (g.start, g.rows, g.width, before, mask, g.ctx, None, None, True)

    def forward_seq(self, kv: SeqKV, tokens: list[int], positions: list[int], tree: torch.Tensor | None = None,
                    logits: str = "all", skip_layers: frozenset[int] | set[int] = frozenset(),
                    hidden_layers: tuple[int, ...] = (), observer=None):
        """One sequence's pass (prefill chunk, step or tree) appended after `kv.length`, which then advances.
        Returns logits `[T or 1, V]` (and hidden states with `hidden_layers`). `observer`: a KV press's part in
        the pass (`observe_rows`)."""
        kv.ensure(kv.length + len(tokens))
        spec = RowSpec(kv, list(tokens), list(positions), tree, logits, observer)
        out = self(build_batch([[spec]], self.device, hidden_layers=hidden_layers), kv.pool, skip_layers)
        kv.length += len(tokens)
        return out


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
