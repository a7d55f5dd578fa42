"""DeepSeekMoE: fine-grained routed experts plus shared experts (DeepSeekMoE 2401.06066; V2 §2.2; V3 §2.1.2).

Router: affinities s = softmax (V2) or sigmoid (V3) of x·W_g; selection uses s + b, where the bias b is
the auxiliary-loss-free balancing state (aux-loss-free 2408.15664), changed outside the model by
`update_router_bias` and never by the optimizer; gate values come from s alone. Selection may be
limited to the top-M devices (V2 device-limited routing, device score = max affinity) and to the top
groups (V2 group max; V3 sum of the top-2). Experts are stacked tensors evaluated per expert over
the tokens routed to it, so the cost follows the active parameters, not the total.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


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
    load: torch.Tensor  # [E] tokens per expert in this batch (fp32, no grad)


def keep_top_blocks(sel_TE: torch.Tensor, n_blocks: int, k_blocks: int, score: str) -> torch.Tensor:
    """Mask (-inf) every expert outside the k best of n contiguous blocks (groups or devices).

    A block is scored by its best expert ("max": V2 group- and device-limited routing) or by the sum
    of its best two ("top2": V3 node-limited routing).
    """
    T, E = sel_TE.shape
    blocks = sel_TE.view(T, n_blocks, E // n_blocks)
    block_score = blocks.amax(-1) if score == "max" else blocks.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(block_score, dtype=torch.bool)
    keep.scatter_(1, block_score.topk(k_blocks, dim=-1).indices, True)
    return blocks.masked_fill(~keep[:, :, None], float("-inf")).view(T, E)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits = F.linear(x_TD.float(), self.weight.float())  # routing in fp32, as DeepSeek does
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        sel = scores.detach() + self.e_score_correction_bias  # bias: selection only
        if cfg.topk_devices is not None:
            sel = keep_top_blocks(sel, cfg.ep_size, cfg.topk_devices, "max")
        if cfg.topk_method != "greedy" and (cfg.n_group or 1) > 1:
            sel = keep_top_blocks(sel, cfg.n_group, cfg.topk_group, "max" if cfg.topk_method == "group_limited_greedy" else "top2")
        indices = sel.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        load = torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts).float()
        return Routing(weights * cfg.routed_scaling_factor, indices, scores, load)


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts stored stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        K = indices_TK.shape[1]
        flat = indices_TK.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // K
        x_sorted = x_TD[token]
        pieces, start = [], 0
        for e, n in enumerate(torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()):
            if n:
                seg = x_sorted[start:start + n]
                h = F.silu(seg @ self.gate_proj[e].T) * (seg @ self.up_proj[e].T)
                pieces.append(h @ self.down_proj[e].T)
                start += n
        y_sorted = torch.cat(pieces) * weights_TK.flatten()[order, None].to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token, y_sorted)


class MoE(nn.Module):
    """Routed experts + shared experts. After each forward, `last_load` [E] and `last_aux_loss` hold
    what training needs (expert load for the bias update and metrics, the weighted balance losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.last_load: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        r = self.gate(x_TD)
        y = self.experts(x_TD, r.indices, r.weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        self.last_load = r.load
        self.last_aux_loss = balance_loss(self.cfg, r, B, S) if self.training else None
        return y.view(B, S, D)


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
