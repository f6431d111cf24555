"""Prompts -> token ids (`encode_prompt`), and a stand-in tokenizer for random-weight models (`ByteTokenizer`).

ByteTokenizer: one token per UTF-8 byte, no files, no training.

Ids: 0 pad, 1 bos, 2 eos, 3..258 the bytes 0..255; ids from 259 up to `vocab_size` exist only so that the tokenizer
covers a model's whole vocabulary, and decode to nothing. It offers the subset of the Hugging Face tokenizer API the
engine uses (`encode`, `decode`, special token ids, `apply_chat_template`, `chat_template`, `len`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral
from typing import Any

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
NUM_SPECIAL_AND_BYTES = BYTE_OFFSET + 256  # 259
_SPECIAL_TEXT = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}

# The Jinja equivalent of `ByteTokenizer.apply_chat_template`, for code that reads the template itself.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ByteTokenizer:
    """UTF-8 bytes as tokens; a drop-in for the Hugging Face tokenizer methods the engine calls."""

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token = _SPECIAL_TEXT[PAD_ID]
    bos_token = _SPECIAL_TEXT[BOS_ID]
    eos_token = _SPECIAL_TEXT[EOS_ID]
    chat_template = BYTE_CHAT_TEMPLATE

    def __init__(self, vocab_size: int = NUM_SPECIAL_AND_BYTES) -> None:
        if vocab_size < NUM_SPECIAL_AND_BYTES:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {NUM_SPECIAL_AND_BYTES}, got {vocab_size}")
        self.vocab_size = vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [PAD_ID, BOS_ID, EOS_ID]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes, after bos when `add_special_tokens`."""
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: int | Iterable[int] | Any, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (an int, a sequence or a tensor); ids past the byte range decode to nothing.

        Bytes that are not valid UTF-8 (a token stream cut inside a character) become U+FFFD.
        """
        if hasattr(ids, "tolist"):  # torch tensor or numpy array
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if BYTE_OFFSET <= i < NUM_SPECIAL_AND_BYTES:
                pending.append(i - BYTE_OFFSET)
            elif i in _SPECIAL_TEXT and not skip_special_tokens:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                parts.append(_SPECIAL_TEXT[i])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **_: Any,
    ) -> str | list[int]:
        """Messages as `<|role|>\\ncontent\\n` blocks, then `<|assistant|>\\n` when `add_generation_prompt`.

        Returns the text, or its token ids when `tokenize` (other Hugging Face keyword arguments are ignored).
        """
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text) if tokenize else text


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int] | Sequence[Mapping[str, Any]], chat: bool) -> list[int]:
    """Token ids of a prompt, built as transformers builds them for the same tokenizer.

    - a string with `chat=False`: the tokenizer's own special-token rule (`tokenizer(prompt)["input_ids"]`), e.g.
      Gemma prepends <bos>, SmolLM2 adds nothing. Dropping it changes what a base model continues with.
    - a string with `chat=True`: one user turn, then as chat messages.
    - chat messages (dicts with role and content): the chat template with the generation prompt, encoded without
      special tokens, since templates write their own BOS (as `apply_chat_template(tokenize=True)` does).
    - token ids: passed through unchanged.
    """
    if isinstance(prompt, str):
        if not chat:
            return list(tokenizer.encode(prompt, add_special_tokens=True))
        messages: list[Mapping[str, Any]] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, Integral) for t in prompt):
        return [int(t) for t in prompt]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, Mapping) for m in prompt):
        messages = list(prompt)
    else:
        raise ValueError("a prompt must be a string, a list of token ids, or a list of chat messages "
                         "({'role': ..., 'content': ...})")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass a plain string prompt with chat=False "
                         "(--raw on the command line)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
