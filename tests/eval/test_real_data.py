"""The real data sets of /work/shared/data (skipped where that folder is absent): item counts, and reference
solutions passing through each task's program assembly and the sandbox (so a wrong assembly cannot hide)."""
from __future__ import annotations

import pytest
from evaldata import SHARED_DATA

from decodekit.eval import make_task

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


def test_item_counts():
    counts = {name: len(make_task(name).load(SHARED_DATA)) for name in
              ("gsm8k", "humaneval", "mbpp", "summarization", "translation")}
    assert counts == {"gsm8k": 1319, "humaneval": 164, "mbpp": 257, "summarization": 80, "translation": 80}


def test_gsm8k_reference_solutions_score_right_and_shots_fit():
    task = make_task("gsm8k")
    items = task.load(SHARED_DATA)
    assert all(task.score(item, item.row["answer"], chat=True)["accuracy"] == 1.0 for item in items[:40])
    assert task.score(items[0], "#### 17", chat=True)["accuracy"] == 0.0  # the reference is 18
    assert task.prompt(items[0], chat=False).count("Question:") == task.num_fewshot + 1


@pytest.mark.parametrize("index", [0, 38, 163])
def test_humaneval_canonical_solutions_pass(index):
    task = make_task("humaneval")
    item = task.load(SHARED_DATA)[index]
    solution = item.row["canonical_solution"]
    assert task.score(item, solution, chat=False)["pass@1"] == 1.0
    reply = f"```python\n{item.row['prompt']}{solution}```"  # a chat reply with the whole function
    assert task.score(item, reply, chat=True)["pass@1"] == 1.0
    assert task.score(item, "    return None\n", chat=False)["pass@1"] == 0.0


@pytest.mark.parametrize("index", [0, 100, 256])
def test_mbpp_reference_code_passes(index):
    task = make_task("mbpp")
    item = task.load(SHARED_DATA)[index]
    assert task.score(item, item.row["code"], chat=False)["pass@1"] == 1.0
    assert task.score(item, f"```python\n{item.row['code']}\n```", chat=True)["pass@1"] == 1.0
    assert task.score(item, "pass", chat=False)["pass@1"] == 0.0
