"""Unit tests of the training-free drafters' data structures and proposals."""
import pytest
import torch

import decodekit
from decodekit.speculative.aded import ADED
from decodekit.speculative.base import DraftTree, StepResult
from decodekit.speculative.pld import NgramIndex, PromptLookup, find_continuation
from decodekit.speculative.recycling import TokenRecycling
from decodekit.speculative.suffix import SuffixDecoding, SuffixTrie
from decodekit.speculative.tree_search import best_first_tree


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 65, 150])
def test_ancestor_mask_marks_each_node_and_its_ancestors(n):
    g = torch.Generator().manual_seed(n)
    parents = [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n + 1)]
    mask = DraftTree(list(range(n)), parents).ancestor_mask()
    want = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for i in range(n + 1):  # walk up from each node to the root
        node = i
        while True:
            want[i, node] = True
            if node == 0:
                break
            node = parents[node - 1]
    assert mask.dtype == torch.bool and torch.equal(mask, want)
    with pytest.raises(ValueError, match="must precede"):
        DraftTree([1, 2], [0, 2]).ancestor_mask()


def test_pld_finds_most_recent_longest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert find_continuation(ctx, 1, 3, 2) == [7, 8]  # "2 3" last seen before "7 8"
    assert PromptLookup(num_draft=3).propose([4, 5, 6]).tokens == []


def test_best_first_tree_orders_by_path_probability():
    table = {0: [(1, 0.6, 1), (2, 0.4, 2)], 1: [(3, 0.9, 3)], 2: [(4, 0.5, 4)], 3: [], 4: []}
    tree = best_first_tree(0, lambda s: table[s], max_nodes=3, max_depth=5)
    # 1 (0.6), then 3 (0.54), then 2 (0.4); 4 (0.2) does not fit
    assert tree.tokens == [1, 3, 2] and tree.parents == [0, 1, 0]


def test_suffix_trie_counts_and_matches():
    trie = SuffixTrie(max_depth=4)
    trie.extend([1, 2, 3, 1, 2, 4, 1, 2])
    node, length = trie.match([7, 1, 2])
    assert length == 2 and {t: c.count for t, c in node.children.items()} == {3: 1, 4: 1}
    node, length = trie.match([2, 3, 1])  # "2 3 1" occurred once and was followed by 2
    assert length == 3 and list(node.children) == [2]


def test_suffix_drafts_continuation_and_learns_across_generations():
    d = SuffixDecoding(min_token_prob=0.0)
    d.reset([5, 6, 7, 8, 5, 6])
    assert d.propose([5, 6, 7, 8, 5, 6]).tokens[:2] == [7, 8]
    d.propose([5, 6, 7, 8, 5, 6, 40, 41, 42])  # the output so far: 40 41 42
    d.finish([5, 6, 7, 8, 5, 6, 40, 41, 42])  # the sequence ends: its output joins the global trie
    d.reset([1, 2])  # next request
    assert d.propose([1, 2, 40, 41]).tokens[:1] == [42]


def test_aded_tables_adapt_to_output():
    d = ADED()
    d.reset([1, 2, 3])
    d.propose([1, 2, 3, 1, 2, 4, 1, 2, 4])
    assert d.trigram[(1, 2)] == {3: 1, 4: 2}
    tree = d.propose([1, 2, 3, 1, 2, 4, 1, 2, 4, 1, 2])
    assert tree.tokens[0] == 4  # the more frequent continuation comes first


def test_recycling_updates_adjacency_from_target_logits():
    engine = decodekit.load("random:tiny-llama", device="cpu")
    d = TokenRecycling(top_k=3, widths=(2, 1)).bind(engine)
    d.reset([1, 2])
    assert len(d.propose([1, 2])) == 0  # nothing recycled yet
    logits = torch.zeros(3, 512)
    logits[0, [10, 11, 12]] = torch.tensor([3.0, 2.0, 1.0])  # root token 2
    logits[1, [20, 21, 22]] = torch.tensor([3.0, 2.0, 1.0])  # node token 7
    tree = DraftTree.chain([7, 8])
    d.observe([1, 2, 7, 30], StepResult(tree, accepted=[1], next_token=30, logits=logits))
    assert d.adjacency[2].tolist() == [10, 11, 12] and d.adjacency[7].tolist() == [20, 21, 22]
    proposal = d.propose([5, 7])
    assert proposal.tokens[:2] == [20, 21] and proposal.parents[:2] == [0, 0]


