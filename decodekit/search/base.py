"""Search strategies: the registry, the two shapes a strategy takes, and what they share.

A strategy is one file holding one `@register`ed dataclass of knobs whose docstring names its paper. It plugs into the
engine's one loop in one of two shapes:

- `PolicySearch`: a `Policy` (engine/policy.py) decides for all of a request's sequences after each pass: beams
  fork their survivors and finish the dropped, contrastive search scores its candidates as a tree in the same pass,
  a best-first queue pauses the hypotheses it is not expanding. These decide every token themselves, so they run
  without a speculative method.
- `SampleSearch`: `n` samples drawn as one request (one prefill, forks sharing the prompt's KV; any speculative
  `method` drafts them, its budget applies), one of which is selected afterwards (best-of-n, MBR, self-consistency,
  reranking, arithmetic sampling).

`Engine.generate(prompt, max_new_tokens, search=NAME, **options)` builds each request as usual, lets the strategy
`prepare` it, runs the loop, and returns what `select` chose (its score in `stats.score`), or with
`return_all=True` a `SearchResult(chosen, candidates)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import torch

from ..engine.policy import Policy
from ..engine.sequence import GenerationResult, logprob_entries
from ..engine.stopping import StopChecker
from ..models.kv_cache import PoolFull

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine
    from ..engine.core import EngineCore, Request
    from ..engine.sequence import Sequence


class SearchResult(NamedTuple):
    """What `generate(..., search=NAME, return_all=True)` returns per prompt: the chosen sequence and every candidate
    the strategy ranked (the chosen one among them), each with its score in `stats.score`, best first."""

    chosen: GenerationResult
    candidates: list[GenerationResult]


SEARCHES: dict[str, type["SearchStrategy"]] = {}


def register(cls: type["SearchStrategy"]) -> type["SearchStrategy"]:
    """Class decorator: make a strategy available by its `name` to `generate(search=...)` and the CLI."""
    SEARCHES[cls.name] = cls
    return cls


def search_knobs(name: str) -> set[str]:
    cls = SEARCHES.get(name)
    return {f.name for f in fields(cls)} if cls is not None and is_dataclass(cls) else set()


def make_search(name: str, options: dict[str, Any]) -> "SearchStrategy":
    if name not in SEARCHES:
        raise ValueError(f"unknown search {name!r}; available: {', '.join(sorted(SEARCHES))}")
    unknown = sorted(set(options) - search_knobs(name))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for search {name!r}; its knobs: "
                         f"{', '.join(sorted(search_knobs(name))) or '(none)'}")
    return SEARCHES[name](**options)


@dataclass
class SearchStrategy:
    """Base class: subclasses are dataclasses of their knobs (validated in `__post_init__`, ValueError)."""

    name: ClassVar[str] = ""
    takes_method: ClassVar[bool] = False  # may a speculative method draft its tokens?

    def prepare(self, engine: "Engine", req: "Request") -> None:
        """Make `req` this strategy's request (before it is queued); raise ValueError for what it cannot do."""
        raise NotImplementedError

    def select(self, engine: "Engine", req: "Request") -> SearchResult:
        """After `req` finished: the chosen result and the ranked candidates."""
        raise NotImplementedError


def check(ok: bool, message: str) -> None:
    """Knob validation: a one-line ValueError."""
    if not ok:
        raise ValueError(message)


# ---- policies ------------------------------------------------------------------------------------------------
class PolicySearch(SearchStrategy):
    """A strategy that decides every token through a `Policy`; `policy(engine, req)` builds it for one request."""

    def policy(self, engine: "Engine", req: "Request"):
        raise NotImplementedError

    def prepare(self, engine: "Engine", req: "Request") -> None:
        method = getattr(req.method, "name", req.method)
        if method != "plain":
            raise ValueError(f"search {self.name!r} decides every token itself: it runs without a speculative method "
                             f"(got method={method!r})")
        req.policy = self.policy(engine, req)
        if getattr(req.policy, "scores_tokens", False):
            req.token_stat = token_logprob

    def select(self, engine: "Engine", req: "Request") -> SearchResult:
        return req.policy.outcome(req)


def rows_width(seq: "Sequence") -> int:
    """Entries of the last pass that sit past `seq`'s committed context: 1 when its root was written (a decoding
    pass, or the prompt's last token after its prefill), 0 when a preempted sequence lost it since."""
    return max(0, seq.kv.length - (len(seq.tokens) - 1))


def keep_root(seq: "Sequence") -> None:
    """Keep the root's entry of the last pass and drop whatever else the pass wrote."""
    width = rows_width(seq)
    if width:
        seq.kv.keep_path(seq.kv.length - width, [0])


def fork(core: "EngineCore", seq: "Sequence", search: str) -> "Sequence":
    """`core.fork_sequence` with a user-facing error when the KV pool is full."""
    try:
        child = core.fork_sequence(seq)
    except PoolFull:
        raise ValueError(f"search {search!r}: the KV pool is full; load with a larger kv_tokens or search narrower")
    seq.request.sequences.append(child)
    return child


def commit_token(seq: "Sequence", row: torch.Tensor, token: int) -> None:
    """Keep the root, commit `token` (drawn after `row` `[1, V]`, the raw logits) through the stop rules, and record
    its logprob and token statistic as a plain step would."""
    keep_root(seq)
    kept = seq.commit([token])
    seq.record_logprobs(row, kept)


