"""Answer verifiers of data-file tasks: is an extracted answer equal to the reference? (DeepSeek-R1
§2.2.2: "for math problems with deterministic results, the model is required to provide the final
answer in a specified format (e.g., within a box), enabling reliable rule-based verification").

    equal("math", "\\boxed{\\frac{1}{2}}", "0.5")     # True: math-verify (sympy) equivalence
    equal("numeric", "1,234 apples", "1234")         # True: the one number in the answer
    equal("choice", "(B)", "B")                      # True

Every verifier returns a bool and never raises on an answer; the strict rule of ``rewards.py`` holds:
an answer naming several candidates ("3 or 4") is wrong. Code is verified by running tests
(``sandbox.py``), not here.
"""
from __future__ import annotations

import math
import re
import threading

from math_verify import parse, verify

VERIFIERS = ("math", "numeric", "exact", "choice", "code")
# Longer answers are wrong anyway, and sympy's cost grows with them.
MAX_ANSWER_CHARS = 400
# math-verify bounds parsing and comparison with SIGALRM, which only the main thread may use.
TIMEOUT_S = 2

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_NUMBER_WORDS = re.compile(r"\s*(\\?\$?[-+]?[\d.,]+)\s*[A-Za-z][A-Za-z ]*\.?\s*")
_LETTER = re.compile(r"(?<![A-Za-z])[A-J](?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _math_parse(text: str, timeout: int | None) -> list:
    # A number followed by words ("18 dollars") is the number; the rest is read as LaTeX (math-verify's
    # advice for bare "\frac12" or "x+1"), and raw only if that finds nothing.
    if unit := _NUMBER_WORDS.fullmatch(text):
        text = unit.group(1)
    return parse(f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)


def math_equal(answer: str, reference: str) -> bool:
    """Mathematical equivalence by math-verify: fractions, LaTeX, thousands separators, units, sets, intervals."""
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold, pred = _math_parse(reference, timeout), _math_parse(answer, timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - math-verify reports most failures as False; this catches the rest
        return False


def the_number(text: str) -> float | None:
    """The one number in ``text`` ("$1,234.5 total" -> 1234.5); None with none or several."""
    found = _NUMBER.findall(text.replace("\\!", ""))
    if len(found) != 1:
        return None
    return float(found[0].replace(",", ""))


def numeric_equal(answer: str, reference: str, rel_tol: float = 1e-6) -> bool:
    a, b = the_number(answer), the_number(reference)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def the_choice(text: str) -> str | None:
    """The one option letter A-J in ``text`` ("(B)", "B.", "The answer is B"); None with none or several."""
    bare = text.strip().strip("()[]{}.:*$ ")
    if len(bare) == 1 and bare.upper() in "ABCDEFGHIJ":
        return bare.upper()
    letters = set(_LETTER.findall(text))
    return letters.pop() if len(letters) == 1 else None


def equal(verifier: str, answer: str, reference: str) -> bool:
    """Whether ``answer`` matches ``reference`` under ``verifier`` (a ``\\boxed{}`` answer is unwrapped first)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    if verifier != "math":  # math-verify reads \boxed{} itself
        answer = last_boxed(answer) or answer
    if verifier == "math":
        return math_equal(answer, reference)
    if verifier == "numeric":
        return numeric_equal(answer, reference)
    if verifier == "choice":
        got = the_choice(answer)
        return got is not None and got == the_choice(reference)
    if verifier == "exact":
        return " ".join(answer.split()) == " ".join(reference.split())
    raise ValueError(f"verifier={verifier!r}: expected one of {[v for v in VERIFIERS if v != 'code']}")
