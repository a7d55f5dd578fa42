"""Tasks read from data files: GSM8K, MATH, MBPP / HumanEval and plain question-answer rows, scored by
a verifier per task (DeepSeek-R1 §2.2.2: rule-based accuracy rewards; math answers checked in a box,
code compiled and run against test cases).

    task = make_task("file", path="gsm8k_train.jsonl")            # format and verifier auto-detected
    task = make_task("file", path="mbpp.parquet", test_path="mbpp_test.parquet")
    task = make_task("file", path="qa.jsonl", verifier="numeric", fields={"question": "q", "answer": "a"})

Rows are read as the common datasets ship them. Each format names the fields it reads (its roles:
question, answer, solution, tests, entry_point, setup, choices), any of which ``fields`` renames:

* ``gsm8k``: ``question``, ``answer`` = worked solution ending in ``#### n`` (the reference is n, the
  solution the text before it without ``<<48/2=24>>`` calculator notes); verifier ``math``.
* ``math``: ``problem``, ``solution`` with ``\\boxed{}`` (the reference is the last box, or an
  ``answer`` field when the row has one); verifier ``math``.
* ``mbpp``: ``text`` or ``prompt``, ``test_list`` (assert lines, shown in the question as MBPP's
  prompt does), ``code`` (reference solution), ``test_setup_code``; verifier ``code``.
* ``humaneval``: ``prompt`` (signature and docstring), ``test`` (defines ``check``), ``entry_point``,
  ``canonical_solution``; verifier ``code``; a completion that does not define ``entry_point`` is
  read as the body continuing the prompt.
* ``qa``: ``question``, ``answer``, optional ``choices`` (listed as "A. ..." under the question; an
  integer answer is the choice's index); verifier ``choice`` with choices, else ``exact``.

The code verifier takes the answer (``<answer>`` content, or the whole completion when bare answers
are accepted), keeps the last fenced code block when there is one, and scores the share of the row's
tests that pass in ``sandbox.run_tests``. Test problems come from ``test_path`` when given, otherwise
from a stable hash of the question (``test_fraction``), as for the generated tasks.
"""
from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path

from nanoseek.data.files import read_rows as read_data_rows
from nanoseek.tasks import rewards as R
from nanoseek.tasks.base import SPLITS, Example, Task
from nanoseek.tasks.sandbox import Limits, check_sandbox, run_tests
from nanoseek.tasks.verifiers import VERIFIERS, equal, last_boxed

# format -> (role -> field names tried in order, default verifier)
FORMATS: dict[str, tuple[dict[str, tuple[str, ...]], str]] = {
    "gsm8k": ({"question": ("question",), "answer": ("answer",)}, "math"),
    "math": ({"question": ("problem",), "solution": ("solution",), "answer": ("answer",)}, "math"),
    "mbpp": ({"question": ("text", "prompt"), "tests": ("test_list",), "solution": ("code",),
              "setup": ("test_setup_code",)}, "code"),
    "humaneval": ({"question": ("prompt",), "tests": ("test",), "entry_point": ("entry_point",),
                   "solution": ("canonical_solution",)}, "code"),
    "qa": ({"question": ("question",), "answer": ("answer",), "choices": ("choices",)}, "exact"),
}
ROLES = ("question", "answer", "solution", "tests", "entry_point", "setup", "choices")
DETECTED_AS = {"question": "question", "answer": "answer", "solution": "solution", "tests": "test_list",
               "entry_point": "entry_point", "setup": "test_setup_code", "choices": "choices"}
LETTERS = "ABCDEFGHIJ"
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a task's data file (`nanoseek.data.files`: .jsonl, .jsonl.gz, .json, .parquet, saved datasets)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"task file {path} does not exist")
    return read_data_rows(path)


def detect_format(row: Mapping) -> str:
    """The format whose fields the row has (see the module doc)."""
    if "entry_point" in row and ("test" in row or "test_list" in row):
        return "humaneval"
    if "test_list" in row:
        return "mbpp"
    if "problem" in row or ("solution" in row and "answer" not in row):
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k" if "####" in str(row["answer"]) else "qa"
    raise ValueError(f"cannot tell the format of a row with fields {sorted(row)}; set format to one of "
                     f"{sorted(FORMATS)} (and fields to rename)")


def code_of(answer: str) -> str:
    """The program in an answer: the last fenced code block if there is one, else the whole answer."""
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else answer


