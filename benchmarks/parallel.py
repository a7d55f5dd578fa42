"""Data and expert parallelism on local gloo ranks (CPU): what each rank holds and what the all-to-all moves.

memory: small-v3 trained for a few AdamW steps (fp32, global batch 8 x 256) with FSDP2 over
dp_shard = 1, 2, 4 ranks. Per rank: the bytes of its parameter, gradient and AdamW shards beside the
closed form 16·P / dp_shard (fp32 weight, gradient, two moments), and the peak resident memory during
the steps (VmHWM, reset after setup; it includes what every process holds: torch itself, activations).

alltoall: one MoE layer's forward under expert parallelism (ep ranks, E experts, top-K, device-limited
routing to M = 1 … ep ranks) on random tokens: the bytes each rank sends to other ranks in the dispatch
and combine all-to-alls, measured by the dispatcher, beside the bound 2 · T · min(M, K) · D · 4 bytes
(each token goes at most once to each of its ≤ min(M, K) ranks and comes back once), the expected
value under uniform routing, and the bytes with the experts in FP8 (V3 §3.3.4: the dispatch in E4M3 with
1x128 tile scales, the combine in the rows' precision; measured in the same run).

    .venv/bin/python benchmarks/parallel.py memory
    .venv/bin/python benchmarks/parallel.py alltoall              # ep = 4, E = 32, K = 8
"""
from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh

from nanoseek.config import ModelConfig
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.parallel.expert import shard_experts
from nanoseek.parallel.launch import run_ranks
from nanoseek.parallel.mesh import ParallelDims
from nanoseek.parallel.parallelize import parallelize
from nanoseek.pretrain.losses import lm_losses, model_inputs, total_loss
from nanoseek.quant.fp8 import convert_to_fp8
from nanoseek.train.config import ParallelSection
from nanoseek.train.optim import build_optimizer, clip_grad_norm


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def memory_worker(rank: int, world: int, steps: int, batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("small-v3")
    model = DeepSeekForCausalLM(cfg)
    P = sum(p.numel() for p in model.parameters())
    if world > 1:
        dims = ParallelDims.resolve(ParallelSection(dp_shard=world), world, cfg)
        parallelize(model, dims, dims.build_meshes("cpu"))
    opt = build_optimizer(model, 1e-4)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS: count the steps, not the setup
    D = cfg.num_nextn_predict_layers
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        window = torch.randint(cfg.vocab_size, (batch // world, seq + 1 + D), generator=gen)
        out = model(model_inputs(window, seq, D))
        main, mtp = lm_losses(out, window, seq)
        total_loss(main, mtp, 0.3, out.aux_loss).backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        grads = _local_bytes(p.grad for p in model.parameters())
        opt.zero_grad(set_to_none=True)
    moments = _local_bytes(t for s in opt.state.values() for t in s.values() if t.dim() > 0)
    return {"params": P, "state_bytes": _local_bytes(model.parameters()) + grads + moments,
            "peak_rss": _status_kib("VmHWM") * 1024}


def memory(args) -> None:
    print(f"small-v3, fp32, global batch {args.batch} x {args.seq}, {args.steps} AdamW steps per layout")
    print(f"{'dp_shard':>8} {'weights+grads+AdamW / rank':>27} {'16·P/dp_shard':>14} {'peak RSS / rank':>16}")
    for world in args.dp_shard:
        results = run_ranks(memory_worker, world, (args.steps, args.batch, args.seq), timeout=900)
        P = results[0]["params"]
        state = max(r["state_bytes"] for r in results)
        peak = max(r["peak_rss"] for r in results)
        print(f"{world:>8} {state / 2**20:>23.1f} MiB {16 * P / world / 2**20:>10.1f} MiB {peak / 2**20:>12.0f} MiB")


def alltoall_worker(rank: int, world: int, limits: list[int], tokens: int, experts: int, k: int) -> list[dict]:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    out = []
    for M in limits:
        cfg = ModelConfig.preset("small-v3").replace(n_routed_experts=experts, num_experts_per_tok=k, n_group=1,
                                                     topk_group=1, topk_devices=M, ep_size=world)
        row = {"M": M, "hidden": cfg.hidden_size}
        for fp8 in (False, True):
            torch.manual_seed(0)  # the same layer on every rank
            moe = MoE(cfg)
            for p in moe.parameters():
                torch.nn.init.normal_(p, std=0.02)
            if fp8:
                convert_to_fp8(moe)
            shard_experts(moe, mesh)
            x = torch.randn(1, tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
            with torch.no_grad():
                _, stats = moe(x)
            row["fp8_bytes" if fp8 else "bytes"] = moe.dispatcher.sent_bytes
        ranks_per_token = (stats.routing.indices // (experts // world)).sort(-1).values.diff(dim=-1).ne(0).sum(-1) + 1
        out.append({**row, "ranks_per_token": float(ranks_per_token.float().mean())})
    return out


def alltoall(args) -> None:
    E, K, ep, T = args.experts, args.k, args.ep, args.tokens
    per_rank = E // ep
    uniform = ep * (1 - math.comb(E - per_rank, K) / math.comb(E, K))  # expected ranks a token reaches, no limit
    print(f"one MoE layer forward (small-v3 width), E = {E} experts top-{K} on ep = {ep} ranks, {T} tokens per "
          f"rank, fp32; bytes each rank sends to the others (dispatch + combine), mean over ranks")
    print(f"{'M':>3} {'ranks/token':>11} {'measured':>12} {'bound 2·T·min(M,K)·D·4':>24} {'uniform, off-rank':>18} "
          f"{'FP8 dispatch':>13} {'FP8/fp32':>8}")
    results = run_ranks(alltoall_worker, ep, (list(range(1, ep + 1)), T, E, K), timeout=900)
    for i, M in enumerate(range(1, ep + 1)):
        rows = [r[i] for r in results]
        D = rows[0]["hidden"]
        measured = sum(r["bytes"] for r in rows) / ep
        fp8 = sum(r["fp8_bytes"] for r in rows) / ep
        reach = sum(r["ranks_per_token"] for r in rows) / ep
        bound = 2 * T * min(M, K) * D * 4
        # with no limit and uniform routing a token reaches `uniform` ranks, (ep-1)/ep of them others
        expect = f"{2 * T * uniform * (ep - 1) / ep * D * 4 / 2**20:>14.2f} MiB" if M == ep else f"{'':>18}"
        print(f"{M:>3} {reach:>11.2f} {measured / 2**20:>8.2f} MiB {bound / 2**20:>20.2f} MiB {expect} "
              f"{fp8 / 2**20:>9.2f} MiB {fp8 / measured:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="per-rank memory of small-v3 under FSDP2")
    m.add_argument("--dp-shard", type=int, nargs="+", default=[1, 2, 4])
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--seq", type=int, default=256)
    m.set_defaults(func=memory)
    a = sub.add_parser("alltoall", help="expert-parallel all-to-all bytes under device-limited routing")
    a.add_argument("--ep", type=int, default=4)
    a.add_argument("--experts", type=int, default=32)
    a.add_argument("--k", type=int, default=8)
    a.add_argument("--tokens", type=int, default=2048)
    a.set_defaults(func=alltoall)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
