"""Stop rules and incremental detokenization, token by token: what a stream shows, where the output ends."""
import pytest

import decodekit
from decodekit.engine import Engine
from decodekit.engine.stopping import IncrementalDecoder, StopChecker
from decodekit.models.tokenizer import ByteTokenizer
from engine_helpers import fused_engine

BYTES = ByteTokenizer()


def ids(text: str) -> list[int]:
    return BYTES.encode(text)


def push_all(checker: StopChecker, tokens: list[int]) -> int | None:
    """Index of the token that ended the output, or None."""
    for i, t in enumerate(tokens):
        if checker.push(t):
            return i
    return None


def test_a_stop_string_of_multibyte_characters_is_found():
    text = "abc 日本語 def"
    checker = StopChecker(BYTES, set(), ["日本語"])
    end = push_all(checker, ids(text))
    assert end == len(ids("abc 日本語")) - 1  # the token completing the stop string ends the output
    assert checker.text == "abc " and checker.reason == "stop"


def test_eos_and_stop_strings_in_token_order():
    eos = 2
    first_stop = ids("xy") + [eos]
    checker = StopChecker(BYTES, {eos}, ["y"])
    assert push_all(checker, first_stop) == 1 and checker.text == "x"  # the stop string came first
    first_eos = ids("x") + [eos] + ids("y")
    checker = StopChecker(BYTES, {eos}, ["y"])
    assert push_all(checker, first_eos) == 1 and checker.text == "x"  # EOS came first


def test_visible_text_holds_back_a_possible_stop_string():
    checker = StopChecker(BYTES, set(), ["STOP"])
    shown = []
    for t in ids("go ST"):
        checker.push(t)
        shown.append(checker.visible())
    assert shown[-1] == "go "  # "ST" might become "STOP"
    for t in ids("AY"):
        checker.push(t)
    assert checker.visible() == "go STAY"  # it did not


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🎉🎉 mixed ü"])
def test_incremental_decoder_equals_full_decode(text):
    decoder = IncrementalDecoder(BYTES)
    pieces = [decoder.push(t) for t in ids(text)]
    assert "".join(pieces) == text == BYTES.decode(ids(text))
    assert all("\ufffd" not in p for p in pieces)  # incomplete characters are held back, never shown broken


def test_decoded_text_does_not_depend_on_how_often_it_is_read():
    """A stream reads the text after every step, a whole result once at the end: the same tokens give the same text,
    and bytes that never form a character (random models emit them) become U+FFFD instead of stalling the text."""
    tokens = ids("ab") + [196, 400] * 3 + ids("c") + [196, 400, 196]  # 196: byte 0xC1, never valid UTF-8
    once = IncrementalDecoder(BYTES)
    once.append(tokens)
    often = IncrementalDecoder(BYTES)
    for t in tokens:
        often.append([t])
        often.text  # noqa: B018 - read after every token, as a stream does
    # The last 3 tokens might still start a character: held back, as the stream holds them.
    assert once.text == often.text == "ab\ufffd\ufffd\ufffdc" == BYTES.decode(tokens[:-3])


@pytest.mark.real_model
def test_incremental_decoder_on_the_real_tokenizers():
    for name in ("smollm2", "gemma3-270m"):
        from transformers import AutoTokenizer

        from decodekit.models.sources import resolve

        tok = AutoTokenizer.from_pretrained(str(resolve(name, progress=False)))
        for text in ("Hello wörld, 日本語 🎉 done.", "  leading spaces\nand lines\t!"):
            token_ids = tok.encode(text, add_special_tokens=False)
            decoder = IncrementalDecoder(tok)
            streamed = "".join(decoder.push(t) for t in token_ids)
            assert streamed == tok.decode(token_ids, skip_special_tokens=True), name


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu")


PROMPT = [5, 6, 7, 8, 9, 10] * 4
METHODS = ["plain", "pld", "suffix", "recycling", "aded", "lookahead"]


def stop_string(engine: Engine) -> tuple[str, list[int]]:
    full = engine.generate(PROMPT, 40, ignore_eos=True)
    text = full.text
    for start in range(len(text) // 3, len(text) - 2):
        stop = text[start:start + 2]
        if stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
            return stop, full.token_ids
    pytest.skip("no usable stop string in the random model's text")


def test_stop_strings_end_every_method_at_the_same_token(engine):
    """token_ids end with the token that completes the stop string, whatever the method and however many tokens
    its steps commit at once (fused chunks included); the text ends just before the stop string."""
    stop, full = stop_string(engine)
    results = {m: engine.generate(PROMPT, 40, method=m, stop=[stop], ignore_eos=True, adaptive=False)
               for m in METHODS}
    results["fused"] = fused_engine(engine).generate(PROMPT, 40, stop=[stop], ignore_eos=True)
    want = results["plain"]
    assert want.finish_reason == "stop" and stop not in want.text
    assert engine.tokenizer.decode(want.token_ids).find(stop) >= 0
    assert engine.tokenizer.decode(want.token_ids[:-1]).find(stop) < 0  # the last token completed it
    assert want.token_ids == full[:len(want.token_ids)]
    for m, r in results.items():
        assert (r.token_ids, r.text, r.finish_reason) == (want.token_ids, want.text, "stop"), m
        assert r.stats.generated_tokens == len(want.token_ids), m


def test_a_stream_never_shows_what_the_final_text_removes(engine):
    stop, _ = stop_string(engine)
    for method in ("plain", "pld"):
        stream = engine.stream(PROMPT, 40, method=method, stop=[stop], ignore_eos=True)
        pieces = []
        try:
            while True:
                pieces.append(next(stream))
        except StopIteration as end:
            result = end.value
        assert "".join(pieces) == result.text and stop not in result.text, method
