"""An interactive DeepSeek-R1 style chat in the terminal (`nanoseek chat`), and loading a model directory.

Replies stream token by token; the thinking (<think>…</think>) is shown dimmed, apart from the answer.
Past turns go back into the prompt without their thinking, as R1 does. Commands: /reset, /exit.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch

from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer.text import ReasoningParser
from nanoseek.interop.hf import load_pretrained

DIM, RESET = "\033[2m", "\033[0m"
HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"


class ReplyPrinter:
    """Writes a streamed reply: the reasoning dimmed (or, without colors, between <think> tags), then
    the answer."""

    def __init__(self, out: TextIO, color: bool, thinking: bool):
        self.out, self.color = out, color
        self.parser = ReasoningParser(thinking)
        self.in_reasoning = False

    def feed(self, text: str, final: bool = False) -> None:
        r, c = self.parser.feed(text, final)
        if r:
            if not self.in_reasoning:
                self.out.write(DIM if self.color else "<think>\n")
                self.in_reasoning = True
            self.out.write(r)
        if c or (final and self.in_reasoning):
            self._close_reasoning()
            self.out.write(c)
        self.out.flush()

    def _close_reasoning(self):
        if self.in_reasoning:
            self.out.write(RESET + "\n\n" if self.color else "\n</think>\n\n")
            self.in_reasoning = False

    def finish(self) -> str:
        """End the reply; returns it as the assistant message to keep in the history."""
        self.feed("", final=True)
        self._close_reasoning()
        self.out.write("\n")
        self.out.flush()
        p = self.parser
        return f"<think>\n{p.reasoning}\n</think>\n\n{p.content}" if p.opened else p.content


def load(model_dir: str, dtype: str = "float32", fp8: bool = False):
    """(model in eval mode, tokenizer) of a model directory; `dtype` ("float32" or "bfloat16") is the compute
    precision; `fp8` keeps an FP8 checkpoint's weights in FP8 (`load_pretrained(..., keep_fp8=True)`)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; a model directory needs its tokenizer")
    tok = load_tokenizer(model_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return load_pretrained(model_dir, dtype=dtype, keep_fp8=fp8), tok


def chat_loop(engine, tokenizer, params, *, system: str | None = None, thinking: bool = False,
              input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout, color: bool = False,
              stats: bool = False) -> list[dict]:
    """Run the conversation until /exit or end of input; returns the messages."""
    context = engine.model.config.max_position_embeddings
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    out.write(HELP + "\n")
    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            break
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation reset)\n")
            continue
        if cmd in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking,
                                            strip_thinking=True)
        if len(ids) + 1 > context:
            messages.pop()
            out.write(f"(the conversation is {len(ids)} tokens, over this model's context of {context}; /reset)\n")
            continue
        room = min(params.max_new_tokens, context - len(ids))
        printer = ReplyPrinter(out, color, thinking)
        t0, n = time.perf_counter(), 0
        try:
            for deltas in engine.stream([ids], params.__class__(**{**params.__dict__, "max_new_tokens": room})):
                for d in deltas:
                    n += len(d.tokens)
                    printer.feed(d.text, final=d.finish_reason is not None)
        except KeyboardInterrupt:
            out.write(" [stopped]")
        messages.append({"role": "assistant", "content": printer.finish()})
        if stats:
            dt = time.perf_counter() - t0
            s = engine.stats
            extra = f", {s.acceptance_rate:.0%} drafts accepted" if engine.speculative else ""
            out.write(f"({n} tokens, {n / dt:.1f} tokens/s{extra})\n")
    return messages
