"""`nanoseek generate`: complete a prompt with a checkpoint and its tokenizer."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from nanoseek.infer.chat import ReplyPrinter, load, use_color
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import add_sampling_arguments, sampling_params


def _run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model, tok = load(args.model, args.dtype)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=args.thinking)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    params = sampling_params(args, seed=args.seed, stop_tokens=[] if args.ignore_eos else None,
                             stop_strings=tuple(args.stop))
    engine = Engine(model, tok, speculative=args.speculative)
    color = use_color(args.color)
    t0, n = time.perf_counter(), 0
    if args.chat:
        printer = ReplyPrinter(sys.stdout, color, args.thinking)
        write = lambda text, final: printer.feed(text, final)  # noqa: E731
    else:
        write = lambda text, final: (sys.stdout.write(text), sys.stdout.flush())  # noqa: E731
    if args.stream:
        for deltas in engine.stream([ids], params):
            for d in deltas:
                n += len(d.tokens)
                write(d.text, d.finish_reason is not None)
    else:
        c = engine.generate([ids], params)[0]
        n = len(c.tokens)
        write(c.text, True)
    if args.chat:
        printer.finish()
    else:
        print()
    if args.stats:
        dt = time.perf_counter() - t0
        s = engine.stats
        print(f"{n} tokens in {dt:.2f}s ({n / dt:.1f} tokens/s); tokens per forward {s.tokens_per_forward:.2f}"
              + (f", draft acceptance {s.acceptance_rate:.1%}" if args.speculative else ""), file=sys.stderr)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a model directory",
                              description="Generate text from a model directory (weights + tokenizer).")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory with its tokenizer")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (thinking shown apart)")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--thinking", action="store_true", help="with --chat: open the reply with <think> (R1 style)")
    add_sampling_arguments(p, max_new_tokens=64, temperature=0.0, top_p=1.0, temperature_help="0 = greedy (default)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (same output, fewer forwards)")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and draft acceptance) to stderr")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
