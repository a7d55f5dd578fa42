"""Tasks from data files (nanoseek.tasks.file): formats, field names, splits, SFT targets and rewards
(issue 17 item 1). The files under tests/data/ are small hand-written rows in each dataset's layout."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.posttrain.config import PostConfig
from nanoseek.tasks import FileTask, make_task

DATA = Path(__file__).parent / "data"


def all_rows(task):
    return task.rows["train"] + task.rows["test"]


def by_question(task, start):
    return next(e for e in all_rows(task) if e.question.startswith(start))


def test_gsm8k_rows():
    task = make_task("file", path=str(DATA / "gsm8k_tiny.jsonl"))
    assert (task.format, task.verifier, task.styles) == ("gsm8k", "math", ("think", "bare"))
    e = by_question(task, "Mia has 3 boxes")
    assert e.answer == "29"
    assert e.meta["solution"] == "She had 3 * 12 = 36 pencils.\nAfter giving some away she has 36 - 7 = 29 pencils."
    assert task.sft_example(e, "think") == f"<think>{e.meta['solution']}</think><answer>29</answer>"
    for good in ("<think>…</think><answer>29</answer>", "<answer>\\boxed{29}</answer>", "29 pencils", "29.0"):
        assert task.score(e, good)["accuracy"] == 1.0, good
    for bad in ("<answer>30</answer>", "<think>29</think>", "28 or 29", ""):
        assert task.score(e, bad)["accuracy"] == 0.0, bad
    farm = by_question(task, "A farm has 1,200")
    assert task.is_correct(farm, "<answer>750</answer>") and not task.is_correct(farm, "<answer>1,200</answer>")


def test_math_rows():
    task = make_task("file", path=str(DATA / "math_tiny.jsonl"))
    assert (task.format, task.verifier) == ("math", "math")
    half = by_question(task, "What is")
    assert half.answer == "\\frac{3}{4}"
    assert task.score(half, "<answer>0.75</answer>")["accuracy"] == 1.0
    assert task.score(half, "<answer>\\frac{6}{8}</answer>")["accuracy"] == 1.0
    assert task.score(half, "<answer>\\frac{3}{5}</answer>")["accuracy"] == 0.0
    root = by_question(task, "Simplify")
    assert task.is_correct(root, "<answer>\\sqrt{50}</answer>") and not task.is_correct(root, "<answer>5</answer>")


def test_mbpp_rows_score_the_share_of_tests():
    task = make_task("file", path=str(DATA / "mbpp_tiny.jsonl"))
    assert (task.format, task.verifier, task.styles) == ("mbpp", "code", ("bare",))
    e = by_question(task, "Write a function to return the sum")
    assert e.question.endswith("assert list_sum([-1, 1]) == 0")  # MBPP's prompt shows the tests
    assert task.score(e, task.sft_example(e, "bare"))["accuracy"] == 1.0
    assert task.score(e, "```python\ndef list_sum(xs):\n    return 6\n```")["accuracy"] == pytest.approx(1 / 3)
    assert task.score(e, "<think>sum it</think><answer>def list_sum(xs):\n    return 0</answer>")["accuracy"] \
        == pytest.approx(2 / 3)
    assert task.score(e, "import os\nos._exit(0)")["accuracy"] == 0.0
    with pytest.raises(ValueError, match="offers"):
        task.sft_example(e, "think")


def test_humaneval_rows():
    task = make_task("file", path=str(DATA / "humaneval_tiny.jsonl"), test_fraction=0.5)
    assert (task.format, task.verifier) == ("humaneval", "code")
    e = all_rows(task)[0]
    assert e.meta["entry_point"] == "add"
    assert task.score(e, task.sft_example(e, "bare"))["accuracy"] == 1.0
    assert task.score(e, "    return a + b\n")["accuracy"] == 1.0  # a body continuing the prompt
    assert task.score(e, "<answer>\n    return a + b\n</answer>")["accuracy"] == 1.0
    assert task.score(e, "```python\ndef add(a, b):\n    return b + a\n```")["accuracy"] == 1.0
    assert task.score(e, "def add(a, b):\n    return a * b")["accuracy"] == 0.0
    assert task.score(e, "def check(candidate):\n    pass\ndef add(a, b):\n    return 0")["accuracy"] == 0.0


def test_choices_field_names_and_parquet(tmp_path):
    rows = [{"q": f"Which letter is number {i}?", "options": ["first", "second", "third"], "gold": i % 3}
            for i in range(6)]
    path = tmp_path / "mc.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    task = make_task("file", path=str(path), format="qa", fields={"question": "q", "answer": "gold", "choices": "options"},
                     test_fraction=0.5)
    assert task.verifier == "choice"
    e = by_question(task, "Which letter is number 4?")
    assert e.answer == "B" and e.question.endswith("\nA. first\nB. second\nC. third")
    assert task.is_correct(e, "<answer>(B)</answer>") and not task.is_correct(e, "<answer>C</answer>")

    numeric = tmp_path / "n.jsonl"
    numeric.write_text(json.dumps({"question": "How many?", "answer": "1,234"}) + "\n")
    task = make_task("file", path=str(numeric), verifier="numeric", test_fraction=0.5)
    e = all_rows(task)[0]
    assert task.is_correct(e, "1234 apples") and not task.is_correct(e, "1234 or 1235")

    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"q": "How many?", "a": "2 + 2 = 4\n#### 4"}) + "\n")
    task = make_task("file", path=str(renamed), fields={"question": "q", "answer": "a"}, test_fraction=0.5)
    assert (task.format, all_rows(task)[0].answer) == ("gsm8k", "4")
    renamed.write_text(json.dumps({"task": "Add.", "checks": ["assert add(1, 1) == 2"], "ref": "def add(a, b):\n"
                                   "    return a + b"}) + "\n")
    task = make_task("file", path=str(renamed), fields={"question": "task", "tests": "checks", "solution": "ref"},
                     test_fraction=0.5)
    e = all_rows(task)[0]
    assert task.format == "mbpp" and task.score(e, task.sft_example(e, "bare"))["accuracy"] == 1.0


def test_splits_and_examples(tmp_path):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_task("file", path=str(path), test_fraction=0.25)
    train, test = ({e.question for e in task.rows[s]} for s in ("train", "test"))
    assert train and test and not train & test and len(train | test) == 40
    again = make_task("file", path=str(path), test_fraction=0.25)
    assert {e.question for e in again.rows["test"]} == test  # a stable hash, not a seed
    # every row once before any repeats; the same seed gives the same order
    drawn = task.examples(2 * len(train), seed=3)
    assert {e.question for e in drawn[: len(train)]} == train and drawn == task.examples(2 * len(train), seed=3)
    assert drawn[: len(train)] != task.examples(len(train), seed=4)
    # the test split is never repeated
    assert len(task.examples(1000, split="test")) == len(test)

    held_out = tmp_path / "test.jsonl"
    held_out.write_text(json.dumps({"question": "What is 100 plus 1?", "answer": "#### 101"}) + "\n")
    task = make_task("file", path=str(path), test_path=str(held_out))
    assert len(task.rows["train"]) == 40 and [e.answer for e in task.examples(5, split="test")] == ["101"]


def test_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: no 'answer' field for the answer"):
        make_task("file", path=str(bad), format="gsm8k")
    no_marker = tmp_path / "nm.jsonl"
    no_marker.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"nm.jsonl row 0: a GSM8K answer must end in '#### <number>'"):
        make_task("file", path=str(no_marker), format="gsm8k")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        make_task("file", path=str(odd))
    with pytest.raises(ValueError, match="verifier='fuzzy'"):
        make_task("file", path=str(DATA / "gsm8k_tiny.jsonl"), verifier="fuzzy")
    with pytest.raises(ValueError, match="code tasks use 'code'"):
        make_task("file", path=str(DATA / "gsm8k_tiny.jsonl"), verifier="code")
    with pytest.raises(ValueError, match=r"fields\['prompt'\]: unknown role"):
        make_task("file", path=str(DATA / "gsm8k_tiny.jsonl"), fields={"prompt": "q"})
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        make_task("file", path=str(tmp_path / "missing.jsonl"))


def test_configured_from_a_run_config():
    cfg = PostConfig.load(None, ["task.name=file", f"task.options.path={DATA / 'gsm8k_tiny.jsonl'}",
                                 "task.options.test_fraction=0.3", "task.options.limits.timeout=2"])
    task = cfg.build_task()
    assert isinstance(task, FileTask) and task.format == "gsm8k" and task.limits.timeout == 2
