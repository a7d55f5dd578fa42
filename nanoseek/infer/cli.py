"""`nanoseek generate`: complete a prompt with a checkpoint and its tokenizer."""
from __future__ import annotations

import argparse
import os


def _run(args: argparse.Namespace) -> None:
    import torch

    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.infer.generate import generate
    from nanoseek.model.transformer import DeepSeekForCausalLM

    if not os.path.exists(os.path.join(args.model, "tokenizer.json")):
        raise FileNotFoundError(f"{args.model} has no tokenizer.json; a model directory needs its tokenizer")
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    model = DeepSeekForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    new = generate(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_tokens=[tok.eos_id])[0]
    print(tok.decode(new, skip_special_tokens=True))


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with a model directory",
                              description="Generate text from a model directory (weights + tokenizer).")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory with its tokenizer")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
