"""Expert parallelism (nanoseek.parallel.expert) against a single-process MoE over all ranks' tokens.

Every rank builds the same tiny MoE from one seed and the same per-rank inputs; the reference is the
unsharded copy run in one process over the concatenation of all ranks' inputs. Its router runs on each
rank's slice separately (a row-wise op, so the same maths), which makes its routing bitwise equal to the
ranks': top-k and dropping decisions then cannot flip on a last-bit difference of a matmul's blocking.
One spawn per world size runs every case (`_worker`); the tests assert on what it returns.
"""
import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from nanoseek import fastpath
from nanoseek.config import ModelConfig
from nanoseek.model.moe import (
    MoE,
    Routing,
    TokenDispatcher,
    device_token_drop,
    drop_priority,
    keep_within_capacity,
)
from nanoseek.parallel.expert import (
    AllToAllDispatcher,
    fp8_row_bytes,
    shard_experts,
    take_sent_bytes,
)
from nanoseek.parallel.launch import run_ranks
from nanoseek.quant.fp8 import (
    convert_to_fp8,
    dequantize_activation_tilewise,
    quantize_activation_tilewise,
)

S = 4  # tokens per sequence

# name: (preset, config overrides, sequences per rank (cycled), MoE attributes / options)
CASES = {
    # V3: sigmoid, noaux_tc groups, K = 2; uneven token counts; fast paths on
    "v3": ("tiny-v3", {}, [3, 1, 2, 5], {"fast": True}),
    # V2: softmax, group-limited greedy, K = 3, device-limited routing to M = 2 ranks
    "v2_limited": ("tiny-v2", {"topk_devices": 2, "ep_size": "world"}, [2, 4, 1, 3], {}),
    # a rank with no tokens (rank 0) and a rank whose experts are never chosen (the last: router bias)
    "empty": ("tiny-v3", {}, [0, 3, 2, 2], {"starve_last": True}),
    # V2 token dropping decided on the receiving ranks; nothing protected: the single-process decision
    "drop": ("tiny-v2", {"ep_size": "world"}, [4, 2, 3, 3], {"capacity_factor": 0.7, "no_drop_fraction": 0.0}),
    # each rank protects its own first sequence
    "drop_protected": ("tiny-v2", {"ep_size": "world"}, [4, 2, 3, 3],
                       {"capacity_factor": 0.7, "no_drop_fraction": 0.25}),
    # FP8 experts (and shared experts): rows dispatched in E4M3 with their 1x128 scales (V3 §3.3.4)
    "fp8": ("tiny-v3", {}, [3, 1, 2, 5], {"fp8": True}),
}


def _config(preset: str, overrides: dict, world: int) -> ModelConfig:
    kw = {k: world if v == "world" else v for k, v in overrides.items()}
    return ModelConfig.preset(preset, hidden_size=32, moe_intermediate_size=16, seq_aux_alpha=0.0,
                              expert_aux_alpha=0.0, **kw)


class _Sliced(nn.Module):
    """A row-wise module (the gate, FP8 shared experts) run on each rank's slice of the concatenated tokens, its
    outputs (routings) concatenated."""

    def __init__(self, inner: nn.Module, sizes: list[int]):
        super().__init__()
        self.inner, self.sizes = inner, sizes

    def forward(self, x_TD):
        outs = [self.inner(x) for x in x_TD.split(self.sizes)]
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)
        return Routing(*(torch.cat([getattr(r, f) for r in outs]) for f in ("weights", "indices", "scores")))


