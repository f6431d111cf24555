"""tree_masks against per-path matchers built from scratch; prune against the definition of the kept sub-tree."""
import json
import random

import pytest
import torch

from decodekit.constrain import constraint_spec, prune, prune_tree, tree_bitmask, tree_masks
from decodekit.constrain.base import unpack_bitmask
from decodekit.speculative.base import DraftTree

from constrain_helpers import BACKENDS, BYTE_VOCAB, encode

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["id"], "additionalProperties": False}
PREFIX = '{"id": 1'


def byte_ids(text):
    return [3 + b for b in text.encode()]


def hand_tree():
    """After `{"id": 1`, a tree mixing valid and invalid branches, an EOS node and children of invalid nodes.

    node: 1 '2'  2 '3'(1)  3 ','(2)  4 'x'(0)  5 '5'(4)  6 ','(0)  7 ' '(6)  8 '"'(7)  9 '}'(0)  10 EOS(9)
          11 '}'(9)  12 'o'(8)  13 ' '(3)
    """
    spec = [("2", 0), ("3", 1), (",", 2), ("x", 0), ("5", 4), (",", 0), (" ", 6), ('"', 7), ("}", 0), (None, 9),
            ("}", 9), ("o", 8), (" ", 3)]
    tokens = [2 if ch is None else byte_ids(ch)[0] for ch, _ in spec]
    parents = [p for _, p in spec]
    return tokens, parents


def path_of(node, parents):
    path = []
    while node:
        path.append(node)
        node = parents[node - 1]
    return path[::-1]


def reference(grammar, prefix_ids, tokens, parents):
    """Masks and validity by definition: a fresh matcher per node, advanced along the node's path."""
    rows, valid = [], []
    root = grammar.matcher()
    root.advance(prefix_ids)
    rows.append(root.allowed())
    for node in range(1, len(tokens) + 1):
        m = grammar.matcher()
        m.advance(prefix_ids)
        ok = True
        for step in path_of(node, parents):
            if not m.allows(tokens[step - 1]):
                ok = False
                break
            m.advance([tokens[step - 1]])
        valid.append(ok)
        rows.append(m.allowed() if ok else torch.zeros(grammar.matcher().vocab_size, dtype=torch.bool))
    return torch.stack(rows), valid


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_masks_equal_per_path_matchers(byte, backend):
    grammar = byte[backend].compile(constraint_spec(json_schema=SCHEMA))
    tokens, parents = hand_tree()
    m = grammar.matcher()
    m.advance(byte_ids(PREFIX))
    before = m.allowed()
    allowed, valid = tree_masks(m, tokens, parents)
    want_rows, want_valid = reference(grammar, byte_ids(PREFIX), tokens, parents)
    assert valid.tolist() == want_valid
    assert valid.tolist() == [True, True, True, False, False, True, True, True, True, True, False, True, True]
    assert torch.equal(allowed, want_rows)
    assert allowed[10].sum() == 0  # after EOS nothing is allowed
    assert torch.equal(m.allowed(), before)  # the caller's matcher did not move


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_trees_on_the_real_tokenizer(smol, backend):
    compiler = smol[backend]
    grammar = compiler.compile(constraint_spec(json_schema=SCHEMA))
    prefix = encode(compiler, '{"id": ')
    rng = random.Random(0)
    m = grammar.matcher()
    m.advance(prefix)
    continuation = encode(compiler, '123, "ok": true}') + [2]
    candidates = continuation + [11, 28, 90]
    total_valid = 0
    for _ in range(3):
        parents = [rng.randrange(i + 1) for i in range(12)]
        depth = [0]
        tokens = []
        for p in parents:  # mostly the valid text's next token at that depth, so that deep nodes are valid too
            depth.append(depth[p] + 1)
            d = depth[-1] - 1
            tokens.append(continuation[d] if d < len(continuation) and rng.random() < 0.7 else rng.choice(candidates))
        allowed, valid = tree_masks(m, tokens, parents)
        want_rows, want_valid = reference(grammar, prefix, tokens, parents)
        assert valid.tolist() == want_valid and torch.equal(allowed, want_rows)
        total_valid += sum(want_valid)
    assert 6 <= total_valid < 36  # both kinds of node were exercised


def test_tree_bitmask_fills_a_reused_buffer(byte):
    grammar = byte["llguidance"].compile(constraint_spec(regex="ab|ac"))
    buf = torch.full((8, BYTE_VOCAB // 32), -1, dtype=torch.int32)
    bits, valid = tree_bitmask(grammar.matcher(), byte_ids("abx"), [0, 1, 0], out=buf)
    assert bits.data_ptr() == buf.data_ptr() and bits.shape[0] == 4 and valid == [True, True, False]
    allowed = unpack_bitmask(bits, BYTE_VOCAB)
    assert allowed[0].nonzero().flatten().tolist() == byte_ids("a")
    assert allowed[1].nonzero().flatten().tolist() == byte_ids("bc")
    assert allowed[2].nonzero().flatten().tolist() == [2] and not allowed[3].any()
    with pytest.raises(ValueError, match="needs 4"):
        tree_bitmask(grammar.matcher(), byte_ids("abx"), [0, 1, 0], out=buf[:2])
    with pytest.raises(ValueError, match="must precede"):
        tree_masks(grammar.matcher(), byte_ids("ab"), [0, 2])


def test_prune_keeps_valid_nodes_under_kept_parents():
    tokens, parents = list(range(100, 113)), hand_tree()[1]
    valid = [True, True, True, False, True, True, True, True, True, True, False, False, True]
    new_tokens, new_parents, kept = prune(tokens, parents, valid)
    # node 5 is valid but its parent 4 is not: dropped with it
    assert kept == [1, 2, 3, 6, 7, 8, 9, 10, 13]
    assert new_tokens == [tokens[i - 1] for i in kept]
    assert new_parents == [0, 1, 2, 0, 4, 5, 0, 7, 3]
    old_of = {0: 0, **{j + 1: k for j, k in enumerate(kept)}}
    for j, p in enumerate(new_parents, start=1):  # remapped parents are the old parents
        assert p < j and old_of[p] == parents[old_of[j] - 1]
    assert prune([5, 6], [0, 1], [False, True]) == ([], [], [])
    with pytest.raises(ValueError):
        prune([5, 6], [0, 1], [True])


def test_prune_tree_renormalizes_draft_probs_over_allowed_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    tree = DraftTree([0, 2, 3], [0, 1, 0], probs, verify=[True, True, False])
    allowed = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    valid = [True, True, False]  # node 3's token 3 is not allowed at the root
    pruned, kept = prune_tree(tree, allowed, valid)
    assert kept == [1, 2] and pruned.tokens == [0, 2] and pruned.parents == [0, 1] and pruned.verify == [True, True]
    expected = torch.tensor([[0.5 / 0.75, 0.0, 0.25 / 0.75, 0.0], [0.0, 0.2 / 0.5, 0.3 / 0.5, 0.0]])
    assert torch.allclose(pruned.draft_probs, expected)
    assert json.dumps(prune_tree(DraftTree([1], [0]), allowed, [False])[0].tokens) == "[]"
