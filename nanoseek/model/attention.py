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
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.linear import DecodeCache, Linear, decode_layout, emulate_bf16, linear, scalar
from nanoseek.model.rope import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as transformers and DeepSeek's code do), output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._dim_eps = scalar(dim), scalar(eps)  # (a decoded token runs 25 norms: no Python numbers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x·rsqrt(mean(x²) + eps) in the ops transformers uses, bit for bit; cheaper than F.rms_norm on
        # CPU both for a decoded token (fewer dispatches) and in training
        xf = x if x.dtype == torch.float32 else x.float()
        dim, eps = self._dim_eps
        y = xf * xf.square().sum(-1, keepdim=True).div_(dim).add_(eps).rsqrt_()
        return self.weight * (y if y.dtype == x.dtype else y.to(x.dtype))


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
        self.fuse: bool | None = None
        """Absorbed path: multiply W^UK into the query projection and W^UV into o_proj ahead of time?
        None: when that costs no more multiplies per token (latent no wider than a head's keys and
        values, as in the small presets; not at V2/V3 shapes, where the latent is 4x wider)."""
        self._decode_cache = DecodeCache()

    def forward(self, x_BSD, rope, mask=None, cache=None, start: int = 0):
        B, S, _ = x_BSD.shape
        absorb = self.absorb
        if absorb is None:  # decoding a few tokens over a long cache: never up-project the whole cache
            absorb = cache is not None and (S == 1 or (start > 0 and S <= 16))
        if absorb:
            return self._absorbed(x_BSD, rope, mask, cache, start)
        H, dn = self.n_heads, self.dn
        q = self.q_proj(x_BSD) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q = q.view(B, S, H, dn + self.dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BSD).split([self.C, self.dr], dim=-1)
        q_pe, latent_BTL = self._rope_and_cache(q[..., dn:], c_kv, k_pe, rope, cache, start)
        return self.o_proj(self._naive(q[..., :dn], q_pe, latent_BTL, mask).flatten(2))

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

    def _absorbed(self, x_BSD, rope, mask, cache, start):
        """Attention over the latent cache (V2 §2.1.4 / Appendix C): W^UK folds into the query and W^UV
        into the output, so keys and values are the cached [c_kv; k_pe] rows themselves. One GEMM
        projects x to the query's latent (or the query) and the new cache row together; with `fuse`,
        the query comes out already absorbed and scaled and o_proj takes the latent output directly.
        Batched matmuls (not einsum: ~5x less overhead per call on CPU), the (s, h) query rows together.
        The projections' weights are read directly (an FP8Linear's master weights: decoding is not FP8)."""
        B, S, _ = x_BSD.shape
        H, dn, dr, C = self.n_heads, self.dn, self.dr, self.C
        w = self._absorbed_weights()
        q, c_kv, k_pe = linear(x_BSD, w.w_in, w.b_in).split([w.w_in.shape[0] - C - dr, C, dr], dim=-1)
        if w.w_q is not None:
            q = linear(self.q_a_layernorm(q), w.w_q)
        if w.fused:  # [q_abs (H·C) | q_pe (H·dr)]
            q_abs, q_pe = q.split([H * C, H * dr], dim=-1)
            q_pe = q_pe.view(B, S, H, dr)
        else:
            q = q.view(B, S, H, dn + dr)
            q_abs = torch.bmm(q[..., :dn].reshape(B * S, H, dn).transpose(0, 1), w.w_uk).transpose(0, 1)
            q_pe = q[..., dn:]
        q_pe, latent_BTL = self._rope_and_cache(q_pe, c_kv, k_pe, rope, cache, start)
        T = latent_BTL.shape[1]
        q_BQL = torch.cat([q_abs.reshape(B, S * H, C), q_pe.reshape(B, S * H, dr)], dim=-1)
        if mask is None and S > 1:
            mask = causal_mask(S, T, q_BQL.device, q_BQL.dtype)
        if mask is None:
            scores = torch.bmm(q_BQL, latent_BTL.transpose(1, 2))
            scores = scores if w.scale == 1 else scores.mul_(w.scale)
        else:  # mask [B|1, 1, S, T] -> [B|1, S*H, T], rows in the (s, h) order of the queries
            m = mask[:, 0] if S == 1 else mask[:, 0, :, None, :].expand(-1, S, H, T).reshape(-1, S * H, T)
            scores = torch.baddbmm(m if m.dtype == q_BQL.dtype else m.to(q_BQL.dtype), q_BQL,
                                   latent_BTL.transpose(1, 2), alpha=w.scale)
        p = scores.softmax(dim=-1, dtype=torch.float32)
        p = p if p.dtype == q_BQL.dtype else p.to(q_BQL.dtype)  # skip no-op casts: decode is op-bound
        o_lat = torch.bmm(p, latent_BTL[..., :C])  # [B, S*H, C]
        if w.fused:
            return linear(o_lat.view(B, S, H * C), w.w_o, w.b_o)
        o = torch.bmm(o_lat.view(B * S, H, C).transpose(0, 1), w.w_uv)
        return self.o_proj(o.transpose(0, 1).reshape(B, S, H * self.dv))

    def _absorbed_weights(self) -> SimpleNamespace:
        """The absorbed path's weights, built from the parameters and kept until one of them is replaced or
        its version changes (see DeepSeekForCausalLM.clear_decode_caches); built afresh, differentiably,
        when grad is on."""
        if torch.is_grad_enabled():
            return self._build_absorbed_weights()
        # every projection's tensors, read from the module dicts (cheaper than attribute access, and a swapped
        # module or parameter shows up too)
        key = tuple((t.data_ptr(), t._version, t.dtype) for name, m in self._modules.items()
                    if name.endswith(("proj", "mqa")) for t in m._parameters.values() if t is not None)
        return self._decode_cache.get(key, self._build_absorbed_weights)

    def _build_absorbed_weights(self) -> SimpleNamespace:
        H, dn, dr, dv, C = self.n_heads, self.dn, self.dr, self.dv, self.C
        W_UK, W_UV = self.kv_b_proj.weight.view(H, dn + dv, C).split([dn, dv], dim=1)  # [H, dn, C], [H, dv, C]
        lora = not hasattr(self, "q_proj")
        w_q = self.q_b_proj.weight if lora else self.q_proj.weight  # [H·(dn + dr), R] (R = D without q LoRA)
        w_o = self.o_proj.weight  # [D, H·dv]
        R, D = w_q.shape[1], w_o.shape[0]
        fused = self.fuse if self.fuse is not None else C * R <= dn * (R + C) and D * C <= dv * (C + D)
        scale = self.scale
        layout = (lambda t: t) if torch.is_grad_enabled() else decode_layout  # (for the copies made here)
        if fused:  # per head: W^UK·W_q takes the query straight to the latent space; W_o·W^UV takes it out
            Wq = w_q.float().view(H, dn + dr, R)
            q_abs = torch.bmm(W_UK.float().transpose(1, 2), Wq[:, :dn]).reshape(H * C, R)
            w_q = layout((torch.cat([q_abs, Wq[:, dn:].reshape(H * dr, R)]) * scale).to(w_q.dtype))
            w_o = torch.bmm(w_o.float().view(D, H, dv).transpose(0, 1), W_UV.float())  # [H, D, C]
            w_o = layout(w_o.transpose(0, 1).reshape(D, H * C).to(self.o_proj.weight.dtype))
            scale = 1.0
        # one GEMM from x: [the query's latent (or the query) | c_kv | k_pe]
        kv_a = self.kv_a_proj_with_mqa
        first_w, first_b = (self.q_a_proj.weight, self.q_a_proj.bias) if lora else (w_q, None)
        b_in = None
        if first_b is not None or kv_a.bias is not None:
            b_in = torch.cat([first_w.new_zeros(w.shape[0]) if b is None else b
                              for w, b in ((first_w, first_b), (kv_a.weight, kv_a.bias))])
        return SimpleNamespace(fused=fused, scale=scale, w_in=layout(torch.cat([first_w, kv_a.weight])), b_in=b_in,
                               w_q=w_q if lora else None, w_uk=W_UK, w_uv=W_UV.transpose(1, 2), w_o=w_o,
                               b_o=self.o_proj.bias)


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
