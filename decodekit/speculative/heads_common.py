"""Shared parts of the trained draft heads (`eagle.py`, `medusa.py`, `hydra.py`).

A head reads the target's features (hidden states of chosen layers, `Transformer.forward(hidden_layers=...)`) and
drafts with the target's own embedding and LM head, which it shares instead of storing copies. Here: the head's
configuration and weights on disk, the frozen target parts, a decoder block whose keys and values are passed in
and out (drafting keeps them in a `HeadCache`; training unrolls it), EAGLE-2's dynamic tree growth, and
`HeadDrafter`, the drafter base that collects the features the engine hands over and runs the draft pass.

A draft pass (each head's `_pass`) is device code from the features to the kept tree, with no host synchronization:
the head's rows for the newly committed tokens, then the tree grown round by round (`grow_tree`: top-k on the
device), so the drafter copies the tree to the host once per draft. Under CUDA graphs the pass is captured per
(new-rows bucket, cache-length bucket) over static buffers (`DraftPass`, `GraphRunner.capture`) and replayed;
elsewhere it runs eagerly on tight shapes. The buffers and captures live in a `HeadLane`, which a sequence takes
when it starts and gives back when it ends, so the next sequence replays what is captured.

Position convention (training and drafting alike): feature `f_t` is the target's hidden state after token `x_t`,
the one its LM head turns into `x_{t+1}`. A head's row t reads `f_t` (and, for EAGLE and Hydra, `x_{t+1}`), and its
draft step k (0-based) predicts `x_{t+2+k}`: at the root `x_r` (the last committed token, whose feature is not known
yet) row `r-1` drafts depth 1, 2, ...
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..models.batch import bucket
from ..models.config import ModelConfig
from ..models.transformer import MLP, RMSNorm, apply_rope, rope_table
from .base import DraftTree, Drafter
from .token_ranks import read_token_ranks

TRAINED_DIR = Path(__file__).with_name("trained")
HEAD_FILE, CONFIG_FILE = "head.safetensors", "config.json"


def fused_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers (block outputs; near its reference's 2, N/2, N-3)."""
    return tuple(dict.fromkeys((min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0))))


@dataclass
class HeadConfig:
    """A head's shape and the target it was made for; saved as `config.json` beside the weights."""

    arch: str  # "eagle" | "medusa" | "hydra"
    hidden_size: int
    vocab_size: int
    num_target_layers: int
    feature_layers: tuple[int, ...]  # the target layers it reads (index num_target_layers: final normed state)
    num_heads: int  # attention heads of its own block (EAGLE; Hydra's prefix layer)
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    num_draft_heads: int = 4  # Medusa, Hydra: one head per draft depth
    prefix_layer: bool = True  # Hydra++: an attention layer over the target's features before the heads
    mix_heads: bool = False  # Medusa: heads attend to each other (Amphista's bi-directional auto-embedding block)
    target: str = ""  # the model it was trained on (informative)

    @classmethod
    def for_target(cls, arch: str, config: ModelConfig, fused: bool = False, **overrides) -> "HeadConfig":
        layers = fused_layers(config.num_layers) if fused else (config.num_layers,)
        base = dict(arch=arch, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                    num_target_layers=config.num_layers, feature_layers=layers, num_heads=config.num_heads,
                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                    intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps,
                    rope_theta=config.rope_theta, rope_scaling=config.rope_scaling, hidden_act=config.hidden_act)
        return cls(**{**base, **overrides})

    def __post_init__(self) -> None:
        self.feature_layers = tuple(int(i) for i in self.feature_layers)
        if not self.feature_layers or not all(0 <= i <= self.num_target_layers for i in self.feature_layers):
            raise ValueError(f"feature layers {self.feature_layers} must lie in 0..{self.num_target_layers}")

    @property
    def final_only(self) -> bool:
        """Reads only the final normed state (EAGLE-1/2, Medusa, Hydra) rather than fused layers (EAGLE-3)."""
        return self.feature_layers == (self.num_target_layers,)

    def block_config(self) -> ModelConfig:
        return ModelConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, num_layers=1,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                           rope_scaling=self.rope_scaling, hidden_act=self.hidden_act)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    def check_target(self, config: ModelConfig) -> None:
        if (self.hidden_size, self.vocab_size, self.num_target_layers) != \
                (config.hidden_size, config.vocab_size, config.num_layers):
            raise ValueError(f"this {self.arch} head was made for a target with hidden size {self.hidden_size}, "
                             f"{self.num_target_layers} layers and {self.vocab_size} tokens ({self.target or '?'}); "
                             f"the target has {config.hidden_size}, {config.num_layers} and {config.vocab_size}")


