"""`nanoseek eval`: a model on a verifiable task's held-out split, as the R1 report measures it —
greedy accuracy, pass@1 averaged over k samples (temperature 0.6, top-p 0.95), pass@k, cons@k
(majority vote), mean response length, format rate, <think> use, language consistency
(`nanoseek.eval.tasks.evaluate_task`).

    nanoseek eval --model runs/r1-zero/02-rl/model --task arithmetic --k 8
    nanoseek eval --model DIR --task bilingual --examples 500 --set eval.temperature=1.0 --out runs/eval
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.trainer import build_policy, eval_examples, evaluate
from nanoseek.utils import atomic_write_text, torch_threads


def evaluate_model(model_dir: str | os.PathLike, cfg) -> dict:
    """Metrics of the model in `model_dir` on cfg's task ([task]) with cfg's [eval] settings."""
    if not cfg.task.name:
        raise ValueError("eval needs a task: --task arithmetic | countdown | bilingual | file")
    with torch_threads(cfg.train.threads):
        model, tok = build_policy(cfg, init_from=os.fspath(model_dir))
        model.eval()
        task = cfg.build_task(tok.prompt_format)
        result = evaluate(model, tok, task, eval_examples(cfg, task), cfg, progress=cfg.log.progress)
    return {k[len("eval_"):]: v for k, v in result.items()}


def _eval(args: argparse.Namespace) -> None:
    sets = [f"task.name={json.dumps(args.task)}"] if args.task else []
    if args.examples is not None:
        sets.append(f"eval.examples={args.examples}")
    if args.k is not None:
        sets.append(f"eval.k={args.k}")
    if args.seed is not None:
        sets.append(f"eval.seed={args.seed}")
    cfg = PostConfig.load(args.config, sets + list(args.set or []))
    result = evaluate_model(args.model, cfg)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps({"model": os.fspath(args.model), **result}, indent=1) + "\n")
        atomic_write_text(out / "config.toml", cfg.to_toml())


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nanoseek eval`."""
    p = subparsers.add_parser(
        "eval", help="evaluate a model on a verifiable task (greedy accuracy, pass@1, pass@k, cons@k, format, length)",
        description="Evaluate a model directory on a task's held-out (test) split: greedy accuracy, format rate, "
                    "<think> use, mean length, language consistency (bilingual); with --k: pass@1 averaged over k "
                    "samples at [eval] temperature/top_p (default 0.6/0.95), pass@k and cons@k (majority vote).",
        epilog="Config keys: [task] name/options/weights, [eval] examples/seed/k/temperature/top_p/max_new_tokens.")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (HF layout with its tokenizer)")
    p.add_argument("--task", help="arithmetic | countdown | bilingual (task.name)")
    p.add_argument("--examples", type=int, default=None, help="held-out problems (eval.examples, default 200)")
    p.add_argument("--k", type=int, default=None, help="samples per problem for pass@1/pass@k/cons@k (eval.k)")
    p.add_argument("--config", metavar="FILE", help="TOML with [task] and [eval] tables")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. eval.temperature=1.0")
    p.add_argument("--seed", type=int, default=None, help="seed of the held-out problems and samples (eval.seed)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/eval.json and DIR/config.toml")
    p.set_defaults(func=_eval)
