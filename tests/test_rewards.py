"""Rule-based rewards: known answers, adversarial completions, and properties (nanoseek.tasks.rewards)."""
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.tasks import rewards as R

GOOD = "<think>2+9+0=11 1+7+1=9</think><answer>91</answer>"
OPEN_R1_STYLE = "<think>\n2+9+0=11\n</think>\n<answer>\n91\n</answer>"

# Completions every reward must survive; tags in odd arrangements, non-text and broken encodings.
ADVERSARIAL = [
    "", None, 91, 3.5, object(), b"", b"\xff\xfe<answer>91</answer>", bytearray(b"<answer>91</answer>"),
    "\ud800", "<think>\udfff</think><answer>\ud83d</answer>", "<answer>", "</answer>", "<think>", "</think>",
    "</answer><answer>", "<answer><answer>91</answer></answer>", "<think><answer>91</answer>",
    "<think><think>x</think></think><answer>91</answer>", "<answer>91", "91</answer>",
    "<think>x</think><answer>91</answer>" * 3, "\x00<think>\x00</think><answer>\x00</answer>",
    "<think>" * 1000, "<ANSWER>91</ANSWER>", "<answer>3 or 4</answer>",
]


def all_completion_rewards(completion, prefix=""):
    """Every reward that reads a completion, as floats (extraction mapped to whether it found something)."""
    return [
        R.accuracy_reward(completion, "91", prefix=prefix),
        R.accuracy_reward(completion, "91", prefix=prefix, allow_bare=True),
        R.format_reward(completion, prefix=prefix),
        R.tag_count_reward(completion, prefix=prefix),
        R.language_consistency_reward(completion, {"plus", "is"}, prefix=prefix),
        float(R.extract_answer(completion, prefix=prefix) is not None),
        float(R.reasoning_text(completion, prefix=prefix) is not None),
    ]


# ---- answer extraction and accuracy ------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, "91"),
        (OPEN_R1_STYLE, "91"),
        ("<answer>  91 \n</answer>", "91"),
        ("<answer>1</answer><answer>2</answer>", "2"),  # the last complete block counts
        ("<answer>1</answer><answer>2", "1"),  # an unclosed last block is not complete
        ("<think>a</think><answer>1</answer> trailing", "1"),
        ("<answer><answer>91</answer></answer>", "91</answer>"),  # nesting leaves a tag inside: never an int
        ("<think><answer>91</answer></think>", None),  # an answer inside the reasoning does not count
        ("<think><answer>91</answer>", None),  # nor one after a <think> that is never closed
        ("<think><answer>7</answer></think><answer>91</answer>", "91"),
        ("91", None),  # bare answers only when allowed
        ("", None),
        ("</answer>", None),
    ],
)
def test_extract_answer(completion, expected):
    assert R.extract_answer(completion) == expected


def test_extract_answer_bare_and_prefix():
    assert R.extract_answer(" 91\n", allow_bare=True) == "91"
    assert R.extract_answer("   ", allow_bare=True) is None
    assert R.extract_answer("91</think>", allow_bare=True) is None  # any tag turns bare reading off
    # after a prefilled <think>, a bare answer is reasoning that never ended
    assert R.extract_answer("91", prefix="<think>", allow_bare=True) is None
    assert R.extract_answer("x</think><answer>91</answer>", prefix="<think>") == "91"


@pytest.mark.parametrize(
    "completion, reward",
    [
        (GOOD, 1.0),
        ("<answer>91</answer>", 1.0),
        ("<answer>3 or 4</answer>", 0.0),
        ("<answer>91 or 92</answer>", 0.0),
        ("<answer>91, 92</answer>", 0.0),
        ("<answer>[91]</answer>", 0.0),
        ("<answer>091</answer>", 0.0),
        ("<answer>+91</answer>", 0.0),
        ("<answer>91.0</answer>", 0.0),
        ("<answer>９１</answer>", 0.0),  # full-width digits are not the answer's characters
        ("<answer>91</answer><answer>92</answer>", 0.0),  # last block wrong
        ("<answer>92</answer><answer>91</answer>", 1.0),  # last block right
        ("<think><answer>91</answer></think><answer>92</answer>", 0.0),
        ("<think>so <answer>91</answer></think>", 0.0),
        ("<think>unclosed <answer>91</answer>", 0.0),
        ("91", 0.0),
    ],
)
def test_accuracy_reward(completion, reward):
    assert R.accuracy_reward(completion, "91") == reward


