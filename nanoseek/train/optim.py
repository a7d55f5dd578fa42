"""AdamW as DeepSeek trains with it (DeepSeek LLM §2.3, V2 §3.1.2, V3 §4.2): β = (0.9, 0.95),
weight decay 0.1, gradient clipping at 1.0.

Weight decay applies to every matrix (attention and MLP projections, the stacked experts, the router
weight, the embedding and the head) and never to vectors (RMSNorm weights, biases). The router's
aux-loss-free bias `e_score_correction_bias` is a buffer, so the optimizer never sees it. Parameters
are passed by name, so the optimizer's state dict records which tensor each entry belongs to.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek import fastpath


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices (dim >= 2) and undecayed vectors (norms, biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel where the device has one. The fused kernel updates the
    weights without bumping their versions, so each step clears the fast path's decode caches."""
    groups = param_groups(model, weight_decay)
    try:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    opt.register_step_post_hook(lambda *_: fastpath.clear_caches(model))
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model: nn.Module, max_norm: float, pp_group=None) -> float:
    """Clip the global L2 gradient norm to max_norm (0 = measure only); returns the norm before clipping
    (inf or nan when a gradient is not finite).

    Sharded (DTensor) gradients are grouped by mesh, since torch's norm cannot mix meshes (FSDP's dense
    mesh and the routed experts'); each group's norm is reduced over its own mesh, and with pipeline
    stages (`pp_group`) the squares are summed over the stages' ranks too."""
    groups: dict = {}
    for p in model.parameters():
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
    norms = [torch.zeros((), device=device)]  # (a pipeline rank may hold no gradient yet)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if pp_group is not None:
        squared = total.square()
        dist.all_reduce(squared, group=pp_group)
        total = squared.sqrt()
    if max_norm > 0:
        for grads in groups.values():
            torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return float(total)
