"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation"; Su and Collier 2023,
"Contrastive Search Is What You Need For Neural Text Generation").

At each step the `top_k` most probable tokens are candidates; each is scored by
    (1 - penalty_alpha) x p(v | context)  -  penalty_alpha x max_j cos(h_v, h_j)
where h_v is the model's last hidden state (after the final norm) at the candidate and h_j those of every earlier
token, the prompt's included (the degeneration penalty), and the best candidate is taken. Options as transformers
names them (`penalty_alpha`, `top_k`); since `top_k` is also a sampling setting, pass it as
`search_options={"top_k": k}` (CLI: -S top_k=k). p is the distribution the sampling rules define (penalties;
temperature and warpers if set); the choice itself is deterministic.

On the engine the candidates ride in the same pass as the root, as a depth-1 tree (`Policy.plan`): one pass per
token scores all of them with their hidden states; the chosen one is fed again as the next root (its entry is
not kept), whose logits came with it. For the first token the prompt's last token is fed again as that root.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..speculative.base import DraftTree
from .base import PolicySearch, SinglePolicy, check, register


@register
@dataclass
class Contrastive(PolicySearch):
    """Knobs (defaults): `penalty_alpha` (0.6: weight of the degeneration penalty), `top_k` (4: candidates)."""

    name = "contrastive"
    penalty_alpha: float = 0.6
    top_k: int = 4

    def __post_init__(self) -> None:
        check(0.0 <= self.penalty_alpha <= 1.0, f"{self.name}: penalty_alpha must be in [0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 1, f"{self.name}: top_k must be an integer >= 1")

    def policy(self, engine, req) -> "ContrastivePolicy":
        return ContrastivePolicy(self, engine.model.config.num_layers)


class ContrastivePolicy(SinglePolicy):
    def __init__(self, search: Contrastive, num_layers: int) -> None:
        self.alpha, self.k = search.penalty_alpha, search.top_k
        self.feature_layers = (num_layers,)  # the final normed hidden state
        self.max_nodes = self.k
        self.context: torch.Tensor | None = None  # [n, H] normalized hidden states of every committed token
        self.candidates: tuple[list[int], torch.Tensor] | None = None  # next step's tokens and probabilities

    def prefill_features(self, seq, features: torch.Tensor) -> None:
        self._remember(features)

    def _remember(self, hidden: torch.Tensor) -> None:
        h = F.normalize(hidden.float(), dim=-1)
        self.context = h if self.context is None else torch.cat([self.context, h])

    def _top(self, seq, row: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        probs = seq.next_logits(row).softmax(-1)[0]
        top = probs.topk(min(self.k, int((probs > 0).sum())))
        return top.indices.tolist(), top.values

    def _best(self, probs: torch.Tensor, hidden: torch.Tensor) -> int:
        penalty = (F.normalize(hidden.float(), dim=-1) @ self.context.T).max(-1).values
        return int(((1 - self.alpha) * probs - self.alpha * penalty).argmax())

    def plan(self, seq) -> DraftTree:
        if self.candidates is None:
            return DraftTree()
        tokens, _ = self.candidates
        return DraftTree(list(tokens), [0] * len(tokens))

    def step(self, core, req, rows) -> list:
        (seq, (logits, hidden)), = rows.items()
        if self.candidates is None:
            # The prompt's last logits. Its candidates must be scored after that token, whose entry is written:
            # drop the entry and decode from the prompt's last token as root, with the candidates under it.
            seq.kv.rollback(seq.kv.length - 1)
            seq.prompt_root = True
            self.candidates = self._top(seq, logits[-1:])
            return [seq]
        tokens, probs = self.candidates
        width = 1 + len(tokens)
        best = self._best(probs, hidden[1:width])
        self._remember(hidden[1 + best:2 + best])
        seq.kv.keep_path(seq.kv.length - width, [0])  # the root stays; the chosen candidate is fed again as root
        kept = seq.commit([tokens[best]])
        seq.record_logprobs(logits[:1], kept)
        self.candidates = self._top(seq, logits[1 + best:2 + best]) if not seq.finished else None
        return [seq]
