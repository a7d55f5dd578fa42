"""Answer verifiers of data-file tasks against a known-answer table (issue 17: >= 40 equal and unequal pairs)."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanoseek.tasks.verifiers import equal, last_boxed

# (answer, reference, equal?) judged by hand.
MATH_TABLE = [
    ("72", "72", True),
    ("\\boxed{72}", "72", True),
    ("The answer is \\boxed{72}.", "72", True),
    ("1,000", "1000", True),
    ("1,000,000", "1000000", True),
    ("$1,234$", "1234", True),
    ("\\$18", "18", True),
    ("18 dollars", "18", True),
    ("12 cm", "12", True),
    ("5 \\text{ cm}", "5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac12", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("50\\%", "50", True),
    ("3.0", "3", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("x+1", "1+x", True),
    ("2x^2+4x+2", "2(x+1)^2", True),
    ("(1, 2)", "(1,2)", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("[0, 1)", "[0,1)", True),
    ("x=3", "3", True),
    ("-7", "-7", True),
    ("\\pi", "\\pi", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("2^{10}", "1024", True),
    ("10^{3}", "1000", True),
    ("\\frac{3}{4}", "0.75", True),
    ("73", "72", False),
    ("\\boxed{73}", "72", False),
    ("-72", "72", False),
    ("7.2", "72", False),
    ("1,001", "1000", False),
    ("\\frac{1}{3}", "0.33", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("2\\sqrt{2}", "\\sqrt{2}", False),
    ("x+2", "x+1", False),
    ("(1, 2)", "(2, 1)", False),
    ("[0, 1)", "(0, 1)", False),
    ("\\pi", "3.14", False),
    ("", "72", False),
    ("no idea", "72", False),
    ("3 or 4", "4", False),
    ("x^2", "2x", False),
]


@pytest.mark.parametrize(("answer", "reference", "expected"), MATH_TABLE)
def test_math_verifier_known_answers(answer, reference, expected):
    assert equal("math", answer, reference) is expected


@pytest.mark.parametrize(("verifier", "answer", "reference", "expected"), [
    ("numeric", "1,234 apples", "1234", True),
    ("numeric", "$18.00", "18", True),
    ("numeric", "\\boxed{-3.5}", "-3.5", True),
    ("numeric", "1e3", "1000", True),
    ("numeric", "3 or 4", "4", False),
    ("numeric", "seventy-two", "72", False),
    ("numeric", "72.1", "72", False),
    ("exact", "  New   York ", "New York", True),
    ("exact", "new york", "New York", False),
    ("choice", "(B)", "B", True),
    ("choice", "The answer is C.", "C", True),
    ("choice", "\\boxed{d}", "D", True),
    ("choice", "A or B", "B", False),
    ("choice", "B", "C", False),
])
def test_other_verifiers(verifier, answer, reference, expected):
    assert equal(verifier, answer, reference) is expected


def test_verifier_limits():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert equal("math", "1" * 10_000, "1" * 10_000) is False  # over MAX_ANSWER_CHARS: wrong, and fast
    with pytest.raises(ValueError, match="verifier='fuzzy'"):
        equal("fuzzy", "1", "1")


def test_math_verifier_off_the_main_thread():
    # math-verify's SIGALRM timeouts only work on the main thread; elsewhere it must still decide
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda case: equal("math", case[0], case[1]), MATH_TABLE))
    assert got == [expected for _, _, expected in MATH_TABLE]
