"""Expert parallelism (EP): the routed experts spread over the ranks of a group, tokens moved by all-to-all.

DeepSeek's layout (V2 §2.2.3, V3 §3.2.2): rank d of the `ep` ranks holds experts [d·E/ep, (d+1)·E/ep).
Dispatch sends each token ONCE to every rank that holds at least one of its selected experts, with its
gate values for that rank's experts and their local ids, so device-limited routing (`topk_devices` = M,
V2 §2.2.3) bounds the traffic to M rows per token. The receiving rank sorts the (row, local expert)
pairs by expert (the local `TokenDispatcher.sort`), runs its experts, and sums each row's outputs
weighted by the gate values; combine sends that one row per (token, rank) back, and the source rank adds
it into its token. Both row exchanges are `all_to_all_single_autograd`, so x, the gate values (router)
and the experts get their gradients; the ids, the split sizes and the dropping priorities are no-grad
metadata sent by plain `all_to_all_single`.

V2 §2.2.4 device-level token dropping is decided where the capacity is, on the receiving rank: it keeps
at most ceil(capacity_factor · T_total·K / ep) of the (token, expert) pairs it receives, T_total the
tokens of the whole EP group, those of highest affinity first, with the pairs of each source rank's
first round(no_drop_fraction · B) sequences above the rest. With no_drop_fraction = 0 this is exactly
`device_token_drop` over the concatenation of the ranks' tokens (ties go to the earlier token in both);
otherwise each rank protects its own first sequences, not the global batch's. `MoEStats.dropped_fraction`
is then the share of the pairs THIS rank received that it dropped.

With FP8 experts (`Experts.fp8`, V3 §3.3.4) the dispatch sends each row in E4M3 with its 1 x 128 tile
scales, the same tiles the experts' first GEMMs quantize to (so the receiver's re-quantization is exact up to
the scales' last bit), dequantized to fp32 on arrival; the combine and both backward exchanges stay in the
rows' precision.

`sent_bytes` counts the hidden-state rows a rank sends to OTHER ranks in the forward dispatch and combine
(rows × hidden × element size; FP8 rows: hidden + 4 bytes per 128-channel tile's scale); the gate values,
ids, priorities and split sizes go to `sent_meta_bytes`; backward traffic (the same rows again, reversed,
in high precision) is not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from nanoseek.model.moe import (
    DispatchState,
    Experts,
    MoE,
    Routing,
    TokenDispatcher,
    TokenDrop,
    drop_priority,
    keep_within_capacity,
)
from nanoseek.quant.fp8 import (
    dequantize_activation_tilewise,
    quantize_activation_tilewise,
)


@dataclass
class AllToAllState:
    """What `AllToAllDispatcher.combine` needs: the receiving side's sort and the way back."""
    local: DispatchState  # the received rows, sorted by local expert
    token: torch.Tensor  # [R] source token of each row sent, in send order (by destination rank)
    num_tokens: int
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    dropped_fraction: torch.Tensor | None = None  # share of the pairs received here that were dropped


