"""Tiny models for the inference tests, built in seconds and cached per process.

`chat_model_dir()`: a tokenizer trained on a few KB of the standard library and a tiny V3-style model
(with MTP) trained to answer every question with the same R1-style reply, saved as a model directory.
`pattern_model()`: a tiny V3-style model whose main head and MTP module both learned a fixed
successor table, so MTP drafts are almost always right.
`serve_process(...)`: `nanoseek serve` on that directory in its own process, as users start it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.interop.hf import save_pretrained
from nanoseek.data.tokenizer import train_tokenizer_from_texts

REASONING = "Two plus two."
ANSWER = "It is 4."
REPLY = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"
QUESTIONS = ["What is 2+2?", "hello", "Tell me a joke", "sum two and two", "why?", "Compute 2 + 2 please",
             "who are you", "ok"]


def _train(model, batches, steps: int, lr: float = 3e-3, seed: int = 0) -> None:
    """Next-token loss plus the MTP loss, plain AdamW: just enough to make behaviour deterministic."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x, mask = batches(g)
        out = model(x)
        tgt = x[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100)
        for k, lg in enumerate(out.mtp_logits, start=1):
            t = x[:, k + 1:].masked_fill(~mask[:, k + 1:], -100)
            loss = loss + F.cross_entropy(lg[:, :-1].flatten(0, 1), t.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def chat_model_dir() -> str:
    with _lock:
        torch.manual_seed(0)
        texts = [inspect.getsource(m) for m in (json.decoder, json.encoder, functools)]
        tok = train_tokenizer_from_texts(texts, 300, progress=False)
        cfg = nanoseek.ModelConfig.preset("tiny-v3", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, seq_aux_alpha=0.0)
        model = nanoseek.DeepSeekForCausalLM(cfg)
        convs = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}],
                                         add_generation_prompt=False) for q in QUESTIONS]
        L = max(map(len, convs))
        data = torch.full((len(convs), L), tok.pad_id)
        mask = torch.zeros(len(convs), L, dtype=torch.bool)
        for i, c in enumerate(convs):
            data[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), True

        def batches(g):
            idx = torch.randint(0, len(convs), (16,), generator=g)
            return data[idx], mask[idx]

        _train(model, batches, steps=100, lr=5e-3)
        path = tempfile.mkdtemp(prefix="nanoseek-chat-")
        save_pretrained(model, path)
        tok.save(path)
        return path


@functools.lru_cache(maxsize=None)
def pattern_model():
    torch.manual_seed(0)
    cfg = nanoseek.ModelConfig.preset("tiny-v3", seq_aux_alpha=0.0, eos_token_id=None)
    model = nanoseek.DeepSeekForCausalLM(cfg)
    g0 = torch.Generator().manual_seed(0)
    cycle = torch.randperm(64, generator=g0) + 8
    succ = torch.arange(cfg.vocab_size)
    succ[cycle] = cycle.roll(-1)

    def batches(g, B=16, S=32):
        x = torch.empty(B, S, dtype=torch.long)
        x[:, 0] = cycle[torch.randint(0, 64, (B,), generator=g)]
        for i in range(1, S):
            x[:, i] = succ[x[:, i - 1]]
        return x, torch.ones_like(x, dtype=torch.bool)

    _train(model, batches, steps=80, lr=5e-3)
    return model, cycle, succ


@contextlib.contextmanager
def serve_process(*args: str, headers: dict | None = None, timeout: float = 60):
    """`nanoseek serve --model chat_model_dir() --model-name tiny ARGS` on a free 127.0.0.1 port, 1 thread;
    yields (url, process) once /health answers (with `headers`); terminated (then killed) afterwards."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # its output goes to a file: a pipe nobody reads could fill up and stall a long-running server
    with tempfile.TemporaryFile() as log, subprocess.Popen(
            [sys.executable, "-m", "nanoseek.cli", "serve", "--model", chat_model_dir(), "--port", str(port),
             "--model-name", "tiny", *args], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"}) as proc:
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"the server exited: {log.read().decode(errors='replace')}")
                try:
                    if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.2)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
