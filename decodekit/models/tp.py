"""Tensor parallelism: one Transformer split over the ranks of a torch.distributed group, as Megatron-LM does it
(Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism") and
gpt-fast's `tp.py` applies it: by rewriting a built model, so that the model code does not know.

- Attention: `wqkv` column-parallel by heads (each rank its query heads and the KV heads those read: split when
  there are at least as many KV heads as ranks, else replicated), `wo` row-parallel; one all-reduce of its output.
- MLP: `w_gate_up` column-parallel, `w_down` row-parallel; one all-reduce of its output.
- Embedding vocabulary-parallel (each rank looks up the rows it holds, zeros elsewhere, all-reduce); `lm_head`
  vocabulary-parallel (each rank the logits of its rows, all-gathered: every rank ends with the full logits).
- Each rank's config has its local head counts, so the attention splits its local heads and `make_pool`
  allocates only the local KV heads. Norms are replicated.

A shard is a slice of the full tensor (`ShardPlan.take`). It shapes the model (applied to meta tensors, which
costs nothing) and fills it, one full tensor at a time (a checkpoint's, or a random one drawn exactly as the
single-process `random:` model draws it): no rank ever holds the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .transformer import Transformer


def valid_sizes(config: ModelConfig) -> list[int]:
    """Rank counts that split the heads evenly: a divisor of the query heads, each rank's query heads reading
    whole KV heads of their own (KV heads split evenly, or each one replicated over a whole number of ranks)."""
    h, kv = config.num_heads, config.num_kv_heads
    return [w for w in range(1, h + 1) if h % w == 0 and (kv % w == 0 or w % kv == 0)]


def check_world(config: ModelConfig, world: int, name: str = "the model") -> None:
    """A one-line ValueError unless `world` ranks can split this model."""
    sizes = valid_sizes(config)
    if world not in sizes:
        raise ValueError(f"tensor_parallel={world} cannot split {name} ({config.num_heads} query heads, "
                         f"{config.num_kv_heads} KV heads); sizes that work: {', '.join(map(str, sizes))}")


def span(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s part of `n` items split as evenly as possible."""
    return n * rank // world, n * (rank + 1) // world


@dataclass(frozen=True)
class ShardPlan:
    """Which part of each weight rank `rank` of `world` holds."""

    config: ModelConfig  # the full model's
    rank: int
    world: int

    @property
    def q_heads(self) -> tuple[int, int]:
        return span(self.config.num_heads, self.world, self.rank)

    @property
    def kv_heads(self) -> tuple[int, int]:
        """The KV heads this rank's query heads read (query head q reads KV head q // group)."""
        group = self.config.num_heads // self.config.num_kv_heads
        lo, hi = self.q_heads
        return lo // group, (hi - 1) // group + 1

    @property
    def ffn(self) -> tuple[int, int]:
        return span(self.config.intermediate_size, self.world, self.rank)

    @property
    def vocab_chunk(self) -> int:
        """Rows of the vocabulary per rank (the last rank may hold fewer: logits are padded to this to gather)."""
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab(self) -> tuple[int, int]:
        v, chunk = self.config.vocab_size, self.vocab_chunk
        return min(v, self.rank * chunk), min(v, (self.rank + 1) * chunk)

    def local_config(self) -> ModelConfig:
        (q0, q1), (k0, k1) = self.q_heads, self.kv_heads
        return replace(self.config, num_heads=q1 - q0, num_kv_heads=k1 - k0)

    def take(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor of parameter `name` (a view or a small concatenation)."""
        c = self.config
        d = c.head_dim
        if name.endswith("attn.wqkv.weight") or name.endswith("attn.wqkv.bias"):
            q, k, v = full.split([c.num_heads * d, c.num_kv_heads * d, c.num_kv_heads * d])
            (q0, q1), (k0, k1) = self.q_heads, self.kv_heads
            return torch.cat([q[q0 * d:q1 * d], k[k0 * d:k1 * d], v[k0 * d:k1 * d]])
        if name.endswith("attn.wo.weight"):
            q0, q1 = self.q_heads
            return full[:, q0 * d:q1 * d]
        if name.endswith("mlp.w_gate_up.weight"):
            gate, up = full.chunk(2)
            f0, f1 = self.ffn
            return torch.cat([gate[f0:f1], up[f0:f1]])
        if name.endswith("mlp.w_down.weight"):
            f0, f1 = self.ffn
            return full[:, f0:f1]
        if name in ("embed.weight", "lm_head.weight"):
            v0, v1 = self.vocab
            return full[v0:v1]
        return full  # norms: replicated


# ---- collectives ---------------------------------------------------------------------------------------------
def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks. Under torch.compile the functional collective (traceable); eagerly in place."""
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group)
    dist.all_reduce(x, group=group)
    return x


