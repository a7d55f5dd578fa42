"""KV caches shared by every attention type.

Each layer stores whatever its attention hands over per token: MLA its latent c_kv [kv_lora_rank]
and RoPE key [qk_rope_head_dim] (DeepSeek-V2 §2.1.4), MHA/GQA/MQA their K and V [n_kv, head_dim].
Buffers are allocated on first use at `max_len` positions; `length` is the number filled, and
setting it lower rolls the cache back (speculative decoding).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        self.buffers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        self.length = 0

    def update(self, layer_idx: int, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write new [B, S, ...] entries at positions start..start+S; return all [B, start+S, ...]."""
        end = start + new[0].shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, max_len is {self.max_len}")
        if self.buffers[layer_idx] is None:
            self.buffers[layer_idx] = tuple(
                torch.zeros(self.batch_size, self.max_len, *t.shape[2:], dtype=self.dtype or t.dtype, device=t.device)
                for t in new)
        bufs = self.buffers[layer_idx]
        for buf, t in zip(bufs, new):
            buf[:, start:end] = t
        return tuple(buf[:, :end].to(t.dtype) for buf, t in zip(bufs, new))  # a no-op unless stored narrower

    def bytes_per_token_per_layer(self) -> int:
        """Bytes one token occupies in one layer's cache (per batch row)."""
        bufs = next(b for b in self.buffers if b is not None)
        return sum(b[0, 0].numel() * b.element_size() for b in bufs)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.buffers if bufs for b in bufs)
