"""The user-facing constraint arguments, normalized into one hashable `ConstraintSpec`.

`constraint_spec(json_schema=..., regex=..., grammar=..., choice=..., response_format=...)` accepts exactly what
`engine.generate`, the CLI and the server take (OpenAI's `response_format` included) and returns a spec, or None
when nothing constrains the output. Every mistake a user can make here is a one-line ValueError, raised before any
model work. Whether the schema, regex or grammar *compiles* is the backend's question (`base.ConstraintCompiler`),
also answered before decoding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json_schema", "json_object", "regex", "grammar", "choice"]

# OpenAI's {"type": "json_object"}: any JSON object.
ANY_OBJECT_SCHEMA = '{"type":"object"}'


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match. `source` is canonical text, so equal constraints give equal (hashable) specs.

    kind `json_schema`: `source` is the schema as compact JSON (key order kept: it is the order properties are
    generated in); `json_object`: any JSON object (`source` is `{"type":"object"}`); `regex`: the pattern;
    `grammar`: Lark text (llguidance's dialect, which xgrammar also reads); `choice`: `choices` holds the strings
    and `source` their JSON list.
    """

    kind: Kind
    source: str
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """A short label for messages and benchmark rows."""
        text = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"{self.kind} {text}"


def constraint_spec(json_schema: dict | str | None = None, regex: str | None = None, grammar: str | None = None,
                    choice: list[str] | tuple[str, ...] | None = None,
                    response_format: dict | None = None) -> ConstraintSpec | None:
    """The normalized constraint of these arguments; None when none is given (or `response_format` is text).

    Raises ValueError (one line) for more than one kind at once, a schema that is not a JSON object, an empty
    regex or grammar, an empty choice list or a non-string choice, and a malformed `response_format`.
    """
    given = [name for name, value in [("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                      ("choice", choice), ("response_format", response_format)] if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one constraint, got {' and '.join(given)}")
    if json_schema is not None:
        return ConstraintSpec("json_schema", _schema_text(json_schema, "json_schema"))
    if regex is not None:
        return ConstraintSpec("regex", _nonempty_text(regex, "regex"))
    if grammar is not None:
        return ConstraintSpec("grammar", _nonempty_text(grammar, "grammar"))
    if choice is not None:
        return _choice(choice)
    if response_format is not None:
        return _response_format(response_format)
    return None


def _schema_text(schema: Any, what: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} cannot be written as JSON: {e}") from None


def _nonempty_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} is empty")
    return value


def _choice(choice: Any) -> ConstraintSpec:
    if isinstance(choice, str) or not isinstance(choice, (list, tuple)):
        raise ValueError(f"choice must be a list of strings, got {type(choice).__name__}")
    if not choice:
        raise ValueError("choice is an empty list")
    for c in choice:
        if not isinstance(c, str) or not c:
            raise ValueError(f"every choice must be a non-empty string, got {c!r}")
    choices = tuple(dict.fromkeys(choice))  # duplicates add nothing; order kept for messages
    return ConstraintSpec("choice", json.dumps(list(choices), ensure_ascii=False), choices)


def _response_format(rf: Any) -> ConstraintSpec | None:
    """OpenAI's `response_format`: {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}."""
    if not isinstance(rf, dict) or "type" not in rf:
        raise ValueError('response_format must be an object with a "type" (text, json_object or json_schema)')
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object", ANY_OBJECT_SCHEMA)
    if kind == "json_schema":
        inner = rf.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise ValueError('response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}')
        return ConstraintSpec("json_schema", _schema_text(inner["schema"], "response_format json_schema.schema"))
    raise ValueError(f"unknown response_format type {kind!r}; expected text, json_object or json_schema")


def choice_lark(choices: tuple[str, ...]) -> str:
    """A Lark grammar matching exactly one of `choices` (JSON string literals are valid Lark literals)."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
