"""Countdown, the TinyZero task (Pan et al., 2025, a small R1-Zero reproduction): reach a target from
given numbers with + - * / and parentheses, each number used at most once.

Instances are built backwards (random numbers combined by random operations into a target), so every
instance is solvable and carries a reference solution. Answers are checked by a small
recursive-descent parser over exact rationals, never ``eval``: only integer literals, the four
operators and parentheses are accepted, the literals must be a sub-multiset of the given numbers,
and division by zero or anything unparsable is simply wrong. TinyZero demands every number be used;
here "at most once" is the rule, which the reference solutions (that use them all) also satisfy.
"""
from __future__ import annotations

import operator
import random
import re
from collections import Counter
from fractions import Fraction

from nanoseek.tasks.base import Example, Task

# Longer answers are rejected unparsed: no solution over a handful of small numbers needs more, and it
# bounds the parser's work and recursion depth.
MAX_EXPRESSION_CHARS = 256
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
# Operator precedence, for printing solutions with the fewest parentheses (atoms bind tightest).
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _tokenize(text: str) -> list[str] | None:
    tokens, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            return None
        tokens.append(match.group(1) or match.group(2))
        pos = match.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'.

    No unary minus: countdown only combines the given numbers. Errors are signalled by returning None;
    a literal that is not among the unused given numbers is an error at once, which also keeps values small.
    """

    def __init__(self, tokens: list[str], numbers: Counter):
        self.tokens, self.pos, self.unused = tokens, 0, numbers

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> Fraction | None:
        value = self.term()
        while value is not None and self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term()
            value = None if rhs is None else _APPLY[op](value, rhs)
        return value

    def term(self) -> Fraction | None:
        value = self.factor()
        while value is not None and self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor()
            if rhs is None or (op == "/" and rhs == 0):
                return None
            value = _APPLY[op](value, rhs)
        return value

    def factor(self) -> Fraction | None:
        token = self._peek()
        if token is None:
            return None
        self.pos += 1
        if token == "(":
            value = self.expr()
            if value is None or self._peek() != ")":
                return None
            self.pos += 1
            return value
        if token[0].isdigit() and self.unused[int(token)] > 0:
            self.unused[int(token)] -= 1
            return Fraction(int(token))
        return None


def evaluate(expression: str, numbers: list[int] | tuple[int, ...]) -> Fraction | None:
    """The exact value of ``expression`` if it is well formed and uses each of ``numbers`` at most once, else None."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    tokens = _tokenize(expression)
    if not tokens:
        return None
    parser = _Parser(tokens, Counter(numbers))
    value = parser.expr()
    return value if parser.pos == len(tokens) else None


def _combine(left: tuple[str, int], op: str, right: tuple[str, int]) -> str:
    """``left op right`` with only the parentheses precedence and left-associativity require."""
    (lt, lp), (rt, rp) = left, right
    if lp < _PREC[op]:
        lt = f"({lt})"
    if rp < _PREC[op] or (op in "-/" and rp == _PREC[op]):
        rt = f"({rt})"
    return f"{lt}{op}{rt}"


class CountdownTask(Task):
    """``count`` numbers (a (min, max) range) from 1..``max_number``, a target in 1..``max_target``.

    Prompt: "use 3 5 2 to make 16:"; answer: an expression such as "(3+5)*2"; "think" trace: the
    solution's steps in evaluation order ("3+5=8 8*2=16"). Styles: "think", "bare".
    Default weights follow TinyZero: 0 no answer, 0.1 wrong answer, 1 correct.
    """

    name = "countdown"
    default_weights = {"tinyzero": 1.0}

    def __init__(self, count: tuple[int, int] = (3, 4), max_number: int = 99, max_target: int = 100, **task_kwargs):
        lo, hi = count
        if not 2 <= lo <= hi <= 8:
            raise ValueError(f"count={count!r}: expected (min, max) with 2 <= min <= max <= 8")
        if max_number < 1 or max_target < 1:
            raise ValueError(f"max_number={max_number!r}, max_target={max_target!r}: expected positive integers")
        super().__init__(**task_kwargs)
        self.count, self.max_number, self.max_target = (lo, hi), max_number, max_target

    def _sample(self, rng: random.Random) -> tuple[str, str, dict]:
        k = rng.randint(*self.count)
        # Rejection: many random trees miss the target range, but each try costs microseconds.
        for _ in range(100_000):
            numbers = [rng.randint(1, self.max_number) for _ in range(k)]
            # pool of (value, text, precedence); combine two random items until one remains
            pool = [(Fraction(n), str(n), _ATOM) for n in numbers]
            steps = []
            while len(pool) > 1:
                (lv, lt, lp) = pool.pop(rng.randrange(len(pool)))
                (rv, rt, rp) = pool.pop(rng.randrange(len(pool)))
                op = rng.choice("+-*/" if rv != 0 else "+-*")
                value = _APPLY[op](lv, rv)
                right = str(rv) if rv >= 0 else f"({rv})"  # "47+(-34)", not "47+-34"
                steps.append(f"{lv}{op}{right}={value}")
                pool.append((value, _combine((lt, lp), op, (rt, rp)), _PREC[op]))
            target, solution, _ = pool[0]
            if target.denominator == 1 and 1 <= target <= self.max_target:
                break
        else:
            raise ValueError(f"countdown: no target in 1..{self.max_target} from {k} numbers in 1..{self.max_number}")
        question = f"use {' '.join(map(str, numbers))} to make {target}:"
        meta = {"numbers": tuple(numbers), "target": int(target), "steps": " ".join(steps)}
        return question, solution, meta

    def _split_key(self, example: Example) -> str:
        # The same numbers in another order are the same puzzle.
        return f"{sorted(example.meta['numbers'])}->{example.meta['target']}"

    def _check(self, example: Example, answer: str) -> bool:
        return evaluate(answer, example.meta["numbers"]) == example.meta["target"]

    def _solution(self, example: Example, style: str) -> tuple[str | None, str]:
        return (example.meta["steps"] if style == "think" else None), example.answer
