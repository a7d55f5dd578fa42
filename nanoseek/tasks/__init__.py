"""Verifiable tasks and rule-based rewards for GRPO, R1-Zero and rejection sampling (DeepSeek-R1 §2.2).

    task = make_task("arithmetic", digits=2)
    ex = task.examples(16, seed=0)[0]            # Example(prompt="12+79=", answer="91", ...)
    task.reward(ex, "<think>…</think><answer>91</answer>")   # weighted rule-based reward
    task.score(ex, completion)                   # {"accuracy", "format", "tag_count", "tinyzero", "answered", ...}
    task.sft_example(ex, "think")                # a correct target completion for SFT / cold start
    make_task("file", path="gsm8k.jsonl")        # rows of a data file (GSM8K, MATH, MBPP, HumanEval, QA)
"""
from nanoseek.tasks import rewards
from nanoseek.tasks.arithmetic import ArithmeticTask
from nanoseek.tasks.base import R1_ZERO_TEMPLATE, TEMPLATES, Example, Task
from nanoseek.tasks.bilingual import BilingualTask
from nanoseek.tasks.countdown import CountdownTask
from nanoseek.tasks.file import FileTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ArithmeticTask, CountdownTask, BilingualTask, FileTask)}


def make_task(name: str, **kwargs) -> Task:
    """The task registered as ``name``, built with ``kwargs`` (its own and ``Task``'s options)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = [
    "ArithmeticTask", "BilingualTask", "CountdownTask", "Example", "FileTask", "R1_ZERO_TEMPLATE", "TASKS", "TEMPLATES",
    "Task", "make_task", "rewards",
]
