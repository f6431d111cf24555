"""Beam search exactly as transformers' `generate(num_beams=...)` defines it; groups make it diverse beam search.

Beam search keeps the `num_beams` best partial outputs by the sum of their tokens' log-probabilities. The rules and
the option names are transformers' (`GenerationMixin._beam_search`, 4.50+ and 5.x):
- each step takes the top K = max(2, 1 + number of EOS ids) x num_beams continuations of all beams (beam sampling
  when the sampling rule samples: K drawn without replacement from the softmax of the accumulated scores);
- a continuation that ends (EOS, a stop string, or the length limit) and is among the first num_beams of the K joins
  the finished hypotheses with score = its log-probability sum / (its generated tokens, EOS included) **
  `length_penalty`, and the best num_beams finished ones are kept; the best num_beams continuations that do not end
  are the next running beams;
- `early_stopping`: True stops once num_beams hypotheses are finished; False once the best running beam's score,
  normalized at the current length, cannot beat the worst finished one (transformers' heuristic); "never" bounds it
  at the maximum length when length_penalty > 0 (the canonical beam search). The search also stops when every
  continuation ends (the length limit).

Groups (`num_beam_groups` > 1 with `diversity_penalty` > 0) give diverse beam search (Vijayakumar et al. 2018,
"Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models") as transformers' group beam search:
the beams split into groups of num_beams / num_beam_groups that take each step one after another; group g's
log-probabilities are lowered by diversity_penalty x the number of beams of earlier groups that chose the token at
this step (Hamming diversity), and the penalty stays in its beam scores; each group keeps its own finished
hypotheses under the rules above and the result ranks all of them.

Sampling rules: a candidate's log-probability is that of the distribution the sequence's rules define (penalties over
each beam's own tokens; temperature and warpers when sampling), renormalized. transformers applies its processors to
the log-probabilities without renormalizing: the two agree when no rule is active.

On the engine a beam is a sequence of the request: a beam with several surviving continuations forks (KV shared, a
partial last block copied), a beam with none finishes (its KV returns). A step is decided once every running beam
has its logits (a preempted beam re-prefills first; the others wait paused).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..engine.policy import Policy
from ..engine.sequence import make_generator
from .base import (Hypothesis, PolicySearch, SearchResult, check, extended_logprobs, finish_all, fork,
                   hypothesis_result, keep_root, register)

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.sequence import Sequence


@register
@dataclass
class Beam(PolicySearch):
    """Knobs, as transformers names them (defaults): `num_beams` (4), `length_penalty` (1.0: exponent of the
    generated length a finished score is divided by), `early_stopping` (False | True | "never"), `num_beam_groups`
    (1; > 1: diverse beam search), `diversity_penalty` (0.0; > 0 with groups)."""

    name = "beam"
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0

    def __post_init__(self) -> None:
        n = self.name
        check(isinstance(self.num_beams, int) and self.num_beams >= 1, f"{n}: num_beams must be an integer >= 1")
        check(self.early_stopping in (True, False, "never"),
              f"{n}: early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        g = self.num_beam_groups
        check(isinstance(g, int) and g >= 1 and self.num_beams % g == 0,
              f"{n}: num_beam_groups must be an integer >= 1 dividing num_beams ({self.num_beams}), got {g}")
        check(self.diversity_penalty >= 0, f"{n}: diversity_penalty must be >= 0")
        check(g == 1 or self.diversity_penalty > 0,
              f"{n}: with num_beam_groups > 1 give diversity_penalty > 0, or the groups are identical")

    def finished_slots(self, group_size: int) -> int:
        """Finished hypotheses a group keeps (and needs for early stopping): its beam width."""
        return group_size

    def policy(self, engine, req) -> "BeamPolicy":
        return BeamPolicy(self, engine, req)


class Group:
    """One group's beam search state, as transformers keeps it per batch entry."""

    def __init__(self, size: int, slots: int) -> None:
        self.size, self.slots = size, slots
        self.running: list[list] = []  # [sequence, score], best first
        self.finished: list[Hypothesis] = []  # best first, at most `slots`
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False

    @property
    def full(self) -> bool:
        return len(self.finished) >= self.slots