class _FP8AllToAll(torch.autograd.Function):
    """Rows [R, D] to the ranks of `group` as E4M3 bytes + their fp32 1 x block tile scales in one uint8
    exchange, dequantized to fp32 on arrival; the gradient goes back unquantized in the rows' dtype."""

    @staticmethod
    def forward(ctx, x_RD: torch.Tensor, recv_splits: list[int], send_splits: list[int], group, block: int):
        D = x_RD.shape[1]
        q, s = quantize_activation_tilewise(x_RD, block)
        payload = torch.cat([q.view(torch.uint8), s.view(torch.uint8)], 1)
        recv = payload.new_empty(sum(recv_splits), payload.shape[1])
        dist.all_to_all_single(recv, payload, recv_splits, send_splits, group=group)
        q_recv, s_recv = recv.split([D, s.shape[1] * 4], 1)
        ctx.splits, ctx.group, ctx.dtype = (recv_splits, send_splits), group, x_RD.dtype
        return dequantize_activation_tilewise(q_recv.contiguous().view(q.dtype), s_recv.contiguous().view(s.dtype), block)

    @staticmethod
    def backward(ctx, grad_recv: torch.Tensor):
        recv_splits, send_splits = ctx.splits
        grad = grad_recv.new_empty(sum(send_splits), grad_recv.shape[1])
        dist.all_to_all_single(grad, grad_recv.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad.to(ctx.dtype), None, None, None, None


def fp8_row_bytes(hidden: int, block: int) -> int:
    """Bytes of one hidden-state row dispatched in FP8: E4M3 values + an fp32 scale per 1 x block tile."""
    return hidden + 4 * math.ceil(hidden / block)


class AllToAllDispatcher:
    """`TokenDispatcher`'s interface over an EP process group; this rank's experts are the local ones (in FP8
    when `experts.fp8` is set, which then decides the dispatch's format too)."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup, experts: Experts):
        self.group = group
        self.experts = experts
        self.ep, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.ep:
            raise ValueError(f"n_routed_experts = {n_experts} must be divisible by the EP size {self.ep}")
        self.n_local = n_experts // self.ep
        self.local = TokenDispatcher(self.n_local)
        self.sent_bytes = 0
        """Bytes of hidden-state rows sent to other ranks by the forward dispatch and combine."""
        self.sent_meta_bytes = 0
        """Bytes of metadata (gate values, ids, priorities, split sizes) sent to other ranks."""

    def dispatch(self, x_TD: torch.Tensor, r: Routing, drop: TokenDrop | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        """Send each token's row once to every rank holding one of its experts; return the rows this rank's
        experts process (sorted by local expert), their counts [E/ep] and the state for `combine`. The split
        sizes are read on the host (one sync per layer, as any all-to-all with uneven splits needs)."""
        T, K = r.indices.shape
        D, ep, El = x_TD.shape[1], self.ep, self.n_local
        dest_TK = r.indices // El
        to_TR = torch.zeros(T, ep, dtype=torch.bool, device=x_TD.device).scatter_(1, dest_TK, True)
        dest, token = to_TR.T.nonzero(as_tuple=True)  # one row per (token, rank), grouped by rank, tokens in order
        send_R = to_TR.sum(0)

        # split sizes first (and each rank's token count, for the capacity over the whole group)
        sizes_out = torch.stack([send_R, torch.full_like(send_R, T)], 1).flatten()
        sizes_in = torch.empty_like(sizes_out)
        dist.all_to_all_single(sizes_in, sizes_out, group=self.group)
        send_splits, recv_splits = send_R.tolist(), sizes_in[0::2].tolist()
        N_recv = sum(recv_splits)

        # the rows, with the gate values of the destination's experts (0 elsewhere) in x's dtype (the local
        # combine multiplies in x's precision too): as K extra columns of one differentiable exchange, or
        # beside the FP8 rows
        mine_RK = dest_TK[token] == dest[:, None]
        w_RK = torch.where(mine_RK, r.weights[token], 0.0).to(x_TD.dtype)
        recipe = self.experts.fp8
        if recipe is None:
            recv = all_to_all_single_autograd(torch.cat([x_TD[token], w_RK], 1), recv_splits, send_splits, self.group)
            x_recv, w_recv = recv.split([D, K], 1)
            row_bytes = D * x_TD.element_size()
        else:
            x_recv = _FP8AllToAll.apply(x_TD[token], recv_splits, send_splits, self.group, recipe.block)
            w_recv = all_to_all_single_autograd(w_RK, recv_splits, send_splits, self.group)
            row_bytes = fp8_row_bytes(D, recipe.block)

        # metadata, no grad, int32: local expert ids (-1: not on that rank), and the dropping priorities' bits
        meta = torch.where(mine_RK, r.indices[token] % El, -1).to(torch.int32)
        if drop is not None:
            meta = torch.cat([meta, drop_priority(r, drop.protected_tokens)[token].view(torch.int32)], 1)
        meta_recv = meta.new_empty(N_recv, meta.shape[1])
        dist.all_to_all_single(meta_recv, meta, recv_splits, send_splits, group=self.group)
        ids_recv = meta_recv[:, :K].long()
        keep = valid = ids_recv >= 0

        dropped = None
        if drop is not None:  # the capacity is this rank's: it decides over the pairs it received
            capacity = math.ceil(drop.capacity_factor * int(sizes_in[1::2].sum()) * K / ep)
            priority = meta_recv[:, K:].contiguous().view(torch.float32)
            # invalid slots are a second "device", so they never take a place within the capacity
            keep = keep_within_capacity((~valid).long().flatten(), priority.flatten(), capacity, 2).view_as(valid)
            keep = keep & valid
            n_valid = valid.sum()
            dropped = (n_valid - keep.sum()) / n_valid.clamp(min=1)

        rows, counts, local = self.local.sort(x_recv, ids_recv, w_recv, keep)
        sent_other = len(token) - send_splits[self.rank]
        self.sent_bytes += sent_other * row_bytes
        self.sent_meta_bytes += (sent_other * (K * x_TD.element_size() + meta.shape[1] * meta.element_size())
                                 + 2 * (ep - 1) * sizes_out.element_size())
        return rows, counts, AllToAllState(local, token, T, send_splits, recv_splits, dropped)

    def combine(self, rows_ND: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        """The local experts' output rows back to their source ranks, one gate-weighted row per (token, rank),
        added into the tokens: [T, D] in the tokens' dtype."""
        y_RD = self.local.combine(rows_ND, state.local)  # Σ over the row's local experts, gate-weighted
        back = all_to_all_single_autograd(y_RD, state.send_splits, state.recv_splits, self.group)
        back_other = sum(state.recv_splits) - state.recv_splits[self.rank]
        self.sent_bytes += back_other * y_RD.shape[1] * y_RD.element_size()
        y_TD = y_RD.new_zeros(state.num_tokens, y_RD.shape[1])
        return y_TD.index_add_(0, state.token, back)


def shard_experts(moe: MoE, ep_mesh: DeviceMesh) -> None:
    """Turn a built MoE (the same full model on every rank) into its EP form over the 1-D `ep_mesh`: the
    stacked expert parameters become DTensor parameters sharded along the experts (Shard(0), so a later
    FSDP2 `fully_shard` can shard them further), the dispatcher an `AllToAllDispatcher`."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be 1-D, got {ep_mesh.ndim} dimensions")
    cfg, ep = moe.cfg, ep_mesh.size()
    if cfg.n_routed_experts % ep:
        raise ValueError(f"n_routed_experts = {cfg.n_routed_experts} must be divisible by the EP size {ep}")
    if cfg.topk_devices is not None and cfg.ep_size != ep:
        raise ValueError(f"ep_size = {cfg.ep_size} must equal the EP size {ep} with device-limited routing "
                         f"(topk_devices = {cfg.topk_devices}): the router picks devices of E/ep_size experts")
    experts = moe.experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(experts, name)
        setattr(experts, name, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]),
                                            requires_grad=p.requires_grad))
    moe.dispatcher = AllToAllDispatcher(cfg.n_routed_experts, ep_mesh.get_group(), experts)


def take_sent_bytes(model: nn.Module) -> int:
    """The hidden-state bytes sent to other ranks by all EP dispatchers since the last call (then reset)."""
    total = 0
    for m in model.modules():
        d = getattr(m, "dispatcher", None)
        if isinstance(m, MoE) and isinstance(d, AllToAllDispatcher):
            total, d.sent_bytes = total + d.sent_bytes, 0
    return total
