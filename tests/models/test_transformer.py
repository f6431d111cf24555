"""The native runtime against transformers (the oracle) on random tiny models of each family."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decodekit.models.config import ModelConfig, shape
from decodekit.models.transformer import Transformer, convert_hf_state_dict

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]


def make_pair(name: str, seed: int = 0):
    """A transformers reference model with randomized weights (norms too) and the native copy of it."""
    config = shape(name)
    hf_config = AutoConfig.for_model(**config.to_hf())
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.05)
    assert ModelConfig.from_hf(hf_config.to_dict()) == config
    model = Transformer(config).eval()
    model.load_state_dict(convert_hf_state_dict(ref.state_dict(), config), strict=True)
    return ref, model


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_decode_match_transformers(name):
    ref, model = make_pair(name)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        model.setup_cache(1, 64)
        got = model(ids[:, :20], torch.arange(20)[None])  # prefill
        steps = [model(ids[:, i : i + 1], torch.tensor([[i]])) for i in range(20, 24)]  # one token at a time
    torch.testing.assert_close(got, expected[:, :20], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, 20:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_tree_forward_and_keep_path(name):
    """Each tree node sees the prefix and its ancestors only; keeping one path equals having decoded it."""
    ref, model = make_pair(name)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, model.config.vocab_size, (1, 12), generator=g)
    # Tree: 0 is the root; 1,2 children of 0; 3 child of 1; 4 child of 2; 5 child of 3.
    parents = [-1, 0, 0, 1, 2, 3]
    nodes = torch.randint(0, model.config.vocab_size, (1, len(parents)), generator=g)
    depth = [0] * len(parents)
    anc = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    with torch.no_grad():
        model.setup_cache(1, 64)
        model(prefix, torch.arange(12)[None])
        tree_logits = model(nodes, (12 + torch.tensor(depth))[None], tree_mask=anc)
        for leaf in [5, 4]:
            path = [i for i in range(len(parents)) if anc[leaf, i]]
            seq = torch.cat([prefix, nodes[:, path]], 1)
            expected = ref(seq).logits[:, 12:]
            torch.testing.assert_close(tree_logits[:, path], expected, rtol=1e-4, atol=1e-4)
        # keep the path 0-1-3-5 and continue decoding: must equal decoding that path directly
        model.cache.keep_path(12, [0, 1, 3, 5])
        nxt = torch.randint(0, model.config.vocab_size, (1, 1), generator=g)
        after = model(nxt, torch.tensor([[16]]))
        seq = torch.cat([prefix, nodes[:, [0, 1, 3, 5]], nxt], 1)
        torch.testing.assert_close(after, ref(seq).logits[:, -1:], rtol=1e-4, atol=1e-4)


def test_rollback_forgets_rejected_tokens():
    ref, model = make_pair("tiny-llama")
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.setup_cache(1, 32)
        model(ids[:, :6], torch.arange(6)[None])
        model(other, torch.arange(6, 10)[None])
        model.cache.rollback(6)
        got = model(ids[:, 6:], torch.arange(6, 10)[None])
        torch.testing.assert_close(got, ref(ids).logits[:, 6:], rtol=1e-4, atol=1e-4)


def test_cache_overflow_is_an_error():
    _, model = make_pair("tiny-llama")
    model.setup_cache(1, 8)  # rounded up to 256 slots
    model(torch.zeros(1, 250, dtype=torch.long), torch.arange(250)[None])
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 7, dtype=torch.long), torch.arange(250, 257)[None])


def test_single_query_attention_matches_sdpa():
    from decodekit.models.transformer import single_query_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((2, 9, 1, 64), (2, 3, 40, 64), (2, 3, 40, 64)))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(single_query_attention(q, k, v, mask, 0.125), want, rtol=1e-5, atol=1e-5)
