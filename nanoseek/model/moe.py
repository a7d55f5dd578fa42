"""DeepSeekMoE: fine-grained routed experts plus shared experts (DeepSeekMoE 2401.06066; V2 §2.2; V3 §2.1.2).

Router: affinities s = softmax (V2) or sigmoid (V3) of x·W_g; selection uses s + b, where the bias b is
the auxiliary-loss-free balancing state (aux-loss-free 2408.15664), changed outside the model by
`update_router_bias` and never by the optimizer; gate values come from s alone. Selection may be
limited to the top-M devices (V2 device-limited routing, device score = max affinity) and to the top
groups (V2 group max; V3 sum of the top-2).

Routed path: a `TokenDispatcher` sorts the (token, expert) pairs by expert and gathers their rows;
`Experts` (stacked tensors) computes each expert's SwiGLU over its contiguous rows, one grouped matmul
per projection (torch's grouped_mm; a loop over the experts where it is missing), so the cost follows
the active parameters, not the total; the dispatcher then weights the rows by their gate values and
adds them back to their tokens. Expert parallelism (`nanoseek.parallel.expert`) swaps the dispatcher for
an all-to-all one and shards the stacked experts (DTensors: `Experts` computes with the local shard).

V2 §2.2.4 device-level token dropping (training only): with `MoE.capacity_factor` set, each of the
`ep_size` devices processes at most capacity_factor · T·K / ep_size (token, expert) pairs, dropping
those of lowest affinity; the first `MoE.no_drop_fraction` of the sequences in a batch are never
dropped (V2: ~10%). Evaluation never drops. The local dispatcher decides for all simulated devices at
once (`device_token_drop`); under expert parallelism each rank decides for the pairs it receives.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

from nanoseek.config import ModelConfig
from nanoseek.quant.fp8 import FP8Recipe, fp8_grouped_matmul
from nanoseek.quant.fp8_weights import dequantize_experts, holds_fp8


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    weights: torch.Tensor  # [T, K] gate values (fp32), scaled by routed_scaling_factor
    indices: torch.Tensor  # [T, K] selected experts, distinct per token
    scores: torch.Tensor  # [T, E] affinities s (fp32), for the balance losses

    def detached(self) -> "Routing":
        if not (self.weights.requires_grad or self.scores.requires_grad):
            return self  # (inference: no graph to cut, and no ops to spend on decoding)
        return Routing(self.weights.detach(), self.indices, self.scores.detach())

    @property
    def load(self) -> torch.Tensor:
        """[E] tokens per expert in this batch (fp32, no grad); counted when asked (decoding never asks)."""
        return torch.bincount(self.indices.flatten(), minlength=self.scores.shape[-1]).float()


def keep_top_blocks(sel_TE: torch.Tensor, n_blocks: int, k_blocks: int, score: str) -> torch.Tensor:
    """Mask (-inf) every expert outside the k best of n contiguous blocks (groups or devices).

    A block is scored by its best expert ("max": V2 group- and device-limited routing) or by the sum
    of its best two ("top2": V3 node-limited routing).
    """
    T, E = sel_TE.shape
    blocks = sel_TE.view(T, n_blocks, E // n_blocks)
    block_score = blocks.amax(-1) if score == "max" else blocks.topk(2, dim=-1).values.sum(-1)
    drop = torch.ones_like(block_score, dtype=torch.bool).scatter_(1, block_score.topk(k_blocks, dim=-1).indices, False)
    return blocks.masked_fill(drop[:, :, None], float("-inf")).view(T, E)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg, dev = self.cfg, x_TD.device.type
        # routing in fp32, as DeepSeek does (autocast off; entering its context costs a decode step ~1%)
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext():
            logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        sel = scores.detach() + self.e_score_correction_bias  # the bias steers selection only
        if cfg.topk_devices is not None:
            sel = keep_top_blocks(sel, cfg.ep_size, cfg.topk_devices, "max")
        if cfg.topk_method != "greedy" and (cfg.n_group or 1) > 1:
            score = "max" if cfg.topk_method == "group_limited_greedy" else "top2"
            sel = keep_top_blocks(sel, cfg.n_group, cfg.topk_group, score)
        indices = sel.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * cfg.routed_scaling_factor, indices, scores)


@dataclass
class TokenDrop:
    """V2 §2.2.4 device-level token dropping, as one training forward asks for it (`MoE.capacity_factor`)."""
    capacity_factor: float
    no_drop_fraction: float
    batch: int  # B sequences of S tokens
    seq_len: int

    @property
    def protected_tokens(self) -> int:
        """Tokens of the first round(no_drop_fraction · B) sequences: never dropped."""
        return round(self.no_drop_fraction * self.batch) * self.seq_len


@dataclass
class DispatchState:
    """What `TokenDispatcher.combine` needs to send the expert outputs back to their tokens."""
    order: torch.Tensor  # [N] flat (token, slot) index of each dispatched row
    token: torch.Tensor  # [N] source token of each row
    weights: torch.Tensor  # [T, K] gate values
    num_tokens: int
    dtype: torch.dtype  # the tokens' dtype
    dropped_fraction: torch.Tensor | None = None  # share of the (token, expert) pairs dropped (dropping on)


class TokenDispatcher:
    """Local dispatch: all experts live here. The interface an expert-parallel (all-to-all) dispatcher keeps:
    `dispatch(x_TD, routing, drop)` returns the rows the local experts process, contiguous per expert in
    expert order, their counts [E_local] and a state; `combine(rows, state)` takes the experts' output
    rows back to [T, D], weighted by the gate values. `n_devices` is the number of devices token dropping
    simulates (cfg.ep_size): their capacities are decided here, in one process (`device_token_drop`)."""

    def __init__(self, n_experts: int, n_devices: int = 1):
        self.n_experts, self.n_devices = n_experts, n_devices

    def dispatch(self, x_TD: torch.Tensor, r: Routing, drop: TokenDrop | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """`sort` over the routing; with `drop`, device-level dropping over the `n_devices` simulated devices
        first decides which pairs are dispatched."""
        keep = None
        if drop is not None:
            keep = drop_mask(r, self.n_experts, self.n_devices, drop)
            dropped = 1.0 - keep.float().mean()
        rows, counts, state = self.sort(x_TD, r.indices, r.weights, keep)
        if drop is not None:
            state.dropped_fraction = dropped
        return rows, counts, state

    def sort(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
             keep_TK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Rows [N, D] (a token once per selected expert; pairs where `keep_TK` is False dropped, and
        their indices may then be out of range, e.g. -1), sorted by expert, and the counts [E] per expert."""
        K = indices_TK.shape[1]
        flat = indices_TK.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        if keep_TK is not None:
            order = order[keep_TK.flatten()[order]]
        counts_E = torch.bincount(flat if keep_TK is None else flat[order], minlength=self.n_experts)
        token = order // K
        return x_TD[token], counts_E, DispatchState(order, token, weights_TK, x_TD.shape[0], x_TD.dtype)

    def combine(self, rows_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y_t = Σ_k weights[t, k] · row of (t, k), [T, D] in the tokens' dtype; dropped pairs add nothing."""
        y_ND = rows_ND * state.weights.flatten()[state.order, None].to(state.dtype)  # gate values in x's precision
        y_TD = rows_ND.new_zeros(state.num_tokens, rows_ND.shape[1], dtype=state.dtype)
        return y_TD.index_add_(0, state.token, y_ND.to(state.dtype))


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process computes with: a DTensor's local shard (expert parallelism
    shards the stacked experts along dim 0), else the tensor itself. Duck-typed: the model imports nothing
    distributed."""
    return p.to_local() if hasattr(p, "to_local") else p


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts stored stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.fp8: FP8Recipe | None = None
        """FP8 training's grouped GEMMs (set by quant.convert_to_fp8); None = high precision."""

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """expert_e(row) for rows sorted by expert, counts_E[e] of them for expert e (the local experts,
        when expert parallelism has sharded them)."""
        if holds_fp8(self):  # FP8 inference weights (quant.fp8_weights): dequantize the experts with rows only
            used = counts_E.nonzero()[:, 0]
            w = tuple(dequantize_experts(self, name, used) for name in ("gate_proj", "up_proj", "down_proj"))
            counts_E = counts_E[used]
        else:
            w = self.local_weights()
        if self.fp8 is not None:
            return self._fp8(x_ND, counts_E, *w)
        return self._grouped(x_ND, counts_E, *w) if self._can_group(x_ND, w[0]) else self._looped(x_ND, counts_E, *w)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_proj, up_proj, down_proj) of the experts held here (FP8-stored ones read dequantized)."""
        return local_shard(self.gate_proj), local_shard(self.up_proj), local_shard(self.down_proj)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _can_group(self, x: torch.Tensor, gate_EID: torch.Tensor) -> bool:
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
        _, I, D = gate_EID.shape
        return D % per16 == 0 and I % per16 == 0

    def _operand(self, t: torch.Tensor) -> torch.Tensor:
        """grouped_mm is not autocast-aware: its operands go to the autocast dtype as autocast would cast them."""
        return t.to(self._compute_dtype(t))

    def _grouped(self, x_ND, counts_E, gate_EID, up_EID, down_EDI) -> torch.Tensor:
        dtype = self._compute_dtype(x_ND)
        offs = counts_E.cumsum(0).to(torch.int32)

        def mm(a, w):
            return _grouped_mm(self._operand(a), self._operand(w).transpose(1, 2), offs=offs).to(dtype)
        return mm(F.silu(mm(x_ND, gate_EID)) * mm(x_ND, up_EID), down_EDI)

    def _fp8(self, x_ND, counts_E, gate_EID, up_EID, down_EDI) -> torch.Tensor:
        dtype = self._compute_dtype(x_ND)

        def mm(a, w):
            return fp8_grouped_matmul(a, w, counts_E, self.fp8.block, self.fp8.accumulation).to(dtype)
        return mm(F.silu(mm(x_ND, gate_EID)) * mm(x_ND, up_EID), down_EDI)

    def _looped(self, x_ND, counts_E, gate_EID, up_EID, down_EDI) -> torch.Tensor:
        pieces, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                seg = x_ND[start:start + n]
                h = F.silu(seg @ gate_EID[e].T) * (seg @ up_EID[e].T)
                pieces.append(h @ down_EDI[e].T)
                start += n
        return torch.cat(pieces) if pieces else x_ND.new_zeros(0, down_EDI.shape[1])


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
        op = torch.ops.aten._grouped_mm
        if op not in flop_registry and op.default not in flop_registry:
            register_flop_formula(op)(lambda a_shape, b_shape, *args, out_shape=None, **kwargs:
                                      _grouped_mm_flops(a_shape, b_shape))
    except (AttributeError, RuntimeError):
        pass
    return fn


_grouped_mm = _setup_grouped_mm()


@dataclass
class MoEStats:
    """What training needs from one MoE layer's forward."""
    routing: Routing
    """The routing, detached: expert load (bias update, metrics)."""
    aux_loss: torch.Tensor | None = None
    """The weighted balance losses (training mode, when any is enabled)."""
    dropped_fraction: torch.Tensor | None = None
    """Share of the (token, expert) pairs dropped (training mode with token dropping on)."""