def test_accuracy_reward_bare_answers():
    assert R.accuracy_reward("91", "91", allow_bare=True) == 1.0
    assert R.accuracy_reward("91 or 92", "91", allow_bare=True) == 0.0
    assert R.accuracy_reward("9 1", "91", allow_bare=True) == 0.0


# ---- format and tag count ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, reward",
    [
        (GOOD, 1.0),
        (OPEN_R1_STYLE, 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("\n" + GOOD + "\n", 1.0),  # surrounding whitespace is allowed
        ("<think>x</think> \n <answer>91</answer>", 1.0),
        ("", 0.0),
        ("<answer>91</answer>", 0.0),
        ("<think>x</think>", 0.0),
        ("<think>x</think>junk<answer>91</answer>", 0.0),
        (GOOD + " trailing", 0.0),
        ("prefix " + GOOD, 0.0),
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think><answer>1</answer></think><answer>2</answer>", 0.0),
        ("<think><think>x</think></think><answer>91</answer>", 0.0),
        ("<answer>91</answer><think>x</think>", 0.0),
        ("<think>x<answer>91</answer>", 0.0),
        ("<think>x</answer></think><answer>91<answer>", 0.0),
    ],
)
def test_format_reward(completion, reward):
    assert R.format_reward(completion) == reward


def test_format_reward_prefilled_think():
    completion = "2+9+0=11</think><answer>11</answer>"
    assert R.format_reward(completion) == 0.0  # the pitfall: the prefilled prefix zeroes format
    assert R.format_reward(completion, prefix="<think>") == 1.0
    assert R.format_reward("<think>" + completion, prefix="<think>") == 0.0  # re-emitted <think>
    assert R.tag_count_reward(completion) == 0.75
    assert R.tag_count_reward(completion, prefix="<think>") == 1.0


@pytest.mark.parametrize(
    "completion, reward",
    [
        (GOOD, 1.0),
        (OPEN_R1_STYLE, 1.0),
        ("", 0.0),
        ("<think>x</think>", 0.5),
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.5),
        ("<answer>1</answer>", 0.5),
        ("<think><think>", 0.0),
    ],
)
def test_tag_count_reward(completion, reward):
    assert R.tag_count_reward(completion) == reward


# ---- language consistency ----------------------------------------------------------------------
EN = frozenset({"plus", "is", "then"})


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("<think>2 plus 9 is 11 then</think><answer>11</answer>", 1.0),
        ("<think>2 plus 9 EST 11</think>", 0.5),
        ("<think>2 PLU 9 EST 11</think><answer>11</answer>", 0.0),
        ("<think>2 plus 9 是 11</think>", 0.5),  # any script's words count against the target
        ("<think>2+9=11</think><answer>11</answer>", 0.0),  # no words: nothing earns the bonus
        ("<think></think><answer>11</answer>", 0.0),
        ("<answer>plus</answer>", 0.0),  # no reasoning block
        ("<think>plus is then", 1.0),  # an unclosed block is reasoning to the end
        ("<think>plus</think><think>EST EST</think>", 1.0),  # only the first block is the reasoning
    ],
)
def test_language_consistency_reward(completion, reward):
    assert R.language_consistency_reward(completion, EN) == pytest.approx(reward)


def test_language_consistency_prefix():
    assert R.language_consistency_reward("plus is</think><answer>1</answer>", EN) == 0.0
    assert R.language_consistency_reward("plus is</think><answer>1</answer>", EN, prefix="<think>") == 1.0


# ---- TinyZero, length, overlong ----------------------------------------------------------------
def test_tinyzero_reward():
    assert R.tinyzero_reward(answered=False, correct=False) == 0.0
    assert R.tinyzero_reward(answered=True, correct=False) == 0.1
    assert R.tinyzero_reward(answered=True, correct=True) == 1.0
    assert R.tinyzero_reward(True, False, format_score=0.2) == 0.2


