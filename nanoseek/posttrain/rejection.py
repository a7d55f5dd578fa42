"""Rejection sampling: turn an RL checkpoint into SFT data (DeepSeek-R1 §2.3.3).

R1 samples several responses per prompt from the reasoning-RL checkpoint and keeps only the correct
ones, filtering out chains of thought with mixed languages, long paragraphs and code blocks, which
gave ~600k reasoning samples for the next SFT round. Here: `samples` completions per train problem
(temperature, top-p), kept when they are

* verified correct by the task's rule (`Task.is_correct`),
* complete (stopped with EOS, never truncated),
* well formed (`<think>…</think><answer>…</answer>`, `require_format`),
* single-language (the task's language-consistency score is 1, `require_language`, for tasks that
  score language),

de-duplicated, at most `max_per_prompt` per prompt, and written as {"prompt", "completion"} jsonl
rows that `nanoseek sft` reads.

    rows, stats = rejection_sample(model, tok, task, task.examples(1000, seed=7), samples=4)

Under torchrun (`nanoseek rejection-sample`, or distillation's traces) each rank samples its share of
the prompts with an unsharded copy of the model and its own seed; rank 0 gathers the rows, in prompt
order, and writes the file atomically.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nanoseek.infer.generate import sample_completions
from nanoseek.parallel.mesh import (
    barrier,
    env_world_size,
    gather_objects,
    init_distributed,
    rank,
)
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.trainer import build_policy, rank_seed, shard
from nanoseek.train.loop import resolve_device
from nanoseek.utils import atomic_write_text, torch_threads, write_jsonl

REASONS = ("incorrect", "truncated", "format", "language", "duplicate", "over_limit")


def rejection_sample(model, tok, task, examples, samples: int = 4, temperature: float = 0.7, top_p: float = 0.95,
                     max_new_tokens: int = 64, require_format: bool = True, require_language: bool = True,
                     max_per_prompt: int = 1, seed: int = 0, batch_size: int = 256,
                     progress: bool = False) -> tuple[list[dict], dict]:
    """(kept rows, statistics): rows are {"prompt", "completion", "answer"}; stats count every rejection reason."""
    prompts = [e.prompt for e in examples for _ in range(samples)]
    t0 = time.perf_counter()
    out = sample_completions(model, tok, prompts, max_new_tokens, temperature, top_p, seed=seed,
                             batch_size=batch_size, progress="rejection-sample" if progress else None)
    seconds = time.perf_counter() - t0
    rows, rejected = [], dict.fromkeys(REASONS, 0)
    solved = 0
    correct_samples = 0
    for k, e in enumerate(examples):
        kept: list[str] = []
        any_correct = False
        for s in out[k * samples:(k + 1) * samples]:
            scores = task.score(e, s.text)
            ok = scores["accuracy"] == 1.0
            correct_samples += ok
            any_correct |= ok and s.stopped
            reason = ("truncated" if s.truncated else "incorrect" if not ok
                      else "format" if require_format and scores["format"] != 1.0
                      else "language" if require_language and scores.get("language", 1.0) != 1.0
                      else "duplicate" if s.text in kept
                      else "over_limit" if len(kept) >= max_per_prompt else None)
            if reason:
                rejected[reason] += 1
            else:
                kept.append(s.text)
        solved += any_correct
        rows += [{"prompt": e.prompt, "completion": c, "answer": e.answer} for c in kept]
    stats = {"prompts": len(examples), "samples": len(out), "kept": len(rows),
             "kept_fraction": len(rows) / max(len(out), 1), "sample_accuracy": correct_samples / max(len(out), 1),
             "prompts_solved": solved / max(len(examples), 1), "rejected": rejected,
             "generated_tokens": sum(len(s.tokens) for s in out), "sampling_seconds": seconds}
    stats["tokens_per_s"] = stats["generated_tokens"] / max(seconds, 1e-9)
    return rows, stats


def merge_stats(parts: list[dict]) -> dict:
    """The statistics of `rejection_sample` over disjoint shares of the prompts."""
    samples, prompts = sum(p["samples"] for p in parts), sum(p["prompts"] for p in parts)
    kept = sum(p["kept"] for p in parts)
    tokens, seconds = sum(p["generated_tokens"] for p in parts), max(p["sampling_seconds"] for p in parts)
    return {"prompts": prompts, "samples": samples, "kept": kept, "kept_fraction": kept / max(samples, 1),
            "sample_accuracy": sum(p["sample_accuracy"] * p["samples"] for p in parts) / max(samples, 1),
            "prompts_solved": sum(p["prompts_solved"] * p["prompts"] for p in parts) / max(prompts, 1),
            "rejected": {k: sum(p["rejected"][k] for p in parts) for k in REASONS},
            "generated_tokens": tokens, "sampling_seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


def rejection_sample_ranks(model, tok, task, examples, *args, seed: int = 0, **kwargs) -> tuple[list[dict], dict]:
    """`rejection_sample` with the prompts split over the ranks (every rank calls it with the same examples and
    an unsharded model; each samples its contiguous share with its own seed) and the rows and statistics
    gathered on every rank, in prompt order. One process: `rejection_sample` itself."""
    world = env_world_size()
    if world == 1:
        return rejection_sample(model, tok, task, examples, *args, seed=seed, **kwargs)
    r = rank()
    parts = gather_objects(rejection_sample(model, tok, task, shard(examples, r, world), *args,
                                            seed=rank_seed(seed, r), **kwargs))
    return [row for rows, _ in parts for row in rows], merge_stats([stats for _, stats in parts])


def rejection_sample_run(cfg: PostConfig, out_dir: str | os.PathLike) -> dict:
    """`nanoseek rejection-sample`: model.init_from's samples on the task → DIR/data.jsonl (+ stats.json,
    config.toml). Returns the statistics with the path of the data under "data"."""

    cfg = cfg.validate()
    r = cfg.rejection
    if not cfg.task.name:
        raise ValueError("rejection sampling needs a task (task.name) to verify completions")
    if not cfg.model.init_from:
        raise ValueError("rejection sampling needs a model: set model.init_from (e.g. an RL run's DIR/model)")
    out = Path(out_dir)
    device = resolve_device(cfg.train.device)
    init_distributed(device, cfg.parallel.timeout)  # (under torchrun: each rank samples its share of the prompts)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    with torch_threads(cfg.train.threads):
        model, tok = build_policy(cfg)
        task = cfg.build_task(tok.prompt_format)
        model.to(device).eval()
        examples = task.examples(r.prompts, seed=r.seed, split="train")
        rows, stats = rejection_sample_ranks(model, tok, task, examples, r.samples, r.temperature, r.top_p,
                                             r.max_new_tokens, r.require_format, r.require_language, r.max_per_prompt,
                                             seed=cfg.train.seed, progress=cfg.log.progress and rank() == 0)
    stats["data"] = os.fspath(out / "data.jsonl")
    if rank() == 0:  # (every rank holds the gathered rows; one writes them)
        write_jsonl(out / "data.jsonl", rows)
        atomic_write_text(out / "config.toml", cfg.to_toml())
        atomic_write_text(out / "stats.json", json.dumps(stats, indent=1) + "\n")
    barrier()
    return stats
