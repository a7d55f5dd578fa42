"""KV caches shared by every attention type, and their closed-form sizes (DeepSeek-V2 §2.1.4, Table 1).

Each layer stores whatever its attention hands over per token: MLA one row [c_kv; k_pe] of
kv_lora_rank + qk_rope_head_dim values (the latent and the RoPE key shared by all heads), MHA/GQA/MQA
their K and V [n_kv, head_dim]. Buffers are allocated on first use at `max_len` positions; `length`
is the number filled, and setting it lower rolls the cache back (speculative decoding). MTP modules
have their own layers after the main ones (index num_hidden_layers + k).

A batch of sequences shares the slot axis: shorter rows are left-padded (the attention mask hides the
padding), which is what lets `shift`, `select` and `cat` add and drop rows of a running batch.
"""
from __future__ import annotations

import itertools

import torch

_versions = itertools.count()


def capacity_bucket(n: int) -> int:
    """The power of two >= n (at least 64): the capacities a compiled decode step is built for."""
    return max(64, 1 << (n - 1).bit_length())


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 buckets: bool = False):
        self.buffers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        self.buckets = buckets
        """Round every capacity up to a `capacity_bucket` (a compiled step's shapes come from a few)."""
        self.batch_size, self.max_len, self.dtype = batch_size, self._capacity(max_len), dtype
        self.length = 0
        self.version = next(_versions)
        """Changes (unique across caches) whenever entries move or buffers are replaced, not when appended to."""

    def _capacity(self, n: int) -> int:
        return capacity_bucket(n) if self.buckets else n

    @property
    def num_layers(self) -> int:
        return len(self.buffers)

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
        # cast back only when stored narrower (even a no-op .to() is a dispatched op; decode is op-bound)
        return tuple(buf[:, :end] if buf.dtype == t.dtype else buf[:, :end].to(t.dtype) for buf, t in zip(bufs, new))

    # ------------------------------------------------------------------ batch surgery (continuous batching)
    def reserve(self, max_len: int) -> None:
        """Make room for `max_len` positions (grows by at least half again, so appends stay amortized)."""
        if max_len <= self.max_len:
            return
        max_len = self._capacity(max(max_len, self.max_len + self.max_len // 2))
        self.version = next(_versions)
        for i, bufs in enumerate(self.buffers):
            if bufs is not None:
                grown = []
                for b in bufs:
                    g = b.new_zeros(b.shape[0], max_len, *b.shape[2:])
                    g[:, : self.length] = b[:, : self.length]
                    grown.append(g)
                self.buffers[i] = tuple(grown)
        self.max_len = max_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a 1-D index), in this order."""
        self.buffers = [None if bufs is None else tuple(b.index_select(0, rows) for b in bufs) for bufs in self.buffers]
        self.batch_size = int(rows.numel())
        self.version = next(_versions)

    def shift(self, n: int) -> None:
        """Move every entry n slots right (n > 0: left padding) or drop the first -n slots (n < 0)."""
        if n == 0:
            return
        if n > 0:
            self.reserve(self.length + n)
        self.version = next(_versions)
        keep = self.length if n > 0 else self.length + n
        for bufs in self.buffers:
            for b in bufs or ():
                src = b[:, self.length - keep: self.length].clone()
                b[:, max(n, 0): max(n, 0) + keep] = src
                if n > 0:
                    b[:, :n] = 0
        self.length += n

    @staticmethod
    def cat(caches: list["KVCache"], max_len: int | None = None) -> "KVCache":
        """Stack caches of equal `length` along the batch axis (layers a cache never wrote are zeros)."""
        length = caches[0].length
        if any(c.length != length or c.num_layers != caches[0].num_layers for c in caches):
            raise ValueError("KVCache.cat needs caches with the same length and number of layers")
        out = KVCache(caches[0].num_layers, sum(c.batch_size for c in caches), max(max_len or 0, length),
                      caches[0].dtype, caches[0].buckets)
        max_len = out.max_len
        out.length = length
        for i in range(out.num_layers):
            like = next((c.buffers[i] for c in caches if c.buffers[i] is not None), None)
            if like is None:
                continue
            parts = []
            for j, ref in enumerate(like):
                buf = ref.new_zeros(out.batch_size, max_len, *ref.shape[2:])
                row = 0
                for c in caches:
                    if c.buffers[i] is not None:
                        buf[row: row + c.batch_size, :length] = c.buffers[i][j][:, :length]
                    row += c.batch_size
                parts.append(buf)
            out.buffers[i] = tuple(parts)
        return out

    # ------------------------------------------------------------------ sizes
    def bytes_per_token_per_layer(self) -> int:
        """Bytes one token occupies in one layer's cache (per batch row)."""
        bufs = next(b for b in self.buffers if b is not None)
        return sum(b[0, 0].numel() * b.element_size() for b in bufs)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.buffers if bufs for b in bufs)


def cache_elements_per_token(cfg, layers: int | None = None) -> int:
    """Cached values per token (closed form): MLA (d_c + d_h^R)·l; MHA/GQA/MQA 2·n_kv·d_h·l."""
    layers = cfg.num_hidden_layers if layers is None else layers
    if cfg.is_mla:
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers
    return 2 * cfg.num_key_value_heads * cfg.attn_head_dim * layers


def mha_elements_per_token(cfg, layers: int | None = None) -> int:
    """The MHA cache the same model would need (V2 Table 1: 2·n_h·d_h·l), with d_h the per-head width
    of the values (for MLA: v_head_dim = qk_nope_head_dim in every DeepSeek model)."""
    layers = cfg.num_hidden_layers if layers is None else layers
    d_h = cfg.v_head_dim if cfg.is_mla else cfg.attn_head_dim
    return 2 * cfg.num_attention_heads * d_h * layers
