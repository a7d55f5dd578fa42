"""`nanoseek <command>`: one entry point; each command's module registers its own subparser.

User errors (bad paths, bad configs, bad checkpoints) print one line and exit 2. Under torchrun every
rank runs the command and rank 0 alone prints to stdout (errors go to stderr from every rank).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import version

# Modules that add commands with `register(subparsers)`, in the order `--help` lists them.
COMMAND_MODULES = (
    "nanoseek.data.cli",       # tokenizer, data
    "nanoseek.pretrain.cli",   # pretrain
    "nanoseek.posttrain.cli",  # sft, dpo, grpo, distill, rejection-sample
    "nanoseek.eval.cli",       # eval
    "nanoseek.interop.cli",    # convert
    "nanoseek.infer.cli",      # generate, chat, serve
    "nanoseek.recipes.cli",    # pipeline, demo
    "nanoseek.parallel.cli",   # plan
    "nanoseek.scaling.cli",   # scaling
    "nanoseek.experiments.cli",  # experiment
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek recipe on a laptop.")
    parser.add_argument("--version", action="version", version=f"nanoseek {version('nanoseek')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a training command sets `interrupted`: how to resume
        hint = getattr(args, "interrupted", None)
        print(f"nanoseek {args.command}: interrupted" + (f" {hint()}" if hint else ""), file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
