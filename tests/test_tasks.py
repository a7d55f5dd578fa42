"""Verifiable tasks: generators, SFT traces, checkers and the Task API (nanoseek.tasks)."""
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.tasks import (
    R1_ZERO_TEMPLATE,
    TASKS,
    ArithmeticTask,
    BilingualTask,
    CountdownTask,
    Example,
    make_task,
)
from nanoseek.tasks.arithmetic import dropped_carry_answer, has_carry, scratchpad
from nanoseek.tasks.bilingual import VOCABULARIES, addition_trace
from nanoseek.tasks.countdown import evaluate


def arithmetic_example(a, b, op):
    """The example ArithmeticTask would generate for a op b (without sampling)."""
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return Example(f"{a}{op}{b}=", str(result), f"{a}{op}{b}=", {"a": a, "b": b, "op": op})


def carries_longhand(a, b, op):
    """Whether pencil-and-paper arithmetic carries or borrows, written independently of the module."""
    if op == "+":
        while a or b:
            if a % 10 + b % 10 >= 10:  # before the first carry every carry-in is 0
                return True
            a, b = a // 10, b // 10
        return False
    if op == "-":
        while a:
            if a % 10 < b % 10:
                return True
            a, b = a // 10, b // 10
        return False
    # "*": one row per digit of b, then the rows added; any carry in either phase counts
    rows, shift = [], 0
    while True:
        digit, x, row = b % 10, a, 0
        place = 0
        while x:
            if (x % 10) * digit >= 10:
                return True
            row += (x % 10) * digit * 10**place
            x, place = x // 10, place + 1
        rows.append(row * 10**shift)
        b, shift = b // 10, shift + 1
        if not b:
            break
    total = 0
    for row in rows:
        if carries_longhand(total, row, "+"):
            return True
        total += row
    return False


# ---- arithmetic --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, op, b, trace, buggy",
    [
        (12, "+", 79, "2+9+0=11 1+7+1=9", 81),
        (95, "+", 17, "5+7+0=12 9+1+1=11", 2),  # the final carry is the answer's leading 1
        (12, "+", 34, "2+4+0=6 1+3+0=4", 46),
        (91, "-", 17, "11-7-0=4 9-1-1=7", 84),  # a borrowing column shows its digit + 10
        (100, "-", 99, "10-9-0=1 10-9-1=0 1-0-1=0", 111),
        (12, "*", 79, "12*9=108 12*70=840 108+840=948", 738),
        (12, "*", 3, "12*3=36", 36),
    ],
)
def test_arithmetic_known_traces(a, op, b, trace, buggy):
    assert scratchpad(a, b, op) == trace
    assert dropped_carry_answer(a, b, op) == buggy


def test_arithmetic_examples_and_sft_styles():
    task = ArithmeticTask(digits=2)
    ex = arithmetic_example(12, 79, "+")
    assert task.sft_example(ex, "think") == "<think>2+9+0=11 1+7+1=9</think><answer>91</answer>"
    assert task.sft_example(ex, "bare") == "91"
    assert task.sft_example(ex, "buggy") == "81"
    for e in task.examples(50, seed=0):
        a, b = e.meta["a"], e.meta["b"]
        assert e.prompt == f"{a}+{b}=" and e.answer == str(a + b) and 10 <= a <= 99 and 10 <= b <= 99
        assert e.meta["carry"] == carries_longhand(a, b, "+")
    ops = {e.meta["op"] for e in ArithmeticTask(digits=3, ops="+-*").examples(60, seed=0)}
    assert ops == {"+", "-", "*"}
    assert all(int(e.answer) >= 0 for e in ArithmeticTask(ops=("-",)).examples(50, seed=0))
    assert {e.meta["a"] for e in ArithmeticTask(digits=1).examples(200, seed=0)} <= set(range(10))