class BeamPolicy(Policy):
    def __init__(self, search: Beam, engine, req) -> None:
        self.search = search
        size = search.num_beams // search.num_beam_groups
        self.groups = [Group(size, search.finished_slots(size)) for _ in range(search.num_beam_groups)]
        self.eos = set() if req.ignore_eos else set(engine.eos_ids)
        self.keep = max(2, 1 + len(self.eos)) * size
        self.stops = bool(req.stop)
        self.generator = make_generator(engine.device, req.sampling.seed)
        self.rows: dict["Sequence", torch.Tensor] = {}  # this step's raw root logits of the beams that ran
        self.started = False

    def finished(self, req) -> bool:
        return self.started and all(g.done for g in self.groups)

    def step(self, core, req, rows) -> list["Sequence"]:
        for seq, (logits, _) in rows.items():
            if not seq.finished:
                self.rows[seq] = logits[:1]
                seq.paused = True
        if not self.started:
            first = req.sequences[0]
            for g in self.groups:
                g.running = [[first, 0.0]]
            self.started = True
        if any(seq not in self.rows for g in self.groups if not g.done for seq, _ in g.running):
            return []  # a beam is still catching up (preempted): decide when every beam has its logits
        return self._decide(core, req)

    def _ends(self, seq: "Sequence", token: int) -> str | None:
        """Whether appending `token` ends `seq`: "stop" (EOS or a stop string), "length", or None."""
        if token in self.eos:
            return "stop"
        if self.stops and seq.stopper.fork().push(token):
            return "stop"
        return "length" if seq.room <= 1 else None

    def _candidates(self, g: Group, penalty: torch.Tensor | None, greedy: bool) -> list[tuple]:
        """The top K continuations (beam sequence, token, accumulated score), in transformers' order."""
        scores = torch.cat([seq.next_logits(self.rows[seq]).log_softmax(-1) + score for seq, score in g.running])
        if penalty is not None:
            scores = scores - penalty
        vocab = scores.shape[-1]
        flat = scores.reshape(-1)
        k = min(self.keep, flat.numel())
        if greedy:
            top, index = flat.topk(k)
        else:  # beam sampling: K continuations without replacement
            k = min(k, int(torch.isfinite(flat).sum()))
            index = torch.multinomial(flat.softmax(-1), k, generator=self.generator)
            top = flat[index]
        return [(g.running[i // vocab][0], i % vocab, s) for i, s in zip(index.tolist(), top.tolist())]

    def _decide(self, core, req) -> list["Sequence"]:
        s = self.search
        greedy = req.sampling.greedy
        chosen: list[int] = []  # tokens of the running beams earlier groups chose this step (Hamming diversity)
        survivors: dict["Sequence", list[list]] = {}
        vocab = next(iter(self.rows.values())).shape[-1]
        for g in self.groups:
            if g.done:
                continue
            penalty = None
            if s.diversity_penalty and chosen:
                penalty = s.diversity_penalty * torch.bincount(torch.tensor(chosen), minlength=vocab).float()
                penalty = penalty.to(next(iter(self.rows.values())).device)
            cands = self._candidates(g, penalty, greedy)
            ends = [self._ends(seq, tok) for seq, tok, _ in cands]
            if g.improvable and not (g.full and s.early_stopping is True):
                for rank, ((seq, tok, score), end) in enumerate(zip(cands, ends)):
                    if end and rank < g.size:  # only the first num_beams continuations may finish
                        length = len(seq.output) + 1
                        g.finished.append(Hypothesis(score / length ** s.length_penalty, seq.output + [tok], seq, end,
                                                     extended_logprobs(seq, self.rows[seq], tok)))
                g.finished = sorted(g.finished, key=lambda h: -h.score)[:g.slots]
            live = sorted((c for c, end in zip(cands, ends) if end is None), key=lambda c: -c[2])[:g.size]
            generated = len(cands[0][0].output) + 1
            if g.improvable:
                best_len = generated
                if s.early_stopping == "never" and s.length_penalty > 0:  # the longest a hypothesis may grow
                    seq = cands[0][0]
                    best_len = min(seq.max_new_tokens, seq.max_len - len(seq.prompt))
                if g.full:
                    best = live[0][2] / best_len ** s.length_penalty if live else float("-inf")
                    g.improvable = best > g.finished[-1].score
            g.done = not g.improvable or (g.full and s.early_stopping is True) or all(ends) or not live
            g.running = [] if g.done else [[seq, score] for seq, _, score in live]
            for entry, (seq, tok, _) in zip(g.running, live):
                survivors.setdefault(seq, []).append((entry, tok))
                chosen.append(tok)
        changed = self._materialize(core, survivors)
        self.rows.clear()
        if all(g.done for g in self.groups):
            finish_all(req)
        return changed

    def _materialize(self, core, survivors: dict) -> list["Sequence"]:
        """Survivors of each beam fork it; beams without one finish."""
        changed = []
        for parent, row in self.rows.items():
            mine = survivors.get(parent, [])
            parent.paused = False
            if not mine:
                if not parent.finished:
                    parent.finish("abort")
                changed.append(parent)
                continue
            keep_root(parent)
            children = [parent] + [fork(core, parent, self.search.name) for _ in mine[1:]]
            for child, (entry, tok) in zip(children, mine):
                kept = child.commit([tok])
                child.record_logprobs(row, kept)
                entry[0] = child
                changed.append(child)
        return changed

    def outcome(self, req) -> SearchResult:
        hyps = sorted((h for g in self.groups for h in g.finished), key=lambda h: -h.score)
        results = [hypothesis_result(h) for h in hyps]
        if not results:  # aborted before any hypothesis finished
            results = [max(req.sequences, key=lambda q: len(q.output)).result()]
        return SearchResult(results[0], results)
