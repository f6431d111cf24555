"""Trained draft heads: the target's features, the engine's feature contract, tree growth, and drafting that agrees
with the training-time unroll (so what training measures is what drafting does)."""
from __future__ import annotations

import pytest
import torch

from decodekit.models.kv_cache import private_pool
from head_helpers import HEADS, perturbed_head
from micro import spawned

import decodekit
from decodekit.speculative import DRAFTERS
from decodekit.speculative.base import Drafter, DraftTree
from decodekit.speculative.heads_common import (HeadBatch, HeadConfig, grow_tree, new_head, read_head, save_head)
from decodekit.train.data import feature_pass


@pytest.fixture(scope="module")
def tiny():
    return decodekit.load("random:tiny-llama", device="cpu")


def test_hidden_layers_are_block_outputs_and_final_norm(tiny):
    model = tiny.model
    n = model.config.num_layers
    ids, pos = [5, 9, 13, 2, 7], list(range(5))
    seen = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i, block in enumerate(model.layers)]
    logits, hidden = model.forward_seq(private_pool(model, 16)[1], ids, pos, hidden_layers=(n - 1, 0, n))
    for h in hooks:
        h.remove()
    size = model.config.hidden_size
    assert hidden.shape == (5, 3 * size)
    assert torch.equal(hidden[:, :size], seen[n - 1]) and torch.equal(hidden[:, size:2 * size], seen[0])
    final = model.norm(seen[n - 1])
    assert torch.equal(hidden[:, 2 * size:], final)
    assert torch.allclose(logits, model.lm_head(final))
    last_logits, last_hidden = model.forward_seq(private_pool(model, 16)[1], ids, pos, logits="last",
                                                 hidden_layers=(0,))
    assert last_hidden.shape == (1, size) and torch.equal(last_hidden, seen[0][-1:])
    assert torch.equal(model.forward_seq(private_pool(model, 16)[1], ids, pos), logits)  # no hidden_layers: logits


class Recorder(Drafter):
    """Drafts a fixed chain and records the features the engine hands over."""

    name = "recorder"
    learns_from_steps = True

    def __init__(self, layers, draft):
        self.feature_layers, self.draft = layers, draft
        self.rows: list[torch.Tensor] = []

    def reset(self, prompt_ids):
        self.rows = []

    def prefill_features(self, features):
        self.rows.append(features.clone())

    def propose(self, context):
        return DraftTree.chain(self.draft(context))

    def observe(self, context, step):
        self.rows.append(step.hidden[[0, *step.accepted]].clone())

    def max_draft_tokens(self):
        return 4


def test_engine_hands_every_committed_tokens_features_to_the_drafter(tiny):
    """Prefill + accepted rows of each verify step = the features of a single pass over the committed tokens."""
    plain = tiny.generate([3, 4, 5, 6, 7, 3, 4], 24).token_ids
    prompt = [3, 4, 5, 6, 7, 3, 4]
    full = prompt + plain

    def draft(context):  # right for a while, then wrong: accepted and rejected nodes both occur
        n = len(context) - len(prompt)
        return full[len(context):len(context) + 3] if n % 5 else [1, 2]

    layers = (0, tiny.model.config.num_layers)
    rec = Recorder(layers, draft)
    copies = spawned(rec)  # the engine's per-sequence copy receives the features
    out = tiny.generate(prompt, 24, method=rec, adaptive=False)
    assert out.token_ids == plain
    got = torch.cat(copies[0].rows)
    # every committed token but the last root, except after the step that finished (nothing to observe then)
    assert got.shape[0] >= len(prompt) + len(plain) - 1 - 4
    longer = tiny.generate(prompt, 40).token_ids  # the last step may commit past max_new_tokens
    want = feature_pass(tiny.model, (prompt + longer)[:got.shape[0]], layers)
    assert torch.allclose(got, want, atol=1e-4)


def test_drafters_without_features_see_no_change(tiny):
    assert Drafter.feature_layers == ()
    assert tiny.generate([1, 2, 3], 8, method="pld").token_ids == tiny.generate([1, 2, 3], 8).token_ids


def reference_tree(root_lp, table, depth, branch, max_nodes):
    """EAGLE-2's selection written out by levels: expand the branch best of each level, keep max_nodes best paths."""
    level = [((t,), float(root_lp[t])) for t in root_lp.topk(branch).indices.tolist()]
    pool = list(level)
    for _ in range(depth - 1):
        frontier = sorted(level, key=lambda x: -x[1])[:branch]
        level = []
        for path, score in frontier:
            lp = table(path)
            level += [(path + (t,), score + float(lp[t])) for t in lp.topk(branch).indices.tolist()]
        pool += level
    return {p for p, _ in sorted(pool, key=lambda x: -x[1])[:max_nodes]}