class Target:
    """The target's frozen parts a head shares: token embedding (with Gemma's scale) and LM head (with softcap).

    `vocab_ids` `[N]` (FR-Spec, Zhao et al. 2025: the most frequent tokens, `token_ranks.py`): logits come from
    those N rows of the LM head only, gathered once here, and every other token's logit is -inf, so what reads the
    logits (top-k, log-softmax) is unchanged and never drafts outside the subset. Target verification keeps the
    output exact whatever the draft."""

    def __init__(self, model, vocab_ids: torch.Tensor | None = None) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.vocab_ids = self.vocab_weight = None
        if vocab_ids is not None:
            head = model.lm_head
            weight = getattr(head, "weight", None)
            if not isinstance(head, nn.Linear) or weight is None or weight.shape[0] != self.config.vocab_size:
                raise ValueError("draft_vocab needs the target's whole LM head on one device (a plain Linear; "
                                 "not a tensor-parallel or quantized one)")
            # A copy, contiguous: a draft round reads N rows of contiguous memory, not the whole head. Allocated
            # before any draft pass is captured, and never replaced: a captured pass reads these very tensors.
            self.vocab_ids = vocab_ids.to(weight.device, torch.long)
            self.vocab_weight = weight.detach().index_select(0, self.vocab_ids)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(ids)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.vocab_weight is None:
            out = self.model.lm_head(h.to(self.model.lm_head.weight.dtype))
        else:
            out = F.linear(h.to(self.vocab_weight.dtype), self.vocab_weight)
        if cap := self.config.final_logit_softcap:  # before the scatter: the softcap of -inf would be -cap
            out = torch.tanh(out / cap) * cap
        if self.vocab_ids is None:
            return out
        full = out.new_full((*out.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, out)


class Rope(nn.Module):
    """cos/sin of the head's positions, grown on demand (not saved with the weights)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("table", torch.zeros(2, 0, config.head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`max_position`: a bound the caller knows (drafting), which spares reading `positions` on the host."""
        need = (int(positions.max()) if max_position is None else max_position) + 1
        if need > self.table.shape[1]:
            size = max(need, 2 * self.table.shape[1], 256)
            self.table = rope_table(self.config, self.config.rope_theta, size).to(positions.device)
        return self.table[0][positions].unsqueeze(1).to(dtype), self.table[1][positions].unsqueeze(1).to(dtype)


class HeadBlock(nn.Module):
    """One pre-norm decoder block (attention + gated MLP) of a head.

    Keys and values of earlier rows are passed in and the new rows' are returned, so that drafting keeps them in a
    `HeadCache` while training unrolls several draft steps over lists of them (EAGLE-3's training-time test).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.wqkv = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.rope = Rope(c)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor, max_position: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x` `[B, T, H]` at `positions` `[B, T]` (at most `max_position`, if given); `past` keys/values
        `[B, Hkv, S, D]`; `mask` bool `[B or 1, 1, T, S+T]` (may row t see key s). Returns (output `[B, T, H]`, new
        keys, new values)."""
        c = self.config
        b, t, _ = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        cos, sin = self.rope(positions, x.dtype, max_position)
        q = apply_rope(q.view(b, t, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=c.scale,
                                             enable_gqa=c.num_kv_heads != c.num_heads)
        h = x + self.wo(out.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.mlp_norm(h)), k, v


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()[None, None]


class HeadCache:
    """Keys and values of a head's block while drafting: the rows computed from the target's real features (row t
    at entry t; `length` of them are committed). The rows of a draft being built are kept beside it, never here."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (1, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, block: HeadBlock, x: torch.Tensor, start: torch.Tensor, length: int,
               max_position: int) -> torch.Tensor:
        """Run `block` on new rows `x` `[1, R, H]` at entries (and positions) `start`.. (`start` `[1]`, on the
        device), each seeing the entries before `start` and the new rows up to itself; their keys and values are
        written there. `length` entries are read (those from `start` on are masked), so the shapes do not depend
        on `start` and the pass can be captured. Returns the block's output `[1, R, H]`."""
        r, dev = x.shape[1], x.device
        pos = start + torch.arange(r, device=dev)
        before = (torch.arange(length, device=dev) < start).expand(r, length)
        mask = torch.cat([before, torch.ones(r, r, dtype=torch.bool, device=dev).tril_()], dim=1)
        out, k, v = block(x, pos[None], (self.k[:, :, :length], self.v[:, :, :length]), mask[None, None],
                          max_position)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return out


# ---- training batches -----------------------------------------------------------------------------------------
@dataclass
class HeadBatch:
    """Right-padded sequences for training or scoring a head: what `unroll` reads."""

    tokens: torch.Tensor  # [B, T] long
    feats: torch.Tensor  # [B, T, len(feature_layers) * H]: the head's input features
    final: torch.Tensor  # [B, T, H]: the target's final normed state (next-token targets, EAGLE-1's regression)
    lengths: torch.Tensor  # [B]
    prompt_lens: torch.Tensor  # [B]

    def targets(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token `[B, T-1]`, weight `[B, T-1]` float) that draft step `step` of row t is scored on: `x_{t+2+step}`,
        counted where it exists and is an answer token (prompts are context, never targets)."""
        want = shifted(self.tokens, 2 + step)
        idx = torch.arange(self.tokens.shape[1] - 1, device=self.tokens.device)[None] + 2 + step
        ok = (idx < self.lengths[:, None]) & (idx >= self.prompt_lens[:, None])
        return want, ok.float()


# Scoring hook of `unroll`: (step k, outputs of step k) -> the tokens rows feed to step k+1.
Pick = Callable[[int, torch.Tensor], torch.Tensor]


def shifted(x: torch.Tensor, s: int) -> torch.Tensor:
    """Rows 0..T-2 of `x` `[B, T, ...]` moved up by `s` (row t = x[:, t+s]), zeros past the end."""
    n = x.shape[1] - 1
    out = x.new_zeros((x.shape[0], n, *x.shape[2:]))
    if s < x.shape[1]:
        part = x[:, s:s + n]
        out[:, :part.shape[1]] = part
    return out


# ---- drafting a tree ------------------------------------------------------------------------------------------
@dataclass
class Frontier:
    """The nodes one round of tree growth expands (`k` of them, in node order): their `depth` (1-based, shared),
    `tokens` `[k]`, `paths` `[k, depth]` (the tokens from depth 1 down to each node) and `parent` `[k]` (each
    one's row in the previous round's frontier; 0 in the first round, whose parent is the root). Device tensors."""

    depth: int
    tokens: torch.Tensor
    paths: torch.Tensor
    parent: torch.Tensor


Expand = Callable[[Frontier], torch.Tensor]  # -> [k, V] log-probabilities of the frontier's children


def grow_tree(root_logprobs: torch.Tensor, expand: Expand, depth: int, branch: int, max_nodes: int) -> torch.Tensor:
    """EAGLE-2's dynamic draft tree: expand the `branch` most likely nodes of each depth, then keep the `max_nodes`
    nodes of highest path probability (draft confidence approximates acceptance; ties: the earlier node).

    `root_logprobs` `[V]`: the draft's log-probabilities of depth-1 tokens; `expand(frontier)` those of the
    frontier's children. Nodes are numbered as they are made: the root's children by rank, then each round's
    children, frontier node by frontier node. Children never score above their parents, so the kept nodes include
    their ancestors. Device code throughout (no host synchronization: capturable); returns `[2, m]` (tokens,
    parents, `m = min(max_nodes, nodes made)`) of the kept nodes, 1-based parents (0: the root) in node order:
    `DraftTree(*out.tolist())`.
    """
    k = min(branch, root_logprobs.shape[-1])
    scores, tokens = root_logprobs.float().topk(k)
    dev = tokens.device
    ids = torch.arange(1, k + 1, device=dev)  # the frontier's node numbers
    made = [(tokens, scores, torch.zeros_like(tokens))]  # (tokens, path scores, parents) of each round's nodes
    front, front_scores, count = Frontier(1, tokens, tokens[:, None], torch.zeros_like(tokens)), scores, k
    for d in range(2, depth + 1):
        lp, tok = expand(front).float().topk(k, dim=-1)
        cum = (front_scores[:, None] + lp).flatten()
        made.append((tok.flatten(), cum, ids[:, None].expand(k, k).flatten()))
        best = cum.topk(k).indices.sort().values  # the next frontier, in node order
        ids = count + 1 + best
        count += k * k
        nxt = tok.flatten()[best]
        front = Frontier(d, nxt, torch.cat([front.paths[best // k], nxt[:, None]], dim=1), best // k)
        front_scores = cum[best]
    tokens, scores, parents = (torch.cat(part) for part in zip(*made))
    keep = scores.sort(descending=True, stable=True).indices[:max_nodes].sort().values
    renumber = torch.zeros(count + 1, dtype=torch.long, device=dev)  # old node number -> kept number (0: dropped)
    renumber[keep + 1] = torch.arange(1, keep.shape[0] + 1, device=dev)
    return torch.stack([tokens[keep], renumber[parents[keep]]])


# ---- weights on disk ------------------------------------------------------------------------------------------
def save_head(head: nn.Module, config: HeadConfig, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """`config.json` + `head.safetensors` (the head's own weights only: the target's are shared)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(config.to_json())
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()},
              str(folder / HEAD_FILE))
    return folder