class MoE(nn.Module):
    """Routed experts + shared experts; `forward` returns (y, MoEStats).

    `capacity_factor` (None = off) turns on V2 device-level token dropping in training mode, sparing
    the first `no_drop_fraction` of each batch's sequences. The load counts the routing decisions,
    before any dropping."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.dispatcher = TokenDispatcher(cfg.n_routed_experts, cfg.ep_size)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.capacity_factor: float | None = None
        self.no_drop_fraction: float = 0.1

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        r = self.gate(x_TD)
        drop = None
        if self.training and self.capacity_factor:
            drop = TokenDrop(self.capacity_factor, self.no_drop_fraction, B, S)
        y, dropped = self._routed(x_TD, r, drop)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        aux = balance_loss(self.cfg, r, B, S) if self.training else None
        return y.view(B, S, D), MoEStats(r.detached(), aux, dropped)

    def _routed(self, x_TD: torch.Tensor, r: Routing, drop: TokenDrop | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The routed experts' output [T, D] and the share of pairs dropped (None without dropping)."""
        rows_ND, counts_E, state = self.dispatcher.dispatch(x_TD, r, drop)
        return self.dispatcher.combine(self.experts(rows_ND, counts_E), state), state.dropped_fraction


def drop_priority(r: Routing, protected_tokens: int) -> torch.Tensor:
    """[T, K] rank of each routed pair for token dropping: its affinity (in [0, 1]), + 2 for the first
    `protected_tokens` tokens, so those rank above all others."""
    priority = r.scores.detach().gather(1, r.indices)
    if protected_tokens:
        priority[:protected_tokens] += 2.0
    return priority


