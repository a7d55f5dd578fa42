"""Task evaluation as the R1 report does it: greedy accuracy, pass@1 averaged over k samples
(temperature 0.6, top-p 0.95), pass@k, cons@k (majority vote), plus response length, format rate,
`<think>` use and language consistency — one engine (`nanoseek.generate`) for all of it."""
from __future__ import annotations

from collections.abc import Sequence
from statistics import mean

from nanoseek.eval.metrics import majority_answer, pass_at_k
from nanoseek.infer.generate import sample_completions


def completions(model, tok, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, batch_size: int = 64,
                progress: str | None = None) -> list[tuple[str, int]]:
    """(text, token count) per prompt; the prompt is encoded with BOS, generation stops at EOS (the count
    includes it, the text does not)."""
    return [(s.text, len(s.tokens)) for s in sample_completions(model, tok, prompts, max_new_tokens, temperature,
                                                                top_p, seed, batch_size, progress)]


def evaluate_task(model, tok, task, examples, k: int = 0, temperature: float = 0.6, top_p: float = 0.95,
                  max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, progress: bool = False) -> dict:
    """Metrics over `examples`; `k` > 0 adds the sampled metrics (pass@1 mean, pass@k, cons@k). `progress`
    shows the generation's progress ("eval", then "eval k samples")."""
    if not examples:
        raise ValueError("evaluate_task needs at least one example")
    greedy = completions(model, tok, [e.prompt for e in examples], max_new_tokens, batch_size=batch_size,
                         progress="eval" if progress else None)
    scores = [task.score(e, text) for e, (text, _) in zip(examples, greedy)]
    result = {
        "n": len(examples),
        "greedy_accuracy": mean(float(task.is_correct(e, t)) for e, (t, _) in zip(examples, greedy)),
        "format_rate": mean(s["format"] for s in scores),
        "think_rate": mean(float("<think>" in t) for t, _ in greedy),
        "mean_length": mean(n for _, n in greedy),
    }
    if "language" in scores[0]:
        result["language_consistency"] = mean(s["language"] for s in scores)
    if k:
        prompts = [e.prompt for e in examples for _ in range(k)]
        sampled = completions(model, tok, prompts, max_new_tokens, temperature, top_p, seed, batch_size,
                              progress=f"eval {k} samples" if progress else None)
        p1, pk, ck = [], [], []
        for j, e in enumerate(examples):
            texts = [t for t, _ in sampled[j * k:(j + 1) * k]]
            correct = sum(task.is_correct(e, t) for t in texts)
            p1.append(correct / k)
            pk.append(pass_at_k(k, correct, k))
            answers = [task.extract_answer(t) for t in texts]
            vote = majority_answer(answers)  # judged by the task's own checker (countdown has many answers)
            ck.append(float(vote is not None and task.is_correct(e, texts[answers.index(vote)])))
        result.update({"k": k, "pass@1": mean(p1), f"pass@{k}": mean(pk), f"cons@{k}": mean(ck),
                       "sampled_mean_length": mean(n for _, n in sampled)})
    return result
