"""The policy hook: a request whose sequences are decided together (what search strategies plug into)."""
import pytest
import torch

import decodekit
from decodekit.engine.policy import Policy, keep
from decodekit.speculative.base import DraftTree


class Greedy(Policy):
    """Plain greedy through the hook: must equal the engine's own greedy decoding."""

    def step(self, core, req, rows):
        for seq, (logits, _) in rows.items():
            keep(seq, 0 if not seq.output else 1, [], [int(logits[0].argmax())])
        return list(rows)


class ForkAtThree(Greedy):
    """After 3 tokens each sequence forks: the fork takes the second most likely token, then both go on greedily."""

    def step(self, core, req, rows):
        changed = []
        for seq, (logits, _) in rows.items():
            width = 0 if not seq.output else 1
            if len(seq.output) == 3 and len(req.sequences) == 1:
                top2 = logits[0].topk(2).indices.tolist()
                seq.kv.keep_path(seq.kv.length - width, [0])
                child = core.fork_sequence(seq)
                req.sequences.append(child)
                seq.commit([top2[0]])
                child.commit([top2[1]])
                changed += [seq, child]
            else:
                keep(seq, width, [], [int(logits[0].argmax())])
                changed.append(seq)
        return changed


class ScoreCandidates(Greedy):
    """Scores the top-3 of the last step as a depth-1 tree each step (contrastive search's shape) and keeps the
    argmax candidate: equals greedy, and the candidate rows' hidden states come along."""

    feature_layers = (0, 2)
    max_nodes = 3

    def __init__(self):
        self.last = {}
        self.seen_hidden = []

    def plan(self, seq):
        if seq.id not in self.last:
            return DraftTree()
        return DraftTree(self.last[seq.id], [0, 0, 0])

    def step(self, core, req, rows):
        for seq, (logits, hidden) in rows.items():
            self.seen_hidden.append(tuple(hidden.shape))
            width = 0 if not seq.output else 1 + len(seq.tree)
            best = int(logits[0].argmax())
            if seq.output and len(seq.tree):
                node = seq.tree.tokens.index(best) + 1 if best in seq.tree.tokens else None
                nxt = int(logits[node].argmax()) if node else None
                if node:
                    keep(seq, width, [node], [best, nxt])
                else:
                    keep(seq, width, [], [best])
            else:
                keep(seq, width, [], [best])
            self.last[seq.id] = logits[-1].topk(3).indices.tolist()
        return list(rows)


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu")


PROMPTS = [[5, 6, 7, 8, 9, 10] * 4, list(range(3, 40))]


def test_a_policy_deciding_greedily_equals_greedy(engine):
    want = [engine.generate(p, 20, ignore_eos=True).token_ids for p in PROMPTS]
    reqs = [engine.add_request(p, 20, ignore_eos=True, policy=Greedy()) for p in PROMPTS]
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.sequences[0].output for r in reqs] == want


def test_forks_mid_generation_continue_as_their_own_prefix_would(engine):
    p = PROMPTS[0]
    req = engine.add_request(p, 12, ignore_eos=True, policy=ForkAtThree())
    while not req.finished:
        engine.step()
    a, b = req.sequences
    assert a.output[:3] == b.output[:3] and a.output[3] != b.output[3]
    for seq in (a, b):  # each continues exactly as greedy decoding from its own first 4 tokens
        alone = engine.generate(p + seq.output[:4], 8, ignore_eos=True).token_ids
        assert seq.output[4:] == alone
    alloc = engine.core.pool.allocator
    assert alloc.num_free == alloc.capacity


def test_candidates_scored_as_a_tree_with_hidden_states(engine):
    policy = ScoreCandidates()
    want = engine.generate(PROMPTS[1], 16, ignore_eos=True).token_ids
    req = engine.add_request(PROMPTS[1], 16, ignore_eos=True, policy=policy)
    while not req.finished:
        engine.step()
    assert req.sequences[0].output == want
    hidden = engine.model.config.hidden_size
    assert (4, 2 * hidden) in policy.seen_hidden  # root + 3 candidates, two layers' states each
