"""`decodekit eval` on the real default model (SmolLM2-135M-Instruct, fetched once into the cache) and real GSM8K."""
from __future__ import annotations

import json

import pytest
from evaldata import SHARED_DATA

from decodekit.cli import main

pytestmark = [pytest.mark.real_model, pytest.mark.slow,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")]


def test_smollm2_gsm8k(capsys, tmp_path):
    out = tmp_path / "gsm8k.json"
    code = main(["eval", "--model", "smollm2", "--device", "cpu", "--task", "gsm8k", "--limit", "3",
                 "--max-new-tokens", "128", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    run = json.loads(out.read_text())["runs"][0]
    assert run["items"] == 3 and run["tokens_per_s"] > 0
    for record in run["records"]:
        # A real chat model writes prose about the problem: words, and a number for the harness to extract.
        assert len(record["completion"].split()) > 5 and record["scores"]["extracted"] is not None
        assert record["scores"]["reference"] in ("18", "3", "70000")  # GSM8K test's first three answers
