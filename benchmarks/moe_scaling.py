"""MoE step time as the routed-expert count grows at fixed experts-per-token and expert width.

DeepSeekMoE's premise: compute follows the activated experts, not the total. Here small-v3 is trained
(forward + backward + clip + AdamW, bf16 autocast) with 8, 16, 32 and 64 routed experts per MoE layer,
top-4 routing and 128-wide experts throughout; steps are interleaved across the configs and the median
is reported, with the ratio to 8 experts (target: 64 within 1.3x). The optimizer must still touch every
parameter, so a part of the step does grow with the total; "fwd+bwd" isolates the model.

    .venv/bin/python benchmarks/moe_scaling.py [--threads 1] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import nanoseek  # noqa: F401  (flush denormals)
from nanoseek import DeepSeekForCausalLM, ModelConfig, fastpath


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="8,16,32,64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from nanoseek.pretrain.losses import lm_losses, model_inputs, total_loss
    from nanoseek.train.optim import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    B, S = args.batch, args.seq
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    runs = {}
    for E in map(int, args.experts.split(",")):
        torch.manual_seed(0)
        cfg = ModelConfig.preset("small-v3", n_routed_experts=E, num_experts_per_tok=4)
        model = fastpath.enable(DeepSeekForCausalLM(cfg)).train()
        runs[E] = (model, build_optimizer(model, 1e-4), {"step": [], "fwd+bwd": []})
    batches = [torch.randint(0, 4096, (B, S + 2)) for _ in range(3)]

    def step(model, opt, batch, times):
        t0 = time.perf_counter()
        with amp():
            out = model(model_inputs(batch, S, 1))
            main, mtp = lm_losses(out, batch, S)
            loss = total_loss(main, mtp, 0.3, out.aux_loss)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if times is not None:
            times["fwd+bwd"].append(t1 - t0)
            times["step"].append(time.perf_counter() - t0)

    for model, opt, _ in runs.values():
        step(model, opt, batches[0], None)
    for r in range(args.reps):
        for model, opt, times in runs.values():
            step(model, opt, batches[r % len(batches)], times)
    print(f"small-v3, top-4 of E routed experts (width 128) + 1 shared, batch {B} x {S}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    base = None
    for E, (model, _, times) in runs.items():
        step_t, fb = statistics.median(times["step"]), statistics.median(times["fwd+bwd"])
        base = base or (step_t, fb)
        print(f"  E={E:3d}: {model.num_parameters():>11,} params ({model.num_parameters(active=True):,} active)  "
              f"step {step_t * 1000:7.1f} ms ({step_t / base[0]:.2f}x)   "
              f"fwd+bwd {fb * 1000:7.1f} ms ({fb / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
