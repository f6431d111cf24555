"""Bad input of every kind is a 400 with OpenAI's error object, never a 500; auth is a 401; a full queue a 429 with
Retry-After while the others are served; the time limit ends a request with 408 (a stream with an error event)."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from serve_helpers import TINY

CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": TINY, "prompt": "hi", "max_tokens": 4}


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("content", ["{bad", "", "[1, 2]", "null", '{"model": "x"', "\xff\xfe"])
def test_malformed_bodies(http, content):
    for path in ("/completions", "/chat/completions"):
        r = http.post(path, content=content.encode("utf-8", "surrogatepass"),
                      headers={"content-type": "application/json"})
        assert_openai_error(r, 400)


def test_a_body_that_is_not_json(http):
    error = assert_openai_error(http.post("/completions", data={"model": TINY, "prompt": "x"}), 400)
    assert "JSON" in error["message"]


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"), ("temperature", True), ("max_tokens", 2.5), ("max_tokens", "8"), ("n", None),
    ("stop", 5), ("stop", ["a", 1]), ("seed", 1.5), ("stream", "yes"), ("method_options", [1]), ("top_k", -1),
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -9),
    ("max_tokens", 0), ("n", 129), ("seed", 2**64), ("min_p", 2.0), ("typical_p", 0), ("repetition_penalty", 0),
    ("top_h", -1), ("logprobs", 21), ("prompt", []), ("prompt", [[]]), ("prompt", [10**9]), ("prompt", [-1]),
    ("prompt", 7), ("echo", True), ("suffix", "x"), ("best_of", 3), ("logit_bias", {"5": 1.0}),
    ("model", "gpt-4"), ("method", "telepathy"), ("verifier", "oracle"), ("unknown_field", 1),
    ("stream_options", {"include_usage": "yes"}),
])
def test_bad_completion_fields(http, field, value):
    error = assert_openai_error(http.post("/completions", json={**COMPLETION, field: value}), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {**CHAT, "messages": []},
    {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]},
    {**CHAT, "messages": [{"content": "hi"}]},
    {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {**CHAT, "messages": "hi"},
    {**CHAT, "top_logprobs": 2},  # without logprobs: true
    {**CHAT, "logprobs": True, "top_logprobs": 50},
    {**CHAT, "response_format": {"type": "xml"}},
    {**CHAT, "response_format": {"type": "json_schema"}},  # no json_schema
    {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
    {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
    {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
    {**CHAT, "max_completion_tokens": -1},
    {k: v for k, v in CHAT.items() if k != "model"},
])
def test_bad_chat_bodies(http, body):
    assert_openai_error(http.post("/chat/completions", json=body), 400)


def test_errors_name_the_field(http):
    assert assert_openai_error(http.post("/completions", json={**COMPLETION, "top_p": 7}), 400)["param"] == "top_p"
    error = assert_openai_error(http.post("/completions", json={**COMPLETION, "model": "nope"}), 400)
    assert error["param"] == "model" and error["code"] == "model_not_found"


def test_method_option_values_the_method_refuses(http):
    body = {**COMPLETION, "method": "pld", "method_options": {"num_draft": 0}}
    assert "num_draft" in assert_openai_error(http.post("/completions", json=body), 400)["message"]
    body = {**COMPLETION, "method": "pld", "method_options": {"num_draft": "many"}}
    assert_openai_error(http.post("/completions", json=body), 400)


def test_unknown_routes_and_verbs_are_openai_errors(http):
    assert_openai_error(http.get("/nowhere"), 404)
    assert_openai_error(http.get("/completions"), 405)


def test_the_server_still_serves_after_all_that(http):
    r = http.post("/completions", json=COMPLETION)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- the strict server: API key, one running sequence, one queue place, 3 s per request ----------------------
KEY = {"Authorization": "Bearer sesame"}


def test_missing_or_wrong_api_key_is_401(strict_server):
    with httpx.Client(base_url=strict_server.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            error = assert_openai_error(http.post("/completions", json=COMPLETION, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            assert_openai_error(http.get("/models", headers=headers), 401)
        assert http.post("/completions", json=COMPLETION, headers=KEY).status_code == 200
        assert httpx.get(strict_server.base + "/health").status_code == 200  # health and metrics need no key
    client = openai.OpenAI(base_url=strict_server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_a_full_queue_is_429_with_retry_after_and_the_others_are_served(strict_server):
    # n=8 long samples, one sequence running at a time: busy until the 3 s limit ends them
    long = {**COMPLETION, "max_tokens": 2000, "n": 8, "ignore_eos": True, "stream": True}
    clients = [httpx.Client(base_url=strict_server.url, timeout=30, headers=KEY) for _ in range(3)]
    try:
        with clients[0].stream("POST", "/completions", json=long) as first, \
                clients[1].stream("POST", "/completions", json=long) as second:
            assert first.status_code == second.status_code == 200  # one running, one queued
            r = clients[2].post("/completions", json=COMPLETION)
            error = assert_openai_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1 and error["type"] == "rate_limit_error"
            client = openai.OpenAI(base_url=strict_server.url, api_key="sesame", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(**COMPLETION)
        # Both streams hung up: their places free up and a new request is served.
        deadline = time.monotonic() + 10
        while (r := clients[2].post("/completions", json=COMPLETION)).status_code == 429 and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200
    finally:
        for c in clients:
            c.close()


def test_the_time_limit_ends_a_request(strict_server):
    slow = {**COMPLETION, "max_tokens": 2000, "n": 8, "ignore_eos": True}  # one sequence at a time: far past 3 s
    with httpx.Client(base_url=strict_server.url, timeout=30, headers=KEY) as http:
        t0 = time.monotonic()
        error = assert_openai_error(http.post("/completions", json=slow), 408)
        assert error["code"] == "request_timeout" and time.monotonic() - t0 < 10
        with http.stream("POST", "/completions", json={**slow, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "request_timeout"
        assert http.post("/completions", json=COMPLETION).status_code == 200
    client = openai.OpenAI(base_url=strict_server.url, api_key="sesame", max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=TINY, prompt="hi", max_tokens=2000, n=8, extra_body={"ignore_eos": True})
    assert info.value.status_code == 408 and time.monotonic() - t0 < 6  # x-should-retry: false, so no retries