def _reference_drop(cfg, r: Routing, sizes: list[int], opts: dict, world: int) -> torch.Tensor:
    """The single-process keep mask [T, K]: `device_token_drop` when nothing is protected; otherwise the
    same capacities with each rank's own first sequences protected."""
    cf, ndf = opts["capacity_factor"], opts["no_drop_fraction"]
    T, K = r.indices.shape
    if ndf == 0:
        return device_token_drop(cfg, r, cf, T // S, S, 0.0)
    priority, start = [], 0
    for n in sizes:
        piece = Routing(r.weights[start:start + n], r.indices[start:start + n], r.scores[start:start + n])
        priority.append(drop_priority(piece, round(ndf * (n // S)) * S))
        start += n
    device = (r.indices // (cfg.n_routed_experts // world)).flatten()
    capacity = math.ceil(cf * T * K / world)
    return keep_within_capacity(device, torch.cat(priority).flatten(), capacity, world).view(T, K)


def _run_case(rank: int, world: int, mesh, name: str) -> dict:
    preset, overrides, seqs, opts = CASES[name]
    cfg = _config(preset, overrides, world)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.2)
    E, El, K, D = cfg.n_routed_experts, cfg.n_routed_experts // world, cfg.num_experts_per_tok, cfg.hidden_size
    if opts.get("starve_last"):
        moe.gate.e_score_correction_bias[E - El:] = -10.0  # selection only: the last rank's experts get nothing
    Bs = [seqs[r % len(seqs)] for r in range(world)]
    xs = [torch.randn(B, S, D) for B in Bs]
    gs = [torch.randn(B, S, D) for B in Bs]  # cotangents: loss = Σ_ranks <y_r, g_r>
    if "capacity_factor" in opts:
        moe.capacity_factor, moe.no_drop_fraction = opts["capacity_factor"], opts["no_drop_fraction"]
    if opts.get("fp8"):
        convert_to_fp8(moe)
    ref = copy.deepcopy(moe).train()
    if opts.get("fp8"):
        # each rank's shared experts quantize their Wgrad input over its own tokens (128x1 tiles along tokens)
        ref.shared_experts = _Sliced(ref.shared_experts, [B * S for B in Bs])
        # the routed experts see their rows as the dispatch delivers them: E4M3 1x128 tiles
        experts_forward = ref.experts.forward
        ref.experts.forward = lambda x, counts: experts_forward(  # (the gradient passes straight through)
            x + (dequantize_activation_tilewise(*quantize_activation_tilewise(x.detach())) - x).detach(), counts)
    ref.gate = _Sliced(ref.gate, [B * S for B in Bs])
    if opts.get("fast"):
        fastpath.enable(moe)
    shard_experts(moe, mesh)
    moe.train()

    # expert parallel: each rank its own tokens
    counted = []
    dispatch = moe.dispatcher.dispatch

    def recording(*args, **kw):
        rows, counts, state = dispatch(*args, **kw)
        counted.append(int(counts.sum()))  # the pairs this rank's experts process
        return rows, counts, state
    moe.dispatcher.dispatch = recording
    x = xs[rank].clone().requires_grad_()
    y, stats = moe(x)
    sent = take_sent_bytes(moe)
    (y * gs[rank]).sum().backward()
    gate_grad = moe.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)
    shared_grad = moe.shared_experts.down_proj.weight.grad.clone()
    dist.all_reduce(shared_grad)

    # reference: one process, all tokens
    xcat = torch.cat(xs).requires_grad_()
    lo = sum(B * S for B in Bs[:rank])
    T = Bs[rank] * S
    if "capacity_factor" in opts:  # the single-process dropping decision, then the local dispatcher
        r = ref.gate(xcat.view(-1, D))
        keep = _reference_drop(cfg, r, [B * S for B in Bs], opts, world)
        disp = TokenDispatcher(E)
        rows, counts, state = disp.sort(xcat.view(-1, D), r.indices, r.weights, keep)
        y_ref = (disp.combine(ref.experts(rows, counts), state) + ref.shared_experts(xcat.view(-1, D))).view(xcat.shape)
        kept_on_device = keep[(r.indices // El) == rank].sum().item()
        valid_on_device = ((r.indices // El) == rank).sum().item()
    else:
        y_ref, _ = ref(xcat)
        r = ref.gate(xcat.view(-1, D))
        kept_on_device = valid_on_device = ((r.indices // El) == rank).sum().item()
    (y_ref * torch.cat(gs)).sum().backward()

    out = {
        "T": T,
        "y": (y - y_ref[lo // S:(lo + T) // S]).abs().max().item() if T else 0.0,
        "y_scale": y_ref.abs().max().item(),
        "x_grad": (x.grad - xcat.grad[lo // S:(lo + T) // S]).abs().max().item() if T else 0.0,
        "gate_grad": (gate_grad - ref.gate.inner.weight.grad).abs().max().item(),
        "shared_grad": (shared_grad - _unwrap(ref.shared_experts).down_proj.weight.grad).abs().max().item(),
        "indices_local": stats.routing.indices.tolist(),
        "indices_match": torch.equal(stats.routing.indices, r.indices[lo:lo + T]),
        "sent_bytes": sent,
        "kept": counted[0], "kept_ref": kept_on_device, "received_pairs": valid_on_device,
        "dropped_fraction": None if stats.dropped_fraction is None else stats.dropped_fraction.item(),
        "capacity": math.ceil(opts["capacity_factor"] * sum(Bs) * S * K / world) if "capacity_factor" in opts else None,
        "dispatcher": type(moe.dispatcher).__name__,
    }
    expert_err, sharded = 0.0, True
    for pname in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(moe.experts, pname)
        sharded &= isinstance(p, nn.Parameter) and type(p.data).__name__ == "DTensor" and p.to_local().shape[0] == El
        g = p.grad.to_local() if p.grad is not None else torch.zeros(El, *p.shape[1:])
        g_ref = getattr(ref.experts, pname).grad
        g_ref = torch.zeros_like(getattr(ref.experts, pname)) if g_ref is None else g_ref
        expert_err = max(expert_err, (g - g_ref[rank * El:(rank + 1) * El]).abs().max().item())
    out["expert_grad"], out["sharded"] = expert_err, sharded
    if opts.get("fast"):  # few tokens, no grad, eval: the per-token path must not run on sharded experts
        moe.eval()
        ref.eval()
        ref.gate.sizes = [S] * world
        with torch.no_grad():
            y_eval, _ = moe(xs[rank][:1])
            y_eval_ref, _ = ref(torch.cat([x[:1] for x in xs]))
        out["y_eval"] = (y_eval - y_eval_ref[rank:rank + 1]).abs().max().item()
    return out


def _unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, _Sliced) else module


def _errors(rank: int, world: int) -> dict:
    """The ValueErrors of shard_experts' checks."""
    mesh = init_device_mesh("cpu", (world,))
    msgs = {}
    for key, kw in {"divisible": {"n_routed_experts": 6, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2},
                    "ep_size": {"topk_devices": 1, "ep_size": 2}}.items():
        try:
            shard_experts(MoE(_config("tiny-v3", kw, world)), mesh)
            msgs[key] = None
        except ValueError as e:
            msgs[key] = str(e)
    return msgs


def _worker(rank: int, world: int, names: list[str]) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    out = {name: _run_case(rank, world, mesh, name) for name in names}
    if world == 4:
        out["errors"] = _errors(rank, world)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def ranks(request):
    world = request.param
    return world, run_ranks(_worker, world, (list(CASES),), timeout=60)


def _check_equivalence(results: list[dict], name: str) -> None:
    for rank, res in enumerate(results):
        c = res[name]
        assert c["indices_match"], (name, rank)
        assert c["sharded"] and c["dispatcher"] == AllToAllDispatcher.__name__
        tol = 1e-6 * max(1.0, c["y_scale"])
        for key in ("y", "x_grad", "gate_grad", "shared_grad", "expert_grad", "y_eval"):
            if key in c:
                assert c[key] <= tol, (name, rank, key, c[key])


@pytest.mark.parametrize("name", ["v3", "v2_limited"])
def test_expert_parallel_matches_single_process(ranks, name):
    """Outputs, x grads, router and shared grads (summed over ranks) and the local experts' grads equal the
    single-process MoE over all tokens; uneven token counts; the fast paths (v3) compute on the shard."""
    _, results = ranks
    _check_equivalence(results, name)


def test_empty_rank_and_starved_experts(ranks):
    """Rank 0 has no tokens (sends nothing); the last rank's experts are never chosen (it receives nothing)."""
    _, results = ranks
    assert results[0]["empty"]["T"] == 0 and results[-1]["empty"]["kept"] == 0
    assert all(c["empty"]["received_pairs"] == c["empty"]["kept"] for c in results)
    _check_equivalence(results, "empty")


def _sent_bytes_from_routing(results: list[dict], name: str, world: int, D: int, El: int,
                             dispatch_row: int | None = None) -> list[int]:
    """Per rank: rows to other ranks, one per (token, other rank holding one of its experts) in the dispatch
    (`dispatch_row` bytes each; default 4-byte rows of D), and in the combine one 4-byte row of D per such
    pair received."""
    dests = [[{e // El for e in ids} for ids in res[name]["indices_local"]] for res in results]
    out = []
    for r in range(world):
        dispatch = sum(len(d - {r}) for d in dests[r])
        combine = sum(r in d for src in range(world) if src != r for d in dests[src])
        out.append(dispatch * (dispatch_row or D * 4) + combine * D * 4)
    return out


def test_device_limited_routing_bounds_traffic(ranks):
    """With topk_devices = M each token reaches at most M ranks, and the bytes counted are those the
    routing implies."""
    world, results = ranks
    cfg = _config("tiny-v2", {"topk_devices": 2, "ep_size": world}, world)
    El = cfg.n_routed_experts // world
    for name in ("v2_limited", "v3"):
        expected = _sent_bytes_from_routing(results, name, world, cfg.hidden_size, El)
        assert [res[name]["sent_bytes"] for res in results] == expected, name
    touched = [len({e // El for e in ids}) for res in results for ids in res["v2_limited"]["indices_local"]]
    assert max(touched) <= 2 and (world == 2 or max(touched) == 2)
    assert sum(expected) > 0


@pytest.mark.parametrize("name", ["drop", "drop_protected"])
def test_token_dropping_on_the_receiving_rank(ranks, name):
    """Each receiving rank keeps at most its capacity of pairs, exactly the pairs of the single-process
    decision (no_drop_fraction = 0: `device_token_drop` over all tokens; otherwise the same capacities with
    each rank's own first sequences protected), and outputs and gradients follow."""
    _, results = ranks
    dropped_somewhere = False
    for res in results:
        c = res[name]
        assert c["kept"] <= c["capacity"] and c["kept"] == c["kept_ref"]
        assert c["dropped_fraction"] == pytest.approx(1 - c["kept"] / max(c["received_pairs"], 1), abs=1e-6)
        dropped_somewhere |= c["kept"] < c["received_pairs"]
    assert dropped_somewhere
    _check_equivalence(results, name)


def test_shard_experts_validates(ranks):
    world, results = ranks
    if world != 4:
        pytest.skip("checked on 4 ranks")
    msgs = results[0]["errors"]
    assert "n_routed_experts = 6" in msgs["divisible"]
    assert "ep_size = 2" in msgs["ep_size"] and "topk_devices" in msgs["ep_size"]


def test_fp8_dispatch(ranks):
    """FP8 experts (V3 §3.3.4): the dispatch carries E4M3 rows + 1x128 tile scales, the combine stays in the
    rows' precision. Outputs and all gradients equal the single-process FP8 MoE whose routed experts take their
    rows rounded to E4M3 1x128 tiles (what the dispatch delivers; the experts' own quantization then reproduces
    the same tiles) and whose shared experts run per rank (their Wgrad tiles run along each rank's tokens). The dispatched bytes are those the routing implies at D + 4 bytes per row instead of 4·D."""
    world, results = ranks
    _check_equivalence(results, "fp8")
    cfg = _config("tiny-v3", {}, world)
    El, D = cfg.n_routed_experts // world, cfg.hidden_size
    expected = _sent_bytes_from_routing(results, "fp8", world, D, El, dispatch_row=fp8_row_bytes(D, 128))
    assert [res["fp8"]["sent_bytes"] for res in results] == expected and sum(expected) > 0
    assert fp8_row_bytes(D, 128) == D + 4 and fp8_row_bytes(7168, 128) == 7168 + 4 * 56  # V3's hidden size
