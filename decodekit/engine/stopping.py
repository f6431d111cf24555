"""Incremental detokenization and stop rules, token by token.

Text grows by one token's piece at a time (`IncrementalDecoder`: the tokenizers library's `DecodeStream` where the
tokenizer has one, else a window decode), so a step costs what its new tokens cost, not the whole output; without
stop strings tokens are only decoded when the text is asked for (a stream, the result). The stop rules look at
tokens in the order they were generated: EOS, or a stop string completed by a token, whichever comes first. The output then ends with that token (the same token ids whatever the method, however many tokens its steps
commit at once), and the text ends just before the stop string. While running, text that could still turn out to be
the start of a stop string is held back, so a stream never shows what the final text removes.
"""
from __future__ import annotations

from typing import Sequence


class IncrementalDecoder:
    """Text of a growing token list, one token at a time; equals `tokenizer.decode(ids, skip_special_tokens=True)`.

    Incomplete multi-byte characters (a token that ends mid-character) are held back until completed.
    """

    WINDOW = 6  # tokens of left context re-decoded for the generic path (spaces and merges depend on it)
    MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 bytes: a U+FFFD still there after 4 tokens is for good

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._text = ""
        self.pending: list[int] = []  # appended, not decoded yet
        self.stream = None
        self.backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust tokenizer
        if self.backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers < 0.21
                pass
            else:
                self.stream = DecodeStream(skip_special_tokens=True)
        self.read = 0  # generic path: ids[:read] are reflected in text

    @property
    def text(self) -> str:
        if self.pending:
            pending, self.pending = self.pending, []
            for token in pending:  # one at a time: the text must not depend on how often it is asked for
                self.push(token)
        return self._text

    def append(self, tokens: list[int]) -> None:
        """Add tokens to decode when the text is next asked for."""
        self.pending += tokens

    def push(self, token: int) -> str:
        """Add one token now; return the text it completes (possibly "")."""
        if self.pending:
            self.text  # noqa: B018 - decode what came before, in order
        self.ids.append(token)
        if self.stream is not None:
            piece = self.stream.step(self.backend, token) or ""
        else:
            piece = self._generic()
        self._text += piece
        return piece

    def _generic(self) -> str:
        start = max(0, self.read - self.WINDOW)
        before = self.tokenizer.decode(self.ids[start:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
        incomplete = after.endswith("\ufffd") and len(self.ids) - self.read < self.MAX_CHAR_TOKENS
        if incomplete or not after.startswith(before):
            return ""  # an incomplete character (or a merge that rewrites the window): wait for more tokens
        self.read = len(self.ids)
        return after[len(before):]


class StopChecker:
    """EOS ids and stop strings of one sequence, applied token by token as tokens are committed."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: Sequence[str] | None) -> None:
        self.eos_ids = eos_ids
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoder = IncrementalDecoder(tokenizer)
        self.cut: int | None = None  # text length at which a stop string starts, once found
        self.reason: str | None = None  # "stop" once EOS or a stop string ended the output

    def fork(self) -> "StopChecker":
        """The same rules and text for a forked sequence (its tokens are decoded again, lazily, when asked for)."""
        child = StopChecker(self.decoder.tokenizer, self.eos_ids, self.stop)
        child.decoder.append(self.decoder.ids + self.decoder.pending)
        child.cut, child.reason = self.cut, self.reason
        return child

    @property
    def text(self) -> str:
        return self.decoder.text if self.cut is None else self.decoder.text[:self.cut]

    def visible(self) -> str:
        """Text safe to show while running: without a tail that could still become a stop string."""
        if self.reason or not self.stop:
            return self.text
        text = self.decoder.text
        keep = len(text)
        for k in range(min(self.hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                keep = len(text) - k
                break
        return text[:keep]

    def push(self, token: int) -> bool:
        """Commit one token; True when it ends the output (it is then the last token kept)."""
        return self.push_many([token]) == 0

    def push_many(self, tokens: list[int]) -> int | None:
        """Commit tokens in order; the index of the one that ends the output (kept: the rest are not), or None."""
        if not self.stop:  # only EOS can stop: no need to decode now
            end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            self.decoder.append(tokens if end is None else tokens[:end])
            if end is not None:
                self.reason = "stop"
            return end
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                self.reason = "stop"
                return i
            before = len(self.decoder.text)
            self.decoder.push(token)
            text = self.decoder.text
            lo = max(0, before - self.hold)
            hits = [j for s in self.stop if (j := text.find(s, lo)) >= 0]
            if hits:
                self.cut, self.reason = min(hits), "stop"
                return i
        return None
