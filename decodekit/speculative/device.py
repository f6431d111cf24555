"""Greedy acceptance of a chain draft on the device, the step of fused draft rounds.

Plain greedy decoding on a GPU runs many steps per replay of one captured graph (`engine/graphs.py`); a verified
step instead costs a host round trip (the draft is made on the host, the logits' argmax comes back to be
compared). A drafter that can propose from the token history with tensor ops (`Drafter.propose_on_device`, e.g.
prompt lookup) lets the whole round stay on the device: propose a chain, verify root + chain in one pass, accept the
longest prefix the target's argmax agrees with, commit it with the target's next token, repeat. Several rounds run
per replay, and replays are pipelined, as the fused greedy chunks are (the fused-chunk idea applied to
speculation). Greedy only: the output is the target's greedy output, as with the host verifier (`verify_greedy`).
"""
from __future__ import annotations

import torch


def accept_chain(draft: torch.Tensor, n_draft: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification of chain drafts, all rows at once. `draft` `[R, k]` (row r's first `n_draft[r]` tokens are
    its draft), `best` `[R, k + 1]` the target's argmax at the root and at each draft token. Returns the accepted
    count `[R]` (draft tokens equal to the argmax before them, up to the first mismatch) and the next token `[R]`
    (the argmax after the accepted prefix): `verify_greedy`'s answer for a chain."""
    k = draft.shape[1]
    hit = (draft == best[:, :k]) & (torch.arange(k, device=draft.device) < n_draft[:, None])
    accepted = hit.long().cumprod(dim=1).sum(dim=1)
    return accepted, best.gather(1, accepted[:, None])[:, 0]


def committed_tokens(draft: torch.Tensor, accepted: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """`[R, k + 1]`: each row's accepted draft tokens then its next token (the columns past that repeat it)."""
    cols = torch.arange(draft.shape[1] + 1, device=draft.device)
    tokens = torch.cat([draft, nxt[:, None]], dim=1)
    return torch.where(cols < accepted[:, None], tokens, nxt[:, None])


def window_columns(ctx: torch.Tensor, sink: int, window: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries a StreamingLLM view of each row's cache reads (attention sinks, then a recent window; Xiao et al.
    2024): `[R, sink + window + length]` entry indices, the first `sink` entries then the entries from `base` =
    max(sink, ctx - window) on, with room for `length` new entries past `ctx`; and `base` `[R]`. Entry `e >= base`
    is column `e - base + sink` (below `sink` as well, where `base` = `sink`)."""
    base = (ctx - window).clamp_min(sink)
    cols = torch.arange(sink + window + length, device=ctx.device)
    return torch.where(cols < sink, cols, base[:, None] + cols - sink), base
