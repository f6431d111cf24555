"""Trained heads drafting over the most frequent tokens only (`draft_vocab`, FR-Spec): the subset's logits are the
full LM head's, every other token's is -inf, drafts stay inside the subset, and the output is still the target's
(greedy: token-identical; sampled: the same distribution)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.models.tokenizer import EOS_ID, ByteTokenizer
from decodekit.sampling import SamplingConfig
from decodekit.speculative import DRAFTERS
from decodekit.speculative.heads_common import Target
from decodekit.speculative.token_ranks import (RANKS_FILE, read_token_ranks, save_token_ranks, special_ids,
                                              token_counts, token_ranks)
from decodekit.train.data import feature_pass
from head_helpers import HEADS, saved_head
from micro import chi_square_p, exact_pair_distribution, micro_engine
from test_lossless import empirical_pairs, prompts


@pytest.fixture(scope="module")
def tiny():
    return decodekit.load("random:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def tiny_graphs(tiny):
    """The graph runner's static draft passes (on the CPU a replay calls the captured function)."""
    return Engine(tiny.model, tiny.tokenizer, cuda_graphs=True)


def ranked_head(arch: str, config, folder, seed: int = 1) -> str:
    """A random head with a random token ranking beside it (the subset is whatever ranks first)."""
    saved_head(arch, config, folder, seed)
    save_token_ranks(torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed)), folder)
    return str(folder)


def subset(folder: str, vocab_size: int, n: int) -> set[int]:
    return set(read_token_ranks(folder, vocab_size)[:n].tolist())


def test_ranks_put_special_ids_first_then_frequency():
    tok = ByteTokenizer()
    counts = token_counts(tok, ["aab", "ba", "c"], tok.vocab_size)
    a, b, c = (tok.encode(x)[0] for x in "abc")
    assert counts[a] == 3 and counts[b] == 2 and counts[c] == 1 and counts.sum() == 6
    keep = special_ids(tok, [EOS_ID])
    ranks = token_ranks(counts, keep)
    assert ranks[:3].tolist() == sorted(keep) and ranks[3:6].tolist() == [a, b, c]
    assert sorted(ranks.tolist()) == list(range(tok.vocab_size))  # every id once; unseen ones by id
    assert ranks[6:].tolist() == sorted(set(range(tok.vocab_size)) - {*keep, a, b, c})


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_subset_logits_are_the_full_ones_on_the_subset_and_minus_inf_elsewhere(tiny, softcap):
    net = tiny.model
    ids = torch.randperm(net.config.vocab_size, generator=torch.Generator().manual_seed(0))[:37]
    full, part = Target(net), Target(net, ids)
    full.config = part.config = replace(net.config, final_logit_softcap=softcap)
    h = torch.randn(3, 5, net.config.hidden_size, generator=torch.Generator().manual_seed(1))
    want, got = full.logits(h), part.logits(h)
    assert got.shape == want.shape
    torch.testing.assert_close(got[..., ids], want[..., ids])
    outside = torch.ones(net.config.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(got[..., outside]).all()


@pytest.mark.parametrize("arch", HEADS)
def test_drafts_stay_inside_the_subset(arch, tiny, tmp_path):
    folder = ranked_head(arch, tiny.model.config, tmp_path)
    n = 40
    allowed = subset(folder, tiny.model.config.vocab_size, n)
    seq = [7, 3, 9, 4, 4, 11, 2, 8, 5, 6, 1, 9, 12, 3]
    drafter = DRAFTERS[arch](path=folder, draft_vocab=n, branch=3, depth=3, max_nodes=10).bind(tiny)
    feats = feature_pass(tiny.model, seq, drafter.head.config.feature_layers)
    for root in (4, 8, len(seq) - 1):
        drafter.reset(seq[:root])
        drafter.prefill_features(feats[:root])
        tree = drafter.propose(seq[:root + 1])
        assert len(tree) == 10 and set(tree.tokens) <= allowed, (arch, root)


@pytest.mark.parametrize("arch", HEADS)
@pytest.mark.parametrize("which", ["tiny", "tiny_graphs"])
def test_greedy_with_a_draft_vocabulary_is_plain_greedy(arch, which, request, tmp_path):
    engine = request.getfixturevalue(which)
    folder = ranked_head(arch, engine.model.config, tmp_path)
    for p in prompts(engine.model.config.vocab_size):
        plain = engine.generate(p, 40, ignore_eos=True).token_ids
        got = engine.generate(p, 40, ignore_eos=True, method=arch, path=folder, draft_vocab=64, adaptive=False)
        assert got.token_ids == plain


def test_sampled_with_a_draft_vocabulary_follows_the_target(tmp_path):
    """Micro model (6 tokens), half of them in the draft vocabulary: the chi-square test of the lossless suite."""
    micro = micro_engine()
    folder = ranked_head("eagle", micro.model.config, tmp_path)
    sampling = SamplingConfig(temperature=1.0)
    probs = exact_pair_distribution(micro, sampling)
    counts = empirical_pairs(micro, "eagle", sampling, 1200, path=folder, draft_vocab=3, branch=2, depth=2,
                             max_nodes=4, adaptive=False)
    assert chi_square_p(counts, probs) > 1e-3


def test_bad_draft_vocab_values_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="draft_vocab must be 0"):
        tiny.generate([1, 2, 3], 4, method="eagle", init="random", draft_vocab=-1)
    with pytest.raises(ValueError, match="at least branch"):
        tiny.generate([1, 2, 3], 4, method="eagle", init="random", draft_vocab=2, branch=4)
    with pytest.raises(ValueError, match="token ranking"):  # an untrained head has no ranking
        tiny.generate([1, 2, 3], 4, method="eagle", init="random", draft_vocab=16)
    folder = saved_head("medusa", tiny.model.config, tmp_path)
    with pytest.raises(ValueError, match=f"token ranking \\({RANKS_FILE}\\)"):  # a head folder without one
        tiny.generate([1, 2, 3], 4, method="medusa", path=folder, draft_vocab=16)
    save_token_ranks(torch.arange(tiny.model.config.vocab_size), folder)
    with pytest.raises(ValueError, match="exceeds the target's"):
        tiny.generate([1, 2, 3], 4, method="medusa", path=folder, draft_vocab=tiny.model.config.vocab_size + 1)
    save_token_ranks(torch.arange(10), folder)
    with pytest.raises(ValueError, match="each of the target's"):
        tiny.generate([1, 2, 3], 4, method="medusa", path=folder, draft_vocab=8)