def test_draft_model_with_the_target_as_draft_accepts_everything():
    engine = decodekit.load("random:tiny-llama", device="cpu")
    prompt = list(range(3, 30))
    plain = engine.generate(prompt, 70)
    chain = engine.generate(prompt, 70, method="draft", model=engine, num_draft=5, adaptive=False)
    tree = engine.generate(prompt, 70, method="draft", model=engine, tree_width=2, max_nodes=8, adaptive=False)
    assert chain.token_ids == plain.token_ids == tree.token_ids
    assert chain.stats.tau == 69 / 12  # every step: 5 drafted tokens accepted + the target's own (last one cut)
    assert tree.stats.tau > 2.0


def test_draft_model_stop_threshold_drafts_less():
    engine = decodekit.load("random:tiny-llama", device="cpu")
    prompt = list(range(3, 30))
    eager = engine.generate(prompt, 40, method="draft", model=engine, num_draft=5, adaptive=False)
    cautious = engine.generate(prompt, 40, method="draft", model=engine, num_draft=5, stop_threshold=0.99,
                               adaptive=False)
    assert cautious.token_ids == eager.token_ids
    assert cautious.stats.decode_steps > eager.stats.decode_steps


def test_draft_model_rejects_a_foreign_vocabulary():
    import pytest

    engine = decodekit.load("random:tiny-llama", device="cpu")
    other = decodekit.load("random:smollm2-135m", device="cpu")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate([3, 4, 5], 4, method="draft", model=other)


def test_layerskip_skips_middle_layers_and_adapts():
    engine = decodekit.load("random:tiny-gemma3", device="cpu")  # 4 layers: layers 1 and 2 may be skipped
    from decodekit.speculative.layerskip import LayerSkip

    drafter = LayerSkip(skip_ratio=0.5, adapt_every=2, num_draft=3, stop_threshold=0.0).bind(engine)
    assert drafter.skip_layers and not drafter.skip_layers & {0, 3}
    prompt = list(range(3, 40))
    first = drafter.skip_layers
    result = engine.generate(prompt, 60, method=drafter, adaptive=False)
    assert result.token_ids == engine.generate(prompt, 60).token_ids
    assert drafter.scores and first in drafter.scores  # acceptance of the first set was measured


def test_lookahead_window_is_a_tree_of_columns_and_collects_ngrams():
    from decodekit.speculative.lookahead import Lookahead

    d = Lookahead(window=3, ngram=3, guesses=2)
    d.reset([1, 2, 3, 1, 2, 4])
    assert d.pool[1] == [(2, 4), (2, 3)]  # prompt n-grams, most recent first
    d.levels = [[10, 11, 12], [20, 21, 22]]
    tree = d.propose([7, 1])
    # verification branch: 1 -> (2, 4) and (2, 3) merged into a trie: nodes 2, 4, 3 with parents 0, 1, 1
    assert tree.tokens[:3] == [2, 4, 3] and tree.parents[:3] == [0, 1, 1] and tree.verify[:3] == [True] * 3
    # window: level 0 is a chain off the root, level 1 hangs under its column
    assert tree.tokens[3:] == [10, 11, 12, 20, 21, 22] and tree.parents[3:] == [0, 4, 5, 4, 5, 6]
    assert tree.depths()[4:] == [1, 2, 3, 2, 3, 4]
    logits = torch.zeros(len(tree) + 1, 50)
    for row, tok in zip([7, 8, 9], [30, 31, 32]):  # predictions after the last level's guesses
        logits[row, tok] = 1.0
    d.observe([7, 1, 2], StepResult(tree, accepted=[], next_token=2, logits=logits))
    assert d.pool[10] == [(20, 30)] and d.pool[12] == [(22, 32)]
    assert d.levels == [[20, 21, 22], [30, 31, 32]]


def test_ngram_index_answers_like_the_scan_as_the_context_grows():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        index = NgramIndex(1, 3)
        context = torch.randint(0, 4 + trial % 5, (5,), generator=g).tolist()
        for _ in range(40):
            assert index.continuation(context, 4) == find_continuation(context, 1, 3, 4)
            context += torch.randint(0, 4 + trial % 5, (int(torch.randint(1, 4, (1,), generator=g)),),
                                     generator=g).tolist()
        other = context[:7] + [99]  # not an extension of what was indexed: rebuilt
        assert index.continuation(other, 4) == find_continuation(other, 1, 3, 4)
