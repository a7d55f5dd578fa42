"""`nanoseek pipeline r1-zero | r1` and `nanoseek demo`: thin front-ends to nanoseek.recipes.

    nanoseek pipeline r1-zero --out runs/r1-zero        # nanoseek pipeline r1 --out runs/r1
    nanoseek demo --quick --out runs/demo-quick
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.posttrain.cli import add_common_args
from nanoseek.recipes.demo import run
from nanoseek.recipes.r1 import run_pipeline


def _pipeline(args: argparse.Namespace) -> None:

    out = args.out or f"runs/{args.kind}"
    sets = list(args.set or [])
    if args.seed is not None:
        sets.append(f"pipeline.seed={args.seed}")
    if args.base:
        sets.append(f"pipeline.base={json.dumps(args.base)}")
    if args.threads is not None:
        sets.append(f"pipeline.threads={args.threads}")
    report = run_pipeline(args.kind, out, args.config, sets)
    print(f"pipeline {args.kind}: {len(report['stages'])} stages in {report['wall_time']:.0f}s; report in "
          f"{Path(out) / 'report.md'}; final model in {report['final_model']}")
    print((Path(out) / "report.md").read_text(encoding="utf-8"), end="")


def _demo(args: argparse.Namespace) -> None:
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    run(out, quick=args.quick, seed=args.seed, threads=args.threads, progress=not args.no_progress)


def _register_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole DeepSeek recipe at micro scale and write a report",
        description="Pretrain a DeepSeek-V3-style model, run R1-Zero and the R1 pipeline on it, distill a dense "
                    "student, measure MTP speculative decoding, and write OUT/report.md. Running it again "
                    "resumes: finished stages are reused.")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/demo, or "
                   "runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="the same recipe on a smaller budget (<= 4 minutes on 2 "
                   "cores): every stage still shows its effect, with lower, noisier numbers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nanoseek pipeline` and `nanoseek demo`."""
    p = subparsers.add_parser(
        "pipeline", help="the DeepSeek-R1 pipelines at micro scale: r1-zero (base → GRPO) and r1 (cold start → "
                         "reasoning RL → rejection sampling + SFT → all-scenario RL)",
        description="Run a whole post-training pipeline; every stage is its own run directory OUT/NN-stage, "
                    "finished stages are reused and interrupted ones resume. Reports held-out accuracy and "
                    "language consistency after each stage (OUT/report.md, OUT/report.json).",
        epilog="Config: [pipeline] options (base, seed, threads, eval_examples, eval_k, progress), [common] "
               "PostConfig tables for every stage, [STAGE] tables for one stage; --set pipeline.eval_k=4, "
               "--set common.train.threads=1, --set rl.grpo.beta=0.04. Stages: r1-zero: base, rl; "
               "r1: base, cold_start, reasoning_rl, rejection, sft, rl.")
    p.add_argument("kind", choices=("r1-zero", "r1"), help="which pipeline")
    add_common_args(p, "runs/<kind>")
    p.add_argument("--base", metavar="DIR", help="start from this base model instead of building the micro base")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every stage")
    p.set_defaults(func=_pipeline)
    _register_demo(subparsers)