def test_arithmetic_scoring():
    task = ArithmeticTask()
    ex = arithmetic_example(12, 79, "+")
    assert task.score(ex, "<think>...</think><answer>91</answer>") == {
        "accuracy": 1.0, "format": 1.0, "tag_count": 1.0, "tinyzero": 1.0, "answered": 1.0,
    }
    assert task.is_correct(ex, "91") and not task.is_correct(ex, "81")
    assert not ArithmeticTask(accept_bare=False).is_correct(ex, "91")
    assert task.reward(ex, "<answer>91 or 81</answer>") == 0.0
    assert task.reward(ex, "<answer>81</answer><answer>91</answer>") == 1.0
    assert task.reward(ex, "<answer>91</answer><answer>81</answer>") == 0.0
    assert task.reward(ex, "<think><answer>91</answer></think>") == 0.0


OPERANDS = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from("+-*"))


@settings(max_examples=300, deadline=None)
@given(OPERANDS, st.booleans())
def test_think_traces_are_correct_and_well_formed(operands, prefill):
    a, b, op = operands
    if op == "-" and a < b:
        a, b = b, a
    task = ArithmeticTask(prefill_think=prefill, weights={"accuracy": 1.0, "format": 1.0})
    ex = arithmetic_example(a, b, op)
    completion = task.sft_example(ex, "think")
    scores = task.score(ex, completion)
    assert scores["accuracy"] == 1.0 and scores["format"] == 1.0 and scores["tag_count"] == 1.0
    assert task.reward(ex, completion) == 2.0


@settings(max_examples=500, deadline=None)
@given(OPERANDS)
def test_buggy_answers_are_wrong_exactly_when_a_carry_happens(operands):
    a, b, op = operands
    if op == "-" and a < b:
        a, b = b, a
    task = ArithmeticTask()
    ex = arithmetic_example(a, b, op)
    carry = carries_longhand(a, b, op)
    assert has_carry(a, b, op) == carry
    assert task.is_correct(ex, task.sft_example(ex, "buggy")) == (not carry)


# ---- countdown ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expression, numbers, value",
    [
        ("(3+5)*2", [3, 5, 2], Fraction(16)),
        (" ( 3 + 5 ) * 2 ", [3, 5, 2], Fraction(16)),
        ("3+5*2", [3, 5, 2], Fraction(13)),
        ("8-3-2", [8, 3, 2], Fraction(3)),  # left-associative
        ("8/(3-1)", [8, 3, 1], Fraction(4)),
        ("(1/3)*3", [1, 3, 3], Fraction(1)),  # exact rationals, no float round-off
        ("4/3", [4, 3], Fraction(4, 3)),
        ("5", [5, 6], Fraction(5)),  # not every number need be used
        ("3+3", [3, 3], Fraction(6)),
        ("3+3", [3], None),  # a number used twice
        ("3+4", [3], None),  # a number not given
        ("3/(5-5)", [3, 5, 5], None),  # division by zero
        ("-3+5", [3, 5], None),  # no unary minus
        ("3.0+5", [3, 5], None),
        ("3**2", [3, 2], None),
        ("3 5", [3, 5], None),
        ("(3+5", [3, 5], None),
        ("3+5)", [3, 5], None),
        ("()", [], None),
        ("", [], None),
        ("3+5=8", [3, 5], None),
        ("(3+5)*2 or 16", [3, 5, 2], None),
        ("__import__('os').system('true')", [], None),
        ("٣+5", [3, 5], None),  # non-ASCII digits
        ("(" * 120 + "3" + ")" * 120, [3], Fraction(3)),
        ("(" * 200 + "3" + ")" * 200, [3], None),  # over the length cap
        ("9" * 5000, [], None),
    ],
)
def test_countdown_evaluate(expression, numbers, value):
    assert evaluate(expression, numbers) == value


