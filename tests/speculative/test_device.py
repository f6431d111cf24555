"""Drafting and greedy acceptance on the device (fused draft rounds): the tensor versions answer what the host
versions answer."""
from __future__ import annotations

import random

import torch

from decodekit.speculative.base import DraftTree
from decodekit.speculative.device import accept_chain, committed_tokens, window_columns
from decodekit.speculative.pld import PromptLookup, continuation_on_device, find_continuation
from decodekit.speculative.verify import verify_greedy


def test_ngram_lookup_on_the_device_equals_the_scan():
    """Small alphabets, so that matches of every n-gram size, overlaps and ends of context all occur."""
    rng = random.Random(0)
    for _ in range(200):
        contexts = [[rng.randrange(4) for _ in range(rng.randrange(1, 40))] for _ in range(5)]
        history = torch.randint(0, 4, (5, 48))  # past each context: junk the lookup must not read
        for r, c in enumerate(contexts):
            history[r, :len(c)] = torch.tensor(c)
        length = torch.tensor([len(c) for c in contexts])
        for lo, hi, depth in ((1, 3, 6), (2, 4, 3)):
            draft, n = continuation_on_device(history, length, lo, hi, depth)
            for r, c in enumerate(contexts):
                assert draft[r, :n[r]].tolist() == find_continuation(c, lo, hi, depth), (c, lo, hi)


def test_prompt_lookup_on_the_device_caps_at_num_draft():
    pld = PromptLookup(num_draft=2)
    context = [1, 2, 3, 4, 5, 1, 2]
    draft, n = pld.propose_on_device(torch.tensor([context + [0] * 4]), torch.tensor([len(context)]), 5)
    assert draft[0, :n[0]].tolist() == pld.propose(context).tokens == [3, 4]
    assert pld.drafts_on_device and not PromptLookup(on_device=False).drafts_on_device


def test_chain_acceptance_on_the_device_equals_the_greedy_verifier():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows, k, vocab = 6, 5, 3
        draft = torch.randint(0, vocab, (rows, k), generator=g)
        n_draft = torch.randint(0, k + 1, (rows,), generator=g)
        logits = torch.randn(rows, k + 1, vocab, generator=g)
        accepted, nxt = accept_chain(draft, n_draft, logits.argmax(-1))
        new = committed_tokens(draft, accepted, nxt)
        for r in range(rows):
            tree = DraftTree.chain(draft[r, :n_draft[r]].tolist())
            path, token = verify_greedy(tree, logits[r, :n_draft[r] + 1].softmax(-1))
            assert (accepted[r].item(), nxt[r].item()) == (len(path), token)
            assert new[r, :len(path) + 1].tolist() == tree.tokens[:len(path)] + [token]


def test_window_columns_enumerate_sinks_then_the_recent_window():
    for ctx in range(0, 30):
        for sink, window in ((0, 5), (3, 5), (4, 0), (2, 40)):
            cols, base = window_columns(torch.tensor([ctx]), sink, window, 3)
            # every entry while the context is inside the sinks; else the sinks, then the window and 3 new entries
            want = list(range(ctx + 3)) if ctx < sink else \
                list(range(sink)) + list(range(max(sink, ctx - window), ctx + 3))
            assert cols[0, :len(want)].tolist() == want  # columns past them are never read
            assert int(ctx - base[0] + sink) == want.index(ctx)  # the root's column
