"""The DeepSeek decoder: pre-norm blocks of attention (MLA or MHA/GQA) and an MLP or DeepSeekMoE,
then the final norm, the LM head and the multi-token-prediction modules (V3 §2.2).

Parameter names follow the Hugging Face layout, so a state dict maps onto DeepseekV2/V3 (and Llama
for the dense DeepSeek-LLM models) checkpoints one to one, except the stacked experts and the MTP
modules, which `nanoseek.interop.hf` renames.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import RMSNorm, build_attention, causal_mask
from nanoseek.model.linear import DecodeCache, Linear, decode_layout, linear
from nanoseek.model.moe import MLP, Experts, Gate, MoE, Routing
from nanoseek.model.mtp import MTPLayer
from nanoseek.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, S, V] (or the last `logits_to_keep` positions)."""
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    """One per MTP depth k = 1..D: [B, S-k, V]; position i predicts token i+k+1."""
    aux_loss: torch.Tensor | None = None
    """Weighted sum of the enabled balance losses over all MoE layers (training mode only)."""
    hidden_states: torch.Tensor | None = None
    """[B, S, D] final hidden states after the last norm."""
    routings: list[Routing] = field(default_factory=list, repr=False)
    """The routing of each MoE layer that ran: main layers, then MTP layers."""

    @property
    def expert_load(self) -> torch.Tensor | None:
        """[n, E] tokens per expert for the n MoE layers that ran (rows as `routings`); counted when asked."""
        return torch.stack([r.load for r in self.routings]) if self.routings else None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = build_attention(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BSD, rope, mask=None, cache=None, start: int = 0):
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), rope, mask, cache, start)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))