def test_countdown_tinyzero_scoring():
    task = CountdownTask()
    ex = Example("use 3 5 2 to make 16:", "(3+5)*2", "use 3 5 2 to make 16:", {"numbers": (3, 5, 2), "target": 16})
    assert task.reward(ex, "<think>3+5=8 8*2=16</think><answer>(3+5)*2</answer>") == 1.0
    assert task.reward(ex, "<think>x</think><answer>2*(5+3)</answer>") == 1.0  # any correct expression
    assert task.reward(ex, "<answer>3+5+2</answer>") == pytest.approx(0.1)
    assert task.reward(ex, "<answer>16</answer>") == pytest.approx(0.1)  # 16 is not a given number
    assert task.reward(ex, "<answer>(3+5)*2*2/2</answer>") == pytest.approx(0.1)  # reuses numbers
    assert task.reward(ex, "no answer here </think>") == 0.0
    assert task.reward(ex, "") == 0.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.tuples(st.integers(2, 5), st.integers(0, 2)), st.booleans())
def test_countdown_instances_are_solvable_and_solutions_verify(seed, shape, prefill):
    lo, extra = shape
    task = CountdownTask(count=(lo, lo + extra), max_number=30, max_target=200, prefill_think=prefill)
    for ex in task.examples(5, seed=seed):
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert lo <= len(numbers) <= lo + extra and all(1 <= n <= 30 for n in numbers) and 1 <= target <= 200
        assert ex.question == f"use {' '.join(map(str, numbers))} to make {target}:"
        assert evaluate(ex.answer, numbers) == target
        assert sorted(map(int, re.findall(r"[0-9]+", ex.answer))) == sorted(numbers)  # uses every number
        completion = task.sft_example(ex, "think")
        assert task.score(ex, completion)["accuracy"] == 1.0 and task.score(ex, completion)["format"] == 1.0


# ---- bilingual ---------------------------------------------------------------------------------
def test_bilingual_traces_and_language_reward():
    assert addition_trace(12, 79, "en") == "2 plus 9 plus 0 is 11 then 1 plus 7 plus 1 is 9"
    assert addition_trace(12, 79, "xx") == "2 PLU 9 PLU 0 EST 11 POST 1 PLU 7 PLU 1 EST 9"
    assert not VOCABULARIES["en"] & VOCABULARIES["xx"]
    task = BilingualTask()
    for ex in task.examples(20, seed=0):
        lang = ex.meta["language"]
        words = ex.question.rstrip(":").split()
        assert words[0] in VOCABULARIES[lang] and words[2] in VOCABULARIES[lang]
        think, switched = task.sft_example(ex, "think"), task.sft_example(ex, "switched")
        assert task.score(ex, think)["language"] == 1.0 and task.reward(ex, think) == 2.0  # accuracy + language
        assert task.score(ex, switched)["language"] == 0.0 and task.reward(ex, switched) == 1.0
        assert task.sft_example(ex, "bare") == ex.answer and task.reward(ex, ex.answer) == 1.0
    assert {ex.meta["language"] for ex in task.examples(20, seed=0)} == {"en", "xx"}
    assert {ex.meta["language"] for ex in BilingualTask(languages=("xx",)).examples(10, seed=0)} == {"xx"}
    ex = Example("add 12 and 79:", "91", "add 12 and 79:", {"a": 12, "b": 79, "language": "en"})
    mixed = "<think>2 plus 9 PLU 0 is 11</think><answer>91</answer>"
    assert task.score(ex, mixed)["language"] == pytest.approx(2 / 3)


# ---- Task API ----------------------------------------------------------------------------------
ALL_TASKS = [ArithmeticTask(digits=2), ArithmeticTask(digits=3, ops="+-*"), CountdownTask(), BilingualTask()]


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_examples_are_deterministic_by_seed(task):
    assert task.examples(30, seed=7) == task.examples(30, seed=7)
    assert task.examples(30, seed=7) != task.examples(30, seed=8)
    assert task.examples(30, seed=7, split="test") == task.examples(30, seed=7, split="test")
    assert task.examples(10, seed=7) == task.examples(30, seed=7)[:10]  # a prefix is a smaller draw
    assert task.examples(0) == []


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_train_and_test_are_disjoint(task):
    def keys(split):
        return {task._split_key(e) for s in range(3) for e in task.examples(100, s, split)}

    train, test = keys("train"), keys("test")
    assert train and test and not train & test


