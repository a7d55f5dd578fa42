"""Expert load balancing in the training loop, and the statistics that measure it.

As DeepSeek's papers balance their experts:
- aux-loss-free (2408.15664, V3 §2.1.2; `[balance] bias_update_speed` γ > 0): after each optimizer step
  every router bias moves b_i += γ·sign(mean load − load_i) over the step's summed load
  (`update_biases`); the bias only steers top-K selection and the optimizer never sees it. γ follows a
  schedule (V3: 0.001, then 0).
- balance losses (model fields, set with `model.overrides`): V3's sequence-wise loss (seq_aux_alpha,
  V3 Eq. 17-20, with a tiny α: V3 trains with both), V2's expert-, device- and communication-level
  losses (expert_aux_alpha, device_aux_alpha, comm_aux_alpha; V2 §2.2.3), and optionally V2's
  device-level token dropping with a capacity factor (`configure_token_dropping`).

MaxVio (`nanoseek.train.metrics.max_violation`, 2408.15664 §4.1) measures it: over one step's batch
(MaxVio_batch) or summed over the whole held-out set (MaxVio_global), per MoE layer.
"""
from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.moe import update_router_bias
from nanoseek.model.transformer import ModelOutput


@torch.no_grad()
def update_biases(model: nn.Module, load_LE: torch.Tensor, speed: float, center: bool = False) -> None:
    """One aux-loss-free step on every MoE layer from the step's load [n_moe_layers, E]."""
    if not speed:
        return
    layers = model.moe_layers()
    if len(layers) != load_LE.shape[0]:
        raise ValueError(f"expert load has {load_LE.shape[0]} rows but the model has {len(layers)} MoE layers")
    for moe, load in zip(layers, load_LE):
        update_router_bias(moe.gate, load, speed, center=center)


def configure_token_dropping(model: nn.Module, capacity_factor: float, no_drop_fraction: float = 0.1) -> None:
    """V2 device-level token dropping in training mode (capacity_factor 0 = off); never at eval."""
    for moe in model.moe_layers():
        moe.capacity_factor = capacity_factor or None
        moe.no_drop_fraction = no_drop_fraction


def drop_fraction(out: ModelOutput) -> float | None:
    """Mean share of (token, expert) pairs dropped in a forward, or None when nothing could drop."""
    return None if out.dropped_fraction is None else float(out.dropped_fraction)


def bias_stats(model: nn.Module) -> dict[str, float]:
    """Spread of the routing biases (how hard aux-loss-free balancing is steering)."""
    biases = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    if not biases:
        return {}
    b = torch.stack(biases)
    return {"router_bias_absmax": float(b.abs().max()), "router_bias_std": float(b.std(-1).mean())}
