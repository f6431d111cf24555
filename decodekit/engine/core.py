"""The engine core: requests in, one `step()` at a time, tokens out. Every caller drives this one loop.

`step()` = schedule -> plan drafts -> run one pass -> postprocess (as nano-vllm's): the scheduler picks the running
sequences and prefill chunks; each decoding sequence brings its root token and its own draft tree; the runner
scores every row in one batched pass (or, when every sequence can take plain greedy tokens, runs fused greedy
chunks); each sequence then verifies and commits on its own. Generate, stream, lists of prompts, `n` samples and
the server are all clients of `add` + `step`.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch

from ..constrain.base import Grammar
from ..constrain.state import SAMPLERS, SequenceConstraint
from ..models.batch import RowSpec
from ..kv.paged import PressSpec
from ..models.kv_cache import PoolFull, SeqKV
from ..sampling import SamplingConfig
from ..speculative.base import Drafter, DraftTree, make_drafter
from ..speculative.budget import DraftBudget, StepCosts
from .runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, Status
from .stopping import StopChecker
from .trace import StepTrace


@dataclass
class Request:
    """What a caller asks for; the core turns it into `n` sequences sharing the prompt's KV memory."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    method: str | Drafter = "plain"
    method_options: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    ignore_eos: bool = False
    adaptive: bool | None = None  # the draft budget; default: on unless a seeded sampled run (reproducible tokens)
    verifier: str | None = None
    logprobs: int | None = None  # record each output token's logprob and this many alternatives (0: none)
    press: PressSpec | None = None  # a KV press for every sequence of the request
    # The grammar the output must match (`constrain.Grammar`, compiled: `Engine.make_request` builds it from
    # json_schema= / regex= / grammar= / choice= / response_format=); each sequence takes its own matcher.
    constraint: Grammar | None = None
    constraint_sampler: str = "mask"  # "awrs": plain sampled steps check sampled tokens instead of masking
    policy: Any = None  # a `Policy` (engine/policy.py) that decides for all this request's sequences at once
    # Per-sample hooks of search strategies (search/): `draws(index)` -> sample index's own source of draws
    # (`Sequence.draws`, arithmetic sampling's codes); `token_stat` -> a statistic of each output token's raw
    # distribution (`Sequence.token_stat`, self-certainty). None: off.
    draws: Any = None
    token_stat: Any = None
    trace: bool = False  # record every decode step's shape in `stats.trace` (engine/trace.py)
    id: int = -1
    sequences: list[Sequence] = field(default_factory=list)
    aborted: bool = False

    @property
    def finished(self) -> bool:
        if self.policy is not None and not self.aborted:
            return self.policy.finished(self)
        return (self.aborted or len(self.sequences) == self.n) and all(s.finished for s in self.sequences)


