"""Continuous batching through the server: 32 concurrent streams each get the text they get alone, and a client
that hangs up mid-stream gives its sequence and KV memory back at once."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai

from serve_helpers import TINY

PROMPTS = [f"Request {i}: tell me about the number {i * 7}." for i in range(32)]


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_32_concurrent_streams_equal_each_alone(server, tiny_engine):
    alone = [tiny_engine.generate(p, 24, temperature=0).text for p in PROMPTS]
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    served_alone = [client.completions.create(model=TINY, prompt=p, max_tokens=24, temperature=0).choices[0].text
                    for p in PROMPTS[:4]]
    assert served_alone == alone[:4]

    async def one(aclient, prompt):
        pieces, first, last = [], None, None
        stream = await aclient.completions.create(model=TINY, prompt=prompt, max_tokens=24, temperature=0,
                                                  stream=True)
        async for chunk in stream:
            first = first or time.monotonic()
            pieces.append(chunk.choices[0].text)
            last = time.monotonic()
        return "".join(pieces), first, last

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in PROMPTS))

    results = asyncio.run(all_at_once())
    assert [r[0] for r in results] == alone
    # They ran together: at some moment most streams were between their first piece and their last.
    overlap = max(sum(first <= r[1] <= last for _, first, last in results) for r in results)
    assert overlap >= 16, overlap


def test_a_client_that_hangs_up_frees_its_sequence_and_kv_memory(server):
    body = {"model": TINY, "prompt": "A very long story:", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    assert metric(server.base, "decodekit_kv_blocks_used") == 0
    before = metric(server.base, "decodekit_generation_tokens_total")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert metric(server.base, "decodekit_running_sequences") == 1
            assert metric(server.base, "decodekit_kv_blocks_used") > 0
    deadline = time.monotonic() + 5
    while metric(server.base, "decodekit_kv_blocks_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server.base, "decodekit_kv_blocks_used") == 0
    assert metric(server.base, "decodekit_running_sequences") == 0
    generated = metric(server.base, "decodekit_generation_tokens_total") - before
    assert generated < 1900  # cancelled, not run to the end
    time.sleep(0.3)
    assert metric(server.base, "decodekit_generation_tokens_total") - before == generated  # and nothing since
    assert 'decodekit_requests_total{outcome="cancelled"}' in httpx.get(server.base + "/metrics").text