def test_length_penalty_kimi():
    assert R.length_penalty([10, 20, 30], [True, True, False]) == [0.5, 0.0, -0.5]
    assert R.length_penalty([10, 20, 30], [False, True, True]) == [0.0, 0.0, -0.5]  # wrong: never positive
    assert R.length_penalty([10, 30], [True, False]) == [0.5, -0.5]
    assert R.length_penalty([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    assert R.length_penalty([], []) == []
    with pytest.raises(ValueError, match="2 lengths but 3"):
        R.length_penalty([1, 2], [True, True, False])


@pytest.mark.parametrize(
    "length, reward", [(0, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (100, -1.0), (101, -1.0), (10**9, -1.0)]
)
def test_soft_overlong_penalty_dapo(length, reward):
    assert R.soft_overlong_penalty(length, max_len=100, cache_len=20) == pytest.approx(reward)


def test_soft_overlong_penalty_without_cache_is_a_cliff():
    assert R.soft_overlong_penalty(100, max_len=100, cache_len=0) == 0.0
    assert R.soft_overlong_penalty(101, max_len=100, cache_len=0) == -1.0


# ---- adversarial inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@pytest.mark.parametrize("prefix", ["", "<think>"])
def test_rewards_never_raise(completion, prefix):
    values = all_completion_rewards(completion, prefix)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)


def test_non_text_and_broken_encodings():
    assert R.accuracy_reward(b"<answer>91</answer>", "91") == 1.0  # bytes are decoded
    assert R.accuracy_reward(b"\xff<answer>91</answer>\xfe", "91") == 1.0
    assert R.accuracy_reward(None, "91") == 0.0
    assert R.accuracy_reward("<answer>\ud80091</answer>", "91") == 0.0
    assert R.format_reward("<think>\udc80</think><answer>\ud800</answer>") == 1.0


HUGE = 10_000_000


@pytest.mark.parametrize(
    "completion",
    [
        "x" * HUGE,
        "<think>" + "plus " * (HUGE // 5) + "</think><answer>91</answer>",
        "</think><answer>" * (HUGE // 16),  # defeats a backtracking format regex
        "<answer>9</answer>" * (HUGE // 18) + "<answer>91</answer>",
        "<think>" * (HUGE // 7),
    ],
    ids=["flat", "long-reasoning", "regex-bomb", "many-answers", "many-opens"],
)
def test_ten_megabyte_completions_return_quickly(completion):
    start = time.perf_counter()
    values = all_completion_rewards(completion)
    assert time.perf_counter() - start < 3.0  # linear-time scans take ~0.1 s here; quadratic ones, hours
    assert all(0.0 <= v <= 1.0 for v in values)


def test_huge_answer_found_correctly():
    assert R.accuracy_reward("<answer>9</answer>" * 100_000 + "<answer>91</answer>", "91") == 1.0


# ---- properties --------------------------------------------------------------------------------
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "91", "3", " or ", "plus", " ", "\n", "\ud800", "é", "<"]
completions = st.lists(st.sampled_from(PIECES), max_size=12).map("".join) | st.text(max_size=40)


@settings(max_examples=150, deadline=None)
@given(completions, st.sampled_from(["", "<think>"]))
def test_rewards_total_and_bounded(completion, prefix):
    values = all_completion_rewards(completion, prefix)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)


@settings(max_examples=150, deadline=None)
@given(completions)
def test_format_implies_tags_and_an_answer(completion):
    if R.format_reward(completion) == 1.0:
        assert R.tag_count_reward(completion) == 1.0
        assert R.extract_answer(completion) is not None
        assert R.reasoning_text(completion) is not None


FORMAT_REGEX = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


@settings(max_examples=300, deadline=None)
@given(completions)
def test_format_reward_is_the_documented_regex(completion):
    # the linear-time check equals the regex full match plus "each tag exactly once", on small inputs
    expected = bool(FORMAT_REGEX.fullmatch(completion)) and all(completion.count(t) == 1 for t in R.TAGS)
    assert R.format_reward(completion) == float(expected)