@pytest.mark.parametrize("depth,branch,max_nodes", [(1, 3, 2), (3, 2, 5), (4, 3, 12), (3, 1, 3)])
def test_grow_tree_keeps_the_most_likely_expanded_paths(depth, branch, max_nodes):
    g = torch.Generator().manual_seed(depth * 10 + branch)
    vocab = 7
    cache: dict[tuple, torch.Tensor] = {}

    def table(path):  # a random but fixed next-token distribution per path
        if path not in cache:
            cache[path] = torch.log_softmax(torch.randn(vocab, generator=g) * 2, -1)
        return cache[path]

    root = table(())
    depths = []

    def expand(front):
        depths.append(front.depth)
        assert front.paths.shape == (front.tokens.shape[0], front.depth)
        assert torch.equal(front.paths[:, -1], front.tokens)
        return torch.stack([table(tuple(p)) for p in front.paths.tolist()])

    tree = DraftTree(*grow_tree(root, expand, depth, branch, max_nodes).tolist())
    assert depths == list(range(1, depth))
    paths = set()
    for i in range(1, len(tree) + 1):
        node, p = i, ()
        while node:
            p = (tree.tokens[node - 1],) + p
            node = tree.parents[node - 1]
        paths.add(p)
    assert all(p < i for i, p in enumerate(tree.parents, start=1))  # parents precede children
    assert paths == reference_tree(root, table, depth, branch, max_nodes)


@pytest.mark.parametrize("arch", HEADS)
def test_drafting_equals_the_training_unroll(arch, tiny, tmp_path):
    """A greedy chain drafted through the engine's features and the head's caches equals the head's training-time
    unroll fed its own guesses at that position: one definition of what a head drafts."""
    from decodekit.speculative.heads_common import Target
    from decodekit.train.trainer import ChainScorer

    head = perturbed_head(arch, tiny.model.config)
    save_head(head, head.config, tmp_path, dtype=torch.float32)
    seq = [7, 3, 9, 4, 4, 11, 2, 8, 5, 6, 1, 9, 12, 3]
    final = feature_pass(tiny.model, seq, head.config.feature_layers)
    batch = HeadBatch(torch.tensor([seq]), final[None], final[None], torch.tensor([len(seq)]), torch.tensor([0]))
    target = Target(tiny.model)
    guesses = []

    class Collect(ChainScorer):
        def __call__(self, k, h):
            guesses.append(torch.stack([head.logits(target, h[0, t]).argmax(-1) for t in range(h.shape[1])]))
            return guesses[-1][None]

    with torch.no_grad():
        outs = head.unroll(target, batch, 3, Collect(head, target, batch))
        while len(guesses) < len(outs):
            Collect(head, target, batch)(len(guesses), outs[len(guesses)])
    drafter = DRAFTERS[arch](path=str(tmp_path), branch=1, depth=3, max_nodes=3).bind(tiny)
    states = []  # what the drafter's head hands the LM head: compared as numbers, not only as argmax tokens
    logits = drafter.head.logits
    drafter.head.logits = lambda target, h: (states.append(h.reshape(-1, h.shape[-1])), logits(target, h))[1]
    for root in (4, 8, len(seq) - 1):  # root index r: row r-1 drafts depths 1..3
        drafter.reset(seq[:root])
        drafter.prefill_features(final[:root])
        states.clear()
        tree = drafter.propose(seq[:root + 1])
        assert tree.tokens == [int(g[root - 1]) for g in guesses], (arch, root)
        want = torch.stack([out[0, root - 1] for out in outs])
        assert torch.allclose(torch.cat(states)[:3], want, atol=1e-5), (arch, root)


