"""One sequence's whole state: tokens, KV memory, sampling rule, drafter and its budget, stop rules, stats.

The engine's step asks each running sequence what it brings to the pass (`plan`: a draft tree, or how many plain
greedy tokens it can take in fused chunks) and hands each its share of the pass's logits (`commit`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from ..models.kv_cache import SeqKV
from ..sampling import LogitsProcessor, SamplingConfig
from ..speculative.base import DraftTree, Drafter, StepResult
from ..speculative.budget import DraftBudget, cut_tree
from ..speculative.verify import pick_verifier
from .stopping import StopChecker
from .trace import StepTrace

if TYPE_CHECKING:  # pragma: no cover
    from ..constrain.state import SequenceConstraint


class Status(Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV memory was given back)
    RUNNING = "running"  # admitted: prefilling or decoding
    FINISHED = "finished"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0  # from the request's arrival
    total_time_s: float = 0.0
    tokens_per_s: float = 0.0  # generated tokens after the first / time after the first token
    forward_passes: int = 0  # target forward passes this sequence took part in, prefill chunks included
    decode_steps: int = 0  # target forward passes after the first token (a fused chunk counts each of its steps)
    tau: float = 1.0  # mean tokens committed per decode step (accepted draft tokens + 1)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    accepted_by_position: list[float] = field(default_factory=list)  # acceptance rate of draft depth 1, 2, ...
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    preemptions: int = 0
    method: str = "plain"
    press: str | None = None  # the KV press (`press=`), if any
    # KV memory of this sequence, in bytes: held (pool blocks it owns or shares, its sliding-window rings, plus what
    # a press keeps packed outside the pool) at its largest and at the end, and what its written tokens take
    # uncompressed (same blocks and rings).
    kv_bytes_peak: int = 0
    kv_bytes_final: int = 0
    kv_bytes_uncompressed: int = 0
    jump_forward_tokens: int = 0  # tokens the grammar forced, accepted as free drafts (constrained requests)
    grammar_time_s: float = 0.0  # host time spent on the grammar: masks, checks, pruning, jump-forward
    grammar_masks: int = 0  # next-token masks computed (AWRS steps compute none unless they fall back)
    score: float | None = None  # a search strategy's score of this sequence (search/: beam score, vote share, ...)
    trace: dict[str, Any] | None = None  # every decode step's shape (`generate(..., trace=True)`; engine/trace.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "abort" | "running" (while streaming)
    stats: GenerationStats
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = field(default=None, repr=False)  # if asked


def logprob_entries(logp: torch.Tensor, tokens: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per token: its log-probability in the matching row of `logp` `[n, V]`, and the `k` most likely alternatives."""
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top = logp.topk(k, -1) if k else None
    return [(lp, list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else [])
            for i, lp in enumerate(chosen)]


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


