"""constraint_spec: every user-facing form normalizes to one spec; every mistake is a one-line ValueError."""
import json

import pytest

from decodekit.constrain import ConstraintSpec, constraint_spec
from decodekit.constrain.spec import choice_lark

SCHEMA = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}


def test_nothing_given_is_no_constraint():
    assert constraint_spec() is None
    assert constraint_spec(response_format={"type": "text"}) is None


def test_schema_dict_string_and_response_format_are_one_spec_with_key_order_kept():
    from_dict = constraint_spec(json_schema=SCHEMA)
    from_text = constraint_spec(json_schema=json.dumps(SCHEMA, indent=2))
    from_openai = constraint_spec(response_format={"type": "json_schema",
                                                   "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert from_dict == from_text == from_openai
    assert from_dict.kind == "json_schema" and json.loads(from_dict.source) == SCHEMA
    assert list(json.loads(from_dict.source)["properties"]) == ["b", "a"]  # generation order: never sorted
    assert hash(from_dict) == hash(from_text)


def test_json_object_regex_grammar_choice():
    any_object = ConstraintSpec("json_object", '{"type":"object"}')
    assert constraint_spec(response_format={"type": "json_object"}) == any_object
    assert constraint_spec(regex=r"\d+") == ConstraintSpec("regex", r"\d+")
    assert constraint_spec(grammar="start: /a+/").kind == "grammar"
    spec = constraint_spec(choice=["yes", "no", "yes"])
    assert spec.kind == "choice" and spec.choices == ("yes", "no") and json.loads(spec.source) == ["yes", "no"]


def test_choice_lark_quotes_every_choice():
    assert choice_lark(("a", 'b"c', "d\\e")) == 'start: "a" | "b\\"c" | "d\\\\e"'


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema=SCHEMA, regex="a"), "at most one constraint, got json_schema and regex"),
    (dict(choice=["a"], response_format={"type": "json_object"}), "got choice and response_format"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema="[1, 2]"), "json_schema must be a JSON object"),
    (dict(json_schema={"a": float("nan")}), "cannot be written as JSON"),
    (dict(regex=""), "regex is empty"),
    (dict(regex=5), "regex must be a string"),
    (dict(grammar=""), "grammar is empty"),
    (dict(choice=[]), "choice is an empty list"),
    (dict(choice="yes"), "choice must be a list of strings"),
    (dict(choice=["a", 3]), "every choice must be a non-empty string"),
    (dict(choice=["a", ""]), "every choice must be a non-empty string"),
    (dict(response_format="json"), 'must be an object with a "type"'),
    (dict(response_format={"type": "xml"}), "unknown response_format type 'xml'"),
    (dict(response_format={"type": "json_schema"}), 'needs "json_schema"'),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": "{bad"}}), "is not valid JSON"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        constraint_spec(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
