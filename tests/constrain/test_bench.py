"""bench_constrained on a tiny hand-made JSONSchemaBench folder: coverage counts what each backend compiles."""
import gzip
import json

import pytest

from decodekit.constrain.bench import bench_constrained, format_table, load_schemas

from constrain_helpers import BYTE_VOCAB

SCHEMAS = [
    ("ok.json", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    ("bad.json", {"type": "wat"}),
    ("fmt.json", {"type": "string", "format": "no-such-format"}),  # llguidance refuses, xgrammar ignores
]


@pytest.fixture
def data_dir(tmp_path):
    with gzip.open(tmp_path / "Tiny.jsonl.gz", "wt") as f:
        for name, schema in SCHEMAS:
            f.write(json.dumps({"subset": "Tiny", "file": name, "json_schema": json.dumps(schema)}) + "\n")
    with gzip.open(tmp_path / "Other.jsonl.gz", "wt") as f:
        f.write(json.dumps({"subset": "Other", "file": "x.json", "json_schema": '{"type": "boolean"}'}) + "\n")
    return tmp_path


def test_coverage_and_timings(data_dir, byte_tokenizer):
    result = bench_constrained(byte_tokenizer, [2], BYTE_VOCAB, data_dir=data_dir, subsets=["Tiny"], path_tokens=8)
    ll, xg = result["backends"]["llguidance"], result["backends"]["xgrammar"]
    assert (ll["total"]["compiled"], xg["total"]["compiled"], ll["total"]["schemas"]) == (1, 2, 3)
    assert any("bad.json" in e for e in ll["total"]["errors"]) and any("fmt.json" in e for e in ll["total"]["errors"])
    assert len(xg["total"]["errors"]) == 1 and xg["total"]["errors"][0].startswith("bad.json: invalid JSON schema")
    for b in (ll, xg):
        t = b["total"]
        assert 0 < t["compile_ms_p50"] <= t["compile_ms_p90"] and 0 < t["mask_us_p50"] <= t["mask_us_p99"]
        # the `ok` schema's walk: `{"a": ` then digits... at most path_tokens masks per compiled schema
        assert 1 <= t["mask_tokens"] <= 8 * t["compiled"]
    assert "TOTAL" in format_table(result) and "llguidance" in format_table(result)


def test_load_schemas(data_dir):
    assert [f for f, _ in load_schemas(data_dir, limit=2)["Tiny"]] == ["ok.json", "bad.json"]
    assert set(load_schemas(data_dir)) == {"Tiny", "Other"}
    with pytest.raises(ValueError, match="unknown subset"):
        load_schemas(data_dir, ["Nope"])
    with pytest.raises(ValueError, match="no JSONSchemaBench files"):
        load_schemas(data_dir / "missing")
