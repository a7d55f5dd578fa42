"""AdamW as DeepSeek trains with it (DeepSeek LLM §2.3, V2 §3.1.2, V3 §4.2): β = (0.9, 0.95),
weight decay 0.1, gradient clipping at 1.0.

Weight decay applies to every matrix (attention and MLP projections, the stacked experts, the router
weight, the embedding and the head) and never to vectors (RMSNorm weights, biases). The router's
aux-loss-free bias `e_score_correction_bias` is a buffer, so the optimizer never sees it. Parameters
are passed by name, so the optimizer's state dict records which tensor each entry belongs to.

Optimizer memory as V3 (§3.3.3): `BF16AdamW` stores the two moments in BF16 while the parameters (the FP32
master weights) and the gradients stay FP32, so the AdamW state takes 4 bytes per parameter instead of 8
(`state_bytes_per_param` measures it); with the weights and gradients, training holds 12 bytes per
parameter instead of 16.
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


class BF16AdamW(torch.optim.Optimizer):
    """AdamW with its moments stored in `moments_dtype` (BF16: DeepSeek-V3 §3.3.3) while every update is
    computed in FP32: the moments are upcast, updated, used for the step and stored back rounded to nearest.
    The parameters are the FP32 master weights and the gradients stay FP32.

    The math is torch's foreach AdamW's op for op (decoupled weight decay p *= 1 - lr·wd, per-tensor step
    counts and bias corrections), so with FP32 moments the numbers are torch.optim.AdamW's bit for bit.
    Tensors are updated in buckets of at most `bucket` elements: the FP32 copies of the moments exist for
    one bucket at a time, small beside the state they halve. DTensor parameters (FSDP2, expert parallelism)
    are updated through their local shards, as every op is elementwise; their moments are DTensors too, so
    torch.distributed.checkpoint saves and reshards them like torch's AdamW state."""

    bucket = 1 << 24

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moments_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moments_dtype = moments_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"BF16AdamW keeps FP32 master weights: got a {p.dtype} parameter {tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # (which casts the moments to the parameters' dtype)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(self.moments_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p, dtype=self.moments_dtype),
                                     "exp_avg_sq": torch.zeros_like(p, dtype=self.moments_dtype)}
            for bucket in _buckets(params, self.bucket):
                self._update(bucket, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self.state[p] for p in params]
        for state in states:
            state["step"] += 1
        steps = [state["step"].item() for state in states]
        weights, grads = [_local(p) for p in params], [_local(p.grad) for p in params]
        stored = [_local(state[key]) for key in ("exp_avg", "exp_avg_sq") for state in states]
        moments = [t.float() for t in stored]  # (the same tensors when they are FP32 already)
        exp_avgs, exp_avg_sqs = moments[:len(params)], moments[len(params):]
        if weight_decay:
            torch._foreach_mul_(weights, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_sizes = [(lr / (1 - beta1 ** n)) * -1 for n in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2 ** n) ** 0.5 for n in steps])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(weights, exp_avgs, denoms, step_sizes)
        if self.moments_dtype != torch.float32:
            torch._foreach_copy_(stored, moments)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _buckets(params: list[torch.Tensor], size: int):
    """Consecutive runs of same-device tensors of at most `size` elements together (a bigger tensor alone)."""
    by_device: dict = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    for tensors in by_device.values():
        bucket, n = [], 0
        for p in tensors:
            if bucket and n + _local(p).numel() > size:
                yield bucket
                bucket, n = [], 0
            bucket.append(p)
            n += _local(p).numel()
        if bucket:
            yield bucket


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    weight_decay: float = 0.1, moments_dtype: torch.dtype = torch.float32) -> torch.optim.Optimizer:
    """AdamW over `param_groups`: torch's, with the fused kernel where the device has one, for FP32 moments;
    `BF16AdamW` for BF16 moments. The fused kernel updates the weights without bumping their versions, so
    each step clears the fast path's decode caches."""
    groups = param_groups(model, weight_decay)
    if moments_dtype != torch.float32:
        opt = BF16AdamW(groups, lr=lr, betas=betas, eps=eps, moments_dtype=moments_dtype)
    else:
        try:
            opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)
    opt.register_step_post_hook(lambda *_: fastpath.clear_caches(model))
    return opt


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per parameter, measured on the state itself (this rank's shards): its
    per-element tensors (AdamW's moments) over the elements of the parameters it holds state for (those
    stepped so far; scalar step counts are left out). 0 before the first step."""
    nbytes = numel = 0
    for p, state in optimizer.state.items():
        numel += _local(p).numel()
        nbytes += sum(_local(t).nbytes for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return nbytes / numel if numel else 0.0


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
