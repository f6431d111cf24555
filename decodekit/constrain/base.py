"""The backend-neutral grammar interface the engine uses; llguidance and xgrammar each implement it in one file.

    compiler = ConstraintCompiler(tokenizer, eos_ids, vocab_size, backend="llguidance")   # one per engine
    grammar = compiler.compile(spec)      # cached per spec; ValueError (one line) if it does not compile
    m = grammar.matcher()                 # one per sequence, at the grammar's start
    m.fill_bitmask(row)                   # next-token mask, packed: bit j of int32 word i = token 32*i + j
    m.allowed()                           # the same as bool [vocab_size] (convenience; tests, AWRS fallback)
    m.allows(t)                           # one token, without advancing (AWRS checks only sampled tokens)
    m.advance([t, ...]); m.rollback(n)    # commit / forget tokens (speculative drafts, tree walks)
    m.forced()                            # tokens the grammar forces next (jump-forward), maybe []
    m.accepting(); m.done(); m.fork()     # may stop here; nothing but EOS can follow; independent copy

`vocab_size` is the model's (its logits' width): ids the tokenizer lacks are never allowed. The model's EOS ids
(given at compile time) are allowed exactly when the grammar is accepting; advancing past an EOS ends the matcher.
Masks are computed on the CPU into packed int32 rows (`allocate_bitmask`, pinned for a fast copy) so the engine
can fill them while the device runs the forward pass, then copy them over and apply them there
(`apply_bitmask_`, `unpack_bitmask`, both device-agnostic).

Where the mask goes is the caller's choice: on the logits before penalties and warpers (then top-k/top-p see only
allowed tokens; greedy must do this), or on the final distribution (`awrs.masked_probs`), which is what AWRS
samples exactly and which can leave no mass when the warpers cut every allowed token away.
"""
from __future__ import annotations

import importlib
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, ClassVar, Sequence

import torch

from .spec import ConstraintSpec

