"""Decode speed and KV-cache size: nanoseek's engine, eager and compiled, vs transformers'
DeepseekV3ForCausalLM.generate, on the same weights (nanoseek's random init, saved and loaded by
transformers), batch 1, 8 and 32.

Both generate greedily with no end-of-sequence stop, so they make the same number of tokens (the
script checks they make the same tokens). Runs are interleaved (nanoseek, transformers, nanoseek, ...)
so background load hits both alike; the median is reported. Decode tokens/s excludes the prefill:
it is B·(N-1) / (time for N new tokens - time for 1 new token), by wall clock and by the process's
CPU time (with one thread, CPU time does not count the time other jobs on a shared machine took the
core; the ratio by CPU time is the steadier one there). The compiled engine's compile seconds (its first
call per batch size; short when Inductor's on-disk cache already has the graphs) are printed beside and
are not in its tokens/s. Cache bytes are measured on the caches each library actually filled, per token
(all layers) and per batch row.

    .venv/bin/python benchmarks/decode.py                       # small-v3, fp32, 1 thread
    .venv/bin/python benchmarks/decode.py --batch 1 8 --new-tokens 64 --prompt 32 --reps 5 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import nanoseek
from nanoseek import fastpath
from nanoseek.infer.engine import Engine
from nanoseek.interop.hf import load_pretrained, save_pretrained


def timed(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(*args)."""
    t, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-v3")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = nanoseek.ModelConfig.preset(args.preset)
    ns = nanoseek.DeepSeekForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ns, d)
        ns = fastpath.enable(load_pretrained(d, dtype=dtype)).eval()  # (the engine would enable it too)
        transformers.logging.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # transformers' own defaults (SDPA attention, grouped_mm experts): no handicap on the reference
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    hf.generation_config.pad_token_id = 0
    print(f"{args.preset} ({ns.num_parameters():,} parameters, {ns.num_parameters(active=True):,} active), {args.dtype}, "
          f"{args.threads} thread(s), torch {torch.__version__}, transformers {transformers.__version__} "
          f"(attention {hf.config._attn_implementation}, experts {hf.config._experts_implementation})")
    print(f"prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy, median of {args.reps} interleaved runs\n")
    print(f"{'batch':>5} {'compiled tok/s':>14} {'eager tok/s':>11} {'transformers tok/s':>18} "
          f"{'compiled/hf':>11} {'eager/hf':>8} {'by CPU time':>12} {'compile s':>9}   "
          f"{'cache B/token ns':>16} {'hf':>8} {'ratio':>6}   same tokens")
    engines = {"c": Engine(ns, compile=True), "ns": Engine(ns, compile=False)}
    engine = engines["ns"]
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(10, cfg.vocab_size, (B, args.prompt), generator=g)

        def run_ns(n, kind="ns"):
            return [c.tokens for c in engines[kind].generate(prompts.tolist(), max_new_tokens=n, stop_tokens=[])]

        def run_hf(n, **kw):
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, eos_token_id=None, **kw)

        compiled = run_ns(args.new_tokens, "c")  # (compiles this batch's graph)
        compile_s = engines["c"].stats.compile_seconds
        hf_tokens = run_hf(args.new_tokens)[:, args.prompt:].tolist()
        same = run_ns(args.new_tokens) == hf_tokens and compiled == hf_tokens
        times = {k: [] for k in ("c", "ns", "hf", "c1", "ns1", "hf1")}
        for _ in range(args.reps):
            for k in ("c", "ns", "hf"):
                run = (lambda n, k=k: run_hf(n)) if k == "hf" else (lambda n, k=k: run_ns(n, k))
                times[k].append(timed(run, args.new_tokens))
                times[k + "1"].append(timed(run, 1))
        n = B * (args.new_tokens - 1)
        tps = {}
        for clock in (0, 1):  # wall, CPU
            med = {k: statistics.median(t[clock] for t in v) for k, v in times.items()}
            tps[clock] = {k: n / (med[k] - med[k + "1"]) for k in ("c", "ns", "hf")}
        wall, cpu = tps[0], tps[1]

        # cache bytes per token (all layers, one row): what each library stored for this batch
        batch = engine.new_batch()
        batch.add(prompts.tolist(), nanoseek.infer.sampling.SamplingParams(max_new_tokens=2, stop_tokens=[]))
        batch.step()
        ns_bytes = batch.cache.bytes_per_token_per_layer() * cfg.num_hidden_layers
        out = run_hf(2, return_dict_in_generate=True)
        pkv = out.past_key_values
        hf_bytes = sum(t.numel() * t.element_size() for layer in pkv.layers for t in (layer.keys, layer.values)) // (
            B * pkv.get_seq_length())
        print(f"{B:>5} {wall['c']:>14.1f} {wall['ns']:>11.1f} {wall['hf']:>18.1f} {wall['c'] / wall['hf']:>10.2f}x "
              f"{wall['ns'] / wall['hf']:>7.2f}x {cpu['c'] / cpu['hf']:>5.2f}/{cpu['ns'] / cpu['hf']:.2f}x "
              f"{compile_s:>9.1f}   {ns_bytes:>16,} {hf_bytes:>8,} {hf_bytes / ns_bytes:>5.2f}x   {same}", flush=True)
    mla = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * dtype.itemsize
    mha = 2 * cfg.num_attention_heads * cfg.v_head_dim * cfg.num_hidden_layers * dtype.itemsize
    print(f"\nclosed form: MLA (d_c + d_h^R)·l = {mla:,} B/token vs MHA 2·n_h·d_h·l = {mha:,} B/token "
          f"({mla / mha:.1%}, -{1 - mla / mha:.1%})")


if __name__ == "__main__":
    main()
