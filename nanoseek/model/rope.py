"""Rotary position embedding with YaRN context extension (DeepSeek-V2 §2.1.3, V3 §4.3; YaRN 2309.00071).

DeepSeek's MLA weights rotate interleaved pairs (x[2i], x[2i+1]); the DeepSeek-LLM (Llama) layout
rotates halves (x[i], x[i + d/2]). Both are computed in fp32 and agree with transformers.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import yarn_mscale


def rope_inv_freq(dim: int, theta: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor that scales cos/sin (YaRN's attention factor)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not rope_scaling or rope_scaling.get("rope_type") != "yarn":
        return inv_freq, 1.0
    rs = rope_scaling
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rs["beta_slow"])), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
    keep = 1 - ramp.clamp(0, 1)  # 1: high-frequency dims keep their frequency (extrapolate)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    if rs.get("attention_factor") is not None:
        attention_factor = rs["attention_factor"]
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables [..., S, 1, dim] (fp32, broadcast over heads) for given positions, laid out for
    `apply_rope`: each frequency repeated over the two elements it rotates, and the sine negated on the
    element that takes -x·sin, so one rotation is x·cos + partner(x)·sin. Computed once per forward and
    shared by every layer."""

    def __init__(self, dim: int, theta: float, rope_scaling: dict | None = None, interleaved: bool = True):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = interleaved

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        if self.interleaved:  # pairs (x[2i], x[2i+1]): [c0, c0, c1, c1, ...] and [-s0, s0, -s1, s1, ...]
            cos, sin = torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)
        else:  # halves (x[i], x[i + d/2])
            cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        return cos[..., None, :], sin[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, S, H, D] by RotaryEmbedding's tables [B or 1, S, 1, D]; returns x's dtype and layout.

    x·cos + partner(x)·sin, partner swapping the two elements of each rotated pair: the same products
    and sums as (x1·cos - x2·sin, x2·cos + x1·sin), bit for bit, in fewer ops (decode is op-bound)."""
    xf = x if x.dtype == torch.float32 else x.float()
    if interleaved:
        partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        partner = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    out = xf * cos + partner * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)