class DeepSeekModel(nn.Module):
    """Embedding, decoder layers and final norm (the `model.*` keys of a checkpoint)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepSeekModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self._decode_cache = DecodeCache()  # the LM head's weight in decode layout
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.attn_head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) weights (DeepSeek LLM: 0.006), unit norms, zero biases."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Gate)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Experts):
                for p in m.parameters():
                    nn.init.normal_(p, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for gate in self.modules():
            if isinstance(gate, Gate):
                gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """MoE modules in a fixed order: main layers, then MTP layers (rows of `expert_load`)."""
        # (not self.modules(): walking every module on each decode step cost ~5% of a small model's step)
        return [layer.mlp for layer in [*self.model.layers, *(m.block for m in self.mtp)] if isinstance(layer.mlp, MoE)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, mtp: bool | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """input_ids [B, S]; attention_mask [B, past + S] (1 = real token, for left-padded batches);
        cache: a KV cache (nanoseek.infer.cache) holding `past` positions; mtp: compute the MTP logits
        (default: when there is no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + S, device=input_ids.device)[None]
        rope = self.rotary(position_ids)
        moe = self.moe_layers()
        for m in moe:  # MTP layers may be skipped: no stale statistics
            m.last_routing = m.last_aux_loss = None
        h = self.model.embed_tokens(input_ids)
        mask = self._mask(attention_mask, B, S, start, h.dtype, h.device)
        for layer in self.model.layers:
            h = layer(h, rope, mask, cache, start)
        h = self.model.norm(h)
        logits = self._head(h[:, -logits_to_keep:] if logits_to_keep else h, cache)
        if cache is not None:
            cache.length = start + S
        mtp_logits = []
        if mtp if mtp is not None else cache is None:
            if cache is not None:
                raise ValueError("MTP logits over a cache are produced by the speculative decoder, not forward()")
            mtp_logits = self._mtp(input_ids, h, rope, mask)
        losses = [m.last_aux_loss for m in moe if m.last_aux_loss is not None]
        return ModelOutput(logits=logits, mtp_logits=mtp_logits,
                           aux_loss=torch.stack(losses).sum() if losses else None,
                           hidden_states=h, routings=[m.last_routing for m in moe if m.last_routing is not None])

    def _mtp(self, input_ids, h, rope, mask) -> list[torch.Tensor]:
        """Depth k combines h_i^{k-1} with Emb(t_{i+k}) and predicts t_{i+k+1} (V3 §2.2)."""
        S = input_ids.shape[1]
        emb = self.model.embed_tokens(input_ids)
        out = []
        for k, layer in enumerate(self.mtp, start=1):
            if S - k <= 0:
                break
            n = S - k
            rope_k = tuple(t[:, :n] for t in rope)
            mask_k = None if mask is None else mask[..., :n, :n]
            h = layer(h[:, :n], emb[:, k:], rope_k, mask_k)
            out.append(self.lm_head(layer.shared_head.norm(h)))
        return out

    def mtp_forward(self, hidden_BSD: torch.Tensor, next_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, cache=None, start: int = 0, depth: int = 1,
                    logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module `depth` over slots start..start+S of a cache (speculative drafting, V3 §5.4.3).

        The input at slot i is h_i, the main model's final-normed hidden state there, and Emb(t_{i+1});
        the output predicts t_{i+2}. The module keeps its own cache layer (num_hidden_layers + depth - 1),
        aligned slot for slot with the main layers; `cache.length` is left to the caller.
        Returns (logits [B, S or logits_to_keep, V], h^depth [B, S, D])."""
        B, S = next_ids.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + S, device=next_ids.device)[None]
        layer = self.mtp[depth - 1]
        emb = self.model.embed_tokens(next_ids)
        mask = self._mask(attention_mask, B, S, start, emb.dtype, emb.device)
        h = layer(hidden_BSD, emb, self.rotary(position_ids), mask, cache, start)
        return self._head(layer.shared_head.norm(h[:, -logits_to_keep:] if logits_to_keep else h), cache), h

    def clear_decode_caches(self) -> None:
        """Drop the weight copies kept for decoding (absorbed MLA weights, per-expert views, the LM head's
        decode layout: each module's `_decode_cache`). They are rebuilt when a weight is replaced or its
        version changes, but some in-place updates leave the version alone (fused AdamW, writes through
        `.data`), so the inference engine clears them whenever it starts a batch."""
        for m in self.modules():
            if isinstance(getattr(m, "_decode_cache", None), DecodeCache):
                m._decode_cache.clear()

    def _head(self, h: torch.Tensor, cache) -> torch.Tensor:
        """The LM head. Decoding without grad on CPU, its weight (the step's largest: 4096 x 256 at small-v3)
        is read the way MKL streams it fastest: one row through a column-major copy (`decode_layout`, 2.5x
        faster than the row-major weight; kept until the weight changes), 2-16 rows as W·hᵀ on the weight
        itself (2-5% of a batch 2-8 decode step, vs h·Wᵀ, for which MKL first packs the weight)."""
        rows = h.numel() // h.shape[-1]
        if cache is None or torch.is_grad_enabled() or rows > 16:
            return self.lm_head(h)
        w, b = self.lm_head.weight, self.lm_head.bias
        if rows == 1:
            key = (w.data_ptr(), w._version)
            return linear(h, self._decode_cache.get(key, lambda: decode_layout(w.detach())), b)
        if h.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.lm_head(h)
        y = torch.mm(w, h.reshape(rows, -1).t()).t().contiguous().view(*h.shape[:-1], -1)
        return y if b is None else y + b

    @staticmethod
    def _mask(attention_mask, B, S, start, dtype, device):
        T = start + S
        if attention_mask is None:
            return None if start == 0 or S == 1 else causal_mask(S, T, device, dtype)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [batch, past + seq] = {(B, T)}, got {tuple(attention_mask.shape)}")
        mask = causal_mask(S, T, attention_mask.device, dtype).expand(B, 1, S, T)
        return mask.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(dtype).min)

    # ------------------------------------------------------------------ parameters and checkpoints
    def num_parameters(self, active: bool = False, mtp: bool = False, embedding: bool = True) -> int:
        """Parameter count. `active`: only num_experts_per_tok of the routed experts count (per token);
        `embedding=False` leaves out the input embedding (a lookup, no FLOPs); `mtp` adds the MTP modules."""
        cfg, total = self.config, 0
        seen = set() if embedding else {id(self.model.embed_tokens.weight)}
        for name, p in self.named_parameters():
            if id(p) in seen or (not mtp and name.startswith("mtp.")):
                continue
            seen.add(id(p))
            n = p.numel()
            if active and ".experts." in name:
                n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
            total += n
        return total

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        from nanoseek.interop.hf import save_pretrained
        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device = "cpu") -> "DeepSeekForCausalLM":
        from nanoseek.interop.hf import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device)
