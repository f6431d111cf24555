"""`decodekit serve --model smollm2` with the `openai` client: chat through the model's own template, streaming,
and greedy replies equal to `engine.generate`."""
from __future__ import annotations

import openai
import pytest

from serve_helpers import ServerProcess

pytestmark = pytest.mark.real_model
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smol_server():
    s = ServerProcess("--model", "smollm2", "--method", "pld")
    yield s
    assert s.stop() == 0, s.stderr()


@pytest.fixture(scope="module")
def smol():
    import decodekit

    return decodekit.load("smollm2", device="cpu", progress=False)


def test_chat_and_stream_equal_engine_generate(smol_server, smol):
    client = openai.OpenAI(base_url=smol_server.url, api_key="x", max_retries=0, timeout=120)
    reference = smol.generate(MESSAGES, 24, chat=True, temperature=0)
    assert "Paris" in reference.text
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == reference.text
    assert r.usage.prompt_tokens == len(smol.encode(MESSAGES, chat=True))  # the model's chat template
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0, stream=True))
    assert streamed == reference.text
    # The server's default method is pld; plain asked explicitly gives the same greedy text (lossless).
    plain = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0,
                                           extra_body={"method": "plain"})
    assert plain.choices[0].message.content == reference.text
