"""`decodekit bench`: methods side by side, alone or in batches; greedy drafters are identical to plain."""
import json

import pytest

from decodekit.cli import main


@pytest.mark.parametrize("batch", [1, 4])
def test_bench_runs_methods_side_by_side(tmp_path, capsys, batch):
    out, data_file = tmp_path / "bench.json", tmp_path / "prompts.jsonl"
    rows = [{"category": c, "turns": [t]} for c, t in
            [("a", "the cat sat on the mat, the cat sat"), ("a", "one two three one two"), ("b", "abc abc abc abc")]]
    data_file.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["bench", "--model", "random:tiny-llama", "--device", "cpu", "--methods", "plain,pld,suffix",
                 "--dataset", str(data_file), "--max-new-tokens", "8", "--batch-size", str(batch), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["meta"]["batch_size"] == batch
    overall = {m: rows["overall"] for m, rows in data["summary"].items()}
    assert set(overall) == {"plain", "pld", "suffix"}
    n = overall["plain"]["prompts"]
    assert n == 3 and all(o["identical"] == n for o in overall.values())  # greedy drafts change nothing
    assert overall["plain"]["speedup"] == 1.0 and all(o["tokens_per_s"] > 0 for o in overall.values())


def test_bench_rejects_a_bad_batch_size(capsys):
    assert main(["bench", "--model", "random:tiny-llama", "--device", "cpu", "--batch-size", "0"]) == 1
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_method_specs_split_and_parse_like_the_cli():
    from decodekit.bench.runner import parse_method, split_methods

    assert split_methods("plain,pld:on_device=false,adaptive=false,eagle:draft_vocab=8192,hydra") == [
        "plain", "pld:on_device=false,adaptive=false", "eagle:draft_vocab=8192", "hydra"]
    assert split_methods("pld:num_draft=4;eagle") == ["pld:num_draft=4", "eagle"]
    assert parse_method("pld:on_device=false,num_draft=4,x=1.5,y=text") == (
        "pld", {"on_device": False, "num_draft": 4, "x": 1.5, "y": "text"})
