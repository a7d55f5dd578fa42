"""The DeepSeek language model: embedding, pre-norm decoder layers (`nanoseek.model.decoder`), the final
norm, the LM head and the multi-token-prediction modules (V3 §2.2). `forward` returns everything
training needs (logits, MTP logits, balance loss, routings, dropped fraction) in a `ModelOutput`.

Parameter names follow the Hugging Face layout, so a state dict maps onto DeepseekV2/V3 (and Llama
for the dense DeepSeek-LLM models) checkpoints one to one, except the stacked experts and the MTP
modules, which `nanoseek.interop.hf` renames.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention import RMSNorm, causal_mask
from nanoseek.model.decoder import DecoderLayer
from nanoseek.model.moe import Experts, Gate, MoE, MoEStats, Routing
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
    """The routing (detached) of each MoE layer that ran: main layers, then MTP layers."""
    dropped_fraction: torch.Tensor | None = None
    """Mean share of (token, expert) pairs dropped over the MoE layers (V2 token dropping), else None."""

    @property
    def expert_load(self) -> torch.Tensor | None:
        """[n, E] tokens per expert for the n MoE layers that ran (rows as `routings`); counted when asked."""
        return torch.stack([r.load for r in self.routings]) if self.routings else None


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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.attn_head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave)
        self.activation_checkpointing = False
        """Recompute each decoder layer in the backward pass instead of keeping its activations (training)."""
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
        layers = [*self.model.layers, *(m.block for m in self.mtp)]  # (a pipeline stage's model: placeholders too)
        return [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), MoE)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, mtp: bool | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """input_ids [B, S]; attention_mask [B, past + S] (1 = real token, for left-padded batches), or a
        [B, 1, S, past + S] one per query (True = attend), taken as is;
        cache: a KV cache (nanoseek.infer.cache) holding `past` positions; mtp: compute the MTP logits
        (default: when there is no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + S, device=input_ids.device)[None]
        rope = self.rotary(position_ids)
        h = self.model.embed_tokens(input_ids)
        mask = self._mask(attention_mask, B, S, start, h.dtype, h.device)
        stats = []
        for layer in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h, s = checkpoint(layer, h, rope, mask, cache, start, use_reentrant=False)
            else:
                h, s = layer(h, rope, mask, cache, start)
            stats.append(s)
        h = self.model.norm(h)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        if cache is not None:
            cache.length = start + S
        mtp_logits = []
        if mtp if mtp is not None else cache is None:
            if cache is not None:
                raise ValueError("MTP logits over a cache are produced by the speculative decoder, not forward()")
            mtp_logits = self._mtp(input_ids, h, rope, mask, stats)
        stats = [s for s in stats if s is not None]
        losses = [s.aux_loss for s in stats if s.aux_loss is not None]
        dropped = [s.dropped_fraction for s in stats if s.dropped_fraction is not None]
        return ModelOutput(logits=logits, mtp_logits=mtp_logits,
                           aux_loss=torch.stack(losses).sum() if losses else None,
                           hidden_states=h, routings=[s.routing for s in stats],
                           dropped_fraction=torch.stack(dropped).mean() if dropped else None)

    def _mtp(self, input_ids, h, rope, mask, stats: list[MoEStats | None]) -> list[torch.Tensor]:
        """Depth k combines h_i^{k-1} with Emb(t_{i+k}) and predicts t_{i+k+1} (V3 §2.2); appends each
        module's MoEStats to `stats`."""
        S = input_ids.shape[1]
        emb = self.model.embed_tokens(input_ids)
        out = []
        for k, layer in enumerate(self.mtp, start=1):
            if S - k <= 0:
                break
            n = S - k
            rope_k = tuple(t[:, :n] for t in rope)
            mask_k = None if mask is None else mask[..., :n, :n]
            h, s = layer(h[:, :n], emb[:, k:], rope_k, mask_k)
            stats.append(s)
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
        h, _ = layer(hidden_BSD, emb, self.rotary(position_ids), mask, cache, start)
        return self.lm_head(layer.shared_head.norm(h[:, -logits_to_keep:] if logits_to_keep else h)), h

    @staticmethod
    def _mask(attention_mask, B, S, start, dtype, device):
        T = start + S
        if attention_mask is None:
            return None if start == 0 or S == 1 else causal_mask(S, T, device, dtype)
        if attention_mask.dim() == 4:  # per query (a fixed-capacity cache: the new slots are not the last ones)
            if attention_mask.shape != (B, 1, S, T):
                raise ValueError(f"a 4-D attention_mask must be [batch, 1, seq, past + seq] = {(B, 1, S, T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            return torch.zeros(attention_mask.shape, device=device, dtype=dtype).masked_fill(
                ~attention_mask.bool(), torch.finfo(dtype).min)
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
