"""Each task's loading, prompts, answer extraction and scoring on hand-written cases (correct and incorrect)."""
from __future__ import annotations

import pytest

from decodekit.eval import make_task
from decodekit.eval.base import Item, extract_code, keep_definitions
from decodekit.eval.data import data_dir as resolve_data_dir
from decodekit.eval.gsm8k import extract_answer, is_correct, reference_answer
from decodekit.eval.humaneval import program

from evaldata import HUMANEVAL


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEKIT_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / ".") == tmp_path
    with pytest.raises(FileNotFoundError, match="nowhere.*--data-dir"):
        resolve_data_dir(tmp_path / "nowhere")
    monkeypatch.setenv("DECODEKIT_DATA", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="gone.*DECODEKIT_DATA"):
        resolve_data_dir()


def test_loaders_pick_the_right_items(data_dir):
    counts = {name: len(make_task(name).load(data_dir)) for name in
              ("gsm8k", "humaneval", "mbpp", "summarization", "translation")}
    assert counts == {"gsm8k": 3, "humaneval": 2, "mbpp": 2, "summarization": 1, "translation": 1}
    assert [i.id for i in make_task("mbpp").load(data_dir)] == ["11", "12"]  # the test split, ids 11-510


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")


# ---- GSM8K --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 5\nwait, no\n#### 18", "18"),  # the last marker counts
    ("so she makes $18 a day.", "$18"),  # no marker: the last number
    ("Half of 10 is 5, plus 2 is 7.", "7"),
    ("#### \nThe answer is 12", "12"),  # an empty marker falls back to the last number
    ("#### $1,000.00 in total", "$1,000.00"),
    ("We get 1,000, and that is all.", "1,000"),  # a comma after a number is not part of it
    ("I do not know.", None),
])
def test_gsm8k_extraction(reply, expected):
    assert extract_answer(reply) == expected


@pytest.mark.parametrize("predicted, reference, correct", [
    ("18", "18", True), ("$18", "18", True), ("18.00", "18", True), ("1,000", "1000", True),
    ("18 dollars", "18", True), ("-3", "-3", True), ("19", "18", False), ("3", "-3", False),
    (None, "18", False), ("1,000", "100", False),
])
def test_gsm8k_correctness(predicted, reference, correct):
    assert is_correct(predicted, reference) is correct


def test_gsm8k_reference_and_score(data_dir):
    task = make_task("gsm8k")
    items = task.load(data_dir)
    assert reference_answer(items[1].row["answer"]) == "750"
    assert task.score(items[1], "1000 - 250 = 750\n#### 750", chat=True)["accuracy"] == 1.0
    assert task.score(items[1], "#### 1,250", chat=True)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="no '####'"):
        reference_answer("just 7")


def test_gsm8k_prompts(data_dir):
    task = make_task("gsm8k", num_fewshot=2)
    items = task.load(data_dir)
    chat, base = task.prompt(items[2], chat=True), task.prompt(items[2], chat=False)
    assert "####" in chat and items[2].row["question"] in chat
    assert base.count("Question:") == 3 and base.endswith(f"Question: {items[2].row['question']}\nAnswer:")
    assert "<<" not in base and "#### 7" in base  # calculator notes removed, answers kept
    assert task.stop(chat=False) == ["Question:"] and task.stop(chat=True) == []