def test_incremental_features_draft_as_a_fresh_start(tiny, tmp_path):
    """Drafting after observed verify steps (cache grown step by step) equals drafting from a fresh prefill."""
    from decodekit.speculative.base import StepResult

    head = perturbed_head("eagle", tiny.model.config, seed=4)
    save_head(head, head.config, tmp_path, dtype=torch.float32)
    seq = [7, 3, 9, 4, 4, 11, 2, 8, 5, 6, 1, 9]
    feats = feature_pass(tiny.model, seq, head.config.feature_layers)
    a = DRAFTERS["eagle"](path=str(tmp_path), branch=3, depth=3, max_nodes=8).bind(tiny)
    a.reset(seq[:3])
    a.prefill_features(feats[:3])
    a.propose(seq[:4])
    for end in (6, 7, 10):  # steps that committed 2, 1 and 3 tokens; the draft trees are discarded
        start = a.num_features
        tree = DraftTree.chain(seq[start + 1:end])
        a.observe(seq[:end + 1], StepResult(tree, list(range(1, end - start)), seq[end], torch.zeros(1),
                                            feats[start:end]))
        got = a.propose(seq[:end + 1])
        b = DRAFTERS["eagle"](path=str(tmp_path), branch=3, depth=3, max_nodes=8).bind(tiny)
        b.reset(seq[:end])
        b.prefill_features(feats[:end])
        want = b.propose(seq[:end + 1])
        assert (got.tokens, got.parents) == (want.tokens, want.parents)


def test_save_and_read_round_trip(tiny, tmp_path):
    head = perturbed_head("hydra", tiny.model.config)
    save_head(head, head.config, tmp_path)
    back, config = read_head(tmp_path, {"hydra": DRAFTERS["hydra"].module})
    assert config == head.config
    for (name, a), (_, b) in zip(head.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name  # stored in bf16


@pytest.mark.parametrize("arch", HEADS)
def test_missing_head_is_a_clear_error(arch, tiny, tmp_path):
    with pytest.raises(ValueError, match=f"no trained {arch} head"):
        tiny.generate([1, 2, 3], 4, method=arch)
    with pytest.raises(ValueError, match="not a draft head folder"):
        tiny.generate([1, 2, 3], 4, method=arch, path=str(tmp_path))
    with pytest.raises(ValueError, match="init must be"):
        tiny.generate([1, 2, 3], 4, method=arch, init="maybe")


def test_a_prompt_in_the_prefix_cache_still_gives_the_head_its_features():
    """A head drafts from the features of every prompt token, which a cached prefix does not have: such a sequence
    prefills its whole prompt (before, a prompt seen earlier left the head without features and it never drafted)."""
    engine = decodekit.load("random:tiny-llama", device="cpu")  # prefix caching on: the default
    prompt = list(range(3, 43))  # more than two 16-token blocks
    fresh = engine.generate(prompt, 12, method="eagle", init="random", adaptive=False)
    engine.generate(prompt, 12)  # the prompt's blocks are now cached
    again = engine.generate(prompt, 12, method="eagle", init="random", adaptive=False)
    assert again.stats.cached_prompt_tokens == 0 and fresh.stats.accepted_by_position
    assert again.stats.accepted_by_position == fresh.stats.accepted_by_position
    assert again.stats.decode_steps == fresh.stats.decode_steps


def test_head_for_another_target_is_refused(tiny, tmp_path):
    other = decodekit.load("random:tiny-gemma3", device="cpu")
    head = new_head(DRAFTERS["eagle"].module, HeadConfig.for_target("eagle", other.model.config), 0)
    save_head(head, head.config, tmp_path)
    with pytest.raises(ValueError, match="made for a target"):
        tiny.generate([1, 2, 3], 4, method="eagle", path=str(tmp_path))


@pytest.mark.parametrize("arch", HEADS)
def test_full_drafts_without_budget_are_lossless_and_bounded(arch, tiny):
    prompt = [9, 8, 7, 6, 9, 8, 7, 6, 9, 8]
    plain = tiny.generate(prompt, 30).token_ids
    got = tiny.generate(prompt, 30, method=arch, init="random", adaptive=False, depth=3, branch=2, max_nodes=5)
    assert got.token_ids == plain
    drafter = DRAFTERS[arch](init="random", depth=3, branch=2, max_nodes=5)
    assert drafter.max_draft_tokens() == 5


@pytest.mark.real_model
def test_shipped_smollm2_heads_load_by_name_and_are_lossless():
    """The heads shipped for SmolLM2 (EAGLE, Hydra, Medusa) load by method name alone; greedy output equals plain
    greedy (float32), and they save target passes."""
    from decodekit.bench.datasets import SAMPLE, load_prompts

    engine = decodekit.load("smollm2", device="cpu", dtype="float32", progress=False)
    prompts = load_prompts(str(SAMPLE), 1)[:3]
    plain = [engine.generate(p.prompt, 32, chat=True) for p in prompts]
    for arch in HEADS:
        steps = 0
        for p, want in zip(prompts, plain):
            spec = engine.generate(p.prompt, 32, chat=True, method=arch, adaptive=False)
            assert spec.token_ids == want.token_ids, (arch, p.category)
            steps += spec.stats.decode_steps
        assert steps < sum(w.stats.decode_steps for w in plain), arch
