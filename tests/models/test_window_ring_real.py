"""Gemma 3 270M with its 15 sliding-window layers on rings (window 512) against every entry kept: a prompt of
about 1.5k tokens (three windows), 64 greedy tokens, float32: the same tokens, and the window layers hold a ring."""
import json
from pathlib import Path

import pytest

import decodekit
from decodekit.engine import Engine

pytestmark = pytest.mark.real_model

ESSAYS = Path("/work/shared/data/long_context/PaulGrahamEssays_repo49.json")


@pytest.mark.skipif(not ESSAYS.exists(), reason="needs /work/shared/data/long_context")
def test_gemma3_ring_equals_full_on_a_long_prompt():
    full = decodekit.load("gemma3-270m", device="cpu", dtype="float32", window_ring=False, progress=False)
    ring = Engine(full.model, full.tokenizer)  # the default: rings for the window layers
    assert len(ring.core.pool.ring_layers) == 15 and not full.core.pool.ring_layers
    text = json.loads(ESSAYS.read_text())["text"]
    ids = full.tokenizer.encode(text, add_special_tokens=False)[:1500]
    prompt = [full.model.config.bos_token_id] + ids
    a = ring.generate(prompt, 64, ignore_eos=True)
    b = full.generate(prompt, 64, ignore_eos=True)
    assert a.token_ids == b.token_ids
    ring_cap = ring.core.pool.rings[0].capacity  # 512 + 2 x 256
    per_slot = full.core.pool.bytes_per_token() // 18  # one layer's keys and values
    written = len(prompt) + 63
    assert a.stats.kv_bytes_final == -(-written // 16) * 16 * per_slot * 3 + ring_cap * per_slot * 15
    assert b.stats.kv_bytes_final == -(-written // 16) * 16 * per_slot * 18
