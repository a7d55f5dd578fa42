"""`nanoseek generate`, `nanoseek chat` and `nanoseek serve`: the inference commands over a model directory.

    nanoseek generate --model DIR --prompt "1 + 1 =" --stream
    nanoseek chat --model DIR --thinking
    nanoseek serve --model DIR --port 8000
    nanoseek chat --model DIR --fp8 --dtype bfloat16   # an FP8 checkpoint, kept in FP8
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from nanoseek.infer.chat import ReplyPrinter, chat_loop, load
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.server import create_app


def use_color(choice: str) -> bool:
    """The --color flag: "auto" colors a terminal, not a pipe or a file, and not when NO_COLOR is set (no-color.org)."""
    return {"auto": sys.stdout.isatty() and not os.environ.get("NO_COLOR"), "always": True, "never": False}[choice]


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float,
                           top_p: float, temperature_help: str) -> None:
    """The sampling flags of the commands that generate (`generate`, `chat`), with each command's defaults."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help=temperature_help)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")


def sampling_params(args: argparse.Namespace, **more) -> SamplingParams:
    """Validated `SamplingParams` from the flags of `add_sampling_arguments` (plus `more` fields)."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, **more).validate()


def add_thinking_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{help}; default: as the model was trained (a task's chat prompts ending in <think>)")


def thinking(args: argparse.Namespace, tok) -> bool:
    """--thinking / --no-thinking, else what the model's recorded prompt format says."""
    if args.thinking is not None:
        return args.thinking
    fmt = tok.prompt_format
    return fmt.get("template") == "chat" and bool(fmt.get("prefill_think"))


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """How the commands that load a model hold its weights."""
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the computation and of the weights (but FP8 ones with --fp8)")
    parser.add_argument("--fp8", action="store_true",
                        help="keep an FP8 checkpoint's weights in FP8 with their block scales, each layer dequantizing "
                             "its own as it runs: ~1 byte per quantized weight in memory, the same tokens, slower")


# ---------------------------------------------------------------------- generate
def _generate(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model, tok = load(args.model, args.dtype, args.fp8)
    think = thinking(args, tok)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=think)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    params = sampling_params(args, seed=args.seed, stop_tokens=[] if args.ignore_eos else None,
                             stop_strings=tuple(args.stop))
    context = model.config.max_position_embeddings
    if len(ids) >= context:
        raise ValueError(f"the prompt is {len(ids)} tokens; this model's context is {context}")
    if params.max_new_tokens > context - len(ids):
        print(f"note: --max-new-tokens capped at {context - len(ids)}: the prompt's {len(ids)} tokens and the "
              f"reply must fit this model's context of {context}", file=sys.stderr)
        params = dataclasses.replace(params, max_new_tokens=context - len(ids))
    engine = Engine(model, tok, speculative=args.speculative, compile="auto" if args.compile else False)
    color = use_color(args.color)
    t0, n = time.perf_counter(), 0
    if args.chat:
        printer = ReplyPrinter(sys.stdout, color, think)
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
              + (f", draft acceptance {s.acceptance_rate:.1%}" if args.speculative else "")
              + (f"; {s.compile_seconds:.1f}s of it compiling" if s.compile_seconds else ""), file=sys.stderr)


def _register_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a model directory",
                              description="Generate text from a model directory (weights + tokenizer).")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory with its tokenizer")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (thinking shown apart)")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    add_thinking_argument(p, "with --chat: open the reply with <think> (R1 style)")
    add_sampling_arguments(p, max_new_tokens=64, temperature=0.0, top_p=1.0, temperature_help="0 = greedy (default)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (same output, fewer forwards)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="decode eagerly (default: compiled decode steps where that pays, see Engine)")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and draft acceptance) to stderr")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    add_precision_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_generate)


# ---------------------------------------------------------------------- chat
def _chat(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model, tok = load(args.model, args.dtype, args.fp8)
    engine = Engine(model, tok, speculative=args.speculative, compile="auto" if args.compile else False)
    params = sampling_params(args)
    color = use_color(args.color)
    try:  # here, not at the top: only the interactive chat wants it, and not every platform has it
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat_loop(engine, tok, params, system=args.system, thinking=thinking(args, tok), color=color, stats=args.stats)


def _register_chat(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive chat with a model directory",
                              description="Chat with a model (R1 chat template); the thinking is shown dimmed. "
                                          "Commands: /reset, /exit.")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory with its tokenizer")
    p.add_argument("--system", default=None, help="system prompt")
    add_thinking_argument(p, "open each reply with <think> (R1 style)")
    add_sampling_arguments(p, max_new_tokens=512, temperature=0.6, top_p=0.95,
                           temperature_help="0 = greedy (R1's recommendation: 0.6)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="decode eagerly (default: compiled decode steps where that pays, see Engine)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--stats", action="store_true", help="print tokens/s after each reply")
    add_precision_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_chat)


# ---------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> None:
    try:  # the optional `serve` extra, so imported only to serve
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError("serving needs FastAPI and uvicorn: pip install 'nanoseek[serve]'") from None

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535)")
    torch.manual_seed(args.seed)
    model, tok = load(args.model, args.dtype, args.fp8)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(model, tok, name, api_key=args.api_key or os.environ.get("NANOSEEK_API_KEY"),
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_model_len=args.max_model_len,
                     default_max_tokens=args.default_max_tokens, speculative=args.speculative,
                     thinking=thinking(args, tok), compile="auto" if args.compile else False)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (batch {args.max_batch_size}, queue {args.max_queue}"
          f"{', API key required' if args.api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server for a model directory",
                              description="Serve a model directory (weights + tokenizer) with an OpenAI-compatible "
                                          "API: /v1/models, /v1/chat/completions, /v1/completions.")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set NANOSEEK_API_KEY)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get HTTP 429")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs an MTP module)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="decode eagerly (default: compiled decode steps where that pays, see Engine)")
    add_thinking_argument(p, "open every chat reply with <think> (R1 style)")
    add_precision_arguments(p)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_serve)


def register(subparsers) -> None:
    _register_generate(subparsers)
    _register_chat(subparsers)
    _register_serve(subparsers)
