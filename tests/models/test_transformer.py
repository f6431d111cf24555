"""The native runtime against transformers (the oracle) on random tiny models of each family."""
import pytest
import torch

from decodekit.models.kv_cache import PoolFull, private_pool
from hf_pairs import make_pair

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_decode_match_transformers(name):
    ref, model = make_pair(name)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    _, kv = private_pool(model, 64, block_size=8)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        got = model.forward_seq(kv, ids[0, :20].tolist(), list(range(20)))  # prefill
        steps = [model.forward_seq(kv, [int(ids[0, i])], [i]) for i in range(20, 24)]  # one token at a time
    torch.testing.assert_close(got, expected[:20], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps), expected[20:], rtol=1e-4, atol=1e-4)


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
    _, kv = private_pool(model, 64, block_size=4)  # small blocks: the tree and the kept path cross block edges
    with torch.no_grad():
        model.forward_seq(kv, prefix[0].tolist(), list(range(12)))
        tree_logits = model.forward_seq(kv, nodes[0].tolist(), (12 + torch.tensor(depth)).tolist(), tree=anc)
        for leaf in [5, 4]:
            path = [i for i in range(len(parents)) if anc[leaf, i]]
            seq = torch.cat([prefix, nodes[:, path]], 1)
            expected = ref(seq).logits[0, 12:]
            torch.testing.assert_close(tree_logits[path], expected, rtol=1e-4, atol=1e-4)
        # keep the path 0-1-3-5 and continue decoding: must equal decoding that path directly
        kv.keep_path(12, [0, 1, 3, 5])
        nxt = torch.randint(0, model.config.vocab_size, (1, 1), generator=g)
        after = model.forward_seq(kv, nxt[0].tolist(), [16])
        seq = torch.cat([prefix, nodes[:, [0, 1, 3, 5]], nxt], 1)
        torch.testing.assert_close(after, ref(seq).logits[0, -1:], rtol=1e-4, atol=1e-4)


def test_rollback_forgets_rejected_tokens():
    ref, model = make_pair("tiny-llama")
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(4))
    _, kv = private_pool(model, 32, block_size=4)
    with torch.no_grad():
        model.forward_seq(kv, ids[0, :6].tolist(), list(range(6)))
        model.forward_seq(kv, other[0].tolist(), list(range(6, 10)))
        kv.rollback(6)
        got = model.forward_seq(kv, ids[0, 6:].tolist(), list(range(6, 10)))
        torch.testing.assert_close(got, ref(ids).logits[0, 6:], rtol=1e-4, atol=1e-4)


def test_a_pool_that_runs_out_is_an_error():
    _, model = make_pair("tiny-llama")
    _, kv = private_pool(model, 250, block_size=50)  # 5 blocks of 50 entries (+ scratch)
    model.forward_seq(kv, [0] * 250, list(range(250)))
    with pytest.raises(PoolFull):
        model.forward_seq(kv, [0] * 7, list(range(250, 257)))


def test_padded_rows_of_a_batch_equal_single_rows():
    """Rows of different widths and lengths in one pass (padding, several groups, scratch reads) score as alone."""
    from decodekit.models.batch import RowSpec
    from decodekit.models.kv_cache import KVPool, SeqKV
    from decodekit.engine.runner import ModelRunner

    ref, model = make_pair("tiny-gemma3")  # sliding-window layers too
    c = model.config
    pool = KVPool(c.num_layers, 40, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, c.vocab_size, (n,), generator=g).tolist() for n in (13, 5, 22)]
    kvs = [SeqKV(pool) for _ in seqs]
    runner = ModelRunner(model, pool)
    with torch.no_grad():
        prefix = [s[:-3] for s in seqs]
        specs = [RowSpec(kv, p, list(range(len(p))), None, "none") for kv, p in zip(kvs, prefix)]
        for kv, p in zip(kvs, prefix):
            kv.ensure(len(p))
        runner.run(specs)
        for kv, p in zip(kvs, prefix):
            kv.length = len(p)
        steps = [s[-3:-1] if i == 1 else s[-3:] for i, s in enumerate(seqs)]  # widths 3, 2, 3 in one pass
        specs = [RowSpec(kv, t, list(range(kv.length, kv.length + len(t)))) for kv, t in zip(kvs, steps)]
        for kv, t in zip(kvs, steps):
            kv.ensure(kv.length + len(t))
        logits = runner.run(specs)
        for spec, s, t in zip(specs, seqs, steps):
            want = ref(torch.tensor([s[:len(s) - 3 + len(t)]])).logits[0, -len(t):]
            got = logits[spec.first_logit:spec.first_logit + len(t)]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_single_query_attention_matches_sdpa():
    from decodekit.models.transformer import single_query_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((2, 9, 1, 64), (2, 3, 40, 64), (2, 3, 40, 64)))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(single_query_attention(q, k, v, mask, 0.125), want, rtol=1e-5, atol=1e-5)


def test_passes_a_kernel_reads_build_no_mask(monkeypatch):
    """Inside a captured step every op runs each replay: where the attention kernels read the pool (single tokens;
    verify passes no wider than the window) no dense mask is built. The same tokens as the masked path."""
    import decodekit.models.transformer as transformer
    from decodekit.models.batch import RowSpec, build_batch
    from decodekit.models.kv_cache import SeqKV
    from kernel_reference import use_references

    _, model = make_pair("tiny-gemma3")  # window 8: sliding-window layers and a global one
    pool = model.make_pool(20, 4, ring_pass=8)
    kv = SeqKV(pool)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (30,), generator=g).tolist()
    masks, real_mask = [], transformer.attention_mask
    monkeypatch.setattr(transformer, "attention_mask", lambda *a: masks.append(a[0].width) or real_mask(*a))
    with torch.no_grad():
        model.forward_seq(kv, tokens[:20], list(range(20)))
        for width in (1, 4, 8):  # a step, then chains as verify passes, each after the same 20 entries
            kv.ensure(20 + width)
            batch = build_batch([[RowSpec(kv, tokens[20:20 + width], list(range(20, 20 + width)))]], model.device)
            masks.clear()
            want = model(batch, pool)
            assert masks, "the CPU's masked path builds masks"
            with monkeypatch.context() as m:
                use_references(m)
                masks.clear()
                got = model(batch, pool)
            assert masks == [], (width, masks)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
