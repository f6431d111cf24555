"""Which sequences take part in the next pass, and how much of each prompt it prefills.

Two queues, as nano-vllm: `waiting` (not admitted, or preempted) and `running`. Each step every running sequence
gets KV room for its root and the largest draft it may bring; a sequence still prefilling gets a chunk, and waiting
sequences are admitted while the step's token budget, the running limit and free KV blocks allow (long prompts in
chunks beside running decodes, as SARATHI; with sliding-window rings, chunks of at most the ring's pass width, and
a ring's blocks count as KV blocks). When the pool runs dry the newest running sequence is preempted: its blocks
go back to the pool and it re-prefills later (its tokens are kept). A request larger than the whole pool is
refused when added, so a full pool makes requests wait but never stalls for good.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..models.kv_cache import BlockAllocator, PoolFull
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_running: int = 256  # sequences in one pass at most
    max_step_tokens: int = 2048  # tokens per pass at most (decode rows + prefill chunks): the prefill chunk budget
    prefix_caching: bool = True


@dataclass
class StepPlan:
    decodes: list[Sequence] = field(default_factory=list)  # running sequences past their prompt: a verified step
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens of its prompt this pass)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, config: SchedulerConfig) -> None:
        self.alloc, self.config = allocator, config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence, headroom: int) -> None:
        """Queue a sequence; refuse at once one that could never fit the pool even alone."""
        need = -(-(seq.max_len + headroom) // self.alloc.block_size)
        widest = seq.kv.max_pass
        if widest is not None and headroom > widest:
            raise ValueError(f"a decode pass of this request writes up to {headroom} KV entries (root + draft), more "
                             f"than the sliding-window ring allows ({widest}); load with a larger ring_pass, or "
                             "window_ring=False")
        if need > self.alloc.capacity:
            raise ValueError(f"request needs {seq.max_len + headroom} KV slots (prompt + max new tokens + draft), more "
                             f"than the whole KV pool ({self.alloc.capacity * self.alloc.block_size}); lower "
                             "max_new_tokens or load with a larger kv_tokens")
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork that already holds its KV memory (a sample of a request whose prompt was just prefilled)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.free_kv()
        seq.status = Status.WAITING
        seq.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, entries: int) -> bool:
        """Give `seq` room for `entries` KV entries, preempting newer sequences while the pool is dry."""
        while True:
            try:
                seq.kv.ensure(entries)
                return True
            except PoolFull:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    return False

    def schedule(self, step_width: dict[int, int]) -> StepPlan:
        """`step_width[seq.id]`: KV entries a decoding sequence may write this pass (root + largest draft)."""
        plan = StepPlan()
        budget = self.config.max_step_tokens
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.paused:  # preempted while reserving, or held back by a policy
                continue
            if seq.prefilling:
                n = min(seq.prefill_end - seq.kv.written, budget)
                if n > 0 and self._reserve(seq, seq.kv.length + n):
                    plan.prefills.append((seq, n))
                    budget -= n
            elif self._reserve(seq, seq.kv.length + step_width.get(seq.id, 1)):
                plan.decodes.append(seq)
                budget -= step_width.get(seq.id, 1)
        plan.decodes = [s for s in plan.decodes if s.status == Status.RUNNING]
        plan.prefills = [(s, n) for s, n in plan.prefills if s.status == Status.RUNNING]
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if seq.kv.length == 0 and self.config.prefix_caching and seq.adopts_prefix:
                seq.stats.cached_prompt_tokens = seq.kv.adopt_prefix(seq.tokens, seq.prefill_end - 1)
            n = min(seq.prefill_end - seq.kv.written, budget)
            # Admit only with a block to spare: a fresh admission must not immediately preempt the running ones.
            if not seq.kv.fits(seq.kv.length + n, spare=1):
                if not self.running and not plan.prefills:
                    seq.kv.ensure(seq.kv.length + n)  # alone it fits (checked in `add`); raises only on a bug
                else:
                    seq.kv.free()  # hand back adopted prefix blocks until it can run
                    break
            else:
                seq.kv.ensure(seq.kv.length + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefills.append((seq, n))
            budget -= n
        return plan

    def retire(self) -> list[Sequence]:
        """Drop finished sequences from the running queue, returning their KV memory."""
        done = [s for s in self.running if s.status == Status.FINISHED]
        if done:
            self.running = [s for s in self.running if s.status != Status.FINISHED]
            for s in done:
                s.kv.free()
        return done