def test_split_is_a_stable_share_of_the_problem_space():
    # blake2b of the problem, not Python's salted hash(): the split is the same in every process
    task = ArithmeticTask()
    problems = [arithmetic_example(a, b, "+") for a in range(10, 100) for b in range(10, 100)]
    test = [ex.question for ex in problems if task.split_of(ex) == "test"]
    assert test[:6] == ["10+10=", "10+52=", "10+63=", "10+67=", "10+76=", "11+20="]
    assert len(test) == pytest.approx(810, rel=0.15)
    assert {task.split_of(ex) for ex in task.examples(20, split="test")} == {"test"}


def test_templates_and_prefill():
    ex = ArithmeticTask(template="r1zero").examples(1)[0]
    assert ex.prompt == R1_ZERO_TEMPLATE.format(question=ex.question)
    assert "<think> </think> and <answer> </answer> tags" in ex.prompt and ex.prompt.endswith("Assistant:")
    task = ArithmeticTask(prefill_think=True)
    ex = task.examples(1)[0]
    assert ex.prompt == ex.question + "<think>"
    completion = task.sft_example(ex, "think")
    assert not completion.startswith("<think>") and task.score(ex, completion)["format"] == 1.0
    with pytest.raises(ValueError, match="prefilled"):
        task.sft_example(ex, "bare")


def test_group_rewards_length_and_overlong():
    ex = arithmetic_example(12, 79, "+")
    group = ["<answer>91</answer>", "<think>long reasoning</think><answer>91</answer>", "<answer>81</answer>"]
    lengths = [10, 30, 20]
    plain = ArithmeticTask()
    assert plain.group_rewards(ex, group, lengths) == [1.0, 1.0, 0.0]
    kimi = ArithmeticTask(weights={"accuracy": 1.0, "length": 1.0})
    assert kimi.group_rewards(ex, group, lengths) == pytest.approx([1.5, 0.5, 0.0])
    dapo = ArithmeticTask(weights={"accuracy": 1.0, "overlong": 1.0}, max_len=30, overlong_cache=20)
    assert dapo.group_rewards(ex, group, lengths) == pytest.approx([1.0, 0.0, -0.5])
    assert len(plain.group_rewards(ex, group)) == 3  # character lengths by default
    with pytest.raises(ValueError, match="3 completions but 2 lengths"):
        plain.group_rewards(ex, group, [1, 2])


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
@pytest.mark.parametrize("completion", [None, "", b"\xff\xfe", "\ud800", "<answer>" * 10_000, 3, "x" * 10_000_000])
def test_task_scoring_never_raises(task, completion):
    ex = task.examples(1, seed=0)[0]
    scores = task.score(ex, completion)
    assert set(scores) == set(task.components) and all(isinstance(v, float) for v in scores.values())
    assert isinstance(task.reward(ex, completion), float) and not task.is_correct(ex, completion)


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="weights\\['acc'\\]"):
        ArithmeticTask(weights={"acc": 1.0})
    with pytest.raises(ValueError, match="max_len"):
        ArithmeticTask(weights={"overlong": 1.0})
    with pytest.raises(ValueError, match="template="):
        ArithmeticTask(template="chatml")
    with pytest.raises(ValueError, match="digits="):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError, match="ops="):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="count="):
        CountdownTask(count=(1, 3))
    with pytest.raises(ValueError, match="languages="):
        BilingualTask(languages=("fr",))
    with pytest.raises(ValueError, match="split="):
        ArithmeticTask().examples(1, split="val")
    with pytest.raises(ValueError, match="style="):
        CountdownTask().sft_example(CountdownTask().examples(1)[0], "buggy")
    with pytest.raises(ValueError, match="task="):
        make_task("gsm8k")
    with pytest.raises(ValueError, match="too small"):
        ArithmeticTask(digits=1, test_fraction=0.001).examples(5, split="test")


def test_registry():
    assert set(TASKS) == {"arithmetic", "countdown", "bilingual", "file"}
    task = make_task("arithmetic", digits=3, template="r1zero")
    assert isinstance(task, ArithmeticTask) and task.digits == 3 and task.template == "r1zero"
