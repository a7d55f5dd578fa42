"""`nanoseek sft | dpo | grpo | distill | rejection-sample`: thin front-ends to the post-training
library functions (nanoseek.posttrain.sft, dpo, grpo, distill, rejection).

    nanoseek sft --task arithmetic --set 'data.styles={think=0.3, buggy=0.7}' --out runs/base
    nanoseek grpo --model runs/base/model --task arithmetic --set train.steps=60 --out runs/grpo
    nanoseek dpo --model runs/base/model --task arithmetic --out runs/dpo
    nanoseek rejection-sample --model runs/grpo/model --task arithmetic --out runs/rs
    nanoseek distill --set distill.teacher=runs/grpo/model --set model.init_from=runs/small/model --out runs/distill
    nanoseek grpo --config configs/grpo-arithmetic.toml --show-config

Under `torchrun --nproc-per-node N -m nanoseek <command> ...` each rank trains (or samples) its share
of every global batch and rank 0 alone writes files and prints (`nanoseek.posttrain.trainer`).

Every command takes --config FILE (TOML: the sections of `nanoseek.posttrain.config.PostConfig`),
--set section.key=value overrides (repeatable), --seed and --out; `--keys` lists every key.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.posttrain.config import PostConfig, command_defaults
from nanoseek.posttrain.distill import distill
from nanoseek.posttrain.dpo import dpo
from nanoseek.posttrain.grpo import grpo
from nanoseek.posttrain.rejection import rejection_sample_run
from nanoseek.posttrain.sft import sft
from nanoseek.train.checkpoint import resume_hint

TRAINERS = {"sft": sft, "dpo": dpo, "grpo": grpo, "distill": distill}
COMMANDS = {
    "sft": ("supervised fine-tuning: completion-only loss on chat / prompt-completion jsonl or task data",
            ("model", "task", "data", "optim", "schedule", "train", "sft", "eval", "checkpoint", "log", "parallel")),
    "dpo": ("direct preference optimization on pairs from a file or sampled on-policy from a task",
            ("model", "task", "data", "optim", "schedule", "train", "dpo", "eval", "checkpoint", "log", "parallel")),
    "grpo": ("GRPO reinforcement learning with the task's rule-based rewards (R1-Zero / R1 RL)",
             ("model", "task", "optim", "schedule", "train", "grpo", "eval", "checkpoint", "log", "parallel")),
    "distill": ("SFT a smaller student on a teacher's rejection-sampled traces (optional logit distillation)",
                ("model", "task", "data", "optim", "schedule", "train", "distill", "rejection", "eval", "checkpoint",
                 "log", "parallel")),
    "rejection-sample": (("sample k completions per prompt, keep the verified-correct, well-formed, single-language "
                          "ones as an SFT jsonl"), ("model", "task", "train", "rejection", "parallel")),
}


def _config(args: argparse.Namespace, out: Path):

    config = args.config
    if config is None and getattr(args, "resume", False) and (out / "config.toml").is_file():
        config = out / "config.toml"
    sets = []
    if getattr(args, "model", None):
        sets.append(f"model.init_from={json.dumps(args.model)}")
    if getattr(args, "task", None):
        sets.append(f"task.name={json.dumps(args.task)}")
    if getattr(args, "data", None):
        sets.append(f"data.train={json.dumps(args.data)}")
    if args.seed is not None:
        sets.append(f"train.seed={args.seed}")
    return PostConfig.load(config, sets + list(args.set or []), base=command_defaults(args.command))


def _fmt_eval(ev: dict | None) -> str:
    if not ev:
        return ""
    parts = [f"greedy accuracy {ev['greedy_accuracy']:.3f}"]
    for key, name in (("language_consistency", "language consistency"), ("think_rate", "<think> use"),
                      ("format_rate", "format"), ("pass@1", "pass@1")):
        if key in ev:
            parts.append(f"{name} {ev[key]:.3f}")
    parts.append(f"mean length {ev['mean_length']:.1f}")
    return ", ".join(parts)


def _run(args: argparse.Namespace) -> None:
    command = args.command
    if args.keys:
        print(PostConfig.describe(COMMANDS[command][1], command_defaults(command)))
        return
    out = Path(args.out) if args.out else Path("runs") / command
    cfg = _config(args, out)
    if args.show_config:
        print(cfg.to_toml(), end="")
        return
    if command == "rejection-sample":
        stats = rejection_sample_run(cfg, out)
        print(f"rejection-sample: kept {stats['kept']} of {stats['samples']} samples ({stats['prompts']} prompts, "
              f"sample accuracy {stats['sample_accuracy']:.3f}); rejected {stats['rejected']}; data in {stats['data']}")
        return
    args.interrupted = lambda: resume_hint(command, out, args.argv)
    summary = TRAINERS[command](cfg, out, resume=args.resume)
    parts = [f"{summary['steps']} steps in {summary['train_time']:.1f}s"]
    if summary.get("loss") is not None:
        parts.append(f"loss {summary['loss']:.4f}")
    if summary.get("start_eval"):
        parts.append(f"start: {_fmt_eval(summary['start_eval'])}")
    if summary.get("eval"):
        parts.append(f"end: {_fmt_eval(summary['eval'])}")
    print(f"{command}: {'; '.join(parts)}; model in {summary['model_dir']}, metrics in {summary['metrics']}")


def add_common_args(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--config", metavar="FILE", help="run config (TOML); defaults apply to keys it leaves out")
    p.add_argument("--out", metavar="DIR", help=f"output directory (default {out_default})")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of initialization, data order and sampling (train.seed)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 --set task.options.digits=3; repeatable")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nanoseek sft`, `dpo`, `grpo`, `distill` and `rejection-sample`."""
    for command, (help_text, _) in COMMANDS.items():
        p = subparsers.add_parser(
            command, help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. " + (
                "Writes DIR/data.jsonl, DIR/stats.json and DIR/config.toml." if command == "rejection-sample" else
                "Writes DIR/metrics.jsonl, DIR/checkpoints/ (resumable), DIR/model/ (HF layout + tokenizer), "
                "DIR/config.toml and DIR/summary.json."),
            epilog=f"Run `nanoseek {command} --keys` for every config key it reads, with its meaning and default.")
        add_common_args(p, f"runs/{command}")
        p.add_argument("--model", metavar="DIR", help="starting model directory (model.init_from)")
        p.add_argument("--task", help="verifiable task: arithmetic, countdown, bilingual, file (task.name; a file: --set task.options.path=F)")
        if command in ("sft", "dpo", "distill"):
            p.add_argument("--data", metavar="FILE", help="training data: .jsonl(.gz), .json, .parquet or a saved dataset (data.train)")
        if command != "rejection-sample":
            p.add_argument("--resume", action="store_true",
                           help="continue from DIR's last checkpoint (without --config, DIR/config.toml is used)")
        p.add_argument("--show-config", action="store_true", help="print the resolved config as TOML and exit")
        p.add_argument("--keys", action="store_true", help="list the config keys this command reads and exit")
        p.set_defaults(func=_run)
