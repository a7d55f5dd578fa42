"""Multi-Token Prediction modules (DeepSeek-V3 §2.2).

Depth k keeps the causal chain: h'_i = M_k·[RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))], then one
decoder block, then the shared output head. Embedding and head are the main model's. In DeepSeek's
checkpoints module k is stored as `model.layers.{num_hidden_layers + k - 1}.*`: a full decoder layer
plus enorm, hnorm, eh_proj and shared_head.norm (and copies of the embedding and head).
"""
from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import RMSNorm
from nanoseek.model.decoder import DecoderLayer
from nanoseek.model.moe import MoEStats


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(D, eps)
        self.hnorm = RMSNorm(D, eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = DecoderLayer(cfg, layer_idx)  # the main model's block, never a copy
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(D, eps)

    def forward(self, h_BSD, emb_BSD, rope, mask=None, cache=None, start: int = 0
                ) -> tuple[torch.Tensor, MoEStats | None]:
        """Returns h^k [B, S, D] (logits are lm_head(shared_head.norm(h^k))) and the block's MoEStats."""
        z = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))  # [emb; hidden]
        return self.block(z, rope, mask, cache, start)
