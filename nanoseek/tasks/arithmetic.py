"""Multi-digit arithmetic with a digit-by-digit scratchpad: the verifiable task of the tiny-scale R1
experiments (REFERENCE.md, "Tiny-scale evidence": a "bimodal base" SFT'd on correct <think> traces plus
bare answers with dropped carries, then GRPO with an accuracy reward).

Prompts are plain "12+79="; the "think" target writes the right-to-left column trace
``<think>2+9+0=11 1+7+1=9</think><answer>91</answer>`` (digit + digit + carry-in = column sum; the
sum's last digit is written, its tens digit carried), "bare" is "91" and "buggy" is the answer a
pupil who drops carries writes ("81"). The buggy answer is wrong exactly when a carry (or borrow)
happens, which makes "carry cases" a clean probe of whether RL taught the model to reason.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from nanoseek.tasks.base import Example, Task

OPS = ("+", "-", "*")


def digits_of(n: int) -> list[int]:
    """Decimal digits of a non-negative integer, least significant first ([0] for 0)."""
    return [int(ch) for ch in reversed(str(n))]


def column_sums(a: int, b: int, op: str) -> list[int]:
    """The per-column values of the schoolbook algorithm before any carry moves between columns.

    "+": a_k + b_k; "-": a_k - b_k; "*": the sum over i + j = k of a_i * b_j.
    """
    da, db = digits_of(a), digits_of(b)
    if op == "*":
        cols = [0] * (len(da) + len(db) - 1)
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                cols[i + j] += x * y
        return cols
    width = max(len(da), len(db))
    da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
    return [x + y if op == "+" else x - y for x, y in zip(da, db)]


def has_carry(a: int, b: int, op: str) -> bool:
    """Whether the schoolbook algorithm carries (or borrows) anywhere: some column leaves 0..9.

    The first such column receives nothing, so it carries itself; if none does, nothing ever moves.
    """
    return any(not 0 <= c <= 9 for c in column_sums(a, b, op))


def dropped_carry_answer(a: int, b: int, op: str) -> int:
    """The buggy shortcut: each column's value mod 10, carries (and borrows) dropped.

    It differs from the true result by the sum over k of 10^k * (c_k mod 10 - c_k). For one operation
    all terms share a sign (columns of + and * are >= 0, those of - are <= 9), so the sum is zero
    exactly when every column stays in 0..9: the shortcut is wrong exactly when ``has_carry``.
    """
    return sum((c % 10) * 10**k for k, c in enumerate(column_sums(a, b, op)))


def operand_range(digits: int) -> tuple[int, int]:
    """Smallest and largest ``digits``-digit operand (0..9 for one digit)."""
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits={digits!r}: expected an integer >= 1")
    return (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1


def compute(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def addition_columns(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """Right-to-left columns (x, y, carry_in, x + y + carry_in); the last carry leads the answer."""
    da, db = digits_of(a), digits_of(b)
    width = max(len(da), len(db))
    columns, carry = [], 0
    for x, y in zip(da + [0] * (width - len(da)), db + [0] * (width - len(db))):
        columns.append((x, y, carry, x + y + carry))
        carry = (x + y + carry) // 10
    return columns


def addition_trace(a: int, b: int) -> list[str]:
    """Right-to-left column steps "x+y+carry=sum" ("2+9+0=11 1+7+1=9" for 12+79)."""
    return [f"{x}+{y}+{c}={s}" for x, y, c, s in addition_columns(a, b)]


def subtraction_trace(a: int, b: int) -> list[str]:
    """Right-to-left column steps "x-y-borrow=digit" for a >= b; a borrowing column shows x+10 ("11-7-0=4")."""
    da, db = digits_of(a), digits_of(b)
    db += [0] * (len(da) - len(db))
    steps, borrow = [], 0
    for x, y in zip(da, db):
        top = x + 10 if x - y - borrow < 0 else x
        steps.append(f"{top}-{y}-{borrow}={top - y - borrow}")
        borrow = int(top > x)
    return steps


def multiplication_trace(a: int, b: int) -> list[str]:
    """One partial product per digit of b, right to left ("12*70=840"), then their running sum."""
    partials = [a * d * 10**j for j, d in enumerate(digits_of(b))]
    steps = [f"{a}*{d * 10**j}={p}" for j, (d, p) in enumerate(zip(digits_of(b), partials))]
    total = partials[0]
    for p in partials[1:]:
        steps.append(f"{total}+{p}={total + p}")
        total += p
    return steps


def scratchpad(a: int, b: int, op: str) -> str:
    steps = {"+": addition_trace, "-": subtraction_trace, "*": multiplication_trace}[op](a, b)
    return " ".join(steps)


class ArithmeticTask(Task):
    """``digits``-digit operands (0-9 when digits is 1) with ops drawn from ``ops``; subtraction
    swaps the operands so results are never negative. Styles: "think", "bare", "buggy"."""

    name = "arithmetic"
    styles = ("think", "bare", "buggy")
    shortcut_style = "buggy"  # a pupil's dropped carries: wrong exactly where reasoning is needed

    def __init__(self, digits: int = 2, ops: Sequence[str] = ("+",), **task_kwargs):
        lo, hi = operand_range(digits)
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"ops={ops!r}: expected a non-empty selection of {OPS}")
        super().__init__(**task_kwargs)
        self.digits, self.ops, self.lo, self.hi = digits, tuple(ops), lo, hi

    def _sample(self, rng: random.Random) -> tuple[str, str, dict]:
        op = rng.choice(self.ops)
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        if op == "-" and a < b:
            a, b = b, a
        meta = {"a": a, "b": b, "op": op, "carry": has_carry(a, b, op)}
        return f"{a}{op}{b}=", str(compute(a, b, op)), meta

    def _check(self, example: Example, answer: str) -> bool:
        return answer == example.answer

    def _solution(self, example: Example, style: str) -> tuple[str | None, str]:
        a, b, op = example.meta["a"], example.meta["b"], example.meta["op"]
        if style == "think":
            return scratchpad(a, b, op), example.answer
        if style == "buggy":
            return None, str(dropped_carry_answer(a, b, op))
        return None, example.answer
