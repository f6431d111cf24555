"""Benchmark prompt files: Spec-Bench rows, `prompt` rows, the bundled sample, and clear errors."""
import pytest

from decodekit.bench.datasets import SAMPLE, load_prompts


def test_bundled_sample_covers_every_spec_bench_category():
    prompts = load_prompts(str(SAMPLE), 1)
    assert len({p.category for p in prompts}) == 13 and len(prompts) == 13
    assert len(load_prompts(str(SAMPLE))) == 26


def test_prompt_field_rows_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hello", "id": 7}\n\n{"turns": ["a", "b"], "category": "x"}\n')
    prompts = load_prompts(str(good))
    assert [(p.id, p.category, p.prompt) for p in prompts] == [("7", "all", "hello"), ("3", "x", "a")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="needs a `turns` list or a `prompt` field"):
        load_prompts(str(bad))
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.jsonl"))
