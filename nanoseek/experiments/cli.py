"""`nanoseek experiment`: run a paper's ablation at micro scale and report the verdict.

    nanoseek experiment list
    nanoseek experiment mla --quick                      # ≤ 5 minutes on 2 CPU cores, 1 seed
    nanoseek experiment balance --seeds 3 --out runs/experiments/balance
    nanoseek experiment all --results docs/RESULTS.md --readme README.md
    nanoseek experiment summary --results docs/RESULTS.md   # rebuild the summary from finished experiments
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.experiments import EXPERIMENTS, Context, get, run_experiment
from nanoseek.experiments.summary import write_summary
from nanoseek.utils import torch_threads


def _root(args) -> Path:
    """DIR of one experiment (--out NAME) or the parent of every experiment's DIR (all, summary)."""
    default = Path("runs/experiments") / ("quick" if args.quick else "full")
    if args.out:
        return Path(args.out)
    return default if args.name in ("all", "summary") else default / args.name


def _experiment(args: argparse.Namespace) -> None:
    if args.name == "list":
        for name in EXPERIMENTS:
            exp = get(name)
            print(f"{name:<9} {exp.title}\n{'':<9} claim: {exp.claim}")
        return
    if args.seeds < 0 or args.threads < 1:
        raise ValueError(f"--seeds must be ≥ 1 and --threads ≥ 1, got {args.seeds} and {args.threads}")
    names = list(EXPERIMENTS) if args.name in ("all", "summary") else [args.name]
    for name in names:
        get(name)  # an unknown name fails before anything runs
    root, results = _root(args), {}
    for name in names:
        out = root / name if args.name in ("all", "summary") else root
        if args.name == "summary":
            if (out / "results.json").is_file():
                results[name] = json.loads((out / "results.json").read_text())
            continue
        ctx = Context(out=out, quick=args.quick, seeds=args.seeds or (1 if args.quick else 3),
                      threads=args.threads, cache=Path(args.cache))
        with torch_threads(args.threads):
            results[name] = run_experiment(get(name), ctx)
    if args.name in ("all", "summary"):
        paths = write_summary(results, root, args.results, args.readme)
        print("summary: " + ", ".join(map(str, paths)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nanoseek experiment`."""
    p = subparsers.add_parser(
        "experiment", help="reproduce a DeepSeek paper ablation or scaling law at micro scale",
        description="Run an experiment's variants at matched budgets over several seeds (finished runs are "
                    "reused, interrupted ones resume) and write DIR/results.json, DIR/report.md and plots with "
                    "the verdict: reproduced, not reproduced, or inconclusive when the seeds' spreads overlap.",
        epilog=f"Experiments: {', '.join(EXPERIMENTS)}; 'all' runs every one and writes a summary, 'summary' "
               "rebuilds it from finished experiments, 'list' describes them.")
    p.add_argument("name", choices=[*EXPERIMENTS, "all", "summary", "list"], metavar="NAME",
                   help=f"one of {', '.join(EXPERIMENTS)}, all, summary, list")
    p.add_argument("--quick", action="store_true", help="the ≤ 5-minute plan: smaller budgets, 1 seed by default")
    p.add_argument("--seeds", type=int, default=0, help="seeds per variant (default 3, 1 with --quick)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/experiments/{full,quick}/NAME; "
                                                "for all/summary the parent of one directory per experiment)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--cache", default="runs/experiments/cache", metavar="DIR",
                   help="datasets and tokenizers shared by all experiments")
    p.add_argument("--results", metavar="FILE", help="all/summary: also write the summary here (e.g. docs/RESULTS.md)")
    p.add_argument("--readme", metavar="FILE", help="all/summary: replace the paper-vs-nanoseek table between "
                                                    "<!-- results:begin --> and <!-- results:end --> in FILE")
    p.set_defaults(func=_experiment)
