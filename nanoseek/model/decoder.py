"""The DeepSeek decoder layer: pre-norm attention (MLA or MHA/GQA), then an MLP or DeepSeekMoE, each
added to the residual stream (DeepSeek LLM §2; V2 §2; V3 §2.1). Shared by the main model and the MTP
modules."""
from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import RMSNorm, build_attention
from nanoseek.model.moe import MLP, MoE, MoEStats


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = build_attention(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BSD, rope, mask=None, cache=None, start: int = 0
                ) -> tuple[torch.Tensor, MoEStats | None]:
        """Returns the new hidden state and, for an MoE layer, its MoEStats (None for a dense MLP)."""
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), rope, mask, cache, start)
        y = self.mlp(self.post_attention_layernorm(x_BSD))
        y, stats = y if isinstance(self.mlp, MoE) else (y, None)
        return x_BSD + y, stats
