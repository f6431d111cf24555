"""Helpers for the search tests: engines over small models whose distributions are peaked enough to search."""
import torch

from decodekit.engine import Engine
from decodekit.models.config import ModelConfig
from decodekit.models.tokenizer import ByteTokenizer
from decodekit.models.transformer import Transformer
from hf_pairs import make_pair


def hf_pair(name: str = "tiny-llama", seed: int = 0, scale: float = 0.08):
    """A transformers model with random weights large enough for peaked distributions, and the native copy."""
    return make_pair(name, seed, scale)


def engine_of(model, **options) -> Engine:
    return Engine(model, ByteTokenizer(vocab_size=max(model.config.vocab_size, 259)), **options)


def small_vocab_model(vocab: int = 6, seed: int = 0, scale: float = 0.5) -> Transformer:
    """A 2-layer model over `vocab` tokens (0 pad, 1 bos, 2 eos, then bytes 0..): every output of a few tokens can
    be enumerated."""
    config = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=256)
    model = Transformer(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@torch.no_grad()
def next_logprobs(model, prefixes: list[list[int]]) -> torch.Tensor:
    """log p(next | prefix) for each prefix `[len(prefixes), V]` (a fresh full pass per prefix: the reference)."""
    from decodekit.models.kv_cache import private_pool

    out = []
    for ids in prefixes:
        _, kv = private_pool(model, len(ids) + 1, block_size=16)
        out.append(model.forward_seq(kv, ids, list(range(len(ids))), logits="last")[-1].float().log_softmax(-1))
    return torch.stack(out)