class FileTask(Task):
    """Problems from ``path`` (jsonl / json / parquet) in ``format`` ("auto": from the first row's fields),
    checked with ``verifier`` (default: the format's); ``fields`` maps roles to the file's field names;
    ``test_path`` holds the test split (else a hash split); ``limits`` are the sandbox limits of code checks."""

    name = "file"

    def __init__(self, path: str, *, format: str = "auto", verifier: str | None = None,
                 fields: Mapping[str, str] | None = None, test_path: str | None = None,
                 limits: Mapping | None = None, **task_kwargs):
        super().__init__(**task_kwargs)
        fields = dict(fields or {})
        for role in fields:
            if role not in ROLES:
                raise ValueError(f"fields[{role!r}]: unknown role; allowed: {list(ROLES)}")
        train_rows = read_rows(path)
        if format == "auto":  # renamed fields count under the names detection knows
            format = detect_format({**train_rows[0], **{DETECTED_AS[role]: train_rows[0].get(name)
                                                         for role, name in fields.items()}})
        if format not in FORMATS:
            raise ValueError(f"format={format!r}: expected 'auto' or one of {sorted(FORMATS)}")
        names, default_verifier = FORMATS[format]
        if verifier is None:
            verifier = "choice" if format == "qa" and fields.get("choices", "choices") in train_rows[0] else default_verifier
        if verifier not in VERIFIERS:
            raise ValueError(f"verifier={verifier!r}: expected one of {list(VERIFIERS)}")
        if (verifier == "code") != (format in ("mbpp", "humaneval")):
            raise ValueError(f"verifier={verifier!r} does not fit format {format!r}: code tasks use 'code'")
        self.format, self.verifier, self.path, self.test_path = format, verifier, str(path), test_path
        self.limits = Limits(**dict(limits or {}))
        if verifier == "code":
            check_sandbox(self.limits)
        self.names = {role: (fields[role],) if role in fields else names.get(role, ()) for role in ROLES}
        self.rows = {"train": [self._example(r, f"{path} row {i}") for i, r in enumerate(train_rows)]}
        if test_path is not None:
            self.rows["test"] = [self._example(r, f"{test_path} row {i}") for i, r in enumerate(read_rows(test_path))]
        else:
            everything = self.rows["train"]
            self.rows = {split: [e for e in everything if self.split_of(e) == split] for split in SPLITS}
        has_solution = all(e.meta["solution"] is not None for e in self.rows["train"])
        self.styles = ("think", "bare") if has_solution and verifier != "code" else ("bare",)

    # ---- reading rows --------------------------------------------------------------------------
    def _field(self, row: Mapping, role: str, where: str, required: bool = True):
        for name in self.names[role]:
            if row.get(name) is not None:
                return row[name]
        if required:
            raise ValueError(f"{where}: no {'/'.join(self.names[role]) or role!r} field for the {role} "
                             f"(format {self.format!r}; rename with fields.{role})")
        return None

    def _example(self, row: Mapping, where: str) -> Example:
        question = str(self._field(row, "question", where))
        answer, solution, meta = "", None, {}
        if self.format == "gsm8k":
            text = str(self._field(row, "answer", where))
            if "####" not in text:
                raise ValueError(f"{where}: a GSM8K answer must end in '#### <number>', got {text[-60:]!r}")
            body, _, answer = text.rpartition("####")
            if not answer.strip():
                raise ValueError(f"{where}: nothing after '####' in the GSM8K answer")
            solution = _CALCULATOR.sub("", body).strip()
        elif self.format == "math":
            solution = self._field(row, "solution", where, required=False)
            answer = self._field(row, "answer", where, required=False)
            if answer is None:
                answer = last_boxed(str(solution or ""))
            if answer is None:
                raise ValueError(f"{where}: no answer field and no \\boxed{{}} in the solution")
        elif self.format in ("mbpp", "humaneval"):
            tests = self._field(row, "tests", where)
            tests = [str(t) for t in tests] if isinstance(tests, (list, tuple)) else [str(tests)]
            if not tests:
                raise ValueError(f"{where}: the row has no tests")
            solution = self._field(row, "solution", where, required=False)
            meta = {"tests": tests, "setup": str(self._field(row, "setup", where, required=False) or "")}
            if self.format == "humaneval":
                entry = str(self._field(row, "entry_point", where))
                meta |= {"entry_point": entry, "prompt": question, "tests": [f"{tests[0]}\ncheck({entry})"]}
            else:
                question = question + "\nYour code should pass these tests:\n" + "\n".join(tests)
        else:
            answer = self._field(row, "answer", where)
            choices = self._field(row, "choices", where, required=False)
            if choices is not None:
                if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS):
                    raise ValueError(f"{where}: choices must be a list of 2 to {len(LETTERS)} options")
                question += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
                if isinstance(answer, int) and not isinstance(answer, bool):
                    if not 0 <= answer < len(choices):
                        raise ValueError(f"{where}: answer index {answer} is not one of the {len(choices)} choices")
                    answer = LETTERS[answer]
        meta["solution"] = None if solution is None else str(solution)
        return Example(self.format_prompt(question), str(answer).strip(), question, meta)

    # ---- the Task hooks ------------------------------------------------------------------------
    def examples(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """``n`` examples of ``split`` in a seeded order: every row once before any repeats. The test
        split is never repeated: asking for more than it holds returns all of it."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if n < 0:
            raise ValueError(f"n={n!r}: expected a non-negative count")
        rows = self.rows[split]
        if not rows and n:
            raise ValueError(f"task file {self.path}: the {split} split is empty (set test_path or test_fraction)")
        rng, out = random.Random(f"{self.name}/{split}/{seed}"), []
        while len(out) < n and not (split == "test" and out):
            order = list(rows)
            rng.shuffle(order)
            out += order[: n - len(out)]
        return out

    def extract_answer(self, completion: object) -> str | None:
        answer = super().extract_answer(completion)
        if answer is None or self.verifier != "code":
            return answer
        # Give code back the indentation of its first line, which the trim took (a HumanEval body).
        text = R.to_text(completion)
        start = text.rfind(answer)
        indent = text[text.rfind("\n", 0, start) + 1:start]
        return indent + answer if start >= 0 and not indent.strip() else answer

    def _check(self, example: Example, answer: str) -> float:
        if self.verifier != "code":
            return float(equal(self.verifier, answer, example.answer))
        program = code_of(answer)
        if self.format == "humaneval" and not re.search(rf"^\s*def\s+{re.escape(example.meta['entry_point'])}\b",
                                                        program, re.MULTILINE):
            program = example.meta["prompt"] + program
        return run_tests(example.meta["setup"] + "\n" + program, example.meta["tests"], self.limits).reward

    def _solution(self, example: Example, style: str) -> tuple[str | None, str]:
        solution = example.meta["solution"]
        if self.verifier == "code":
            if solution is None:
                raise ValueError(f"task file {self.path}: the row of {example.question[:40]!r} has no reference solution")
            if self.format == "humaneval":
                solution = example.meta["prompt"] + solution
            return None, solution
        if style == "think":
            return solution, example.answer
        return None, example.answer
