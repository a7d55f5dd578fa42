"""Attention: Multi-head Latent Attention (DeepSeek-V2 §2.1) and MHA / GQA / MQA (DeepSeek LLM §2).

MLA compresses keys and values into a latent c_kv (kv_lora_rank) plus one RoPE key shared by all heads
(qk_rope_head_dim); the cache holds only these. Two equivalent computations:
- naive (training, prefill): up-project the latent to per-head K/V with kv_b_proj, then attention;
- absorbed (decode; V2 App. C): fold kv_b_proj's key half into the query and its value half into the
  output, so attention runs directly over the latent cache: scores = q_abs·c_kv + q_pe·k_pe.
`nanoseek.fastpath` computes both faster on CPU (cached, pre-multiplied absorbed weights; SDPA's flash
kernel). Caches are duck-typed: `cache.update(layer_idx, start, *new) -> full tensors` (nanoseek.infer.cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.rope import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as transformers and DeepSeek's code do), output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)


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
            self.q_proj = nn.Linear(D, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 in every DeepSeek checkpoint
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.C + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.C)
        self.kv_b_proj = nn.Linear(self.C, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, D, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale
        self.interleaved = cfg.rope_interleave
        self.absorb: bool | None = None
        """None: absorbed path when decoding (cache and a single new token), naive otherwise."""

    def forward(self, x_BSD, rope, mask=None, cache=None, start: int = 0):
        B, S, _ = x_BSD.shape
        absorb = self.absorb
        if absorb is None:  # decoding a few tokens over a long cache: never up-project the whole cache
            absorb = cache is not None and (S == 1 or (start > 0 and S <= 16))
        if absorb:
            return self._absorbed(x_BSD, rope, mask, cache, start)
        H, dn = self.n_heads, self.dn
        q = self._query(x_BSD).view(B, S, H, dn + self.dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BSD).split([self.C, self.dr], dim=-1)
        q_pe, latent_BTL = self._rope_and_cache(q[..., dn:], c_kv, k_pe, rope, cache, start)
        return self.o_proj(self._naive(q[..., :dn], q_pe, latent_BTL, mask).flatten(2))

    def _query(self, x_BSD):
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))  # V2's low-rank query

    def _rope_and_cache(self, q_pe, c_kv, k_pe, rope, cache, start):
        """Rotate the queries' RoPE halves and the shared RoPE key (one tensor of H + 1 heads); store
        what the cache holds per token: the normalized latent c_kv and the rotated key, side by side.
        Returns the rotated q_pe and the cached latent rows [B, start + S, C + dr]."""
        pe = apply_rope(torch.cat([q_pe, k_pe[:, :, None]], dim=2), *rope, self.interleaved)
        latent_BTL = torch.cat([self.kv_a_layernorm(c_kv), pe[:, :, -1]], dim=-1)
        if cache is not None:
            (latent_BTL,) = cache.update(self.layer_idx, start, latent_BTL)
        return pe[:, :, :-1], latent_BTL

    def _naive(self, q_nope, q_pe, latent_BTL, mask):
        """Up-project the latent to per-head keys and values (V2 Eq. 12-18), then plain attention."""
        B, S, H, _ = q_nope.shape
        T = latent_BTL.shape[1]
        kv_BTC, pe_BTR = latent_BTL.split([self.C, self.dr], dim=-1)
        k_nope, v = self.kv_b_proj(kv_BTC).view(B, T, H, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, pe_BTR[:, :, None].expand(B, T, H, self.dr)], dim=-1)
        return self._sdpa(torch.cat([q_nope, q_pe], dim=-1), k, v, mask)

    def _sdpa(self, q_BSHK, k_BTHK, v_BTHV, mask):
        """Scaled dot-product attention over [batch, seq, heads, dim] tensors (causal when no mask is given)."""
        o = F.scaled_dot_product_attention(q_BSHK.transpose(1, 2), k_BTHK.transpose(1, 2), v_BTHV.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None and q_BSHK.shape[1] > 1,
                                           scale=self.scale)
        return o.transpose(1, 2)

    def _absorbed(self, x_BSD, rope, mask, cache, start):
        """Attention over the latent cache (V2 §2.1.4 / Appendix C): W^UK folds into the query and W^UV
        into the output, so keys and values are the cached [c_kv; k_pe] rows themselves:
        score = (q_nope·W^UK)·c_kv + q_pe·k_pe, output = o_proj((p·c_kv)·W^UVᵀ)."""
        B, S, _ = x_BSD.shape
        H, dn, dr, dv, C = self.n_heads, self.dn, self.dr, self.dv, self.C
        q = self._query(x_BSD).view(B, S, H, dn + dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BSD).split([C, dr], dim=-1)
        q_pe, latent_BTL = self._rope_and_cache(q[..., dn:], c_kv, k_pe, rope, cache, start)
        kv_BTC, pe_BTR = latent_BTL.split([C, dr], dim=-1)
        W_UK, W_UV = self.kv_b_proj.weight.view(H, dn + dv, C).split([dn, dv], dim=1)  # [H, dn, C], [H, dv, C]
        q_abs = torch.einsum("bshn,hnc->bshc", q[..., :dn], W_UK)  # the query in the latent space
        scores = (torch.einsum("bshc,btc->bsht", q_abs, kv_BTC)
                  + torch.einsum("bshr,btr->bsht", q_pe, pe_BTR)) * self.scale
        T = latent_BTL.shape[1]
        if mask is None and S > 1:
            mask = causal_mask(S, T, scores.device, scores.dtype)
        if mask is not None:  # [B|1, 1, S, T] -> [B|1, S, 1, T]: one row for all heads
            scores = scores + mask.transpose(1, 2)
        p = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        o_lat = torch.einsum("bsht,btc->bshc", p, kv_BTC)
        return self.o_proj(torch.einsum("bshc,hvc->bshv", o_lat, W_UV).flatten(2))


class GQA(nn.Module):
    """Multi-head attention with n_kv ≤ n_heads shared K/V heads: MHA (=), GQA (<), MQA (1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=bias)
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
