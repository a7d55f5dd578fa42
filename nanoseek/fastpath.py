"""Hardware fast paths for the model in `nanoseek.model`: the same numbers, computed faster on CPUs.

`enable(model)` switches them on in place: each module whose computation has a faster form here gets
its class swapped for a subclass that overrides only the hot method. Parameters, buffers and
state_dict stay exactly the model's, so optimizers, checkpoints and FP8 conversion keep working;
`enable` is idempotent. What changes:

- bf16 autocast on CPUs without bf16 GEMM hardware. torch's CPU bf16 GEMM is fast only where oneDNN
  has bf16 kernels (x86 with AVX-512 BW/VL/DQ, AMX, or Arm with bf16); elsewhere (e.g. AVX2-only
  laptops and servers) it takes a generic kernel 10-50x slower than fp32 GEMM. There the linears, the
  routed experts' grouped matmuls and MLA's attention compute the same thing with fp32 kernels: the
  product of two bf16 numbers is exact in fp32 and the accumulation is fp32 either way, so rounding
  the operands to bf16, calling the fp32 kernel and rounding the result matches a bf16 GEMM up to the
  order of summation (gradients go through the same roundings, so they match too).
- MLA's naive attention on CPU pads v to the width of q and k, so SDPA takes its fused (flash) kernel
  (~1.8x faster forward + backward at v 64 vs qk 96; the zero columns give zero outputs, dropped after).
- MLA's absorbed (decode) attention without grad: the projections' weights concatenated into one GEMM
  from x, and, where it costs no more multiplies per token, W^UK multiplied into the query projection and
  W^UV into o_proj ahead of time ("fused"); these copies are cached until a weight changes.
- MoE inference over a few tokens on CPU: each token's K experts evaluated directly (`FastMoE`), with
  thread-count-dependent kernels, instead of sort / grouped matmul / scatter.
- The LM head over a few rows without grad: weight layouts MKL streams fastest.
- RMSNorm with no Python numbers per call (decode is bound by the number of dispatched ops).

The cached weight copies are rebuilt when a source weight is replaced or its version changes; some
in-place updates leave the version alone (fused AdamW, writes through `.data`), so whoever changes
weights that way calls `clear_caches(model)` (the optimizer's step hook and the inference engine do).
Modules holding FP8 inference weights (quant.fp8_weights) take the same paths on weights dequantized as
they are read, and keep no copies of them: the same numbers as the model loaded dequantized.
"""
from __future__ import annotations

import contextlib
import platform
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.linalg import vecdot
from torch.nn.utils import parametrize

from nanoseek.model.attention import MLA, RMSNorm, causal_mask
from nanoseek.model.moe import Experts, MoE, Routing, TokenDispatcher, TokenDrop
from nanoseek.quant.fp8_weights import dequantize_experts, holds_fp8


def _cpu_bf16_gemm_is_slow() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # Arm and others: leave torch's kernels alone
    caps = torch.cpu.get_capabilities()
    # torch routes bf16 GEMM to oneDNN when mkldnn_bf16_device_check() holds: AVX-512 BW + VL + DQ
    return not (caps.get("avx512_bw") and caps.get("avx512_vl") and caps.get("avx512_dq"))


CPU_BF16_GEMM_IS_SLOW = _cpu_bf16_gemm_is_slow()