class EngineCore:
    def __init__(self, model, tokenizer, eos_ids: set[int], max_context: int, runner: ModelRunner,
                 config: SchedulerConfig | None = None, max_chunks: int = 16) -> None:
        self.model, self.tokenizer, self.eos_ids, self.max_context = model, tokenizer, eos_ids, max_context
        self.runner = runner
        self.pool = runner.pool
        self.scheduler = Scheduler(self.pool.allocator, config or SchedulerConfig())
        self.max_chunks = max_chunks  # fused greedy chunks per step at most (when no request waits)
        # Per method and options (`method_key`: "pld", "eagle:draft_vocab=8192"): one bound prototype (its learning
        # persists) and the measured step costs its sequences share.
        self.drafters: dict[str, Drafter] = {}
        self.costs: dict[str, StepCosts] = {}
        self.budget_options: dict[str, Any] = {}  # DraftBudget knobs for new sequences (probe_every, decay, ...)
        self.requests: dict[int, Request] = {}
        self._ids = count()
        self._seq_ids = count()

    # ---- requests ----------------------------------------------------------------------------------------------
    def add_all(self, requests: list[Request]) -> None:
        """Queue every request or none: if one is refused, the ones already queued are taken back."""
        added = []
        try:
            for r in requests:
                added.append(self.add(r))
        except BaseException:
            for r in added:
                self.abort(r)
            raise

    def add(self, req: Request) -> Request:
        """Validate and queue a request; raises ValueError (nothing queued) for one that can never run."""
        n_prompt = len(req.prompt_ids)
        if req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        if n_prompt == 0:
            raise ValueError("empty prompt")
        if n_prompt >= self.max_context:
            raise ValueError(f"prompt has {n_prompt} tokens; the model's context window is {self.max_context}")
        if req.n < 1:
            raise ValueError(f"n must be >= 1, got {req.n}")
        if req.press is not None and req.policy is not None:  # policies fork and roll back entries by token count
            raise ValueError("a KV press cannot be combined with a search strategy that decides per pass "
                             "(beam, contrastive, ...) yet; n-sample strategies (best_of_n, ...) work")
        if req.press is not None and self.pool.ring_layers:
            req.press.check_rings(self.pool.ring_layers, self.model.config.num_layers)
        req.sampling.validate()
        if req.constraint_sampler not in SAMPLERS:
            raise ValueError(f"unknown constraint_sampler {req.constraint_sampler!r}; available: {', '.join(SAMPLERS)}")
        if req.trace and req.policy is not None:
            raise ValueError("trace records drafted and verified steps; a search strategy's steps are not traced")
        if req.constraint is not None and req.policy is not None:
            raise ValueError("a constraint cannot be combined with a policy (the policy draws the tokens itself)")
        if req.constraint is not None and req.constraint.matcher().vocab_size != self.model.config.vocab_size:
            raise ValueError(f"the constraint was compiled for a vocabulary of {req.constraint.matcher().vocab_size} "
                             f"tokens; the model has {self.model.config.vocab_size}")
        req.id = next(self._ids)
        seq = self._sequence(req, 0, SeqKV(self.pool))
        self.scheduler.add(seq, seq.max_step_tokens)
        self.requests[req.id] = req
        return req

    @staticmethod
    def method_key(req: Request) -> str:
        """The method as the bench names it, `name` or `name:k=v,...`: each key has its own bound drafter and its own
        step costs (other options draft at another cost and acceptance). An option that is an object (a draft model)
        is named by its identity: its repr would be long, and two models may print alike."""
        if isinstance(req.method, Drafter):
            return req.method.name

        def short(v: Any) -> str:
            return str(v) if isinstance(v, (int, float, str, bool)) else f"{type(v).__name__}@{id(v):x}"
        options = ",".join(f"{k}={short(v)}" for k, v in sorted(req.method_options.items()))
        return f"{req.method}:{options}" if options else req.method

    def _prototype(self, req: Request, key: str) -> Drafter:
        if isinstance(req.method, Drafter):  # the caller's own instance is the prototype
            return req.method.bind(self.engine)
        if key not in self.drafters:
            self.drafters[key] = make_drafter(req.method, dict(req.method_options)).bind(self.engine)
        return self.drafters[key]

    def _sequence(self, req: Request, index: int, kv: SeqKV) -> Sequence:
        sampling = req.sampling
        if index and sampling.seed is not None:  # sample i of a seeded request: what seed + i gives alone
            sampling = SamplingConfig(**{**sampling.__dict__, "seed": sampling.seed + index})
        key = self.method_key(req)
        proto = self._prototype(req, key)
        adaptive = req.adaptive
        if adaptive is None:
            # The budget decides from wall-clock times, and a different draft consumes the random stream
            # differently: a seeded sampled run keeps every draft (same distribution, reproducible tokens).
            adaptive = sampling.greedy or sampling.seed is None
        budget = None
        if adaptive and proto.name != "plain":
            costs = self.costs.setdefault(key, StepCosts())
            budget = DraftBudget(costs=costs, accept=list(costs.accept), **self.budget_options)
        stopper = StopChecker(self.tokenizer, set() if req.ignore_eos else self.eos_ids, req.stop)
        max_len = min(self.max_context, len(req.prompt_ids) + req.max_new_tokens)
        seq = Sequence(next(self._seq_ids), req.prompt_ids, req.max_new_tokens, max_len, sampling,
                       proto.spawn(kv, sampling, req.prompt_ids), budget, stopper, kv, req.verifier, proto.name,
                       self.model.config.vocab_size)
        seq.request, seq.index, seq.method_key = req, index, key
        seq.top_logprobs = req.logprobs
        if req.press is not None:
            seq.press = req.press.state(self.model, len(req.prompt_ids), req.max_new_tokens, self.pool.block_size)
            seq.stats.press = req.press.name
        seq.token_stat = req.token_stat
        if req.trace:
            seq.trace = StepTrace(len(req.prompt_ids), proto.name, self.model.config.num_layers)
            seq.drafter.recorder = seq.trace  # the drafter files the passes it runs (`Drafter.note_pass`)
        seq.draws = req.draws(index) if req.draws is not None else None
        if req.constraint is not None:
            # AWRS replaces the mask only where masking after the sampling rules is the same as before them:
            # sampled, without truncation warpers (they must see the masked logits).
            awrs = req.constraint_sampler == "awrs" and not sampling.greedy and not seq.processor.active and \
                seq.draws is None
            seq.constraint = SequenceConstraint(req.constraint.matcher(), self.pool.k.device, awrs)
        req.sequences.append(seq)
        return seq

    def abort(self, req: Request) -> None:
        """Finish a request's sequences now ("abort"); their KV memory returns at once."""
        req.aborted = True
        for seq in req.sequences:
            if not seq.finished:
                if seq.status == Status.WAITING and seq in self.scheduler.waiting:
                    self.scheduler.waiting.remove(seq)
                    seq.free_kv()
                seq.finish("abort")
        self.scheduler.retire()
        self.requests.pop(req.id, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def engine(self):
        return self._engine

    # ---- the step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Advance every scheduled sequence by one pass (or a few fused greedy chunks); returns the sequences that
        got new tokens or finished."""
        sched = self.scheduler
        widths = {s.id: s.max_step_tokens for s in sched.running if not s.prefilling}
        plan = sched.schedule(widths)
        if not plan:
            return []
        t0 = time.perf_counter()
        batch = len(plan.decodes) + len(plan.prefills)
        planned: dict[int, int | None] = {}  # sequence id -> greedy tokens it can take fused (None: to propose)
        for seq in plan.decodes:
            if seq.budget is not None:
                seq.budget.batch = batch
            planned[seq.id] = seq.plan(self.runner.fused_sizes, self.runner.drafts_on_device)
        planned.update(self._propose([s for s in plan.decodes if planned[s.id] is None]))
        fusable = [planned[s.id] for s in plan.decodes]
        updated: list[Sequence] = []
        if plan.decodes and not plan.prefills and self.runner.fused_sizes and min(fusable) >= 1:
            updated = self._fused_step(plan.decodes, min(fusable), t0)
        if not updated:
            updated = self._verified_step(plan, t0)
        for seq in updated:
            seq.press_kv()  # a KV press acts on the memory the step left (and the bytes held are recorded)
            if not seq.finished and self.scheduler.config.prefix_caching:
                seq.kv.register_full_blocks(seq.tokens)
        sched.retire()
        for seq in sched.running:
            seq.kv.trim()
        return updated

    def _propose(self, seqs: list[Sequence]) -> dict[int, int]:
        """The drafts of the sequences whose drafters propose this step, one `propose_together` call per method (a
        drafter that runs a model drafts for all its sequences in one batched pass); each sequence's plan is then
        finished. Returns what each one's plan returns (`Sequence.take_proposal`)."""
        groups: dict[str, list[Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.method_key, []).append(seq)
        fusable = {}
        for group in groups.values():
            t0 = time.perf_counter()
            trees = group[0].drafter.propose_together([s.drafter for s in group], [s.tokens for s in group])
            seconds = (time.perf_counter() - t0) / len(group)
            for seq, tree in zip(group, trees):
                fusable[seq.id] = seq.take_proposal(tree, self.runner.fused_sizes, seconds)
        return fusable

    def _verified_step(self, plan, t0: float) -> list[Sequence]:
        specs: list[RowSpec] = []
        for seq, n in plan.prefills:
            start = seq.kv.written  # the next token to write (entries held may be fewer: a press evicted some)
            last = start + n == seq.prefill_end and not seq.output and not seq.prompt_root
            positions = list(range(start, start + n))
            specs.append(RowSpec(seq.kv, seq.tokens[start:start + n], positions, None, "last" if last else "none",
                                 seq.observer(True, positions)))
        for seq in plan.decodes:
            tokens, positions, mask = seq.step_tokens()
            specs.append(RowSpec(seq.kv, tokens, positions, mask, "all", seq.observer(False, positions)))
        last = [spec.logits == "last" for spec in specs[:len(plan.prefills)]]  # the chunk that ends the prompt
        for seq, spec in zip([s for s, _ in plan.prefills] + plan.decodes, specs):
            spec.hidden_layers = seq.hidden_layers
            if seq.hidden_layers:  # features of every prompt token: a drafter that reads them keeps its own cache
                spec.logits = "all"
        t_run = time.perf_counter()
        layers = tuple(sorted({i for s in plan.decodes + [s for s, _ in plan.prefills] for i in s.hidden_layers}))
        out = self.runner.run(specs, layers)
        logits, hidden = out if layers else (out, None)
        # On a GPU the pass runs asynchronously until the first host read below: grammar masks are computed on the
        # CPU meanwhile and copied to the device (constrained sequences only; the others return at once).
        for seq in [s for (s, _), ends in zip(plan.prefills, last) if ends] + plan.decodes:
            seq.prepare_masks()
        device_path = [s for s in plan.decodes if not s.needs_host_logits]
        best = logits.argmax(-1).tolist() if device_path else None  # one sync for every greedy sequence
        elapsed_run = time.perf_counter() - t_run
        updated = []
        decided: dict[int, dict[Sequence, tuple]] = {}  # request id -> its sequences' rows, for its policy

        def rows_of(spec, n):
            a = spec.first_logit
            return logits[a:a + n], None if hidden is None else self._hidden_rows(hidden, layers, spec, a, n)

        for (seq, n), spec, ends in zip(plan.prefills, specs, last):
            seq.kv.length += n
            seq.stats.forward_passes += 1
            rows, feats = rows_of(spec, n if spec.logits == "all" else 1)
            if seq.hidden_layers and seq.request.policy is None:
                seq.drafter.prefill_features(feats)  # a drafter that reads the target's features sees the prompt's
            elif seq.hidden_layers:
                seq.request.policy.prefill_features(seq, feats)
            if ends and seq.request.policy is not None:
                decided.setdefault(seq.request.id, {})[seq] = (rows[-1:], None if feats is None else feats[-1:])
            elif ends:
                first = seq.first_token(rows[-1:])
                seq.commit(first)
                updated.append(seq)
                if seq.request.n > 1 and seq.index == 0:
                    updated += self._fork(seq, rows[-1:])
        for seq, spec in zip(plan.decodes, specs[len(plan.prefills):]):
            start, width = seq.kv.length, len(spec.tokens)
            seq.kv.length += width
            if seq.request.policy is not None:
                decided.setdefault(seq.request.id, {})[seq] = rows_of(spec, width)
                seq.stats.forward_passes += 1
                seq.stats.decode_steps += 1
                continue
            rows, feats = rows_of(spec, width)
            host = seq.needs_host_logits
            accepted, next_token = seq.verify(rows if host else None,
                                              None if host else best[spec.first_logit:spec.first_logit + width])
            seq.kv.keep_path(start, [0, *accepted])
            if spec.observer is not None:
                spec.observer.kept([0, *accepted])
            kept = seq.commit([seq.tree.tokens[i - 1] for i in accepted] + [next_token])
            seq.stats.forward_passes += 1
            seq.stats.decode_steps += 1
            seq.stats.verify_time_s += elapsed_run
            seq.after_verify(accepted, next_token, rows, feats, len(kept))
            updated.append(seq)
        for rid, rows in decided.items():
            req = next(iter(rows)).request
            updated += req.policy.step(self, req, rows)
        elapsed = time.perf_counter() - t0
        width = max((len(s.tokens) for s in specs[len(plan.prefills):]), default=1)
        for costs in {id(s.budget.costs): s.budget.costs for s in plan.decodes if s.budget is not None}.values():
            costs.record(len(specs), width, elapsed)
        return updated

    @staticmethod
    def _hidden_rows(hidden: torch.Tensor, layers: tuple[int, ...], spec: RowSpec, start: int, n: int):
        """The rows of a spec's hidden states, in the order of the layers its sequence asked for."""
        want = spec.hidden_layers
        if not want:  # a batch mixing sequences that need features (heads) with ones that do not
            return None
        size = hidden.shape[-1] // len(layers)
        cols = [hidden[start:start + n, layers.index(i) * size:(layers.index(i) + 1) * size] for i in want]
        return torch.cat(cols, dim=-1) if len(cols) > 1 else cols[0]

    def _round_depth(self, seqs: list[Sequence]) -> int:
        """How deep fused draft rounds draft now (0: plain chunks). Rounds need every sequence on one device
        drafter (one method with one set of options); the first sequence's budget decides for the batch (each one
        still learns its own acceptance). A budget's no marks them `refused`."""
        lead = seqs[0]
        if not self.runner.drafts_on_device or not lead.drafter.drafts_on_device or \
                len({s.method_key for s in seqs}) > 1:
            return 0
        depth = lead.drafter.max_draft_tokens()
        if lead.budget is not None:
            depth = lead.budget.chain_depth(depth)
            for s in seqs:
                s.refused = not depth
        if not depth or any(s.kv.max_pass is not None and self.runner.draft_width(depth) > s.kv.max_pass
                            for s in seqs):  # a sliding-window ring takes passes up to its max_pass wide
            return 0
        return depth

    def _draft_rounds(self, seqs: list[Sequence], depth: int, t0: float) -> list[Sequence]:
        """Fused draft rounds (`GraphRunner.draft_rounds`: draft, verify and commit on the device, several rounds per
        replay) for greedy sequences whose drafter drafts on the device; [] when there is no room for one replay."""
        rounds, width = self.runner.rounds_per_replay, self.runner.draft_width(depth)
        limit = min(self.max_context - len(s.tokens) for s in seqs)  # positions stay inside the context window
        want = max(s.room for s in seqs)  # a round commits at least one token
        # Entries reserved ahead (every round may keep its whole width) set the KV length the captured pass reads:
        # no longer than plain chunks reserve, so the rounds' attention spans what plain decoding's does; within it
        # as many replays as fit (a longer step, fewer step boundaries: rows that finish leave on the device).
        ahead = self.runner.replays_within(max(s.kv.length for s in seqs), rounds * width,
                                           max(1, self.runner.fused_sizes[0] * self.max_chunks // (rounds * width)))
        chunks = max(1, min(want // rounds, limit // (rounds * width), ahead,
                            1 if self.scheduler.waiting else self.max_chunks))
        if limit < rounds * width:
            return []
        chunks = self._reserve(seqs, rounds * width, chunks)
        if not chunks:
            return []
        run = self.runner.draft_rounds([s.kv for s in seqs], [s.tokens for s in seqs], seqs[0].drafter, depth,
                                       rounds, chunks, live=lambda: [not s.finished for s in seqs])
        done = 0
        try:
            for rows in run:
                done += 1
                for seq, row in zip(seqs, rows):
                    for draft, new in row:
                        if seq.finished:
                            break
                        seq.tree = DraftTree.chain(draft)
                        kept = seq.commit(new)
                        seq.stats.forward_passes += 1
                        seq.stats.decode_steps += 1
                        seq.after_verify(list(range(1, len(new))), new[-1], None, None, len(kept))
                if self._stop_early(seqs):
                    break
        finally:
            run.close()
        elapsed = time.perf_counter() - t0
        for s in seqs:
            s.stats.verify_time_s += elapsed
        self._record_cost(seqs, width, elapsed / (done * rounds))  # a round's cost: draft, verify, accept
        return list(seqs)

    def fork_sequence(self, seq: Sequence) -> Sequence:
        """A running copy of `seq`: the same tokens, its KV memory shared (full blocks) or copied (a partial last
        block), its own stop rules and random stream from here on. Raises PoolFull when no block is free."""
        child = copy.copy(seq)
        child.id = next(self._seq_ids)
        child.kv = seq.kv.fork()
        child.tokens = list(seq.tokens)
        child.stopper = seq.stopper.fork()
        child.stats = dataclasses.replace(seq.stats)
        child.logprobs = list(seq.logprobs)
        child.token_stats = list(seq.token_stats)
        child.draws = copy.deepcopy(seq.draws)
        child.paused = False
        child.accepted_at, child.proposed_at = list(seq.accepted_at), list(seq.proposed_at)
        child.generator = torch.Generator(device=seq.generator.device)
        child.generator.set_state(seq.generator.get_state())
        if seq.drafter.name != "plain":
            raise ValueError("only sequences decoding without a drafter can be forked mid-generation")
        self.scheduler.add_running(child)
        return child

    def _fork(self, parent: Sequence, logits: torch.Tensor) -> list[Sequence]:
        """The other samples of the parent's request, sharing its prompt's KV memory, each with its first token."""
        children = []
        req = parent.request
        for index in range(1, req.n):
            try:
                kv = parent.kv.fork()
            except PoolFull:  # no block for the copied partial block: this sample prefills the prompt itself
                self.scheduler.add(self._sequence(req, index, SeqKV(self.pool)), 1)
                continue
            child = self._sequence(req, index, kv)
            if parent.press is not None:  # what the press gathered from the prompt's passes, for this sample too
                child.press = parent.press.fork()
            child.stats.forward_passes = 1
            child.commit(child.first_token(logits))
            self.scheduler.add_running(child)
            children.append(child)
        return children

    def _reserve(self, seqs: list[Sequence], per_chunk: int, chunks: int) -> int:
        """Reserve KV entries for `chunks` fused chunks of `per_chunk` entries in every sequence, halving the chunks
        while the pool is full; returns how many were reserved for (0: not even one)."""
        while chunks:
            try:
                for s in seqs:
                    s.kv.ensure(s.kv.length + per_chunk * chunks)
                return chunks
            except PoolFull:
                chunks //= 2
        return 0

    def _stop_early(self, seqs: list[Sequence]) -> bool:
        """Between fused chunks: stop once every sequence is done, or one is and a request waits for its memory."""
        return all(s.finished for s in seqs) or bool(self.scheduler.waiting) and any(s.finished for s in seqs)

    @staticmethod
    def _record_cost(seqs: list[Sequence], width: int, seconds: float) -> None:
        """What a pass of `width` tokens per row cost, once per method's step costs in the batch."""
        for costs in {id(s.budget.costs): s.budget.costs for s in seqs if s.budget is not None}.values():
            costs.record(len(seqs), width, seconds)

    def _fused_step(self, seqs: list[Sequence], fusable: int, t0: float) -> list[Sequence]:
        """Greedy tokens for every sequence in fused chunks, back to back up to what every sequence can take: draft
        rounds when they all draft on the device with one method (a round stops a sequence wherever it ends), else
        plain chunks (several steps per replay, argmax on the device); [] when there is no room for even one chunk,
        or a sequence can take fewer tokens than the shortest chunk."""
        sizes = self.runner.fused_sizes
        depth = self._round_depth(seqs)
        if depth:
            return self._draft_rounds(seqs, depth, t0)
        if fusable < sizes[-1]:
            return []
        if seqs[0].refused:  # the budget said no to drafting: plain chunks up to its next probe
            fusable = min(fusable, sizes[0] * (1 + seqs[0].budget.quiet_steps()))
        steps = next(s for s in sizes if s <= fusable)
        limit = min(self.max_context - len(s.tokens) for s in seqs)  # positions stay inside the context window
        want = max(s.room for s in seqs)
        chunks = max(1, min(fusable // steps, want // steps, limit // steps,
                            1 if self.scheduler.waiting else self.max_chunks))
        if limit < steps:
            return []
        chunks = self._reserve(seqs, steps, chunks)
        if not chunks:
            return []
        run = self.runner.greedy_chunks([s.kv for s in seqs], [s.tokens[-1] for s in seqs],
                                        [len(s.tokens) - 1 for s in seqs], steps, chunks,
                                        live=lambda: [not s.finished for s in seqs])
        done = 0
        kept_by = {seq.id: 0 for seq in seqs}
        try:
            for i, tokens in enumerate(run):
                done += 1
                for seq, new in zip(seqs, tokens):
                    if seq.finished:
                        continue
                    if seq.refused and i:
                        seq.budget.skip(1)
                    kept = seq.commit(new)
                    kept_by[seq.id] += len(kept)
                    seq.stats.decode_steps += len(kept)
                    seq.stats.forward_passes += steps
                if self._stop_early(seqs):
                    break
        finally:
            run.close()  # a chunk launched ahead and not consumed is rolled back by the runner
        elapsed = time.perf_counter() - t0
        self._record_cost(seqs, 1, elapsed / (done * steps))  # the plain rate a draft must beat: per token
        for seq in seqs:
            seq.fused_done(steps, done, kept_by[seq.id])
            if seq.budget is not None:
                seq.budget.record(seq.tree, 0, 1)
        return list(seqs)
