"""A per-sequence record of the shape of every decode step: what `bench/trace_replay.py` replays on another model.

`generate(..., trace=True)` gives each sequence a `StepTrace`; the step tells it what it ran (a verified pass of
root + draft nodes, or a fused greedy chunk), the sequence's drafter tells it the passes it ran to draft
(`Drafter.note_pass`), and `result.stats.trace` is `StepTrace.to_dict()`:

    {"prompt_tokens": P, "cached_prompt_tokens": C, "method": M, "layers": L, "steps": [step, ...]}

A step is one of
- verified: `{"verify_width": 1 + nodes, "tree": false (a chain or no draft: a causal block) or the parent list
  (tree attention), "accepted": accepted draft nodes, "committed": tokens kept, "draft_passes": [pass, ...]}`
- fused greedy: `{"verify_width": 1, "fused": {"steps": S, "chunks": K}, "accepted": 0, "committed": tokens kept,
  "draft_passes": [...]}` (K chunks of S single-token passes in one replay each)

and a draft pass `{"model": "target" | "head" | "draft_model", "width": tokens, "kv": entries it reads, "layers":
decoder layers it runs, "of": layers of the model that ran it, "tree": bool, "steps": S (a fused chunk of S
single-token passes), ...}` (fields a pass does not have are left out). A drafter's passes are filed under the
step that follows them (a draft model's prompt prefill goes with the first step).
"""
from __future__ import annotations

from typing import Any


class StepTrace:
    def __init__(self, prompt_tokens: int, method: str, layers: int) -> None:
        self.prompt_tokens, self.method, self.layers = prompt_tokens, method, layers
        self.steps: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # draft passes since the last step

    def draft_pass(self, model: str, width: int, kv: int, **extra: Any) -> None:
        self.pending.append({"model": model, "width": int(width), "kv": int(kv), **extra})

    def _step(self, entry: dict[str, Any]) -> None:
        entry["draft_passes"], self.pending = self.pending, []
        self.steps.append(entry)

    def verified(self, parents: list[int], chain: bool, accepted: int, committed: int) -> None:
        self._step({"verify_width": len(parents) + 1, "tree": False if chain else list(parents),
                    "accepted": accepted, "committed": committed})

    def fused(self, steps: int, chunks: int, committed: int) -> None:
        self._step({"verify_width": 1, "fused": {"steps": steps, "chunks": chunks}, "accepted": 0,
                    "committed": committed})

    def to_dict(self, cached_prompt_tokens: int = 0) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": cached_prompt_tokens,
                "method": self.method, "layers": self.layers, "steps": list(self.steps)}
