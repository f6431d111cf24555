"""Structured output through the server: `response_format` takes the engine's own path (`generate(response_format=)`),
so greedy replies equal the engine's, follow the schema, and a schema the grammar engine refuses is a 400."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from serve_helpers import TINY

MESSAGES = [{"role": "user", "content": "Describe a cat as JSON."}]
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["id", "ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_json_schema_reply_equals_engine_generate_and_validates(client, tiny_engine):
    reference = tiny_engine.generate(MESSAGES, 40, chat=True, temperature=0, response_format=FORMAT)
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_completion_tokens=40, temperature=0,
                                       response_format=FORMAT)
    choice = r.choices[0]
    assert choice.message.content == reference.text and choice.finish_reason == reference.finish_reason
    assert choice.finish_reason == "stop"  # the grammar's end: a complete object
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(model=TINY, messages=MESSAGES, max_completion_tokens=40, temperature=0,
                                            response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reference.text


def test_json_object_reply_is_an_object_or_cut_by_the_limit(client):
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_completion_tokens=24, temperature=0,
                                       response_format={"type": "json_object"})
    choice = r.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"


def test_bad_schemas_are_400_and_the_server_serves_on(client):
    for schema in ({"type": "wat"}, {"type": "string", "format": "no-such-format", "maxLength": 3}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=TINY, messages=MESSAGES, max_completion_tokens=8,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": schema}})
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_completion_tokens=4,
                                       response_format={"type": "text"})
    assert r.choices[0].message.content is not None
