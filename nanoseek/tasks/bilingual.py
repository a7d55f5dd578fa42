"""Bilingual addition, a test bed for DeepSeek-R1's language-consistency reward (R1 §2.3.2).

R1-Zero's chains of thought mixed languages; R1 adds to the accuracy reward the share of the CoT's
words that are in the prompt's language. Here the same column-addition problem is asked in one of two
toy "languages" that share digits (as real languages share formulas) but no words:

* "en": lowercase English, ``add 12 and 79:`` → ``<think>2 plus 9 plus 0 is 11 then 1 plus 7 plus 1 is 9</think>``
* "xx": a made-up uppercase vocabulary, ``SUMA 12 KAJ 79:`` → ``<think>2 PLU 9 PLU 0 EST 11 POST …</think>``

The answer is digits in either language (``<answer>91</answer>``), so a model can reason in the wrong
language and still be right: exactly the mixing the reward is meant to discourage. The "switched"
style writes the reasoning in the other language, to build a base that mixes; "buggy" is the
arithmetic task's dropped-carry bare answer, to build a base that is right only sometimes.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from nanoseek.tasks import rewards as R
from nanoseek.tasks.arithmetic import addition_columns, dropped_carry_answer, has_carry, operand_range
from nanoseek.tasks.base import Example, Task

LANGUAGES = {
    "en": {"add": "add", "and": "and", "plus": "plus", "is": "is", "then": "then"},
    "xx": {"add": "SUMA", "and": "KAJ", "plus": "PLU", "is": "EST", "then": "POST"},
}
VOCABULARIES = {lang: frozenset(words.values()) for lang, words in LANGUAGES.items()}


def addition_trace(a: int, b: int, language: str) -> str:
    """The arithmetic task's column trace, spelled in ``language``."""
    w = LANGUAGES[language]
    steps = [f"{x} {w['plus']} {y} {w['plus']} {c} {w['is']} {s}" for x, y, c, s in addition_columns(a, b)]
    return f" {w['then']} ".join(steps)


class BilingualTask(Task):
    """``digits``-digit addition asked in a language drawn from ``languages``.

    Adds the "language" component (language-consistency reward against the prompt's language) and,
    following R1, weights it equally with accuracy by default. Styles: "think", "switched", "bare", "buggy".
    """

    name = "bilingual"
    styles = ("think", "switched", "bare", "buggy")
    shortcut_style = "buggy"
    components = Task.components + ("language",)
    default_weights = {"accuracy": 1.0, "language": 1.0}

    def __init__(self, digits: int = 2, languages: Sequence[str] = tuple(LANGUAGES), **task_kwargs):
        lo, hi = operand_range(digits)
        if not languages or any(lang not in LANGUAGES for lang in languages):
            raise ValueError(f"languages={languages!r}: expected a non-empty selection of {tuple(LANGUAGES)}")
        super().__init__(**task_kwargs)
        self.digits, self.languages, self.lo, self.hi = digits, tuple(languages), lo, hi

    def _sample(self, rng: random.Random) -> tuple[str, str, dict]:
        language = rng.choice(self.languages)
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        w = LANGUAGES[language]
        meta = {"a": a, "b": b, "language": language, "carry": has_carry(a, b, "+")}
        return f"{w['add']} {a} {w['and']} {b}:", str(a + b), meta

    def _split_key(self, example: Example) -> str:
        # The same sum asked in the other language is the same problem: keep it in one split.
        return f"{example.meta['a']}+{example.meta['b']}"

    def _check(self, example: Example, answer: str) -> bool:
        return answer == example.answer

    def score(self, example: Example, completion: object) -> dict[str, float]:
        scores = super().score(example, completion)
        vocabulary = VOCABULARIES[example.meta["language"]]
        scores["language"] = R.language_consistency_reward(completion, vocabulary, prefix=self.prefix)
        return scores

    def _solution(self, example: Example, style: str) -> tuple[str | None, str]:
        if style == "bare":
            return None, example.answer
        if style == "buggy":
            return None, str(dropped_carry_answer(example.meta["a"], example.meta["b"], "+"))
        language = example.meta["language"]
        if style == "switched":
            language = next(lang for lang in LANGUAGES if lang != language)
        return addition_trace(example.meta["a"], example.meta["b"], language), example.answer