class Sequence:
    """A request's sequence (one of its `n` samples). `tokens` is prompt + output; its last token is the *root*,
    whose KV is not yet written, except before the first token, when the whole prompt is still to prefill."""

    def __init__(self, seq_id: int, prompt: list[int], max_new_tokens: int, max_len: int, sampling: SamplingConfig,
                 drafter: Drafter, budget: DraftBudget | None, stopper: StopChecker, kv: SeqKV,
                 verifier: str | None = None, method: str = "plain", vocab_size: int = 0) -> None:
        self.id = seq_id
        self.prompt = list(prompt)
        self.tokens = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.max_len = max_len  # total tokens (prompt + output) allowed: the context window, or prompt + max new
        self.sampling = sampling
        self.processor = LogitsProcessor(sampling)
        self.generator = make_generator(kv.pool.k.device, sampling.seed)
        self.drafter, self.budget, self.stopper, self.kv = drafter, budget, stopper, kv
        self.verifier = verifier
        self.vocab_size = vocab_size
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stats = GenerationStats(prompt_tokens=len(prompt), method=method)
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.tree = DraftTree()  # this step's draft
        self.proposed = DraftTree()  # what the drafter offered before the budget cut it
        self.refused = False  # the budget held the drafter back this step
        self.accepted_at: list[int] = []
        self.proposed_at: list[int] = []
        self.request: Any = None  # the engine's request this sequence belongs to
        self.index = 0  # which of the request's samples
        self.method_key = ""  # the request's method and options (`EngineCore.method_key`), set by the core
        self.top_logprobs: int | None = None  # record logprobs of committed tokens (and this many alternatives)
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # per output token: its logprob, top-k
        self.press: Any = None  # a KV press's state (`kv.paged.PressState`), or None
        self.constraint: SequenceConstraint | None = None  # the grammar the output must match, if any
        self.jumped = False  # this step's draft is the grammar's forced chain (jump-forward), not the drafter's
        # A per-token statistic of the raw distribution each output token was drawn from (`stat(logp [k, V],
        # tokens) -> k floats`, e.g. self-certainty for best-of-n), gathered in `token_stats`; None: off.
        self.token_stat: Any = None
        self.token_stats: list[float] = []
        # The sample's own source of draws (`draws.sample(probs [V]) -> token`, e.g. arithmetic sampling's code);
        # None: multinomial draws from `generator`.
        self.draws: Any = None
        self.trace: StepTrace | None = None  # records each step's shape (`trace=True`), for bench/trace_replay.py
        self.paused = False  # a policy holds this sequence back from passes (it keeps its KV memory)
        # A policy made the prompt's last token the root (its entry rolled back): decoding starts there, with the
        # candidates the policy plans under it, instead of with a first token drawn from the prompt's logits.
        self.prompt_root = False

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def prefill_end(self) -> int:
        """KV entries to write before decoding: the whole prompt for a new sequence (its last logits give the first
        token), else everything but the root (a preempted sequence resuming, or a policy's `prompt_root`)."""
        return len(self.tokens) if not self.output and not self.prompt_root else len(self.tokens) - 1

    @property
    def prefilling(self) -> bool:
        return self.kv.written < self.prefill_end

    @property
    def observed(self) -> bool:
        """A KV press takes part in this sequence's decode passes: they run eagerly, on the masked attention path."""
        return self.press is not None and self.press.observed(self.kv)

    @property
    def adopts_prefix(self) -> bool:
        """Whether the prompt may come from the prefix cache: not when a press must see the prompt's passes, nor when
        a drafter or policy reads the hidden states of every prompt token (a cached prefix has none to give)."""
        return (self.press is None or not self.press.observes_prefill) and not self.hidden_layers and \
            self.kv.shares_prefixes

    def observer(self, prefill: bool, positions: list[int]):
        """The press's part in this pass's row (None: plain attention)."""
        return None if self.press is None else self.press.observer(self.kv, positions, prefill)

    def press_kv(self) -> None:
        """After a step: the press acts on the KV memory (evicts, packs); the memory held is recorded around it."""
        self.note_kv()
        if self.press is not None and not self.finished:
            self.press.after_step(self.kv)
            self.note_kv()

    def note_kv(self) -> None:
        kv, s = self.kv, self.stats
        held = kv.held_bytes() + (self.press.held_outside() if self.press is not None else 0)
        s.kv_bytes_final = held
        s.kv_bytes_peak = max(s.kv_bytes_peak, held)
        s.kv_bytes_uncompressed = kv.bytes_for(kv.written)

    def free_kv(self) -> None:
        """Give the KV memory back (preemption: the sequence prefills again later, its press starts over)."""
        self.kv.free()
        if self.press is not None:
            self.press.reset()

    @property
    def room(self) -> int:
        """Tokens that may still be appended."""
        return min(self.max_len - len(self.tokens), self.max_new_tokens - len(self.output))

    @property
    def policy(self):
        return None if self.request is None else self.request.policy

    @property
    def max_step_tokens(self) -> int:
        """KV entries one pass of this sequence may write: the root and the largest draft (or policy candidates);
        under a grammar the forced tokens may be longer than the drafter's largest draft."""
        if self.policy is not None:
            return 1 + self.policy.max_nodes
        forced = self.constraint.max_draft_tokens() if self.constraint is not None else 0
        return 1 + max(self.drafter.max_draft_tokens(), forced)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Layers whose hidden states this sequence's policy or drafter reads from each pass."""
        owner = self.policy if self.policy is not None else self.drafter
        return tuple(getattr(owner, "feature_layers", ()))

    @property
    def needs_host_logits(self) -> bool:
        """The one rule for when a step's logits must come to the host: sampling, penalties, constraints, or a
        policy deciding. Without them a step needs only the argmax, which stays on the device (greedy chunks fuse)."""
        return not self.sampling.greedy or self.sampling.has_penalties or self.constraint is not None or \
            self.policy is not None

    # ---- the step --------------------------------------------------------------------------------------------
    def plan(self, fused_sizes: tuple[int, ...], draft_rounds: bool = False) -> int | None:
        """Start deciding this step's draft (`self.tree`). Returns how many greedy tokens the sequence can take in
        fused chunks instead (0: it needs a verified step, with `self.tree`, possibly empty), or None when its drafter
        is to propose: the core gathers the proposals of a step's sequences (`Drafter.propose_together`, one batched
        draft pass for drafters that run a model) and hands each to `take_proposal`. `draft_rounds`: the runner drafts
        on the device, so a drafter that can (`drafts_on_device`) leaves its drafts to the fused step."""
        self.tree = self.proposed = DraftTree()
        self.refused = self.jumped = False
        if self.policy is not None:  # the policy's candidates to score beside the root (contrastive search ...)
            self.tree = self.policy.plan(self)
            return 0
        fusable = self.fusable(fused_sizes)
        if self.drafter.name == "plain" or draft_rounds and fusable and self.drafter.drafts_on_device:
            self._constrain_draft()
            return self.room if fusable else 0
        budget = self.budget
        if budget is not None and not budget.should_draft():
            self.refused = True
            self._constrain_draft()
            return fused_sizes[0] * (1 + budget.quiet_steps()) if fusable else 0
        return None

    def fusable(self, fused_sizes: tuple[int, ...]) -> bool:
        """Whether the sequence's greedy tokens may come from fused chunks (nothing needs a step's logits)."""
        return bool(fused_sizes) and not self.needs_host_logits and self.top_logprobs is None and \
            self.token_stat is None and not self.hidden_layers and not self.observed

    def take_proposal(self, proposed: DraftTree, fused_sizes: tuple[int, ...], seconds: float) -> int:
        """Finish `plan` with the drafter's proposal (drafted in `seconds`): the budget's cut, the end of the output,
        the grammar; returns what `plan` returns."""
        self.proposed = proposed
        budget = self.budget
        tree = budget.trim(proposed) if budget is not None and len(proposed) else proposed
        # Never past the end: at most room - 1 nodes deep (the step adds accepted + 1 tokens).
        depths = tree.depths()
        if len(tree) and max(depths) > self.room - 1:
            tree = cut_tree(tree, self.room - 1)
        self.tree = tree
        self.stats.draft_time_s += seconds
        self._constrain_draft()
        if len(self.tree) or not self.fusable(fused_sizes):
            return 0
        if not len(proposed) and self.drafter.learns_from_steps:
            return 0  # it learns from the target's logits: a verified step
        # The budget cut the draft away (a long chunk) or there was none (a short one: a match may start soon).
        return fused_sizes[0] if len(proposed) else fused_sizes[-1]

    def _constrain_draft(self) -> None:
        """Under a grammar: prune the draft's breaking nodes, or draft the tokens the grammar forces."""
        if self.constraint is not None:
            self.tree, self.jumped = self.constraint.shape(self.tree, self.room)

    def prepare_masks(self) -> None:
        """Start this step's grammar masks (the core calls this while the device runs the pass)."""
        if self.constraint is not None:
            self.constraint.prepare(self.tree)

    def step_tokens(self) -> tuple[list[int], list[int], torch.Tensor | None]:
        """Tokens, positions and ancestor mask this sequence feeds the verified pass: root + draft tree."""
        tree = self.tree
        root = len(self.tokens) - 1
        positions = [root + d for d in tree.depths()]
        mask = None if tree.is_chain() else tree.ancestor_mask()
        return [self.tokens[-1], *tree.tokens], positions, mask

    def first_token(self, logits: torch.Tensor) -> list[int]:
        """Sample the first token from the prompt's last logits `[1, V]`."""
        token = self._awrs_token(logits)
        if token is None:
            probs = self._probs(logits, self.tree)
            if self.draws is not None and not self.sampling.greedy:
                token = self.draws.sample(probs[0])
            else:
                token = int(self.processor.sample(probs, self.generator)[0])
        self.record_logprobs(logits, [token])
        return [token]

    def _probs(self, logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """The distribution at the root and every node of `tree`: the grammar's mask, penalties, sampling rules."""
        if self.constraint is not None:
            logits = self.constraint.mask(logits, tree)
        seen, counts = self._penalty_inputs(tree)
        return self.processor.probs(logits.float(), seen, counts)

    def _awrs_token(self, logits: torch.Tensor) -> int | None:
        """A plain step's token by AWRS (the grammar checks sampled tokens only), when this sequence uses it."""
        if self.constraint is None or not self.constraint.uses_awrs(self.tree):
            return None
        seen, counts = self._penalty_inputs(self.tree)
        return self.constraint.awrs_sample(self.processor.probs(logits.float(), seen, counts)[0], self.generator)

    def record_logprobs(self, rows: torch.Tensor, tokens: list[int]) -> None:
        """Log-probabilities of the model (raw logits, before sampling rules) for `tokens`, each drawn after the
        matching row of `rows`, with the `top_logprobs` most likely alternatives (and `token_stat` of each row)."""
        if (self.top_logprobs is None and self.token_stat is None) or not tokens:
            return
        logp = rows[:len(tokens)].float().log_softmax(-1)
        if self.token_stat is not None:
            self.token_stats += self.token_stat(logp, tokens)
        if self.top_logprobs is not None:
            self.logprobs += logprob_entries(logp, tokens, self.top_logprobs)

    def next_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling rules applied to the root's raw logits `[1, V]`: penalties over this sequence's tokens, then
        (unless greedy) temperature and warpers. What a policy scores candidates with (float32)."""
        seen, counts = self._penalty_inputs(DraftTree())
        return self.processor.process(logits.float(), seen, counts)

    def verify(self, logits: torch.Tensor | None, best: list[int] | None) -> tuple[list[int], int]:
        """Accepted nodes and the next token, from this sequence's rows of the pass: `logits` `[n+1, V]` when it
        needs host processing, else the device's argmax per row (`best`)."""
        tree = self.tree
        if logits is None:
            kids, node, accepted = tree.children(), 0, []
            while True:
                match = next((c for c in kids[node] if tree.tokens[c - 1] == best[node]), None)
                if match is None:
                    return accepted, best[node]
                accepted.append(match)
                node = match
        token = self._awrs_token(logits)
        if token is not None:
            return [], token
        probs = self._probs(logits, tree)
        if self.draws is not None and not self.sampling.greedy:
            return self._verify_by_draws(tree, probs)
        verify = pick_verifier(self.verifier, self.sampling.greedy, tree)
        return verify(tree, probs, self.generator)

    def _verify_by_draws(self, tree: DraftTree, probs: torch.Tensor) -> tuple[list[int], int]:
        """The sample's own draw at each node, following a draft child while it matches: the tokens are exactly those
        decoding without a draft would draw from the same source (lossless for any draft; arithmetic codes stay
        consumed in order)."""
        kids, node, accepted = tree.children(), 0, []
        while True:
            token = self.draws.sample(probs[node])
            match = next((c for c in kids[node] if tree.tokens[c - 1] == token), None)
            if match is None:
                return accepted, token
            accepted.append(match)
            node = match

    def commit(self, new: list[int]) -> list[int]:
        """Append committed tokens through the stop rules; returns the ones kept (the output ends at a stop)."""
        kept = new[:max(self.room, 0)]
        if kept and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        grammar_end = False
        if self.constraint is not None:  # the output ends where the grammar does
            kept, grammar_end = self.constraint.advance(kept)
        end = self.stopper.push_many(kept)
        if end is not None:
            kept = kept[:end + 1]
        self.tokens += kept
        if end is not None or grammar_end:
            self.finish("stop")
        elif self.room <= 0:
            self.finish("length")
        return kept

    def after_verify(self, accepted: list[int], next_token: int, logits: torch.Tensor | None,
                     hidden: torch.Tensor | None = None, committed: int | None = None) -> None:
        """Bookkeeping after a verified step (`committed`: tokens it kept): acceptance stats, budget, the trace, and
        what the drafter learns."""
        tree = self.tree
        if self.trace is not None:
            self.trace.verified(tree.parents, tree.is_chain(), len(accepted),
                                len(accepted) + 1 if committed is None else committed)
        if self.jumped:  # the grammar's draft, not the drafter's: neither its statistics nor its budget
            self.stats.jump_forward_tokens += len(accepted)
            tree = DraftTree()
        depths = tree.depths()
        for d in range(1, max(depths, default=0) + 1):
            if d > len(self.proposed_at):
                self.proposed_at.append(0)
                self.accepted_at.append(0)
            self.proposed_at[d - 1] += 1
            self.accepted_at[d - 1] += int(len(accepted) >= d)
        if self.budget is not None and not self.jumped:
            self.budget.record(tree, len(accepted), len(tree) + 1)
        if (self.top_logprobs is not None or self.token_stat is not None) and logits is not None:
            # token j was drawn at the row of its parent (of the step's tree: the drafter's or the grammar's)
            committed = [self.tree.tokens[i - 1] for i in accepted] + [next_token]
            recorded = len(self.logprobs) if self.top_logprobs is not None else len(self.token_stats)
            self.record_logprobs(logits[[0, *accepted]], committed[:len(self.output) - recorded])
        if self.drafter.name != "plain" and not self.finished and not self.jumped:
            self.drafter.observe(self.tokens, StepResult(tree, accepted, next_token, logits, hidden))

    def fused_done(self, steps: int, chunks: int, committed: int) -> None:
        """After fused greedy chunks: `chunks` replays of `steps` single-token passes, `committed` tokens kept."""
        if self.trace is not None:
            self.trace.fused(steps, chunks, committed)

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        if self.budget is not None:  # what this sequence learned of the method's acceptance carries over
            self.budget.costs.accept = list(self.budget.accept)
        self.drafter.finish(self.tokens)

    def _penalty_inputs(self, tree: DraftTree):
        """Per-node repetition context: committed tokens plus each node's draft ancestors."""
        if not self.sampling.has_penalties:
            return None, None
        vocab, dev = self.vocab_size, self.kv.pool.k.device
        output = self.output
        out_counts = torch.bincount(torch.tensor(output, device=dev, dtype=torch.long), minlength=vocab).float()
        prompt_seen = torch.zeros(vocab, device=dev, dtype=torch.bool)
        prompt_seen[torch.tensor(self.prompt, device=dev, dtype=torch.long)] = True
        counts = out_counts.expand(len(tree) + 1, vocab).clone()
        if len(tree):
            anc = tree.ancestor_mask()[:, 1:].float().to(dev)  # draft ancestors of each node, root excluded
            onehot = torch.nn.functional.one_hot(torch.tensor(tree.tokens, device=dev), vocab).float()
            counts += anc @ onehot
        return prompt_seen[None] | (counts > 0), counts

    # ---- results ---------------------------------------------------------------------------------------------
    def result(self) -> GenerationResult:
        s = self.stats
        now = self.finished_at or time.perf_counter()
        s.generated_tokens = len(self.output)
        s.total_time_s = now - self.arrival
        if self.first_token_at is not None:
            s.time_to_first_token_s = self.first_token_at - self.arrival
            decode_time = now - self.first_token_at
            s.tokens_per_s = (len(self.output) - 1) / decode_time if decode_time > 0 and len(self.output) > 1 else 0.0
        s.tau = (len(self.output) - 1) / s.decode_steps if s.decode_steps else 1.0
        s.accepted_by_position = [a / p for a, p in zip(self.accepted_at, self.proposed_at)]
        if self.constraint is not None:
            s.grammar_time_s, s.grammar_masks = self.constraint.time_s, self.constraint.mask_rows
        if self.trace is not None:
            s.trace = self.trace.to_dict(s.cached_prompt_tokens)
        reason = self.finish_reason or "running"
        return GenerationResult(self.stopper.text if self.finished else self.stopper.visible(), list(self.output),
                                reason, s, list(self.prompt),
                                list(self.logprobs) if self.top_logprobs is not None else None)