def draw(seq: "Sequence", logits: torch.Tensor) -> int:
    """A token from processed logits `[1, V]` under `seq`'s sampling rule (argmax when greedy)."""
    if seq.sampling.greedy:
        return int(logits[0].argmax())
    return int(torch.multinomial(logits[0].softmax(-1), 1, generator=seq.generator))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the distributions of logits `[..., V]`."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


@dataclass
class Hypothesis:
    """A candidate output: `tokens` grew from `seq` (whose prompt, stop rules and stats it shares)."""

    score: float
    tokens: list[int]
    seq: Any
    reason: str  # "stop" (EOS or a stop string) | "length"
    logprobs: list | None = None


def hypothesis_result(h: Hypothesis) -> GenerationResult:
    """A hypothesis as a result: text through the same stop rules as a sequence, stats copied from its sequence."""
    base = h.seq.result()
    stopper = h.seq.stopper
    checker = StopChecker(stopper.decoder.tokenizer, stopper.eos_ids, stopper.stop)
    checker.push_many(list(h.tokens))
    stats = dataclasses.replace(base.stats, generated_tokens=len(h.tokens), score=h.score)
    return GenerationResult(checker.text, list(h.tokens), h.reason, stats, base.prompt_ids, h.logprobs)


def kept_row(seq: "Sequence", logits: torch.Tensor) -> torch.Tensor | None:
    """The raw logits row `[1, V]` a waiting hypothesis keeps for the logprobs of the tokens that will extend it: a
    copy, since a view of the pass's logits keeps that whole tensor alive while the hypothesis waits (best-first
    search on Gemma 3's 262k vocabulary held tens of GB so), and nothing when the request records no logprobs."""
    if seq.top_logprobs is None and seq.token_stat is None:
        return None
    return logits[:1].clone()


def extended_logprobs(seq: "Sequence", row: torch.Tensor, token: int) -> list | None:
    """`seq`'s recorded logprobs plus `token`'s (drawn after raw logits `row` `[1, V]`), or None when not asked."""
    if seq.top_logprobs is None:
        return None
    return list(seq.logprobs) + logprob_entries(row.float().log_softmax(-1), [token], seq.top_logprobs)


def finish_all(req: "Request", reason: str = "abort") -> None:
    for seq in req.sequences:
        if not seq.finished:
            seq.paused = False
            seq.finish(reason)


def token_logprob(logp: torch.Tensor, tokens: list[int]) -> list[float]:
    """Token statistic (`Sequence.token_stat`): each token's log-probability under the model."""
    return logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()


class SinglePolicy(Policy):
    """A policy that decodes one sequence token by token (contrastive, DoLa, momentum, AdaDec, ...): its sequence is
    the outcome, scored by the mean log-probability of its tokens under the model (raw logits)."""

    scores_tokens = True  # PolicySearch.prepare asks the sequence to record each token's logprob

    def outcome(self, req: "Request") -> SearchResult:
        seq = req.sequences[0]  # forks a policy made on the way (lookaheads) come after it
        result = seq.result()
        if seq.token_stats:
            result.stats.score = sum(seq.token_stats) / len(seq.token_stats)
        return SearchResult(result, [result])


class TokenPolicy(SinglePolicy):
    """A policy that picks one token per pass for its one sequence from the root's rows (DoLa, momentum, ...)."""

    def choose(self, seq: "Sequence", logits: torch.Tensor, hidden: torch.Tensor | None) -> int:
        """The next token, from the root's raw logits `[1, V]` (and hidden states `[1, F]` of `feature_layers`)."""
        raise NotImplementedError

    def step(self, core, req, rows) -> list:
        for seq, (logits, hidden) in rows.items():
            commit_token(seq, logits[:1], self.choose(seq, logits[:1], None if hidden is None else hidden[:1]))
        return list(rows)



# ---- n samples -----------------------------------------------------------------------------------------------
@dataclass
class SampleSearch(SearchStrategy):
    """`n` samples of the prompt drawn as one request (forks sharing the prompt's KV), then one is selected:
    `scores(engine, req, results, seqs)` gives each candidate's score (higher is better). `arithmetic`: draw the
    samples with arithmetic codes (arithmetic.py) instead of independent draws."""

    n: int = 8
    arithmetic: bool = False
    takes_method: ClassVar[bool] = True
    needs_sampling: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check(isinstance(self.n, int) and self.n >= 1, f"{self.name}: n must be an integer >= 1, got {self.n}")

    def prepare(self, engine: "Engine", req: "Request") -> None:
        if self.needs_sampling and req.sampling.greedy and self.n > 1:
            raise ValueError(f"search {self.name!r} selects among {self.n} samples: give a temperature > 0 "
                             "(greedy samples would all be the same)")
        req.n = self.n
        req.token_stat = self.statistic()
        if self.arithmetic:
            from .arithmetic import lattice

            req.draws = lattice(self.n, req.sampling.seed)

    def statistic(self) -> Callable | None:
        """A per-token statistic of the raw distributions that `scores` reads (`Sequence.token_stats`); None: none."""
        return None

    def scores(self, engine: "Engine", req: "Request", results: list[GenerationResult],
               seqs: list["Sequence"]) -> list[float]:
        raise NotImplementedError

    def select(self, engine: "Engine", req: "Request") -> SearchResult:
        seqs = sorted(req.sequences, key=lambda s: s.index)
        results = [s.result() for s in seqs]
        scores = self.scores(engine, req, results, seqs)
        for r, score in zip(results, scores):
            r.stats.score = float(score)
        order = sorted(range(len(results)), key=lambda i: (-scores[i], i))  # ties: the earlier sample
        ranked = [results[i] for i in order]
        return SearchResult(ranked[0], ranked)
