"""DoLa: decoding by contrasting layers (Chuang et al. 2024, "DoLa: Decoding by Contrasting Layers Improves
Factuality in Large Language Models").

Early exit: the model's final norm and LM head applied to an intermediate layer's hidden state give that layer's
next-token distribution q_j. At each step the *premature* layer M is the candidate whose q_j differs most from the
final layer's q_N by Jensen-Shannon divergence, and the next token comes from
    F(x) = log q_N(x) - log q_M(x)   for x with q_N(x) >= relative_top x max q_N   (else -inf),
through the sequence's sampling rules (DoLa pairs it with a repetition penalty of about 1.2: pass
`repetition_penalty=1.2`). Options as transformers names them: `dola_layers` ("high": the upper half of the layers,
every second one; "low": the lower half; or a list of layer indices counted as transformers' hidden states, 1 = the
first block's output) and `relative_top` (0.1). Two differences from transformers' implementation, which follow
the paper: the final norm is applied before the LM head (transformers applies the head to the raw hidden state),
and the divergence is the Jensen-Shannon divergence (transformers averages KL(M || q) terms). The embedding output
(transformers' index 0) is not a candidate. Native decodekit models only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..speculative.draft_model import native_model
from .base import PolicySearch, TokenPolicy, check, draw, register


def candidate_layers(spec: Any, num_layers: int, tied: bool) -> list[int]:
    """transformers' candidate premature layers (indices of its hidden states: i = after i blocks)."""
    start = 2 if tied else 0  # with tied embeddings an exit at the embeddings is the identity
    if spec == "high":
        layers = list(range(num_layers // 2, num_layers, 2)) if num_layers <= 40 else \
            list(range(num_layers - 20, num_layers, 2))
    elif spec == "low":
        layers = list(range(start, num_layers // 2, 2)) if num_layers <= 40 else list(range(start, 20, 2))
        layers = layers if start != num_layers // 2 else [start]
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(i, int) for i in spec):
        layers = [i for i in spec if i < num_layers]
    else:
        raise ValueError(f"dola: dola_layers must be \"high\", \"low\" or a list of layer indices, got {spec!r}")
    layers = [i for i in layers if i >= 1]
    if not layers:
        raise ValueError(f"dola: no candidate premature layer in {spec!r} for a model of {num_layers} layers")
    return layers


def jensen_shannon(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD between the distributions of log-probabilities `logp` `[V]` and each row of `logq` `[L, V]`."""
    p, q = logp.exp(), logq.exp()
    logm = (0.5 * (p + q)).clamp_min(1e-30).log()
    kl_pm = (p * (logp - logm)).nan_to_num().sum(-1)
    kl_qm = (q * (logq - logm)).nan_to_num().sum(-1)
    return 0.5 * (kl_pm + kl_qm)


@register
@dataclass
class DoLa(PolicySearch):
    """Knobs (defaults): `dola_layers` ("high" | "low" | list of transformers hidden-state indices),
    `relative_top` (0.1: the adaptive plausibility constraint)."""

    name = "dola"
    dola_layers: Any = "high"
    relative_top: float = 0.1

    def __post_init__(self) -> None:
        check(0.0 < self.relative_top <= 1.0, f"{self.name}: relative_top must be in (0, 1]")

    def policy(self, engine, req) -> "DoLaPolicy":
        net = native_model(engine.model)
        c = net.config
        layers = candidate_layers(self.dola_layers, c.num_layers, c.tie_word_embeddings)
        return DoLaPolicy(net, layers, self.relative_top)


class DoLaPolicy(TokenPolicy):
    def __init__(self, net, layers: list[int], relative_top: float) -> None:
        self.net = net
        self.layers = layers
        self.feature_layers = tuple(i - 1 for i in layers)  # block i-1's output is transformers' hidden state i
        self.log_top = math.log(relative_top)

    def contrast(self, final: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """DoLa's logits `[1, V]` from the final logits `[1, V]` and the candidate layers' states `[1, L * H]`."""
        size = hidden.shape[-1] // len(self.layers)
        states = hidden.reshape(len(self.layers), size)
        early = self.net.lm_head(self.net.norm(states.to(self.net.dtype))).float()
        cap = self.net.config.final_logit_softcap
        if cap:
            early = torch.tanh(early / cap) * cap
        logp = final.float().log_softmax(-1)[0]
        logq = early.log_softmax(-1)
        premature = logq[int(jensen_shannon(logp, logq).argmax())]
        keep = logp >= logp.max() + self.log_top
        return torch.where(keep, logp - premature, float("-inf"))[None]

    def choose(self, seq, logits: torch.Tensor, hidden: torch.Tensor | None) -> int:
        return draw(seq, seq.next_logits(self.contrast(logits, hidden)))
