"""MTP speculative decoding speed-up (DeepSeek-V3 §5.4.3: 85-90% second-token acceptance, 1.8x TPS).

Trains a small V3-style model with its MTP module for a few hundred steps on the standard library's
Python source (or loads a trained model directory), then generates greedily from held-out prompts
with and without speculation, runs interleaved, and reports the draft acceptance rate, tokens per
main-model forward, decode tokens/s and the speed-up; greedy outputs must be identical.
`--data pattern` trains on a fixed successor table instead, where drafts are always right: the
upper bound of the speed-up on this machine.

    .venv/bin/python benchmarks/speculative.py                        # small-v3, 300 steps on stdlib
    .venv/bin/python benchmarks/speculative.py --data pattern --steps 150
    .venv/bin/python benchmarks/speculative.py --save /tmp/spec-model     # then: --model /tmp/spec-model
    .venv/bin/python benchmarks/speculative.py --model runs/pretrain/model
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek import fastpath
from nanoseek.infer.engine import Engine
from nanoseek.interop.hf import load_pretrained, save_pretrained


def train(model, batches, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        x = batches()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
        mtp = F.cross_entropy(out.mtp_logits[0][:, :-1].float().flatten(0, 1), x[:, 2:].flatten())
        (loss + mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  mtp loss {mtp.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def stdlib_setup(args):
    from nanoseek.data.corpus import iter_documents
    from nanoseek.data.tokenizer import train_tokenizer_from_texts

    docs = list(iter_documents("stdlib", max_bytes=3_000_000, seed=0))
    tok = train_tokenizer_from_texts(docs, args.vocab, progress=False)
    ids = torch.tensor([t for d in tok.encode_batch(docs) for t in d + [tok.eos_id]])
    split = int(len(ids) * 0.95)
    train_ids, held = ids[:split], ids[split:]
    g = torch.Generator().manual_seed(0)
    S = args.seq

    def batches():
        starts = torch.randint(0, len(train_ids) - S - 1, (args.batch_size,), generator=g)
        return torch.stack([train_ids[s:s + S] for s in starts])

    prompts = [held[i * 500: i * 500 + args.prompt].tolist() for i in range(8)]
    return tok, batches, prompts


def pattern_setup(args, vocab):
    g = torch.Generator().manual_seed(0)
    cycle = torch.randperm(vocab - 16, generator=g)[:512] + 16
    succ = torch.arange(vocab)
    succ[cycle] = cycle.roll(-1)

    def batches():
        x = torch.empty(args.batch_size, args.seq, dtype=torch.long)
        x[:, 0] = cycle[torch.randint(0, len(cycle), (args.batch_size,), generator=g)]
        for i in range(1, args.seq):
            x[:, i] = succ[x[:, i - 1]]
        return x

    prompts = [batches()[0, :args.prompt].tolist() for _ in range(8)]
    return batches, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, metavar="DIR", help="a trained model directory (skips training)")
    ap.add_argument("--preset", default="small-v3")
    ap.add_argument("--data", choices=("stdlib", "pattern"), default="stdlib")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--save", default=None, metavar="DIR", help="save the trained model (and tokenizer) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.model:
        model = fastpath.enable(load_pretrained(args.model)).eval()
        tok = nanoseek.load_tokenizer(args.model)
        from nanoseek.data.corpus import iter_documents
        text = "".join(iter_documents("stdlib", max_bytes=200_000, seed=1))
        ids = tok.encode(text)
        prompts = [ids[i * 1000: i * 1000 + args.prompt] for i in range(8)]
        what = args.model
    else:
        cfg = nanoseek.ModelConfig.preset(args.preset, vocab_size=args.vocab, seq_aux_alpha=0.0, eos_token_id=None)
        model = fastpath.enable(nanoseek.DeepSeekForCausalLM(cfg))  # trained below, then decoded
        if args.data == "stdlib":
            tok, batches, prompts = stdlib_setup(args)
        else:
            batches, prompts = pattern_setup(args, cfg.vocab_size)
        what = f"{args.preset} + MTP trained {args.steps} steps on {args.data} (batch {args.batch_size} x {args.seq})"
        print(f"training {what} ...")
        train(model, batches, args.steps, args.lr)
        if args.save:
            save_pretrained(model, args.save)
            if args.data == "stdlib":
                tok.save(args.save)
    if not model.config.num_nextn_predict_layers:
        raise SystemExit("the model has no MTP module")
    print(f"\n{what}; greedy, {args.new_tokens} new tokens, prompt {args.prompt}, {args.threads} thread(s), "
          f"median of {args.reps} interleaved runs")
    print(f"{'dtype':>5} {'batch':>5} {'plain tok/s':>12} {'MTP tok/s':>10} {'speed-up':>9} {'acceptance':>11} "
          f"{'tok/forward':>12}  same tokens")
    for dtype, B in [(d, b) for d in args.dtypes for b in args.batch]:
        m = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        plain, spec = Engine(m), Engine(m, speculative=True)
        rows = prompts[:B]

        def run(engine):
            return [c.tokens for c in engine.generate(rows, max_new_tokens=args.new_tokens, stop_tokens=[])]

        same = run(plain) == run(spec)
        tp, ts = [], []
        for _ in range(args.reps):
            t = time.perf_counter(); run(plain); tp.append(time.perf_counter() - t)
            t = time.perf_counter(); run(spec); ts.append(time.perf_counter() - t)
        n = B * args.new_tokens
        a, b = n / statistics.median(tp), n / statistics.median(ts)
        s = spec.stats
        print(f"{dtype:>5} {B:>5} {a:>12.1f} {b:>10.1f} {b / a:>8.2f}x {s.acceptance_rate:>10.1%} "
              f"{s.tokens_per_forward:>12.2f}  {same}")


if __name__ == "__main__":
    main()
