"""Constants and helpers shared by the constrain tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import torch

BACKENDS = ["llguidance", "xgrammar"]
SMOL_VOCAB, SMOL_EOS = 49152, 2
BYTE_VOCAB = 512  # random:tiny-llama's vocabulary: 259 byte-level ids, the rest unused


def encode(compiler, text: str) -> list[int]:
    return compiler.tokenizer.encode(text, add_special_tokens=False)


def walk(matcher, ids, eos: int):
    """Advance through `ids`, checking at every step that the token is allowed (mask and `allows` agree) and that
    EOS is allowed exactly when the matcher is accepting; returns the matcher."""
    for i, t in enumerate(ids):
        allowed = matcher.allowed()
        assert allowed.shape == (matcher.vocab_size,) and allowed.dtype == torch.bool
        assert bool(allowed[t]) and matcher.allows(t), f"token {i} ({t}) rejected"
        assert bool(allowed[eos]) == matcher.accepting() == matcher.allows(eos)
        matcher.advance([t])
    return matcher
