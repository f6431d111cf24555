"""ByteTokenizer: the stand-in tokenizer of random-weight models."""
from __future__ import annotations

import pytest
import torch

from decodekit.models.tokenizer import ByteTokenizer


def test_round_trip_ascii_and_unicode() -> None:
    tok = ByteTokenizer()
    for text in ["", "hello world", "héllo wörld ✓ 日本語 🙂", "tab\tnew\nline"]:
        ids = tok.encode(text)
        assert all(3 <= i <= 258 for i in ids)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_byte_ids() -> None:
    tok = ByteTokenizer()
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.encode("\x00") == [3]
    assert tok.encode("A", add_special_tokens=True) == [1, ord("A") + 3]


def test_special_ids_and_len() -> None:
    tok = ByteTokenizer(vocab_size=512)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == tok.vocab_size == 512
    assert len(ByteTokenizer()) == 259
    assert tok.all_special_ids == [0, 1, 2]


def test_vocab_size_too_small() -> None:
    with pytest.raises(ValueError, match="259"):
        ByteTokenizer(vocab_size=258)


def test_decode_skips_specials_and_ids_past_bytes() -> None:
    tok = ByteTokenizer(vocab_size=1000)
    ids = [1, *tok.encode("hi"), 300, 999, *tok.encode("!"), 2, 0]
    assert tok.decode(ids) == "hi!"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi!</s><pad>"


def test_decode_accepts_int_and_tensor() -> None:
    tok = ByteTokenizer()
    assert tok.decode(ord("x") + 3) == "x"
    assert tok.decode(torch.tensor(tok.encode("tensor"))) == "tensor"


def test_decode_invalid_utf8_is_replaced() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é")  # two bytes
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode([*ids[:1], *tok.encode("a")]) == "\ufffda"


def test_chat_template() -> None:
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<|system|>\nbe brief\n<|user|>\nhi\n"
    assert tok.apply_chat_template(messages, tokenize=True) == tok.encode(text)
    assert isinstance(tok.chat_template, str) and tok.chat_template


def test_chat_template_attribute_matches_method() -> None:
    jinja2 = pytest.importorskip("jinja2")
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    for gen in (True, False):
        rendered = jinja2.Template(tok.chat_template).render(messages=messages, add_generation_prompt=gen)
        assert rendered == tok.apply_chat_template(messages, add_generation_prompt=gen)