def keep_within_capacity(device_N: torch.Tensor, priority_N: torch.Tensor, capacity: int, n_devices: int
                         ) -> torch.Tensor:
    """[N] keep mask: each device keeps its `capacity` pairs of highest priority (ties: the earlier pair)."""
    order = priority_N.argsort(descending=True, stable=True)
    order = order[device_N[order].argsort(stable=True)]  # by device, best first within each
    counts = torch.bincount(device_N, minlength=n_devices)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[device_N[order]]
    return rank < capacity


def drop_mask(r: Routing, n_experts: int, n_devices: int, drop: TokenDrop) -> torch.Tensor:
    """V2 device-level token dropping over `n_devices` devices simulated in one process: the keep mask
    [T, K] of the routed (token, expert) pairs (see `device_token_drop`)."""
    T, K = r.indices.shape
    capacity = math.ceil(drop.capacity_factor * T * K / n_devices)
    device = (r.indices // (n_experts // n_devices)).flatten()
    return keep_within_capacity(device, drop_priority(r, drop.protected_tokens).flatten(), capacity,
                                n_devices).view(T, K)


def device_token_drop(cfg: ModelConfig, r: Routing, capacity_factor: float, B: int, S: int,
                      no_drop_fraction: float = 0.1) -> torch.Tensor:
    """V2 device-level token dropping: the keep mask [T, K] of the routed (token, expert) pairs.

    Device d (experts [d·E/D, (d+1)·E/D)) keeps its ceil(capacity_factor · T·K / D) pairs of highest
    affinity; pairs of the first round(no_drop_fraction · B) sequences rank above all others.
    """
    return drop_mask(r, cfg.n_routed_experts, cfg.ep_size, TokenDrop(capacity_factor, no_drop_fraction, B, S))


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