# backend name -> "module:class", imported on first use so that a missing optional library only matters when asked.
BACKENDS = {
    "llguidance": ("decodekit.constrain.llguidance_backend", "LLGuidanceBackend", "llguidance"),
    "xgrammar": ("decodekit.constrain.xgrammar_backend", "XGrammarBackend", "xgrammar"),
}
DEFAULT_BACKEND = "llguidance"


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """`[rows, ceil(V/32)]` int32 on the CPU, all zero (nothing allowed); pinned for an async copy to a GPU."""
    return torch.zeros(rows, bitmask_words(vocab_size), dtype=torch.int32, pin_memory=pin_memory)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 `[..., W]` -> bool `[..., vocab_size]`, on the bitmask's device."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift of negative words is harmless after & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """bool `[..., V]` -> packed int32 `[..., ceil(V/32)]` (the inverse of `unpack_bitmask`)."""
    words = bitmask_words(allowed.shape[-1])
    padded = torch.zeros(*allowed.shape[:-1], words * 32, dtype=torch.int64, device=allowed.device)
    padded[..., : allowed.shape[-1]] = allowed.long()
    shifts = torch.arange(32, device=allowed.device, dtype=torch.int64)
    packed = (padded.view(*allowed.shape[:-1], words, 32) << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # bit 31 is the sign bit


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set disallowed logits to -inf in place (`logits [..., V]`, `bitmask [..., W]` on the same device)."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1])
    return logits.masked_fill_(~allowed, float("-inf"))


def one_line(message: object) -> str:
    """A library's error as one line: its first line (without C++ timestamps and source locations), plus the
    detail line a Rust regex error puts further down (`error: unclosed group`)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    head = re.sub(r"^(\[[\d:]+\]\s*)?(\S+\.(cc|cpp|h|rs):\d+:\s*)?", "", lines[0]).rstrip(":")
    detail = next((ln.removeprefix("error:").strip() for ln in lines[1:] if ln.startswith("error:")), None)
    return f"{head}: {detail}" if detail else head


class Matcher(ABC):
    """Per-sequence grammar state. Cheap to fork; every method but `fill_bitmask`/`allowed` is O(1)-ish."""

    vocab_size: int
    eos_ids: tuple[int, ...]

    @abstractmethod
    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the next-token mask into `out`, a contiguous int32 CPU row of `ceil(vocab_size/32)` words."""

    def allowed(self) -> torch.Tensor:
        """bool `[vocab_size]`: the tokens allowed next (EOS ids exactly when accepting)."""
        row = allocate_bitmask(1, self.vocab_size)[0]
        self.fill_bitmask(row)
        return unpack_bitmask(row, self.vocab_size)

    @abstractmethod
    def allows(self, token: int) -> bool:
        """Whether `token` may come next; the state does not change."""

    @abstractmethod
    def advance(self, tokens: Sequence[int]) -> None:
        """Commit `tokens` in order. ValueError, with the state unchanged, if any of them is not allowed."""

    @abstractmethod
    def rollback(self, n: int) -> None:
        """Forget the last `n` committed tokens."""

    @abstractmethod
    def forced(self) -> list[int]:
        """Tokens the grammar forces next, in the tokenizer's canonical tokenization (may be empty). Committing
        them is the caller's choice (jump-forward); the state does not change here."""

    @abstractmethod
    def accepting(self) -> bool:
        """The output so far is a complete match: EOS is allowed here."""

    @abstractmethod
    def done(self) -> bool:
        """Nothing but EOS can follow (or EOS was already committed). On xgrammar this computes a mask when the
        grammar is complete (it has no cheaper test); on llguidance it is a flag."""

    @abstractmethod
    def fork(self) -> "Matcher":
        """An independent copy of this state."""


class Grammar(ABC):
    """A constraint compiled for one tokenizer; shareable across sequences (each takes its own `matcher()`)."""

    spec: ConstraintSpec
    compile_s: float = 0.0  # seconds the backend spent compiling it

    @abstractmethod
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar."""


class Backend(ABC):
    """One grammar library bound to one tokenizer (building that binding is the expensive part: ~0.5-6 s)."""

    name: ClassVar[str]

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.eos_ids = tuple(sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab_size}))
        if not self.eos_ids:
            raise ValueError("constrained decoding needs at least one EOS id inside the vocabulary")
        self.vocab_size = vocab_size

    @abstractmethod
    def compile(self, spec: ConstraintSpec) -> Grammar:
        """Compile `spec`; ValueError (one line) if the schema, regex or grammar is invalid or unsupported."""


def make_backend(name: str, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; available: {', '.join(BACKENDS)}")
    module, cls, package = BACKENDS[name]
    try:
        backend_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        hint = "llguidance>=1.9,<2" if name == "llguidance" else f"decodekit[{name}]"  # llguidance: a core dependency
        raise ValueError(f"the {name} backend needs the {package} package ({e}); install it with: pip install '{hint}'")
    return backend_cls(tokenizer, eos_ids, vocab_size)


class ConstraintCompiler:
    """Compiles specs for one (tokenizer, EOS ids, vocab size, backend) and caches the results.

    The engine owns one (the cache lives here rather than in a module global, so two engines never share state);
    repeated requests with the same constraint reuse the compiled grammar. The tokenizer binding is built on the
    first `compile`. `cache_size` bounds the number of grammars kept (least recently used dropped first).
    """

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int,
                 backend: str = DEFAULT_BACKEND, cache_size: int = 64) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown grammar backend {backend!r}; available: {', '.join(BACKENDS)}")
        self.tokenizer, self.eos_ids, self.vocab_size = tokenizer, tuple(eos_ids), vocab_size
        self.backend_name, self.cache_size = backend, cache_size
        self._backend: Backend | None = None
        self._cache: OrderedDict[ConstraintSpec, Grammar] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = make_backend(self.backend_name, self.tokenizer, self.eos_ids, self.vocab_size)
        return self._backend

    def compile(self, spec: ConstraintSpec) -> Grammar:
        if spec in self._cache:
            self.hits += 1
            self._cache.move_to_end(spec)
            return self._cache[spec]
        self.misses += 1
        backend = self.backend
        start = time.perf_counter()
        grammar = backend.compile(spec)
        grammar.compile_s = time.perf_counter() - start
        self._cache[spec] = grammar
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return grammar


def is_byte_tokenizer(tokenizer: Any) -> bool:
    from ..models.tokenizer import ByteTokenizer

    return isinstance(tokenizer, ByteTokenizer)


def byte_vocab(vocab_size: int) -> list[bytes]:
    """Token bytes of decodekit's `ByteTokenizer` (specials and unused ids empty: never matched by text).

    Hugging Face tokenizers go through each library's own adapter instead; this covers the stand-in tokenizer of
    `random:<shape>` models, which the libraries do not know.
    """
    from ..models.tokenizer import BYTE_OFFSET

    vocab = [b""] * vocab_size
    for b in range(min(256, vocab_size - BYTE_OFFSET)):
        vocab[BYTE_OFFSET + b] = bytes([b])
    return vocab


def check_hf_tokenizer(tokenizer: Any) -> None:
    """ValueError unless `tokenizer` is a Hugging Face fast tokenizer (what the libraries' adapters read)."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("constrained decoding needs a Hugging Face fast tokenizer or decodekit's ByteTokenizer, "
                         f"got {type(tokenizer).__name__}")


def special_ids(tokenizer: Any) -> set[int]:
    """Ids a Hugging Face tokenizer marks special (added special tokens and `all_special_ids`); none for others."""
    if is_byte_tokenizer(tokenizer):
        return set()
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    ids |= {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids
