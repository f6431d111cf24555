"""The official `openai` client against a real `decodekit serve` process: every endpoint, streaming, n, logprobs,
stop strings, and greedy outputs equal to `engine.generate` on the same prompt."""
from __future__ import annotations

import math

import openai
import pytest

from serve_helpers import TINY

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [TINY]
    assert client.models.retrieve(TINY).id == TINY
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_equals_engine_generate(client, tiny_engine):
    reference = tiny_engine.generate("The capital of France is", 24, temperature=0)
    r = client.completions.create(model=TINY, prompt="The capital of France is", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == reference.text
    assert r.choices[0].finish_reason == reference.finish_reason
    assert r.usage.prompt_tokens == len(reference.prompt_ids)
    assert r.usage.completion_tokens == len(reference.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_equals_engine_generate_with_the_chat_template(client, tiny_engine):
    reference = tiny_engine.generate(MESSAGES, 20, chat=True, temperature=0)
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_completion_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference.text
    assert r.usage.prompt_tokens == len(reference.prompt_ids)
    assert r.usage.completion_tokens == len(reference.token_ids)


def test_token_id_prompts_and_a_list_of_prompts(client, tiny_engine):
    ids = tiny_engine.encode("Once upon a time")
    r = client.completions.create(model=TINY, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == tiny_engine.generate(ids, 8, temperature=0).text
    r = client.completions.create(model=TINY, prompt=["Hello", "World"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt i, sample j: index i * n + j
    assert [c.text for c in r.choices] == [tiny_engine.generate(p, 8, temperature=0).text
                                           for p in ("Hello", "Hello", "World", "World")]


def test_streaming_completion_reassembles_the_whole_text(client, tiny_engine):
    reference = tiny_engine.generate("A list of fruits:", 32, temperature=0)
    pieces, finish = [], None
    stream = client.completions.create(model=TINY, prompt="A list of fruits:", max_tokens=32, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == reference.text and finish == reference.finish_reason
    assert usage.completion_tokens == len(reference.token_ids)


def test_streaming_chat_sends_the_role_first_then_content(client, tiny_engine):
    reference = tiny_engine.generate(MESSAGES, 24, chat=True, temperature=0)
    chunks = list(client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference.text
    assert chunks[-1].choices[0].finish_reason == reference.finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_n_samples_stream_each_with_its_own_index(client, tiny_engine):
    kwargs = dict(temperature=0.9, seed=7, top_p=0.95)
    reference = tiny_engine.generate("Tell me", 16, n=2, **kwargs)
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model=TINY, prompt="Tell me", max_tokens=16, n=2, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [r.text for r in reference]
    whole = client.completions.create(model=TINY, prompt="Tell me", max_tokens=16, n=2, **kwargs)
    assert [c.text for c in whole.choices] == [r.text for r in reference]
    assert whole.usage.completion_tokens == sum(len(r.token_ids) for r in reference)


def test_stop_strings_end_the_text_before_the_stop(client, tiny_engine):
    prompt = "Count: 1, 2, 3,"
    free = tiny_engine.generate(prompt, 40, temperature=0, ignore_eos=True).text
    # a two-character piece the free run produces (after its start), so the stop is certain to fire
    stop = next(free[i:i + 2] for i in range(3, len(free) - 1) if "\ufffd" not in free[i:i + 2])
    expected = tiny_engine.generate(prompt, 40, temperature=0, ignore_eos=True, stop=[stop])
    assert expected.finish_reason == "stop"
    body = dict(model=TINY, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(stop=stop, **body)
    assert r.choices[0].text == expected.text and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **body))
    assert streamed == expected.text


def test_logprobs_are_the_models_and_sorted(client, tiny_engine):
    reference = tiny_engine.generate("Logprobs", 6, temperature=0, logprobs=3)
    r = client.completions.create(model=TINY, prompt="Logprobs", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e[0] for e in reference.logprobs])
    assert len(lp.tokens) == 6 and all(len(top) <= 3 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5)


def test_decodekit_fields_travel_in_extra_body(client, tiny_engine):
    reference = tiny_engine.generate("abcabcabcabc", 20, temperature=0, method="pld", method_options={"num_draft": 4})
    r = client.completions.create(model=TINY, prompt="abcabcabcabc", max_tokens=20, temperature=0,
                                  extra_body={"method": "pld", "method_options": {"num_draft": 4}})
    assert r.choices[0].text == reference.text  # lossless: the same text as plain greedy decoding
    sampled = dict(temperature=1.0, seed=3, min_p=0.05, top_k=40)
    reference = tiny_engine.generate("Hi", 12, **sampled)
    r = client.completions.create(model=TINY, prompt="Hi", max_tokens=12, temperature=1.0, seed=3,
                                  extra_body={"min_p": 0.05, "top_k": 40})
    assert r.choices[0].text == reference.text


@pytest.mark.parametrize("kwargs, param", [
    (dict(model="gpt-4"), "model"),
    (dict(extra_body={"method": "telepathy"}), "method"),
    (dict(extra_body={"method": "pld", "method_options": {"warp": 9}}), None),
    (dict(temperature=5.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(extra_body={"colour": "blue"}), "colour"),
])
def test_bad_requests_raise_bad_request_error(client, kwargs, param):
    kwargs = {"model": TINY, "prompt": "x", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_a_prompt_longer_than_the_context_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model=TINY, prompt="x" * 3000, max_tokens=4)  # tiny-llama: 2048 positions
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "y" * 3000}],
                                       stream=True)
