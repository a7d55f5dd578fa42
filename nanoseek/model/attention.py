"""Attention: Multi-head Latent Attention (DeepSeek-V2 §2.1) and MHA / GQA / MQA (DeepSeek LLM §2).

MLA compresses keys and values into a latent c_kv (kv_lora_rank) plus one RoPE key shared by all heads
(qk_rope_head_dim); the cache holds only these. Two equivalent computations:
- naive (training, prefill): up-project the latent to per-head K/V with kv_b_proj, then attention;
- absorbed (decode): fold kv_b_proj's key half into the query and its value half into the output,
  so attention runs directly over the latent cache: scores = q_abs·c_kv + q_pe·k_pe.
Caches are duck-typed: `cache.update(layer_idx, start, *new) -> full tensors` (see nanoseek.infer.cache).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.linear import Linear, emulate_bf16
from nanoseek.model.rope import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as transformers and DeepSeek's code do), output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op (decode is op-bound)
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def causal_mask(S: int, T: int, device, dtype) -> torch.Tensor:
    """Additive mask [1, 1, S, T] for S queries that are the last S of T positions."""
    q = torch.arange(T - S, T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    return torch.zeros(S, T, device=device, dtype=dtype).masked_fill(k > q, torch.finfo(dtype).min)[None, None]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, D = cfg.num_attention_heads, cfg.hidden_size
        self.dn, self.dr, self.dv, self.C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        qk = self.n_heads * (self.dn + self.dr)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, qk, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 in every DeepSeek checkpoint
            self.q_b_proj = Linear(cfg.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.C + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.C)
        self.kv_b_proj = Linear(self.C, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = Linear(self.n_heads * self.dv, D, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale
        self.interleaved = cfg.rope_interleave
        self.absorb: bool | None = None
        """None: absorbed path when decoding (cache and a single new token), naive otherwise."""

    def forward(self, x_BSD, rope, mask=None, cache=None, start: int = 0):
        B, S, _ = x_BSD.shape
        H, dn, dr, C = self.n_heads, self.dn, self.dr, self.C
        cos, sin = rope
        q = self.q_proj(x_BSD) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q = q.view(B, S, H, dn + dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BSD).split([C, dr], dim=-1)
        # the queries' RoPE halves and the shared RoPE key rotate as one tensor of H + 1 heads
        pe = apply_rope(torch.cat([q[..., dn:], k_pe[:, :, None]], dim=2), cos, sin, self.interleaved)
        q_nope, q_pe = q[..., :dn], pe[:, :, :H]
        # What the cache stores per token: the normalized latent c_kv and the rotated key, side by side.
        latent_BTL = torch.cat([self.kv_a_layernorm(c_kv), pe[:, :, H]], dim=-1)
        if cache is not None:
            (latent_BTL,) = cache.update(self.layer_idx, start, latent_BTL)
        absorb = self.absorb
        if absorb is None:  # decoding a few tokens over a long cache: never up-project the whole cache
            absorb = cache is not None and (S == 1 or (start > 0 and S <= 16))
        o = (self._absorbed if absorb else self._naive)(q_nope, q_pe, latent_BTL, mask)
        return self.o_proj(o.flatten(2))

    def _naive(self, q_nope, q_pe, latent_BTL, mask):
        B, S, H, _ = q_nope.shape
        T = latent_BTL.shape[1]
        kv_BTC, pe_BTR = latent_BTL.split([self.C, self.dr], dim=-1)
        k_nope, v = self.kv_b_proj(kv_BTC).view(B, T, H, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, pe_BTR[:, :, None].expand(B, T, H, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        dtype, pad, fp32 = q.dtype, 0, False
        if q.device.type == "cpu":
            # CPU's fused (flash) SDPA kernel needs v as wide as q and k, else SDPA takes the unfused math path
            # (~1.8x slower forward + backward at v 64 vs qk 96). Zero columns appended to v give zero output
            # columns, dropped after: exact.
            pad = q.shape[-1] - self.dv
            fp32 = emulate_bf16(q, dtype)  # no bf16 GEMM (nanoseek.model.linear): the fp32 kernel on the bf16 values
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
            v = F.pad(v, (0, pad)) if pad else v
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():  # autocast would recast
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None and S > 1, scale=self.scale)
        return o[..., :self.dv].transpose(1, 2).to(dtype)

    def _absorbed(self, q_nope, q_pe, latent_BTL, mask):
        """Attention over the latent cache (V2 §2.1.4 / Appendix C): W^UK folds into the query and W^UV
        into the output, so keys and values are the cached [c_kv; k_pe] rows themselves. Batched
        matmuls (not einsum: ~5x less overhead per call on CPU) with the (s, h) query rows together."""
        B, S, H, _ = q_nope.shape
        T, C, dn = latent_BTL.shape[1], self.C, self.dn
        W = self.kv_b_proj.weight.view(H, dn + self.dv, C)
        q_abs_HNC = torch.bmm(q_nope.reshape(B * S, H, dn).transpose(0, 1), W[:, :dn])
        q_BQL = torch.cat([q_abs_HNC.transpose(0, 1).reshape(B, S * H, C), q_pe.reshape(B, S * H, self.dr)], dim=-1)
        if mask is None and S > 1:
            mask = causal_mask(S, T, q_BQL.device, q_BQL.dtype)
        if mask is None:
            scores = torch.bmm(q_BQL, latent_BTL.transpose(1, 2)).mul_(self.scale)
        else:  # mask [B|1, 1, S, T] -> [B|1, S*H, T], rows in the (s, h) order of the queries
            m = mask[:, 0] if S == 1 else mask[:, 0, :, None, :].expand(-1, S, H, T).reshape(-1, S * H, T)
            scores = torch.baddbmm(m if m.dtype == q_BQL.dtype else m.to(q_BQL.dtype), q_BQL,
                                   latent_BTL.transpose(1, 2), alpha=self.scale)
        p = scores.softmax(dim=-1, dtype=torch.float32)
        p = p if p.dtype == q_BQL.dtype else p.to(q_BQL.dtype)  # skip no-op casts: decode is op-bound
        o_lat_NHC = torch.bmm(p, latent_BTL[..., :C]).view(B * S, H, C)
        o_HNV = torch.bmm(o_lat_NHC.transpose(0, 1), W[:, dn:].transpose(1, 2))
        return o_HNV.transpose(0, 1).reshape(B, S, H, self.dv)


class GQA(nn.Module):
    """Multi-head attention with n_kv ≤ n_heads shared K/V heads: MHA (=), GQA (<), MQA (1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(D, self.n_heads * self.hd, bias=bias)
        self.k_proj = Linear(D, self.n_kv * self.hd, bias=bias)
        self.v_proj = Linear(D, self.n_kv * self.hd, bias=bias)
        self.o_proj = Linear(self.n_heads * self.hd, D, bias=bias)
        self.scale = cfg.softmax_scale
        self.interleaved = cfg.rope_interleave

    def forward(self, x_BSD, rope, mask=None, cache=None, start: int = 0):
        B, S, _ = x_BSD.shape
        cos, sin = rope
        q = apply_rope(self.q_proj(x_BSD).view(B, S, self.n_heads, self.hd), cos, sin, self.interleaved)
        k = apply_rope(self.k_proj(x_BSD).view(B, S, self.n_kv, self.hd), cos, sin, self.interleaved)
        v = self.v_proj(x_BSD).view(B, S, self.n_kv, self.hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None and S > 1, scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).flatten(2))


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return MLA(cfg, layer_idx) if cfg.is_mla else GQA(cfg, layer_idx)