def read_head(folder: str | Path, heads: dict[str, type]) -> tuple[nn.Module, HeadConfig]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / HEAD_FILE).is_file():
        raise ValueError(f"{folder} is not a draft head folder (needs {CONFIG_FILE} and {HEAD_FILE})")
    config = HeadConfig.from_json((folder / CONFIG_FILE).read_text())
    if config.arch not in heads:
        raise ValueError(f"{folder} holds a {config.arch!r} head; expected one of {', '.join(heads)}")
    head = heads[config.arch](config)
    head.load_state_dict({k: v.float() for k, v in load_file(str(folder / HEAD_FILE)).items()})
    return head, config


def new_head(cls: type, config: HeadConfig, seed: int) -> nn.Module:
    """An untrained head, reproducible from `seed` (does not touch the global random stream)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


# ---- the drafter ----------------------------------------------------------------------------------------------
SYNC_ROWS = (1, 2, 4, 8, 16)  # buckets of newly committed rows a captured draft pass adds (accepted tokens + 1)
MIN_LENGTH = 256  # cache entries a captured pass reads: a power of two >= what is committed, at least this


class HeadLane:
    """What one sequence drafts over: the head's cache (EAGLE's block, Hydra's prefix layer; None for Medusa) and the
    draft passes captured over it, by (rows, length). A sequence takes an idle lane when it starts and gives it back
    when it ends (`HeadDrafter.reset` / `finish`), so captures are paid once per lane, not once per sequence."""

    def __init__(self, cache: HeadCache | None, max_position: int) -> None:
        self.cache, self.max_position = cache, max_position
        self.passes: dict[tuple[int, int], DraftPass] = {}


class DraftPass:
    """One shape of a head's draft pass on one lane: `rows` new committed rows (padded; padding rows write past the
    committed entries, which nothing reads before a later pass overwrites them), `length` cache entries read.
    Static inputs (one host-to-device copy of the ints), captured with the engine runner's `capture`; on the CPU a
    replay calls the function."""

    def __init__(self, drafter: "HeadDrafter", lane: HeadLane, rows: int, length: int, feats: torch.Tensor,
                 ints: list[int]) -> None:
        dev = feats.device
        self.rows = rows
        self.host = torch.zeros(rows + 2, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.ints = torch.zeros(rows + 2, dtype=torch.long, device=dev)
        self.feats = feats.new_zeros(rows, feats.shape[1])
        # Filled with this step's inputs before the capture: its warm-up runs write the very rows the step writes.
        self.fill(feats, ints)
        run = lambda: drafter._pass(lane, self.feats, self.ints, length)  # noqa: E731
        self.out = run()  # its shape, in memory of its own (not the capture's)
        # The rotary tables the capture reads (sized by the lane's `max_position`): kept alive should a later
        # caller of the shared head grow them into new tensors.
        self.tables = [m.table for m in drafter.head.modules() if isinstance(m, Rope)]
        self.graph = drafter.capture(lambda: self.out.copy_(run()))

    def fill(self, feats: torch.Tensor, ints: list[int]) -> None:
        n = feats.shape[0]
        self.feats[:n].copy_(feats)
        self.host.copy_(torch.tensor(ints[:n] + [0] * (self.rows - n) + ints[n:]))
        self.ints.copy_(self.host, non_blocking=True)

    def run(self, feats: torch.Tensor, ints: list[int]) -> torch.Tensor:
        self.fill(feats, ints)
        self.graph.replay()
        return self.out


@dataclass
class HeadDrafter(Drafter):
    """Base of the trained-head drafters. Knobs shared by all: `path` (None: the head shipped for the target in
    `speculative/trained/<model>-<method>/`; else a folder written by `decodekit train-drafter`), `init` ("trained":
    the trained head, an error if none; "random": an untrained head, for tests; "trained-or-random": the shipped head
    where one exists, else an untrained one), `seed` (of an untrained head), `depth` (draft depth), `branch` (children
    expanded per node; 1 = a chain), `max_nodes` (tree size, verified in one target pass), `draft_vocab` (0: draft
    over the whole vocabulary; N: over the N most frequent tokens only, ranked by the head folder's
    `token_ranks.safetensors`, FR-Spec: a draft round reads N rows of the LM head instead of all of them).

    A subclass gives its `_pass` (device code: the new committed rows' features and tokens -> the kept tree) and the
    block its cache serves (`cache_block`, or None)."""

    path: str | None = None
    init: str = "trained"
    seed: int = 0
    depth: int = 6
    branch: int = 8
    max_nodes: int = 60
    draft_vocab: int = 0

    learns_from_steps: ClassVar[bool] = True
    module: ClassVar[type]  # the head's nn.Module class

    def __post_init__(self) -> None:
        if self.init not in ("trained", "random", "trained-or-random"):
            raise ValueError(f"{self.name}: init must be trained, random or trained-or-random, got {self.init!r}")
        if self.depth < 1 or self.branch < 1 or self.max_nodes < 1:
            raise ValueError(f"{self.name}: depth, branch and max_nodes must be >= 1")
        if self.draft_vocab < 0 or 0 < self.draft_vocab < self.branch:  # fewer tokens than a node's children
            raise ValueError(f"{self.name}: draft_vocab must be 0 (the whole vocabulary) or at least branch "
                             f"({self.branch}), got {self.draft_vocab}")
        self.head = None
        self.lane: HeadLane | None = None

    def _folder(self, engine) -> Path | None:
        """The folder the head is read from (None: an untrained head)."""
        shipped = TRAINED_DIR / f"{engine.name}-{self.name}"
        if self.path is not None:
            return Path(self.path)
        if self.init != "random" and shipped.is_dir():
            return shipped
        if self.init == "trained":
            raise ValueError(f"no trained {self.name} head ships for {engine.name!r}; train one with `decodekit "
                             f"train-drafter --model {engine.name} --arch {self.name} ...` and pass -O path=DIR "
                             "(or -O init=random for an untrained head)")
        return None

    def _resolve(self, engine, folder: Path | None) -> nn.Module:
        if folder is not None:
            return read_head(folder, {self.name: type(self).module})[0]
        return new_head(type(self).module, type(self).module.default_config(engine.model.config), self.seed)

    def _target(self, net, folder: Path | None) -> Target:
        if not self.draft_vocab:
            return Target(net)
        vocab = net.config.vocab_size
        if self.draft_vocab > vocab:
            raise ValueError(f"{self.name}: draft_vocab {self.draft_vocab} exceeds the target's {vocab} tokens")
        return Target(net, read_token_ranks(folder, vocab)[:self.draft_vocab])

    def bind(self, engine) -> "HeadDrafter":
        from .draft_model import native_model

        super().bind(engine)
        if self.head is None:
            net = native_model(engine.model)
            key = (self.name, self.path, self.init, self.seed)
            loaded = engine.__dict__.setdefault("draft_heads", {})  # loaded once per engine
            if key not in loaded:
                head = self._resolve(engine, self._folder(engine))
                head.config.check_target(net.config)
                loaded[key] = head.to(net.device, net.dtype).eval().requires_grad_(False)
            if (key, self.draft_vocab) not in loaded:  # a draft vocabulary's rows: gathered once
                loaded[key, self.draft_vocab] = self._target(net, self._folder(engine))
            self.head, self.target = loaded[key], loaded[key, self.draft_vocab]
            self.feature_layers = self.head.config.feature_layers
            self.idle_lanes: list[HeadLane] = []  # shared by this prototype's per-sequence copies
            # Draft passes are captured where the engine's passes are and the shared embedding and LM head are the
            # graphed model's own (a tensor-parallel target's run collectives on every rank: drafting stays eager).
            runner = engine.core.runner
            self.capture = runner.capture if getattr(runner, "graph_model", None) is net else None
        return self

    def reset(self, prompt_ids: list[int]) -> None:
        self.features = torch.zeros(0)
        self.num_features = 0
        if self.lane is None:
            self.lane = self.idle_lanes.pop() if self.idle_lanes else self._new_lane()
        if self.lane.cache is not None:
            self.lane.cache.length = 0

    def finish(self, tokens: list[int]) -> None:
        if self.lane is not None:
            self.idle_lanes.append(self.lane)
            self.lane = None

    def cache_block(self) -> HeadBlock | None:
        """The block whose keys and values the head keeps over the committed rows (None: it keeps none)."""
        return None

    def _new_lane(self) -> HeadLane:
        block, net = self.cache_block(), self.target.model
        size = self.engine.max_context + SYNC_ROWS[-1] + 1  # the padding rows of a captured pass write past the end
        cache = None if block is None else HeadCache(block.config, size, net.dtype, net.device)
        return HeadLane(cache, size + self.depth)

    def _store(self, rows: torch.Tensor) -> None:
        n = self.num_features + rows.shape[0]
        if n > self.features.shape[0]:
            grown = torch.zeros(max(n, 2 * self.features.shape[0], 256), rows.shape[1], dtype=rows.dtype,
                                device=rows.device)
            if self.num_features:
                grown[:self.num_features] = self.features[:self.num_features]
            self.features = grown
        self.features[self.num_features:n] = rows
        self.num_features = n

    def prefill_features(self, features: torch.Tensor) -> None:
        self._store(features)

    def observe(self, context: list[int], step) -> None:
        if step.hidden is not None:  # the root and the accepted nodes are now committed: their features are real
            self._store(step.hidden[[0, *step.accepted]])

    def propose(self, context: list[int]) -> DraftTree:
        if self.num_features != len(context) - 1:  # features of some committed token are missing: cannot draft
            return DraftTree()
        with torch.inference_mode():
            return DraftTree(*self._draft(context).tolist())  # the one host copy of a draft

    def _draft(self, context: list[int]) -> torch.Tensor:
        """Run the draft pass on the rows committed since the last one (the head's cache, if it keeps one, catches
        up; at least the root's parent row, whose output drafts depth 1)."""
        lane, end = self.lane, len(context) - 1
        cache = lane.cache
        start = end - 1 if cache is None else min(cache.length, end - 1)
        n = end - start
        feats, ints = self.features[start:end], context[start + 1:end + 1] + [start, n]
        rows = bucket(n, SYNC_ROWS)
        length = 0 if cache is None else min(cache.max_len, max(MIN_LENGTH, 1 << (start + rows - 1).bit_length()))
        if self.capture is None or rows > SYNC_ROWS[-1]:  # eagerly, on tight shapes (a long prompt's first draft)
            out = self._pass(lane, feats, torch.tensor(ints, device=feats.device), 0 if cache is None else end)
        elif (rows, length) in lane.passes:
            out = lane.passes[rows, length].run(feats, ints)
        else:
            lane.passes[rows, length] = DraftPass(self, lane, rows, length, feats, ints)
            out = lane.passes[rows, length].out
        if cache is not None:
            cache.length = end
        if self.recorder is not None:  # traced requests: the passes this draft ran, known on the host
            for width, kv, extra in self.trace_passes(start, n):
                self.note_pass("head", width, kv, **extra)
        return out

    def trace_passes(self, start: int, n: int) -> list[tuple[int, int, dict]]:
        """(width, cache entries read, extra) of each head pass one draft runs, for a trace replay: `n` new
        committed rows from row `start`; each later round expands a frontier of `branch` nodes."""
        raise NotImplementedError

    def _pass(self, lane: HeadLane, feats: torch.Tensor, ints: torch.Tensor, length: int) -> torch.Tensor:
        """Device code of one draft: `feats` `[R, F]` the target's features of the rows `start`..`start+n-1` not yet
        drafted from (rows past n: padding), `ints` `[R + 2]` their next tokens `x_{t+1}` (padded), then `start` and
        `n`; `length` cache entries to read. Returns `grow_tree`'s `[2, m]`. No host synchronization."""
        raise NotImplementedError

    def _grow(self, root_logprobs: torch.Tensor, expand: Expand, max_depth: int) -> torch.Tensor:
        return grow_tree(root_logprobs, expand, min(self.depth, max_depth), self.branch, self.max_nodes)

    def max_draft_tokens(self) -> int:
        return min(self.max_nodes, self.branch + (self.depth - 1) * self.branch ** 2)


def unpack_ints(ints: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A draft pass's ints -> (tokens `[rows]`, start `[1]`, n `[1]`)."""
    return ints[:rows], ints[rows:rows + 1], ints[rows + 1:rows + 2]


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