def emulate_bf16(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when a `dtype` matmul on x's device should run as fp32 kernels on bf16-rounded operands."""
    return dtype == torch.bfloat16 and CPU_BF16_GEMM_IS_SLOW and x.device.type == "cpu"


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 (nearest even), held in fp32 for the fp32 kernels."""
    return t.to(torch.bfloat16).float()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), skipping the call when t already has it (even a no-op cast is a dispatched op, and a
    decoded token's step is bound by the number of ops)."""
    return t if t.dtype == dtype else t.to(dtype)


def scalar(value: float) -> torch.Tensor:
    """value as a 0-dim fp32 CPU tensor, to combine with tensors of any device and floating dtype in place
    of a Python number: torch wraps a Python number into a tensor on every call, ~4 µs per op on CPU."""
    return torch.tensor(value, dtype=torch.float32, device="cpu")  # (explicit device: models are built on meta too)


def decode_layout(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] (same shape and values) laid out for `linear` over a few rows: column-major on CPU,
    where MKL multiplies one to eight rows by it 1.1-2.5x faster than by a row-major weight."""
    return w.t().contiguous().t() if w.device.type == "cpu" else w


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with bf16-autocast GEMMs run as fp32 kernels on bf16-rounded operands on CPUs without
    bf16 GEMM hardware (module docstring)."""
    if CPU_BF16_GEMM_IS_SLOW and torch.is_autocast_enabled("cpu") and x.device.type == "cpu" \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            bias = None if bias is None else round_bf16(bias)
            return F.linear(round_bf16(x), round_bf16(weight), bias).to(torch.bfloat16)
    return F.linear(x, weight, bias)


class DecodeCache:
    """Weight copies a module keeps for decoding, rebuilt when `key` (the source weights' pointers and
    versions) changes. Not part of the module's state: a deep copy or a pickle starts empty."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build):
        if key != self.key:
            self.key, self.value = key, build()
        return self.value

    def clear(self) -> None:
        self.key = self.value = None

    def built(self):
        """The copies as last built, for a compiled graph (keys read data pointers, which a graph cannot): the
        caller builds them eagerly first (`warm_caches`)."""
        if self.value is None:
            raise RuntimeError("fastpath.warm_caches(model) must run before a compiled decode step")
        return self.value

    def __deepcopy__(self, memo) -> "DecodeCache":
        return DecodeCache()

    def __reduce__(self):
        return DecodeCache, ()


# ---------------------------------------------------------------------------------------------- modules
class FastLinear(nn.Linear):
    """nn.Linear computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def _adopt(self) -> None:
        pass


class FastLMHead(FastLinear):
    """The LM head. Without grad over a few rows on CPU its weight (the step's largest: 4096 x 256 at
    small-v3) is read the way MKL streams it fastest: one row through a column-major copy (`decode_layout`,
    2.5x faster than the row-major weight; kept until the weight changes), 2-16 rows as W·hᵀ on the weight
    itself (2-5% of a batch 2-8 decode step, vs h·Wᵀ, for which MKL first packs the weight)."""

    def _adopt(self) -> None:
        self._decode_cache = DecodeCache()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.numel() // h.shape[-1]
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() or rows > 16:
            return linear(h, w, b)
        if rows == 1:
            return linear(h, self._decode_weight(), b)
        if h.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return linear(h, w, b)
        y = torch.mm(w, h.reshape(rows, -1).t()).t().contiguous().view(*h.shape[:-1], -1)
        return y if b is None else y + b

    def _decode_weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._decode_cache.built()
        w = self.weight
        return self._decode_cache.get((w.data_ptr(), w._version), lambda: decode_layout(w.detach()))


class FastRMSNorm(RMSNorm):
    """RMSNorm in the same ops, with its constants as tensors (a decoded token runs 25 norms)."""

    def _adopt(self) -> None:
        self._dim_eps = scalar(self.weight.shape[0]), scalar(self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        dim, eps = self._dim_eps
        y = xf * xf.square().sum(-1, keepdim=True).div_(dim).add_(eps).rsqrt_()
        return self.weight * cast(y, x.dtype)


class FastMLA(MLA):
    """MLA with the flash-kernel padding and bf16 emulation in its naive attention, and the absorbed
    decode path on cached, concatenated (and, with `fuse`, pre-multiplied) weights."""

    def _adopt(self) -> None:
        self.fuse: bool | None = None
        """Absorbed path: multiply W^UK into the query projection and W^UV into o_proj ahead of time?
        None: when that costs no more multiplies per token (latent no wider than a head's keys and
        values, as in the small presets; not at V2/V3 shapes, where the latent is 4x wider)."""
        self._decode_cache = DecodeCache()
        self._fp8 = holds_fp8(self)
        """FP8-stored projections (quant.fp8_weights): the absorbed weights are built from them at every call,
        no dequantized copies kept."""

    def _sdpa(self, q_BSHK, k_BTHK, v_BTHV, mask):
        dtype, pad, fp32 = q_BSHK.dtype, 0, False
        q, k, v = q_BSHK, k_BTHK, v_BTHV
        if q.device.type == "cpu":
            pad = q.shape[-1] - self.dv
            fp32 = emulate_bf16(q, dtype)  # no bf16 GEMM: the fp32 kernel on the bf16 values
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
            v = F.pad(v, (0, pad)) if pad else v
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():  # autocast would recast
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None and q.shape[1] > 1, scale=self.scale)
        return o[..., :self.dv].transpose(1, 2).to(dtype)

    def _absorbed(self, x_BSD, rope, mask, cache, start):
        """MLA._absorbed, computed as: one GEMM projects x to the query's latent (or the query) and the new
        cache row together; with `fuse`, the query comes out already absorbed and scaled and o_proj takes the
        latent output directly. Batched matmuls (not einsum: ~5x less overhead per call on CPU), the (s, h)
        query rows together. The projections' weights are read directly (an FP8Linear's master weights:
        decoding is not FP8)."""
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
            scores = torch.baddbmm(cast(m, q_BQL.dtype), q_BQL, latent_BTL.transpose(1, 2), alpha=w.scale)
        p = cast(scores.softmax(dim=-1, dtype=torch.float32), q_BQL.dtype)
        o_lat = torch.bmm(p, latent_BTL[..., :C])  # [B, S*H, C]
        if w.fused:
            return linear(o_lat.view(B, S, H * C), w.w_o, w.b_o)
        o = torch.bmm(o_lat.view(B * S, H, C).transpose(0, 1), w.w_uv)
        return self.o_proj(o.transpose(0, 1).reshape(B, S, H * self.dv))

    def _absorbed_weights(self) -> SimpleNamespace:
        """The absorbed path's weights, built from the parameters and kept until one of them is replaced or
        its version changes (see `clear_caches`); built afresh, differentiably, when grad is on, and from FP8
        weights."""
        if torch.is_grad_enabled() or self._fp8:
            return self._build_absorbed_weights()
        if torch.compiler.is_compiling():
            return self._decode_cache.built()
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


class FastExperts(Experts):
    """Experts whose grouped matmuls take bf16-rounded fp32 operands where the CPU has no bf16 GEMM, and
    which keep per-expert weight views for `FastMoE`'s per-token path."""

    def _adopt(self) -> None:
        self._decode_cache = DecodeCache()

    def _operand(self, t: torch.Tensor) -> torch.Tensor:
        # (not under torch.compile, whose grouped_mm takes bf16 only)
        dtype = self._compute_dtype(t)
        return round_bf16(t) if emulate_bf16(t, dtype) and not torch.compiler.is_compiling() else cast(t, dtype)

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | _DequantizedExperts:
        """(gate, up, down) views of each expert, kept until a parameter changes (indexing a stacked
        parameter is a dispatched op, and one decoded token would index it 3·K times per layer). Plain
        parameters: the per-token path runs only with the local dispatcher, never on sharded experts. FP8-stored
        weights: each expert dequantized whenever a token asks for it, no copies kept."""
        if holds_fp8(self):
            return _DequantizedExperts(self)
        params = [self._parameters[name] for name in ("gate_proj", "up_proj", "down_proj")]
        key = tuple((p.data_ptr(), p._version) for p in params)
        return self._decode_cache.get(key, lambda: list(zip(*(p.detach().unbind(0) for p in params))))


class _DequantizedExperts:
    """(gate, up, down) of expert e of FP8-stored experts, dequantized when indexed."""

    def __init__(self, experts: Experts):
        self.experts = experts

    def __getitem__(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(dequantize_experts(self.experts, name, e) for name in ("gate_proj", "up_proj", "down_proj"))


class FastMoE(MoE):
    """MoE whose inference over a few tokens on CPU evaluates each token's experts directly."""

    per_token_max = 8
    """Inference over at most this many tokens (half as many when torch runs several threads) evaluates
    each token's experts directly. small-v3 decode on CPU, against the grouped kernel: with 1 thread 28%
    faster at batch 1, 14% at 4, 7% at 6, even at 8; with 2 threads 11% faster at batch 1, 3% at 4, 15%
    slower at 8."""

    def _adopt(self) -> None:
        pass

    def _routed(self, x_TD: torch.Tensor, r: Routing, drop: TokenDrop | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # (measured on CPU, where syncing on the expert ids is free; no bf16 emulation under autocast; all
        # experts local: an expert-parallel dispatcher always dispatches, on every rank alike)
        local = drop is None and not torch.is_grad_enabled() and type(self.dispatcher) is TokenDispatcher
        if local and torch.compiler.is_compiling() and not holds_fp8(self.experts):
            return self._gathered(x_TD, r.indices, r.weights), None
        limit = self.per_token_max if torch.get_num_threads() == 1 else self.per_token_max // 2
        if x_TD.shape[0] <= limit and local and x_TD.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return self._per_token(x_TD, r.indices, r.weights), None
        return super()._routed(x_TD, r, drop)

    def _gathered(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """The per-token evaluation as indexed products and sums, for a compiled decode step: Inductor reads
        each selected expert's rows in place inside one reduction kernel per projection (no gathered weight
        copies, no sort, no sync on the expert ids, which a graph cannot have)."""
        gate, up, down = self.experts.local_weights()
        x = x_TD[:, None, None, :]
        h_TKI = F.silu((gate[indices_TK] * x).sum(-1)) * (up[indices_TK] * x).sum(-1)
        y_TKD = (down[indices_TK] * h_TKI[:, :, None, :]).sum(-1)
        return (cast(weights_TK, y_TKD.dtype)[:, :, None] * y_TKD).sum(1)

    def _per_token(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Each token's K experts are one row through one expert each, cheaper than the sort/gather/scatter
        bookkeeping and the grouped kernel's walk over all experts; a token's K outputs are summed with their
        gate values in one product. With one thread each projection is a vector dot product over the rows
        of the expert's weight (`linalg.vecdot`: it streams a weight that is not in cache ~1.3-1.8x faster
        than MKL's matrix-vector product); with two threads it made the decode step slower, not faster
        (small-v3: 9% at batch 1, 18% at batch 4; the cause is not pinned down), so there MKL's product it is."""
        experts, out = self.experts.expert_weights(), []
        row = vecdot if torch.get_num_threads() == 1 else lambda w, x: F.linear(x, w)
        for x_D, ids, w_K in zip(x_TD, indices_TK.tolist(), weights_TK):
            h_KD = torch.stack([row(down, F.silu(row(gate, x_D)) * row(up, x_D))
                                for gate, up, down in (experts[e] for e in ids)])
            out.append(cast(w_K, h_KD.dtype) @ h_KD)
        return torch.stack(out)


_FAST = {nn.Linear: FastLinear, RMSNorm: FastRMSNorm, MLA: FastMLA, Experts: FastExperts, MoE: FastMoE}


def _swap(module: nn.Module, fast: type) -> None:
    if parametrize.is_parametrized(module):
        type(module).__bases__ = (fast,)
    else:
        module.__class__ = fast
    fast._adopt(module)


def enable(model: nn.Module) -> nn.Module:
    """Switch the fast paths on in place (idempotent); returns model. Only modules of exactly the plain
    classes are swapped: subclasses (FP8Linear, ...) keep their own forward. A module with parametrized
    weights (FP8 inference weights, quant.fp8_weights) has a class of torch's making over the plain one,
    its own: that class is rebased on the fast one."""
    for m in model.modules():
        fast = _FAST.get(parametrize.type_before_parametrizations(m))
        if fast is not None:
            _swap(m, fast)
    head = getattr(model, "lm_head", None)
    if type(head) is FastLinear:
        _swap(head, FastLMHead)
    return model


@torch.inference_mode()
def warm_caches(model: nn.Module) -> None:
    """Build the decoding weight copies a compiled decode step reads (`DecodeCache.built`)."""
    for m in model.modules():
        if isinstance(m, FastMLA) and not m._fp8:
            m._absorbed_weights()
        elif isinstance(m, FastLMHead):
            m._decode_weight()


def clear_caches(model: nn.Module) -> None:
    """Drop the weight copies kept for decoding (absorbed MLA weights, per-expert views, the LM head's
    decode layout). Call after changing weights in place without bumping their versions."""
    for m in model.modules():
        cache = getattr(m, "_decode_cache", None)
        if isinstance(cache, DecodeCache):
            cache.clear()
