"""The grammar interface on xgrammar (MLC; C++ pushdown automaton with precomputed token masks), the second backend.

Hugging Face tokenizers are bound with `TokenizerInfo.from_huggingface`; decodekit's ByteTokenizer with a raw
byte vocabulary. JSON is written as `json.dumps` writes it (`, ` and `: `, no other whitespace) and follows the
schema's own rules for extra properties (`strict_mode=False`), as the llguidance backend does. (With compact
separators xgrammar 0.2.8 still puts `, ` inside untyped values, so `, `/`: ` is the layout both agree on.)
The tokenizer's special tokens (`<|im_start|>`...) are never allowed except EOS where the grammar ends: xgrammar
would read them as their text inside strings. xgrammar ignores some schema
keywords llguidance rejects (unknown `format`s, for one); `tests/constrain` lists the differences it checks.
xgrammar has no forced-token call: `forced()` tokenizes its jump-forward string, keeps the tokens whose bytes
spell it exactly, and drops the last one (it could merge with the text that follows) unless the grammar ends there.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Any, Iterator, Sequence

import torch
import xgrammar as xgr

from .base import (Backend, Grammar, Matcher, bitmask_words, byte_vocab, check_hf_tokenizer, is_byte_tokenizer,
                   one_line, pack_bitmask, special_ids)
from .spec import ConstraintSpec, choice_lark

# xgrammar 0.2.8 writes the characters of a string with a length limit as [^"\\\r\n]: raw control characters,
# which JSON forbids (json.loads rejects them), pass. Its other strings use the JSON class; so do these here.
_LOOSE_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'
_WHAT = {"json_schema": "JSON schema", "json_object": "JSON schema", "regex": "regex", "grammar": "grammar",
         "choice": "choice"}


class UnsupportedSchema(ValueError):
    """A schema keyword the backend would approximate instead of enforcing."""


class XGrammarBackend(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int, threads: int = 2) -> None:
        super().__init__(tokenizer, eos_ids, vocab_size)
        eos = list(self.eos_ids)
        if is_byte_tokenizer(tokenizer):
            self.info = xgr.TokenizerInfo(byte_vocab(vocab_size), xgr.VocabType.RAW, vocab_size=vocab_size,
                                          stop_token_ids=eos)
            self.encode = tokenizer.encode
        else:
            check_hf_tokenizer(tokenizer)
            self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
            self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        # Special tokens (EOS aside, which the grammar governs) are cleared from every mask.
        self.blocked = frozenset(t for t in special_ids(tokenizer) if t not in self.eos_ids and t < vocab_size)
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[list(self.blocked)] = False
        self.keep = pack_bitmask(keep)
        self.token_bytes = self.info.decoded_vocab  # to check jump-forward tokenizations byte for byte
        # decodekit's ConstraintCompiler caches compiled grammars itself.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)

    def compile(self, spec: ConstraintSpec) -> Grammar:
        try:
            if spec.kind in ("json_schema", "json_object"):
                with _native_warnings() as warnings:
                    grammar = xgr.Grammar.from_json_schema(spec.source, any_whitespace=False,
                                                           separators=(", ", ": "), strict_mode=False)
                if warnings:  # a keyword it would not enforce: outputs could break the schema, so refuse it
                    raise UnsupportedSchema(f"unsupported JSON schema feature for xgrammar: {warnings[0]}")
                compiled = self.compiler.compile_grammar(str(grammar).replace(_LOOSE_CHAR, _JSON_CHAR))
            elif spec.kind == "regex":
                compiled = self.compiler.compile_regex(spec.source)
            elif spec.kind == "grammar":
                compiled = self.compiler.compile_lark(spec.source)
            else:
                compiled = self.compiler.compile_lark(choice_lark(spec.choices))
        except UnsupportedSchema:
            raise
        except (RuntimeError, ValueError) as e:  # xgrammar reports every grammar error as a RuntimeError
            raise ValueError(f"invalid {_WHAT[spec.kind]}: {one_line(e)}") from None
        return XGrammarGrammar(spec, compiled, self)


@contextlib.contextmanager
def _native_warnings() -> Iterator[list[str]]:
    """xgrammar's schema converter prints what it approximates ("Warning: pattern combined with minLength is not
    supported; ignoring minLength", "oneOf ... falling back to anyOf") from C++ to file descriptor 2 and goes on.
    Collect those lines while the block runs (descriptor 2 is redirected for the process meanwhile: a compile is
    short, and the engine compiles on its one thread)."""
    sys.stderr.flush()
    saved = os.dup(2)
    found: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield found
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            found += [ln.split("Warning:", 1)[1].strip() for ln in text.splitlines() if "Warning:" in ln]
            other = [ln for ln in text.splitlines() if "Warning:" not in ln]
            if other:  # anything else it printed still reaches the user
                print("\n".join(other), file=sys.stderr)


class XGrammarGrammar(Grammar):
    def __init__(self, spec: ConstraintSpec, compiled: xgr.CompiledGrammar, backend: XGrammarBackend) -> None:
        self.spec, self.compiled, self.backend = spec, compiled, backend

    def matcher(self) -> Matcher:
        return XGrammarMatcher(xgr.GrammarMatcher(self.compiled, override_stop_tokens=list(self.backend.eos_ids)),
                               self.backend)


class XGrammarMatcher(Matcher):
    def __init__(self, m: xgr.GrammarMatcher, backend: XGrammarBackend) -> None:
        self.m, self.backend = m, backend
        self.vocab_size, self.eos_ids = backend.vocab_size, backend.eos_ids

    def fill_bitmask(self, out: torch.Tensor) -> None:
        words = bitmask_words(self.vocab_size)
        if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != words:
            raise ValueError(f"bitmask row must be a contiguous int32 CPU tensor of {words} words")
        if self.m.is_terminated():  # after EOS nothing is allowed (xgrammar refuses to fill a mask there)
            out.zero_()
            return
        self.m.fill_next_token_bitmask(out.view(1, words))
        if self.backend.blocked:
            out &= self.backend.keep

    def _accept(self, token: int) -> bool:
        """Advance by `token` if it is allowed; whether it was."""
        if not 0 <= token < self.vocab_size or token in self.backend.blocked or self.m.is_terminated():
            return False
        return self.m.accept_token(token)

    def allows(self, token: int) -> bool:
        if not self._accept(token):
            return False
        self.m.rollback(1)
        return True

    def advance(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        for i, t in enumerate(tokens):
            if not self._accept(t):
                if i:
                    self.m.rollback(i)
                what = "EOS" if t in self.eos_ids else f"token {t}"
                raise ValueError(f"{what} is not allowed by the grammar here")

    def rollback(self, n: int) -> None:
        if n:
            self.m.rollback(n)

    def forced(self) -> list[int]:
        if self.m.is_terminated():
            return []
        text = self.m.find_jump_forward_string()
        if not text:
            return []
        ids, target = self.backend.encode(text), text.encode("utf-8")
        if b"".join(self.backend.token_bytes[t] for t in ids) != target:
            return []  # the tokenizer would add or change bytes (a prefix space...): force nothing
        probe, kept = self.fork(), []
        for t in ids:
            if not probe._accept(t):
                break
            kept.append(t)
        if kept and len(kept) == len(ids) and not probe.done():
            kept.pop()  # the last token might merge with what the model writes next
        return kept

    def accepting(self) -> bool:
        return self.m.is_completed() or self.m.is_terminated()

    def done(self) -> bool:
        if self.m.is_terminated():
            return True
        if not self.m.is_completed():
            return False
        allowed = self.allowed()
        allowed[list(self.eos_ids)] = False
        return not bool(allowed.any())

    def fork(self) -> Matcher:
        return XGrammarMatcher(self.m.fork(), self.backend)