# torch 2.13 renamed all_gather_into_tensor (2.11 has only that name)
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_output(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return all_reduce(out, module.tp_group)


class VocabParallelEmbedding(nn.Module):
    """The embedding rows [start, start + rows) of the vocabulary; other tokens look up zeros, and the sum over the
    ranks is the full lookup."""

    def __init__(self, weight: nn.Parameter, start: int, group) -> None:
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce(x.masked_fill(~mine[..., None], 0), self.group)


class GatherLogits:
    """A forward hook of `lm_head`: each rank's logits of its vocabulary rows, gathered into the full row."""

    def __init__(self, plan: ShardPlan, group) -> None:
        self.chunk, self.vocab, self.world, self.group = plan.vocab_chunk, plan.config.vocab_size, plan.world, group

    def __call__(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        lead = out.shape[:-1]
        out = out.reshape(-1, out.shape[-1])
        if out.shape[-1] < self.chunk:  # the last rank's shorter slice
            out = F.pad(out, (0, self.chunk - out.shape[-1]))
        gathered = out.new_empty(self.world * out.shape[0], self.chunk)
        ALL_GATHER(gathered, out.contiguous(), group=self.group)
        full = gathered.view(self.world, -1, self.chunk).transpose(0, 1).reshape(-1, self.world * self.chunk)
        return full[:, :self.vocab].reshape(*lead, self.vocab)


def shard_model(model: Transformer, plan: ShardPlan, group) -> Transformer:
    """Rewrite `model` in place into rank `plan.rank`'s shard (on meta tensors this only reshapes it): parameters
    sliced, the embedding vocabulary-parallel, all-reduce hooks after attention and MLP, a gather after lm_head,
    local head counts in the configs."""
    for name, p in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(plan.take(name, p.data), requires_grad=False))
    model.embed = VocabParallelEmbedding(model.embed.weight, plan.vocab[0], group)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.lm_head.register_forward_hook(GatherLogits(plan, group))
    local = plan.local_config()
    model.config = local
    for block in model.layers:
        block.attn.config = local
        for part in (block.attn, block.mlp):
            part.tp_group = group
            part.register_forward_hook(_reduce_output)
    return model


def build_shard(config: ModelConfig, state: dict[str, torch.Tensor] | None, device: torch.device,
                dtype: torch.dtype, seed: int = 0, *, rank: int, world: int, group) -> Transformer:
    """Rank `rank`'s shard of the model `build_native` would build (same arguments): from a transformers state dict,
    or with the very weights of `random:` (each full tensor drawn in turn from the same seeded stream, sliced, freed:
    one full tensor at a time on the device, never the model)."""
    from .loader import fill_random
    from .transformer import convert_hf_state_dict

    check_world(config, world)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    order = [(name, p.shape) for name, p in model.named_parameters()]
    plan = ShardPlan(config, rank, world)
    shard_model(model, plan, group)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    params = dict(model.named_parameters())
    full_state = None if state is None else convert_hf_state_dict(state, config)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, shape in order:
            if full_state is None:
                full = torch.empty(shape, dtype=dtype, device=device)
                fill_random(name, full, config, g)
            else:
                full = full_state[name]
            params[name].copy_(plan.take(name, full))
            del full
    return model.eval()
