r"""The grammar interface on llguidance (guidance-ai; Rust, Earley parser over a lazy lexer; the default backend).

Hugging Face tokenizers are bound with `llguidance.hf.from_tokenizer`; decodekit's ByteTokenizer through
`llguidance.TokenizerWrapper`. JSON is written as `json.dumps` writes it (`, ` and `: `, no
other whitespace), the same as the xgrammar backend: one layout, so small models cannot loop on whitespace; a
schema's `"x-guidance"` options still override that. Unknown schema keywords and formats are errors, not ignored.
Regexes read `\d` and `\w` as ASCII (as JSON Schema patterns and xgrammar do); `\s` and `.` keep the Rust
regex meaning (Unicode spaces; any character but a newline).
"""
from __future__ import annotations

from typing import Any, Sequence

import llguidance
import llguidance.hf
import torch

from .base import (Backend, Grammar, Matcher, bitmask_words, byte_vocab, check_hf_tokenizer, is_byte_tokenizer,
                   one_line)
from .spec import ConstraintSpec, choice_lark

# One JSON layout (json.dumps'); \u escapes of printable characters allowed (llguidance's default refuses them,
# which would reject valid JSON that xgrammar accepts). llguidance has no `\/` escape at all.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                 "json_allow_general_unicode_escapes": True}
_WHAT = {"json_schema": "JSON schema", "json_object": "JSON schema", "regex": "regex", "grammar": "grammar",
         "choice": "choice"}


class _ByteTokenizerAdapter:
    """The attributes `llguidance.TokenizerWrapper` reads, for decodekit's ByteTokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        from ..models.tokenizer import BYTE_OFFSET

        self.offset = BYTE_OFFSET
        self.eos_token_id, self.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        self.tokens = byte_vocab(vocab_size)
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if not t]

    def __call__(self, text: bytes) -> list[int]:
        return [b + self.offset for b in text]


class LLGuidanceBackend(Backend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int) -> None:
        super().__init__(tokenizer, eos_ids, vocab_size)
        if is_byte_tokenizer(tokenizer):
            wrapper = llguidance.TokenizerWrapper(_ByteTokenizerAdapter(tokenizer, vocab_size))
            self.lltok = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=list(self.eos_ids))
        else:
            check_hf_tokenizer(tokenizer)
            # A model vocabulary padded past the tokenizer's gets the extra ids (never allowed) in the mask too.
            n_vocab = vocab_size if vocab_size >= len(tokenizer) else None
            self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(self.eos_ids))
        # llguidance's own mask width; wider than ours only when the tokenizer has ids the model cannot produce.
        self.words = bitmask_words(max(self.lltok.vocab_size, vocab_size))

    def compile(self, spec: ConstraintSpec) -> Grammar:
        what = _WHAT[spec.kind]
        try:
            if spec.kind in ("json_schema", "json_object"):
                text = llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_DEFAULTS)
            elif spec.kind == "regex":
                text = llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(spec.source, 'dw')}/")
            elif spec.kind == "grammar":
                text = llguidance.LLMatcher.grammar_from_lark(spec.source)
            else:
                text = llguidance.LLMatcher.grammar_from_lark(choice_lark(spec.choices))
        except ValueError as e:
            raise ValueError(f"invalid {what}: {one_line(e)}") from None
        # The constructor compiles the grammar and never raises: errors leave the matcher in an error state.
        proto = llguidance.LLMatcher(self.lltok, text, log_level=0)
        if proto.is_error():
            raise ValueError(f"invalid {what}: {one_line(proto.get_error())}")
        return LLGuidanceGrammar(spec, proto, self)


class LLGuidanceGrammar(Grammar):
    def __init__(self, spec: ConstraintSpec, proto: llguidance.LLMatcher, backend: LLGuidanceBackend) -> None:
        self.spec, self.proto, self.backend = spec, proto, backend

    def matcher(self) -> Matcher:
        return LLGuidanceMatcher(self.proto.deep_copy(), self.backend)


class LLGuidanceMatcher(Matcher):
    def __init__(self, m: llguidance.LLMatcher, backend: LLGuidanceBackend, ended: bool = False) -> None:
        self.m, self.backend = m, backend
        self.vocab_size, self.eos_ids = backend.vocab_size, backend.eos_ids
        # EOS is kept here, not consumed by llguidance: rolling back an EOS consumed in a stopped state rolls
        # back one token too many there (llguidance 1.9.1), and the grammar state after EOS is the one before it.
        self.ended = ended

    def fill_bitmask(self, out: torch.Tensor) -> None:
        words = bitmask_words(self.vocab_size)
        if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != words:
            raise ValueError(f"bitmask row must be a contiguous int32 CPU tensor of {words} words")
        if self.ended:
            out.zero_()
            return
        if self.backend.words == words:
            self.m.unsafe_compute_mask_ptr(out.data_ptr(), words * 4)
        else:  # the tokenizer has ids past the model's vocabulary: compute wide, keep the model's part
            wide = torch.empty(self.backend.words, dtype=torch.int32)
            self.m.unsafe_compute_mask_ptr(wide.data_ptr(), self.backend.words * 4)
            out.copy_(wide[:words])
        if self.vocab_size % 32:  # ids past the vocabulary in the last word are never allowed
            out[-1] &= (1 << (self.vocab_size % 32)) - 1

    def allows(self, token: int) -> bool:
        if self.ended or not 0 <= token < self.vocab_size:
            return False
        if token in self.eos_ids:  # validate_tokens does not count EOS; EOS is allowed exactly when accepting
            return self.m.is_accepting() and not self.m.is_error()
        return self.m.validate_tokens([token]) == 1

    def advance(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
        if end < len(tokens) - 1:
            raise ValueError(f"token {tokens[end + 1]} follows EOS")
        if self.ended and tokens:
            raise ValueError(f"token {tokens[0]} follows EOS")
        body = tokens[:end]
        if any(not 0 <= t < self.vocab_size for t in body):
            raise ValueError(f"token {next(t for t in body if not 0 <= t < self.vocab_size)} is outside the vocabulary")
        n = self.m.validate_tokens(body) if body else 0
        if n < len(body):
            raise ValueError(f"token {body[n]} is not allowed by the grammar here")
        if body and not self.m.consume_tokens(body):
            raise RuntimeError(f"llguidance rejected tokens it had validated: {self.m.get_error()}")
        if end < len(tokens):
            if not self.m.is_accepting():
                if body:
                    self.m.rollback(len(body))
                raise ValueError("EOS is not allowed here: the grammar is not complete")
            self.ended = True

    def rollback(self, n: int) -> None:
        if n and self.ended:
            self.ended, n = False, n - 1
        if n and not self.m.rollback(n):
            raise ValueError(f"cannot roll back {n} tokens: {self.m.get_error()}")

    def forced(self) -> list[int]:
        if self.ended:
            return []
        out = []
        for t in self.m.compute_ff_tokens():
            if t in self.eos_ids or not 0 <= t < self.vocab_size:
                break
            out.append(t)
        return out

    def accepting(self) -> bool:
        return self.ended or self.m.is_accepting()

    def done(self) -> bool:
        return self.ended or self.m.is_stopped()

    def fork(self) -> Matcher:
        return LLGuidanceMatcher(self.m.deep_copy(), self.backend, self.ended)
