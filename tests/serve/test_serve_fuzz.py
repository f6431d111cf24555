"""Fuzz every endpoint from the OpenAPI schema FastAPI generates (schemathesis, on hypothesis): bodies that fit the
schema and bodies that do not; the server must answer each without a 5xx and without hanging."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from serve_helpers import TINY

GENERATE = [("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]
READ = [("/v1/models", "GET"), ("/v1/models/{model_id}", "GET"), ("/health", "GET"), ("/metrics", "GET")]
EXAMPLES = 80  # per operation and mode: bounded, and derandomized so a failure reproduces


def bounded(case, positive: bool) -> None:
    """Keep each example cheap (a few tokens and samples: this fuzzes the HTTP surface, not the model); in bodies
    that fit the schema, ask for the served model, so the examples reach the engine and not only the model check."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 3), ("best_of", 3)):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > cap:
            body[key] = cap
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_completion_tokens"] = 8  # a chat reply is otherwise as long as the context allows
    if positive and isinstance(body.get("model"), str):
        body["model"] = TINY


def fuzz(server, op, mode: GenerationMode) -> list[int]:
    """Statuses of the examples' responses."""
    statuses = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        bounded(case, mode == GenerationMode.POSITIVE)
        response = case.call(base_url=server.base, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if response.status_code >= 400:  # every error is OpenAI's error object
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    return statuses


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_dict(httpx.get(server.base + "/openapi.json").json())


@pytest.mark.parametrize("path, method", GENERATE)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generation_endpoints_never_5xx(server, schema, path, method, mode):
    statuses = fuzz(server, schema[path][method], mode)
    if mode == GenerationMode.POSITIVE:  # the fuzz reached the engine, not only the validation
        assert statuses.count(200) >= 10, statuses


@pytest.mark.parametrize("path, method", READ)
def test_read_endpoints_never_5xx(server, schema, path, method):
    fuzz(server, schema[path][method], GenerationMode.POSITIVE)


def test_the_server_is_healthy_after_the_fuzz(server):
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    r = httpx.post(server.url + "/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200