# ---- code ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, code", [
    ("Sure:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
    ("```\ny = 2\n```", "y = 2\n"),
    ("```text\nhi\n```\n```py\nz = 3\n```", "z = 3\n"),  # the python block wins
    ("```python\nunclosed = 4\n", "unclosed = 4\n"),
    ("def f():\n    return 1", "def f():\n    return 1"),  # no fence: all of it
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def toy(i: int) -> Item:
    return Item(HUMANEVAL[i]["task_id"], HUMANEVAL[i])


def test_humaneval_program_base_and_chat():
    task = make_task("humaneval")
    right, wrong = "    return a + b\n", "    return a - b\n"
    assert task.score(toy(0), right, chat=False)["pass@1"] == 1.0
    failed = task.score(toy(0), wrong, chat=False)
    assert failed["pass@1"] == 0.0 and failed["status"] == "failed" and "AssertionError" in failed["detail"]
    whole = "Here it is:\n```python\ndef add(a: int, b: int) -> int:\n    return b + a\n```"
    assert task.score(toy(0), whole, chat=True)["pass@1"] == 1.0
    body_only = "```python\n    return a + b\n```"
    assert task.score(toy(0), body_only, chat=True)["pass@1"] == 1.0
    assert task.score(toy(0), "I cannot help with that.", chat=True)["pass@1"] == 0.0
    # The prompt's imports stay available when the reply redefines the function without them.
    assert task.score(toy(1), "```python\ndef hyp(a, b):\n    return math.hypot(a, b)\n```", chat=True)["pass@1"] == 1.0
    assert program(toy(0), right, chat=False).endswith("check(add)\n")


def test_humaneval_prompts():
    task = make_task("humaneval")
    assert task.prompt(toy(0), chat=False) == HUMANEVAL[0]["prompt"]
    assert "```python" in task.prompt(toy(0), chat=True)
    assert "\ndef" in task.stop(chat=False) and task.stop(chat=True) == []


def test_mbpp_prompts_and_scoring(data_dir):
    task = make_task("mbpp")
    item = task.load(data_dir)[0]
    base = task.prompt(item, chat=False)
    assert base.count("[BEGIN]") == 4 and base.count("[DONE]") == 3 and base.endswith("[BEGIN]\n")
    assert "assert f11() == 11" in base and "f2()" in base
    assert task.stop(chat=False) == ["[DONE]"]
    assert task.score(item, "def f11():\n    return 11\n", chat=False)["pass@1"] == 1.0
    assert task.score(item, "def f11():\n    return 12\n", chat=False)["pass@1"] == 0.0
    assert task.score(item, "```python\ndef f11():\n    return 11\n```", chat=True)["pass@1"] == 1.0
    assert task.score(item, "f11 = 11", chat=True)["pass@1"] == 0.0


# ---- text ---------------------------------------------------------------------------------------------------
def test_summarization_rouge(data_dir):
    task = make_task("summarization")
    item = task.load(data_dir)[0]
    assert task.prompt(item, chat=True) == item.row["turns"][0]
    assert task.prompt(item, chat=False).endswith("\n\nSummary:")
    exact = task.score(item, " The cat sat on the mat. ", chat=True)
    assert exact == {"rougeL": 1.0, "rouge1": 1.0, "rouge2": 1.0}
    # "the cat sat" against "the cat sat on the mat": unigram P = 1, R = 3/6; bigram P = 1, R = 2/5.
    partial = task.score(item, "the cat sat", chat=True)
    assert partial["rouge1"] == pytest.approx(2 / 3) and partial["rougeL"] == pytest.approx(2 / 3)
    assert partial["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert task.score(item, "Stocks fell sharply.", chat=True)["rougeL"] == 0.0


def test_translation_chrf_bleu(data_dir):
    task = make_task("translation")
    item = task.load(data_dir)[0]
    assert task.prompt(item, chat=False) == "German: Der Hund schläft .\nEnglish:"
    exact = task.score(item, "The dog is sleeping .", chat=True)
    assert exact["chrF"] == pytest.approx(100.0) and exact["BLEU"] == pytest.approx(100.0)
    close = task.score(item, "The dog sleeps .", chat=True)
    far = task.score(item, "Stocks fell sharply", chat=True)
    assert 100.0 > close["chrF"] > far["chrF"] >= 0.0
    corpus = task.corpus_scores([item], ["The dog is sleeping ."])
    assert corpus["corpus BLEU"] == pytest.approx(100.0) and corpus["corpus chrF"] == pytest.approx(100.0)


def test_chat_code_keeps_definitions_only():
    task = make_task("humaneval")
    reply = ("```python\nimport math\n\nLIMIT = 10\n\ndef add(a, b):\n    return a + b\n\n"
             "print(add(1, 2))\nassert add(1, 1) == 3  # a wrong demo\nif __name__ == '__main__':\n    add()\n```")
    assert task.score(toy(0), reply, chat=True)["pass@1"] == 1.0
    code = keep_definitions(extract_code(reply))
    assert "LIMIT = 10" in code and "import math" in code and "print" not in code and "assert" not in code
    assert keep_definitions("def f(:\n") == "def f(:\n"  # unparsable: unchanged
    assert keep_definitions("x = 1\n") == "x = 1\n"
