"""`decodekit bench-constrained` end to end on a tiny model and a hand-made JSONSchemaBench folder."""
import gzip
import json

import pytest

from decodekit.cli import main
from decodekit.constrain.bench_cli import _validator, check_output

SCHEMAS = [
    ("ok.json", {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["a"], "additionalProperties": False}),
    ("bad.json", {"type": "wat"}),
    ("enum.json", {"enum": ["red", "green"]}),
    ("fmt.json", {"type": "string", "format": "no-such-format", "maxLength": 3}),  # llguidance refuses it
]


@pytest.fixture
def data_dir(tmp_path):
    with gzip.open(tmp_path / "Tiny.jsonl.gz", "wt") as f:
        for name, schema in SCHEMAS:
            f.write(json.dumps({"subset": "Tiny", "file": name, "json_schema": json.dumps(schema)}) + "\n")
    return tmp_path


def test_check_output_against_the_validator():
    v = _validator(json.dumps(SCHEMAS[0][1]))
    assert check_output('{"a": 5}', v) == "valid"
    assert check_output('{"a": 500}', v) == "invalid" and check_output('{"a": 5', v) == "invalid"
    assert check_output('{"a": 5}', None) == "unchecked"


def test_bench_constrained_reports_coverage_compliance_and_speed(data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench-constrained", "--model", "random:tiny-llama", "--device", "cpu", "--data", str(data_dir),
            "--limit", "4", "--methods", "plain,pld", "--max-new-tokens", "24", "--path-tokens", "4",
            "--json", str(out), "--markdown", str(tmp_path / "r.md")]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert {b: r["grammar"]["backends"][b]["total"]["compiled"] for b in ("llguidance", "xgrammar")} == \
        {"llguidance": 2, "xgrammar": 3}
    gen = r["generation"]
    assert gen["prompts"] == 4 and gen["skipped_long_prompts"] == 0
    for method in ("plain", "pld"):
        assert len(gen["unconstrained"][method]["runs"]) == 4 and gen["unconstrained"][method]["tok_s"] > 0
        for backend, compiled in (("llguidance", 2), ("xgrammar", 3)):
            s = gen["constrained"][backend][method]
            assert s["compiled"] == compiled and s["invalid"] == 0 and s["completed"] >= 1
            assert s["valid"] + s["unchecked"] + s["incomplete"] == compiled
            assert s["tok_s"] > 0 and 0 < s["grammar_share"] < 1
            for run in s["runs"]:
                if run["compiled"] and run["finish_reason"] == "stop":
                    assert run["check"] == "valid"
    # greedy: both methods give the same outputs
    for backend in ("llguidance", "xgrammar"):
        texts = [[x.get("text") for x in gen["constrained"][backend][m]["runs"]] for m in ("plain", "pld")]
        assert texts[0] == texts[1]
    printed = capsys.readouterr().out
    assert "TOTAL" in printed and "grammar %" in printed
    assert (tmp_path / "r.md").read_text().startswith("```")


def test_bench_constrained_rejects_an_unknown_subset_before_loading(data_dir, capsys):
    assert main(["bench-constrained", "--model", "no-such-model", "--data", str(data_dir), "--subset", "Nope"]) == 1
    assert "unknown subset" in capsys.readouterr().err
