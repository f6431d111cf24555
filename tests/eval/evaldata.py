"""Hand-written items in the format of each data set of /work/shared/data (see each folder's SOURCE.md), and a
writer of a data folder in that layout: the harness tests run without the shared data."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from decodekit.eval.data import REPO_ROOT

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 1,000 pens. 250 are sold. How many pens are left?",
     "answer": "1000 - 250 = <<1000-250=750>>750 pens are left.\n#### 750"},
    {"question": "Sam reads 5 pages a day for 6 days. How many pages does he read?",
     "answer": "5 * 6 = <<5*6=30>>30 pages.\n#### 30"},
]
HUMANEVAL = [
    {"task_id": "Toy/0", "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Return a + b.\"\"\"\n",
     "entry_point": "add", "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Toy/1", "prompt": "import math\n\n\ndef hyp(a: float, b: float) -> float:\n"
                                   "    \"\"\"Length of the hypotenuse.\"\"\"\n",
     "entry_point": "hyp", "canonical_solution": "    return math.sqrt(a * a + b * b)\n",
     "test": "def check(candidate):\n    assert abs(candidate(3, 4) - 5) < 1e-9\n"},
]
MBPP = [  # ids 2-4: the few-shot pool; 11 and 12: test split; 600: outside it (validation)
    {"task_id": i, "prompt": f"Write a function f{i} that returns {i}.", "code": f"def f{i}():\n    return {i}",
     "test_imports": [], "test_list": [f"assert f{i}() == {i}"]} for i in (2, 3, 4, 11, 12, 600)
]
SPEC_BENCH = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem."]},
    {"question_id": 2, "category": "summarization", "turns": ["Summarize: The cat sat on the mat all day long."],
     "reference": ["The cat sat on the mat."]},
    {"question_id": 3, "category": "translation", "turns": ["Translate German to English: Der Hund schläft ."],
     "reference": ["The dog is sleeping ."]},
]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data_dir(root: Path) -> Path:
    _write(root / "gsm8k" / "test.jsonl", GSM8K)
    train = "".join(json.dumps(r) + "\n" for r in GSM8K)
    (root / "gsm8k" / "train.jsonl.gz").write_bytes(gzip.compress(train.encode()))
    _write(root / "humaneval" / "HumanEval.jsonl", HUMANEVAL)
    _write(root / "mbpp" / "sanitized-mbpp.jsonl", MBPP)
    _write(root / "spec_bench" / "question.jsonl", SPEC_BENCH)
    return root
