"""DeepSeekMoE: fine-grained routed experts plus shared experts (DeepSeekMoE 2401.06066; V2 §2.2; V3 §2.1.2).

Router: affinities s = softmax (V2) or sigmoid (V3) of x·W_g; selection uses s + b, where the bias b is
the auxiliary-loss-free balancing state (aux-loss-free 2408.15664), changed outside the model by
`update_router_bias` and never by the optimizer; gate values come from s alone. Selection may be
limited to the top-M devices (V2 device-limited routing, device score = max affinity) and to the top
groups (V2 group max; V3 sum of the top-2). Experts are stacked tensors evaluated per expert over
the tokens routed to it, so the cost follows the active parameters, not the total: one grouped
matmul per projection over the (token, expert) pairs sorted by expert (torch's grouped_mm), which
keeps the step time flatter as the expert count grows; a loop over the experts hit where grouped_mm
is missing, and on CPU a direct loop over each token's K experts at inference over a few tokens
(decoding batches of up to 8 rows, and the speculative verify of up to 4).

V2 §2.2.4 device-level token dropping (training only): with `MoE.capacity_factor` set, each of the
`ep_size` devices processes at most capacity_factor · T·K / ep_size (token, expert) pairs, dropping
those of lowest affinity; the first `MoE.no_drop_fraction` of the sequences in a batch are never
dropped (V2: ~10%). Evaluation never drops.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.linalg import vecdot

from nanoseek.config import ModelConfig
from nanoseek.model.linear import DecodeCache, Linear, cast, emulate_bf16, linear, round_bf16, scalar


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter, bias=False)
        self.up_proj = Linear(dim, inter, bias=False)
        self.down_proj = Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    weights: torch.Tensor  # [T, K] gate values (fp32), scaled by routed_scaling_factor
    indices: torch.Tensor  # [T, K] selected experts, distinct per token
    scores: torch.Tensor  # [T, E] affinities s (fp32), for the balance losses

    def detached(self) -> "Routing":
        if not (self.weights.requires_grad or self.scores.requires_grad):
            return self
        return Routing(self.weights.detach(), self.indices, self.scores.detach())

    @property
    def load(self) -> torch.Tensor:
        """[E] tokens per expert in this batch (fp32, no grad); counted when asked (decoding never asks)."""
        return torch.bincount(self.indices.flatten(), minlength=self.scores.shape[-1]).float()


_NEG_INF = scalar(float("-inf"))


def keep_top_blocks(sel_TE: torch.Tensor, n_blocks: int, k_blocks: int, score: str) -> torch.Tensor:
    """Mask (-inf) every expert outside the k best of n contiguous blocks (groups or devices).

    A block is scored by its best expert ("max": V2 group- and device-limited routing) or by the sum
    of its best two ("top2": V3 node-limited routing).
    """
    T, E = sel_TE.shape
    blocks = sel_TE.view(T, n_blocks, E // n_blocks)
    block_score = blocks.amax(-1) if score == "max" else blocks.topk(2, dim=-1).values.sum(-1)
    drop = torch.ones_like(block_score, dtype=torch.bool).scatter_(1, block_score.topk(k_blocks, dim=-1).indices, False)
    return blocks.masked_fill(drop[:, :, None], _NEG_INF).view(T, E)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        self._tiny, self._scale = scalar(1e-20), scalar(cfg.routed_scaling_factor)  # (no Python numbers per call)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        dev = x_TD.device.type
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext():
            # routing in fp32, as DeepSeek does (not autocast)
            logits = F.linear(cast(x_TD, torch.float32), cast(self.weight, torch.float32))
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        sel = (scores.detach() if scores.requires_grad else scores) + self.e_score_correction_bias  # bias: selection only
        if cfg.topk_devices is not None:
            sel = keep_top_blocks(sel, cfg.ep_size, cfg.topk_devices, "max")
        if cfg.topk_method != "greedy" and (cfg.n_group or 1) > 1:
            sel = keep_top_blocks(sel, cfg.n_group, cfg.topk_group, "max" if cfg.topk_method == "group_limited_greedy" else "top2")
        indices = sel.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self._tiny)
        return Routing(weights * self._scale, indices, scores)


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts stored stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self._decode_cache = DecodeCache()
        self.per_token_max = 8
        """Inference over at most this many tokens (half as many when torch runs several threads) evaluates
        each token's experts directly (`_per_token`). small-v3 decode on CPU, against the grouped kernel: with
        1 thread 28% faster at batch 1, 14% at 4, 7% at 6, even at 8; with 2 threads 11% faster at batch 1,
        3% at 4, 15% slower at 8."""

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_k weights[t, k] · expert_{indices[t, k]}(x_t); pairs where `keep_TK` is False are dropped."""
        # (per token: measured on CPU, where syncing on the expert ids is free; no bf16 emulation under autocast)
        limit = self.per_token_max if torch.get_num_threads() == 1 else self.per_token_max // 2
        if x_TD.shape[0] <= limit and keep_TK is None and not torch.is_grad_enabled() and x_TD.device.type == "cpu" \
                and not torch.is_autocast_enabled("cpu"):
            return self._per_token(x_TD, indices_TK, weights_TK)
        K = indices_TK.shape[1]
        flat = indices_TK.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        if keep_TK is not None:
            order = order[keep_TK.flatten()[order]]
        counts_E = torch.bincount(flat if keep_TK is None else flat[order], minlength=self.gate_proj.shape[0])
        token = order // K
        if self._can_group(x_TD):  # cast the T rows once, before the gather copies each K times
            h = self._grouped(self._operand(x_TD)[token], counts_E)
        else:
            h = self._looped(x_TD[token], counts_E)
        y_sorted = h * cast(weights_TK.flatten()[order, None], x_TD.dtype)  # gate values kept in x's precision
        return torch.zeros_like(x_TD).index_add_(0, token, cast(y_sorted, x_TD.dtype))

    def _per_token(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Decoding a few tokens (a small batch, or a small batch's speculative verify): each token's K experts
        are one row through one expert each, cheaper than the sort/gather/scatter bookkeeping and the
        grouped kernel's walk over all experts; a token's K outputs are summed with their gate values in
        one product. With one thread each projection is a vector dot product over the rows of the expert's
        weight (`linalg.vecdot`: it streams a weight that is not in cache ~1.3-1.8x faster than MKL's
        matrix-vector product); with two threads it made the decode step slower, not faster (small-v3:
        9% at batch 1, 18% at batch 4; the cause is not pinned down), so there MKL's product it is."""
        experts, out = self._expert_weights(), []
        row = vecdot if torch.get_num_threads() == 1 else lambda w, x: F.linear(x, w)
        for x_D, ids, w_K in zip(x_TD, indices_TK.tolist(), weights_TK):
            h_KD = torch.stack([row(down, F.silu(row(gate, x_D)) * row(up, x_D))
                                for gate, up, down in (experts[e] for e in ids)])
            out.append(cast(w_K, h_KD.dtype) @ h_KD)
        return torch.stack(out)

    def _expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(gate, up, down) views of each expert, kept until a parameter changes (indexing a stacked
        parameter is a dispatched op, and one decoded token would index it 3·K times per layer)."""
        params = [self._parameters[name] for name in ("gate_proj", "up_proj", "down_proj")]
        key = tuple((p.data_ptr(), p._version) for p in params)
        return self._decode_cache.get(key, lambda: list(zip(*(p.detach().unbind(0) for p in params))))

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _can_group(self, x: torch.Tensor) -> bool:
        # One grouped kernel per projection beats a Python loop of small matmuls, under autograd (forward and
        # backward) and at inference too (batch-8 decode ~10% faster on CPU, although the kernel visits
        # empty experts); a few tokens take `_per_token` instead.
        # grouped_mm kernels: fp32/bf16 on CPU, bf16 on CUDA and under torch.compile; 16-byte aligned rows.
        if _grouped_mm is None:
            return False
        dtype = self._compute_dtype(x)
        ok = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16,)}.get(x.device.type, ())
        if torch.compiler.is_compiling():
            ok = (torch.bfloat16,)
        if dtype not in ok:
            return False
        per16 = 128 // torch.finfo(dtype).bits  # elements per 16 bytes
        _, I, D = self.gate_proj.shape
        return D % per16 == 0 and I % per16 == 0

    def _operand(self, t: torch.Tensor) -> torch.Tensor:
        """grouped_mm is not autocast-aware: its operands go to the autocast dtype as autocast would cast
        them or, where the CPU has no bf16 GEMM, to their bf16-rounded values in fp32 for the fp32 kernel
        (same numerics, see nanoseek.model.linear) — except under torch.compile, whose grouped_mm takes bf16 only."""
        dtype = self._compute_dtype(t)
        return round_bf16(t) if emulate_bf16(t, dtype) and not torch.compiler.is_compiling() else cast(t, dtype)

    def _grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: the sorted rows, already an `_operand`."""
        dtype = self._compute_dtype(x_ND)
        offs = counts_E.cumsum(0).to(torch.int32)

        def mm(a, w):
            return cast(_grouped_mm(a, self._operand(w).transpose(1, 2), offs=offs), dtype)
        return mm(self._operand(F.silu(mm(x_ND, self.gate_proj)) * mm(x_ND, self.up_proj)), self.down_proj)

    def _looped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                seg = x_ND[start:start + n]
                h = F.silu(seg @ self.gate_proj[e].T) * (seg @ self.up_proj[e].T)
                pieces.append(h @ self.down_proj[e].T)
                start += n
        return torch.cat(pieces) if pieces else x_ND.new_zeros(0, self.down_proj.shape[1])


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """FLOPs of one grouped matmul, for torch's FlopCounterMode (it has no formula for it): the groups
    split one dimension, so the cost equals one dense matmul over the concatenated groups."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [N, K] x [E, K, M], groups along N
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [M, N] x [N, P], groups along N (weight gradients)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [E, M, K] x [K, N], groups along N
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # batched


def _setup_grouped_mm():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
        op = torch.ops.aten._grouped_mm
        if op not in flop_registry and op.default not in flop_registry:
            register_flop_formula(op)(lambda a_shape, b_shape, *args, out_shape=None, **kwargs:
                                      _grouped_mm_flops(a_shape, b_shape))
    except (ImportError, AttributeError, RuntimeError):
        pass
    return fn


_grouped_mm = _setup_grouped_mm()


class MoE(nn.Module):
    """Routed experts + shared experts. After each forward, `last_routing` (its `load` [E]) and
    `last_aux_loss` hold what training needs (expert load for the bias update and metrics, the
    weighted balance losses).

    `capacity_factor` (None = off) turns on V2 device-level token dropping in training mode, sparing
    the first `no_drop_fraction` of each batch's sequences; `last_drop_fraction` then holds the share
    of (token, expert) pairs dropped. The load counts the routing decisions, before any dropping."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.last_routing: Routing | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.capacity_factor: float | None = None
        self.no_drop_fraction: float = 0.1
        self.last_drop_fraction: float | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        r = self.gate(x_TD)
        keep = None
        if self.training and self.capacity_factor:
            keep = device_token_drop(self.cfg, r, self.capacity_factor, B, S, self.no_drop_fraction)
            self.last_drop_fraction = 1.0 - keep.float().mean().item()
        y = self.experts(x_TD, r.indices, r.weights, keep)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        self.last_routing = r.detached()  # (kept past the step: no graph)
        self.last_aux_loss = balance_loss(self.cfg, r, B, S) if self.training else None
        return y.view(B, S, D)


def device_token_drop(cfg: ModelConfig, r: Routing, capacity_factor: float, B: int, S: int,
                      no_drop_fraction: float = 0.1) -> torch.Tensor:
    """V2 device-level token dropping: the keep mask [T, K] of the routed (token, expert) pairs.

    Device d (experts [d·E/D, (d+1)·E/D)) keeps its ceil(capacity_factor · T·K / D) pairs of highest
    affinity; pairs of the first round(no_drop_fraction · B) sequences rank above all others.
    """
    T, K = r.indices.shape
    E, Dv = cfg.n_routed_experts, cfg.ep_size
    capacity = math.ceil(capacity_factor * T * K / Dv)
    device = (r.indices // (E // Dv)).flatten()
    priority = r.scores.detach().gather(1, r.indices)  # affinities lie in [0, 1]
    protected = round(no_drop_fraction * B) * S
    if protected:
        priority[:protected] += 2.0
    order = priority.flatten().argsort(descending=True, stable=True)
    order = order[device[order].argsort(stable=True)]  # by device, best first within each
    counts = torch.bincount(device, minlength=Dv)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(T * K, device=order.device) - starts[device[order]]
    return (rank < capacity).view(T, K)


def balance_loss(cfg: ModelConfig, r: Routing, B: int, S: int) -> torch.Tensor | None:
    """Weighted sum of the enabled balance losses, each computed per sequence and averaged over the batch.

    V3 sequence-wise (α): Σ_i f_i·P_i with f_i = E/(K·S)·#{t selects i}, P_i = mean_t s'_{i,t}, s' the
    affinities normalized per token. V2 expert-level (α1): the same with raw affinities. V2 device-level
    (α2): Σ_d mean_{i∈d}(f_i)·Σ_{i∈d} P_i. V2 communication (α3): Σ_d f''_d·Σ_{i∈d} P_i with
    f''_d = D/(M·S)·#{t sends to d}.
    """
    alphas = (cfg.seq_aux_alpha, cfg.expert_aux_alpha, cfg.device_aux_alpha, cfg.comm_aux_alpha)
    if not any(alphas):
        return None
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    sel_BE = torch.zeros(B, E, device=r.indices.device).scatter_add_(
        1, r.indices.view(B, S * K), torch.ones(B, S * K, device=r.indices.device))
    f_BE = sel_BE * E / (K * S)
    scores = r.scores.view(B, S, E)
    loss = scores.new_zeros(())
    if cfg.seq_aux_alpha:
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)
        loss = loss + cfg.seq_aux_alpha * (f_BE * P).sum(1).mean()
    if cfg.expert_aux_alpha or cfg.device_aux_alpha or cfg.comm_aux_alpha:
        P = scores.mean(1)
        if cfg.expert_aux_alpha:
            loss = loss + cfg.expert_aux_alpha * (f_BE * P).sum(1).mean()
        Dv = cfg.ep_size
        P_dev = P.view(B, Dv, E // Dv).sum(-1)
        if cfg.device_aux_alpha:
            loss = loss + cfg.device_aux_alpha * (f_BE.view(B, Dv, E // Dv).mean(-1) * P_dev).sum(1).mean()
        if cfg.comm_aux_alpha:
            device_of = (r.indices // (E // Dv)).view(B, S, K)
            sent = F.one_hot(device_of, Dv).amax(2).float().sum(1)  # tokens sending to each device
            f_dev = sent * Dv / (cfg.topk_devices * S)
            loss = loss + cfg.comm_aux_alpha * (f_dev * P_dev).sum(1).mean()
    return loss


@torch.no_grad()
def update_router_bias(gate: Gate, load: torch.Tensor, speed: float, center: bool = False) -> None:
    """Aux-loss-free balancing step (2408.15664 Alg. 1): b_i += u·sign(mean load − load_i).

    Called after the optimizer step with the load summed over the step's micro-batches (and ranks).
    `center` keeps the biases zero-mean, which leaves selection unchanged but stops drift.
    """
    gate.e_score_correction_bias += speed * torch.sign(load.mean() - load).to(gate.e_score_correction_bias)
    if center:
        gate.e_score_correction_bias -= gate.e_score_correction_bias.mean()
