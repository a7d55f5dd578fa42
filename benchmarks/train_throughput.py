"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the same config, batch and optimizer.

Both models start from the same weights (nanoseek's, saved and loaded by transformers), train with
AdamW (β 0.9/0.95, wd 0.1, fused) under the same autocast, on the same random token batches. Steps
are interleaved (nanoseek, transformers, nanoseek, ...) so background load hits both alike, and the
median step time of each is reported. transformers has no MTP and no balance loss, so the
like-for-like comparison runs nanoseek with MTP off and no balance loss; the full V3 recipe
(MTP depth 1 + sequence-wise loss + aux-loss-free bias update) is reported beside it. transformers
runs with its defaults (printed: experts implementation, attention implementation); the median
process CPU time per step is printed beside the wall time, since with --threads 1 it is robust to
other load on a shared machine. On CPUs without bf16 GEMM hardware (no AVX-512/AMX; see
nanoseek.fastpath, switched on as the trainers do) torch's bf16 matmuls are 10-50x slower than fp32: nanoseek computes the same
bf16 products with fp32 kernels there, transformers' linears use torch's bf16 kernels (its grouped_mm
experts run in fp32, as grouped_mm ignores autocast), so the bf16 ratio mostly measures that.

    .venv/bin/python benchmarks/train_throughput.py                 # small-v3, batch 8 x 256, bf16
    .venv/bin/python benchmarks/train_throughput.py --dtype fp32 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import nanoseek  # noqa: F401  (flush denormals)
from nanoseek import DeepSeekForCausalLM, ModelConfig, fastpath
from nanoseek.interop.hf import save_pretrained


def autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def optimizer(model):
    from nanoseek.train.optim import build_optimizer
    return build_optimizer(model, 1e-4)


def nanoseek_step(model, opt, batch, dtype, S, bias_update=False):
    from nanoseek.pretrain.balance import update_biases
    from nanoseek.pretrain.losses import lm_losses, model_inputs, total_loss

    D = model.config.num_nextn_predict_layers
    with autocast(dtype):
        out = model(model_inputs(batch, S, D))
        main, mtp = lm_losses(out, batch, S)
        loss = total_loss(main, mtp, 0.3, out.aux_loss)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if bias_update:
        update_biases(model, out.expert_load, 0.001)
    return main.item()


def hf_step(model, opt, batch, dtype, S):
    with autocast(dtype):
        logits = model(input_ids=batch[:, :S]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:S + 1].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-v3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reps", type=int, default=6, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--experts-impl", default=None, help="transformers experts_implementation (default: its own)")
    args = p.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, num_nextn_predict_layers=0, seq_aux_alpha=0.0)
    full_cfg = ModelConfig.preset(args.preset)  # V3 recipe: MTP + seq-aux loss (+ bias update in the step)
    ns = fastpath.enable(DeepSeekForCausalLM(cfg)).train()
    full = fastpath.enable(DeepSeekForCausalLM(full_cfg)).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ns, tmp)
        kwargs = {"experts_implementation": args.experts_impl} if args.experts_impl else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kwargs).train()
    B, S, V = args.batch, args.seq, cfg.vocab_size
    batches = [torch.randint(0, V, (B, S + 2)) for _ in range(4)]
    with torch.no_grad():  # same weights, same function
        x = batches[0][:, :S]
        diff = (ns.eval()(x).logits - hf.eval()(input_ids=x).logits).abs().max().item()
        ns.train(), hf.train()
    runs = {
        "nanoseek": (ns, optimizer(ns), lambda m, o, b: nanoseek_step(m, o, b, args.dtype, S)),
        "transformers": (hf, optimizer(hf), lambda m, o, b: hf_step(m, o, b, args.dtype, S)),
        "nanoseek V3 recipe (MTP, seq-aux, bias)": (full, optimizer(full),
                                                    lambda m, o, b: nanoseek_step(m, o, b, args.dtype, S, True)),
    }
    times = {k: [] for k in runs}
    cpu_times = {k: [] for k in runs}  # process CPU time: with --threads 1, robust to other load on a shared machine
    for name, (m, o, fn) in runs.items():  # warm-up: allocations, oneDNN primitives
        for i in range(2):
            fn(m, o, batches[i])
    for r in range(args.reps):
        for name, (m, o, fn) in runs.items():
            for i in range(args.steps):
                t, c = time.perf_counter(), time.process_time()
                fn(m, o, batches[(r * args.steps + i) % len(batches)])
                times[name].append(time.perf_counter() - t)
                cpu_times[name].append(time.process_time() - c)
    print(f"{args.preset}: {ns.num_parameters():,} params ({ns.num_parameters(active=True):,} active), "
          f"batch {B} x {S}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__} (experts: {hf.config._experts_implementation}, attention: "
          f"{hf.config._attn_implementation}); max |logit diff| at init {diff:.1e}")
    tps, cpu = {}, {}
    for name, ts in times.items():
        med, cpu[name] = statistics.median(ts), statistics.median(cpu_times[name])
        tps[name] = B * S / med
        print(f"  {name:42s} {med * 1000:8.1f} ms/step  {tps[name]:8.0f} tokens/s  (n={len(ts)}; "
              f"CPU time {cpu[name] * 1000:.1f} ms/step)")
    v3 = "nanoseek V3 recipe (MTP, seq-aux, bias)"
    print(f"ratio nanoseek / transformers: {tps['nanoseek'] / tps['transformers']:.2f}x "
          f"(V3 recipe / transformers: {tps[v3] / tps['transformers']:.2f}x); by CPU time: "
          f"{cpu['transformers'] / cpu['nanoseek']:.2f}x ({cpu['transformers'] / cpu[v3]:.2f}x)")


if __name__ == "__main__":
    main()
