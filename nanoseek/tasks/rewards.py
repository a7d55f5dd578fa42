"""Rule-based rewards for reasoning RL (DeepSeek-R1 §2.2.2, open-r1, TinyZero, Kimi k1.5, DAPO).

R1-Zero is trained on two rule-based rewards: *accuracy* (the final answer, checked by rules) and
*format* (reasoning inside ``<think> </think>``, answer inside ``<answer> </answer>``); R1 adds a
*language-consistency* reward (share of target-language words in the chain of thought). Around them
the open recipes added ``tag_count`` (open-r1), the 0 / 0.1 / 1 countdown score (TinyZero), a
group-relative length penalty (Kimi k1.5) and a soft overlong penalty (DAPO).

Every function here is pure and returns floats without raising on any completion: ``None``, bytes
(decoded with replacement characters), strings with lone surrogates, empty strings and multi-megabyte
strings are all scored, in time linear in the input (no backtracking regexes on completions, word
scans capped at ``MAX_SCAN_CHARS``). Only caller bugs raise (e.g. a group's lengths and correctness
lists of different sizes: a grouping bug must be loud, not a silently wrong advantage).

Answer extraction, the rule every accuracy check builds on (strict, to leave nothing to hack):

* the answer is the content of the LAST complete ``<answer>...</answer>`` block, whitespace-trimmed;
* it must come after the reasoning: an answer inside ``<think>`` (or after a ``<think>`` that is
  never closed) does not count;
* a completion without any of the four tags is read as a bare answer only if the caller allows it
  (``allow_bare``: base models trained on ``12+79=91`` text answer that way);
* the answer must then match exactly, so several candidates ("3 or 4", "3, 4") are simply wrong.

``prefix`` handles the prefilled-``<think>`` pitfall: when the prompt already ends with ``<think>``
the completion starts inside the reasoning; pass ``prefix="<think>"`` and the completion is scored as
if it began with it (and re-emitting ``<think>`` then counts as a second, malformed tag).
"""
from __future__ import annotations

import re
from collections.abc import Collection, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Reasoning longer than this is judged on its first MAX_SCAN_CHARS characters: a language verdict
# does not need more, and it bounds the work a runaway 10 MB rollout can cost.
MAX_SCAN_CHARS = 100_000
# A word is a run of letters (any script); digits and symbols are language-neutral, like formulas.
_WORD = re.compile(r"[^\W\d_]+")


def to_text(completion: object) -> str:
    """The completion as a str: bytes are decoded as UTF-8 with replacement, anything else non-str is ''."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (bytes, bytearray)):
        return bytes(completion).decode("utf-8", errors="replace")
    return ""


def _full(completion: object, prefix: str) -> str:
    return to_text(prefix) + to_text(completion)


def extract_answer(completion: object, *, prefix: str = "", allow_bare: bool = False) -> str | None:
    """The trimmed content of the last complete <answer> block after the reasoning, or None (see module doc)."""
    text = _full(completion, prefix)
    think_end = text.rfind(THINK_CLOSE)
    if think_end >= 0:
        start = think_end + len(THINK_CLOSE)
    elif THINK_OPEN in text:
        return None  # the reasoning was never closed, so everything is reasoning
    else:
        start = 0
    close = text.rfind(ANSWER_CLOSE, start)
    if close < 0:
        if allow_bare and not any(tag in text for tag in TAGS):
            return text.strip() or None
        return None
    open_ = text.rfind(ANSWER_OPEN, start, close)
    if open_ < 0:
        return None
    return text[open_ + len(ANSWER_OPEN):close].strip()


def reasoning_text(completion: object, *, prefix: str = "") -> str | None:
    """The content of the first <think> block (to the end if never closed), or None without <think>."""
    text = _full(completion, prefix)
    open_ = text.find(THINK_OPEN)
    if open_ < 0:
        return None
    begin = open_ + len(THINK_OPEN)
    close = text.find(THINK_CLOSE, begin)
    return text[begin:] if close < 0 else text[begin:close]


def accuracy_reward(completion: object, reference: str, *, prefix: str = "", allow_bare: bool = False) -> float:
    """1.0 when the extracted answer equals the reference exactly (both whitespace-trimmed), else 0.0.

    Exact string match is the right rule for integers: "091", "+91", "91.0" and "91 or 92" are wrong.
    """
    answer = extract_answer(completion, prefix=prefix, allow_bare=allow_bare)
    return float(answer is not None and answer == to_text(reference).strip())


def format_reward(completion: object, *, prefix: str = "") -> float:
    """1.0 for exactly ``<think>…</think>`` then ``<answer>…</answer>`` and nothing else, else 0.0.

    Equivalent to a full match of ``^<think>.*?</think>\\s*<answer>.*?</answer>$`` with each tag
    present exactly once (so no answer block hides in the reasoning); whitespace around the whole
    completion is allowed. Written with counts and finds rather than a regex so it stays linear on
    adversarial inputs.
    """
    text = _full(completion, prefix).strip()
    if any(text.count(tag) != 1 for tag in TAGS):
        return 0.0
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return 0.0
    think_end, answer_start = text.find(THINK_CLOSE), text.find(ANSWER_OPEN)
    between = text[think_end + len(THINK_CLOSE):answer_start]
    return float(think_end < answer_start and not between.strip())


def tag_count_reward(completion: object, *, prefix: str = "") -> float:
    """0.25 for each of the four tags that occurs exactly once (open-r1): a dense shaping signal for format."""
    text = _full(completion, prefix)
    return 0.25 * sum(text.count(tag) == 1 for tag in TAGS)


def language_consistency_reward(completion: object, vocabulary: Collection[str], *, prefix: str = "") -> float:
    """Share of the words in the reasoning that belong to the target language's vocabulary (DeepSeek-R1).

    Words are runs of letters, so numbers and symbols are neutral. No reasoning, or reasoning without a
    single word, scores 0.0: an empty chain of thought must not earn the full bonus.
    """
    reasoning = reasoning_text(completion, prefix=prefix)
    if not reasoning:
        return 0.0
    words = _WORD.findall(reasoning[:MAX_SCAN_CHARS])
    if not words:
        return 0.0
    return sum(word in vocabulary for word in words) / len(words)


def tinyzero_reward(answered: bool, correct: bool, *, format_score: float = 0.1, score: float = 1.0) -> float:
    """TinyZero's countdown score: 0 without an answer, ``format_score`` for a wrong one, ``score`` if right."""
    if correct:
        return float(score)
    return float(format_score) if answered else 0.0


def length_penalty(lengths: Sequence[float], correct: Sequence[bool]) -> list[float]:
    """Kimi k1.5 length reward over one group of samples for the same prompt.

    λ_i = 0.5 − (len_i − min_len) / (max_len − min_len); correct samples get λ_i, wrong ones min(0, λ_i),
    so short correct answers are pushed up and long wrong ones down. All lengths equal: all zeros.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"length_penalty: {len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (length - lo) / (hi - lo) for length in lengths]
    return [float(lam) if ok else float(min(0.0, lam)) for lam, ok in zip(lambdas, correct)]


def soft_overlong_penalty(length: float, max_len: float, cache_len: float) -> float:
    """DAPO soft overlong punishment: 0 up to ``max_len - cache_len``, then linear to −1 at ``max_len``, −1 beyond.

    Truncated samples get a graded penalty instead of a cliff, so the reward does not punish a sound
    reasoning path merely for being cut.
    """
    if length > max_len:
        return -1.0
    free = max_len - cache_len
    if length <= free:
        return 0.0
    return float((free - length) / cache_len)
