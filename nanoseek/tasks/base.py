"""Task API: a verifiable task exposes its data and its rule-based reward (nanochat's Task, DeepSeek-R1 §2.2).

A task generates ``Example``s deterministically from a seed, scores completions with the rules in
``rewards.py`` (``score`` for the components, ``reward`` for their weighted sum, ``group_rewards``
adding the group-relative length terms GRPO can use), and writes target completions for SFT /
cold-start data (``sft_example``). Train and test are disjoint by construction: a stable hash of the
problem decides its split, whatever the seed.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nanoseek.data.chat import ASSISTANT, USER
from nanoseek.tasks import rewards as R

# DeepSeek-R1-Zero's training template (R1 paper, Table 1), for models that follow instructions.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {question}. Assistant:"
)
# "plain" is the bare question ("12+79="): what a tiny char-level or BPE model is trained on. "chat" is
# DeepSeek's chat format (nanoseek.data.chat): the special tokens around the question make the prompt's
# tokens the same whether it is encoded alone or with its completion, as in a pretraining corpus of chats.
TEMPLATES = {"plain": "{question}", "r1zero": R1_ZERO_TEMPLATE, "chat": USER + "{question}" + ASSISTANT}
SPLITS = ("train", "test")
# Group terms of group_rewards, weighted like the per-completion components.
GROUP_TERMS = ("length", "overlong")


@dataclass(frozen=True)
class Example:
    """One problem: ``prompt`` is what the model sees (template applied), ``question`` the raw problem,
    ``answer`` a reference answer (the text that belongs inside <answer>), ``meta`` what a checker needs."""

    prompt: str
    answer: str
    question: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


class Task:
    """Base class. Subclasses set ``name``, ``styles``, ``components`` and implement the three hooks
    ``_sample``, ``_check`` and ``_solution`` (and ``_split_key`` when the question text is not the
    problem's identity).

    Args:
        template: "plain" (the bare question), "r1zero" (R1-Zero's instruction template) or "chat"
            (DeepSeek's chat format; the tokenizer adds BOS in front).
        prefill_think: end the prompt with "<think>" (TinyZero style); completions are then scored, and
            SFT targets written, as continuing that prefix.
        accept_bare: read a completion without any tag as a bare answer ("91"), as a base model
            trained on "12+79=91" answers. False demands <answer> tags (R1-Zero).
        weights: component or group term -> weight for ``reward`` / ``group_rewards``; defaults to
            ``default_weights`` (accuracy only: the reward of the tiny-scale GRPO evidence).
        max_len: length at which the "overlong" term reaches -1 (needed when it has a weight).
        overlong_cache: DAPO's cache: the penalty ramps over the last ``overlong_cache`` units before max_len.
        test_fraction: share of the problem space that belongs to the test split.
    """

    name = "task"
    styles: tuple[str, ...] = ("think", "bare")
    shortcut_style = "bare"
    """What a model answers without reasoning: the other mode of a bimodal base, beside "think" traces
    (R1-Zero's precondition: the base sometimes reasons). `data.styles` may name it "shortcut"."""
    components: tuple[str, ...] = ("accuracy", "format", "tag_count", "tinyzero", "answered")
    default_weights: Mapping[str, float] = {"accuracy": 1.0}

    def __init__(
        self,
        *,
        template: str = "plain",
        prefill_think: bool = False,
        accept_bare: bool = True,
        weights: Mapping[str, float] | None = None,
        max_len: int | None = None,
        overlong_cache: int = 0,
        test_fraction: float = 0.1,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"template={template!r}: expected one of {sorted(TEMPLATES)}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction!r}: expected a number in (0, 1)")
        weights = dict(self.default_weights if weights is None else weights)
        allowed = self.components + GROUP_TERMS
        for key in weights:
            if key not in allowed:
                raise ValueError(f"weights[{key!r}]: unknown term for task {self.name!r}; allowed: {list(allowed)}")
        if weights.get("overlong") and max_len is None:
            raise ValueError("weights['overlong'] is set but max_len is None: the overlong penalty needs max_len")
        if max_len is not None and not 0 <= overlong_cache <= max_len:
            raise ValueError(f"overlong_cache={overlong_cache!r}: expected 0 <= overlong_cache <= max_len={max_len}")
        self.template = template
        self.prefill_think = prefill_think
        self.accept_bare = accept_bare
        self.weights = weights
        self.max_len = max_len
        self.overlong_cache = overlong_cache
        self.test_fraction = test_fraction
        # The part of the assistant turn that lives in the prompt; completions are scored after it.
        self.prefix = R.THINK_OPEN if prefill_think else ""

    @property
    def prompt_format(self) -> dict:
        """How prompts are written ({"template", "prefill_think"}): recorded with a model trained on them."""
        return {"template": self.template, "prefill_think": self.prefill_think}

    # ---- hooks -------------------------------------------------------------------------------
    def _sample(self, rng: random.Random) -> tuple[str, str, dict]:
        """One random problem: (question, reference answer, meta)."""
        raise NotImplementedError

    def _check(self, example: Example, answer: str) -> bool | float:
        """Whether an extracted answer string solves the example (or the share of it solved, in [0, 1],
        e.g. of a program's tests). Must not raise."""
        raise NotImplementedError

    def _solution(self, example: Example, style: str) -> tuple[str | None, str]:
        """(reasoning or None for a bare answer, answer) for an SFT target in ``style``."""
        raise NotImplementedError

    def _split_key(self, example: Example) -> str:
        """The problem's identity for the train/test split (problems equal under it share a split)."""
        return example.question

    # ---- data --------------------------------------------------------------------------------
    def split_of(self, example: Example) -> str:
        """'test' or 'train', from a stable hash of the problem (independent of seeds and PYTHONHASHSEED)."""
        key = f"{self.name}:{self._split_key(example)}".encode()
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64
        return "test" if u < self.test_fraction else "train"

    def format_prompt(self, question: str) -> str:
        return TEMPLATES[self.template].format(question=question) + self.prefix

    def examples(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """``n`` examples of ``split``, the same for the same (task config, n, seed, split).

        Problems are drawn with replacement (small problem spaces repeat) and kept only if they hash
        to ``split``, so no test problem ever appears in train.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if n < 0:
            raise ValueError(f"n={n!r}: expected a non-negative count")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Example] = []
        tries, max_tries = 0, 1000 * n + 10_000
        while len(out) < n:
            tries += 1
            if tries > max_tries:
                raise ValueError(
                    f"task {self.name!r}: found only {len(out)} of {n} {split} examples in {max_tries} draws; "
                    f"the problem space is too small for this split (raise digits or adjust test_fraction)"
                )
            question, answer, meta = self._sample(rng)
            example = Example(self.format_prompt(question), answer, question, meta)
            if self.split_of(example) == split:
                out.append(example)
        return out

    # ---- rewards -----------------------------------------------------------------------------
    def extract_answer(self, completion: object) -> str | None:
        return R.extract_answer(completion, prefix=self.prefix, allow_bare=self.accept_bare)

    def score(self, example: Example, completion: object) -> dict[str, float]:
        """Every reward component of one completion (for logging, eval and ``reward``)."""
        answer = self.extract_answer(completion)
        accuracy = float(self._check(example, answer)) if answer is not None else 0.0
        correct = accuracy == 1.0
        return {
            "accuracy": accuracy,
            "format": R.format_reward(completion, prefix=self.prefix),
            "tag_count": R.tag_count_reward(completion, prefix=self.prefix),
            "tinyzero": R.tinyzero_reward(answer is not None, correct),
            "answered": float(answer is not None),
        }

    def is_correct(self, example: Example, completion: object) -> bool:
        return self.score(example, completion)["accuracy"] == 1.0

    def reward(self, example: Example, completion: object) -> float:
        """Weighted sum of the per-completion components (group terms are in ``group_rewards``)."""
        return self._weighted(self.score(example, completion))

    def _weighted(self, scores: Mapping[str, float]) -> float:
        return float(sum(w * scores[k] for k, w in self.weights.items() if k not in GROUP_TERMS))

    def group_rewards(
        self, example: Example, completions: Sequence[object], lengths: Sequence[float] | None = None
    ) -> list[float]:
        """Rewards of G completions of the same prompt: ``reward`` plus the weighted group terms,
        Kimi's length penalty ("length") and DAPO's soft overlong penalty ("overlong").

        ``lengths`` should be token counts from the sampler; they default to character counts.
        """
        if lengths is None:
            lengths = [len(R.to_text(c)) for c in completions]
        if len(lengths) != len(completions):
            raise ValueError(f"group_rewards: {len(completions)} completions but {len(lengths)} lengths")
        scores = [self.score(example, c) for c in completions]
        out = [self._weighted(s) for s in scores]
        if self.weights.get("length"):
            penalty = R.length_penalty(lengths, [s["accuracy"] == 1.0 for s in scores])
            out = [r + self.weights["length"] * p for r, p in zip(out, penalty)]
        if self.weights.get("overlong"):
            out = [
                r + self.weights["overlong"] * R.soft_overlong_penalty(n, self.max_len, self.overlong_cache)
                for r, n in zip(out, lengths)
            ]
        return [float(r) for r in out]

    # ---- SFT targets ---------------------------------------------------------------------------
    def sft_example(self, example: Example, style: str = "think") -> str:
        """A target completion for ``example``: "think" is a correct ``<think>…</think><answer>…</answer>``
        trace, "bare" the correct answer alone; subclasses add styles (see ``styles``).

        With ``prefill_think`` the leading "<think>" is left out (the prompt already ends with it) and
        bare styles are refused: after an opened <think> a bare answer can never be read.
        """
        if style not in self.styles:
            raise ValueError(f"style={style!r}: task {self.name!r} offers {list(self.styles)}")
        reasoning, answer = self._solution(example, style)
        if reasoning is None:
            if self.prefill_think:
                raise ValueError(f"style={style!r} is a bare answer, which cannot follow a prefilled <think>")
            return answer
        text = f"{R.THINK_OPEN}{reasoning}{R.THINK_CLOSE}{R.ANSWER_OPEN}{answer}{R.ANSWER_CLOSE}"
        return text[len(self.prefix):]
