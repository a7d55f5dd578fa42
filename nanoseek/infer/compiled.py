"""A compiled decode step (torch.compile, Inductor): the model's own forward over a fixed-capacity cache.

Eager decoding of a small model is bound by the number of dispatched ops (~660 per token at small-v3);
a compiled graph runs them as a few fused kernels. For a graph to be compiled once and reused, every
shape in it is fixed: the batch is padded to a bucket (1, 2, 4, 8, ...), attention reads the cache's
whole capacity (a power of two) under a per-query mask, and the new token's slot and positions are
tensors. One graph per (batch bucket, capacity, tokens per step), kept for the process: a later batch
or request with the same shapes reuses it, and Inductor's on-disk cache makes a rerun's compile short.

`SlotCache` is what the model sees in place of `KVCache`: the same `update` interface, writing the
step's entries at `slot` (a tensor) and handing back the full buffers. The CPU fast paths' weight copies
are built eagerly before (`fastpath.warm_caches`: their keys read data pointers, which a graph cannot)
and enter the graph as inputs, so weights changed between batches (RL) need no recompile; the routed
experts take `FastMoE._gathered` (no sync on the expert ids). Speculative decoding's two forwards are graphs
alike: the verifying step (2 tokens per row) and the MTP module's drafting forward (one decoder layer and the
head over the 1 or 2 new slots, writing the module's own cache layer). Over a large vocabulary the step's token
selection (`sampling.select`: temperature, top-k, top-p, then the division by Exp(1) draws made eagerly from
the rows' generators) is a small graph of its own, its batch dimension dynamic. Prefill stays eager: over a
prompt's many tokens the gathered experts would read T·K expert weights where the grouped kernel reads each
used expert once.
"""
from __future__ import annotations

import os
import time
import weakref

import torch

from nanoseek import fastpath
from nanoseek.infer.cache import KVCache
from nanoseek.infer.sampling import Filters, select
from nanoseek.quant.fp8_weights import holds_fp8

COMPILE_MIN_PARAMETERS = 1_000_000
"""`compile="auto"` compiles models at least this large (non-embedding parameters) on CPU: a graph compiles
in 10-80 s (a few seconds when Inductor's cache has it), which pays back after some thousands of tokens;
the tiny models of tests and the demo decode a few hundred per run."""


SELECT_MIN_VOCAB = 32768
"""The token selection compiles from this vocabulary size on. Measured (1 thread, batch 8, per selection): eager
0.033 / 0.33 / 0.68 / 2.1 / 9.4 ms at 269 / 16k / 32k / 64k / 129k tokens, compiled 0.037 / 0.45 / 0.58 / 1.9 /
2.5 ms (a graph call's fixed cost, ~0.03 ms, against the fused softmax and divisions over the vocabulary)."""


def compile_pays(model) -> bool:
    """Whether `compile="auto"` compiles this model's decode step: on CPU (the GPU's path, CUDA graphs, is
    not measured yet) with Inductor, an fp32 model (bf16: not measured, and Inductor rounds its fused ops'
    intermediates differently from eager's per-op bf16, so greedy tokens can differ) of at least
    COMPILE_MIN_PARAMETERS, without FP8-stored weights (dequantized as read: not written for a graph).
    The environment variable NANOSEEK_COMPILE=0 or 1 decides instead (for the commands that decode
    inside: GRPO, DPO, rejection sampling, evaluation)."""
    env = os.environ.get("NANOSEEK_COMPILE", "")
    if env in ("0", "1"):
        return env == "1" and CompiledDecoder.available()
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and CompiledDecoder.available() \
        and not holds_fp8(model) and model.num_parameters(embedding=False) >= COMPILE_MIN_PARAMETERS


def bucket(n: int) -> int:
    """The batch a compiled step runs for n rows: the power of two >= n."""
    return 1 << (n - 1).bit_length()


class SlotCache:
    """Fixed-capacity buffers [B, capacity, ...] per layer; the step's S entries go to slots slot..slot+S.
    `length` reads capacity - S, so the model attends over all capacity slots (its mask hides the unused)."""

    def __init__(self, buffers: list[tuple[torch.Tensor, ...]], slot_S: torch.Tensor):
        self.buffers, self.slot_S = buffers, slot_S
        self.length = buffers[0][0].shape[1] - slot_S.shape[0]

    def update(self, layer_idx: int, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bufs = self.buffers[layer_idx]
        for buf, t in zip(bufs, new):
            buf.index_copy_(1, self.slot_S, fastpath.cast(t, buf.dtype))
        return tuple(fastpath.cast(buf, t.dtype) for buf, t in zip(bufs, new))


def _step(model, ids_BS, positions_BS, mask_B1ST, slot_S, buffers):
    out = model(ids_BS, attention_mask=mask_B1ST, position_ids=positions_BS, cache=SlotCache(buffers, slot_S),
                logits_to_keep=ids_BS.shape[1])
    return out.logits, out.hidden_states


def _draft(model, hidden_BSD, ids_BS, positions_BS, mask_B1ST, slot_S, buffers, keep: int):
    cache = SlotCache(buffers, slot_S)
    return model.mtp_forward(hidden_BSD, ids_BS, mask_B1ST, positions_BS, cache, start=cache.length,
                             logits_to_keep=keep)[0]


class CompileFailed(RuntimeError):
    pass


class CompiledDecoder:
    """Runs a `Batch`'s decode forwards (of at most `max_batch` rows) as compiled graphs. The batch's
    `KVCache` stays the record: when its rows are already a bucket's, the graph writes into its buffers
    directly; otherwise into a padded copy (refreshed when the batch's rows or slots move), and the step's
    new entries are copied back. (The cache's capacity is a bucket already: `KVCache(buckets=True)`.)"""

    max_batch = 32
    """Larger batches decode eagerly: the compiled experts read each selected expert once per token (T·K
    reads, where the eager grouped kernel reads each used expert once); measured faster than eager up to
    32 rows (small-v3), not beyond."""

    def __init__(self, model, num_layers: int):
        self.model, self.num_layers = model, num_layers
        self.compile_seconds = 0.0
        """Seconds spent compiling (first calls of new graphs) by this decoder."""
        self._mirror = self._mirror_key = None
        self._mirror_length = 0
        fastpath.warm_caches(model)
        # one graph per shape set, all guarded on the same code object: allow more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    @staticmethod
    def failed(model) -> bool:
        return model in _failed

    @staticmethod
    def available() -> bool:
        try:
            import torch._inductor  # noqa: F401  (a torch build without Inductor: eager)
        except ImportError:
            return False
        return True

    def forward(self, cache: KVCache, ids_BS: torch.Tensor, positions_BS: torch.Tensor, mask_BT: torch.Tensor):
        """One decode forward of S new tokens per row at slots cache.length.. (which it fills, and advances
        cache.length past); mask_BT [B, cache.length + S] marks each row's real slots. Returns (logits
        [B, S, V], final hidden states [B, S, D])."""
        (B, S), T = ids_BS.shape, cache.length
        inputs, buffers, mirrored = self._inputs(cache, T, ids_BS, positions_BS, mask_BT)
        inputs = (*inputs[:-1], buffers[: self.num_layers])  # (the main layers: the graph a plain cache gets)
        logits, hidden = self._run(_step, False, ("step", bucket(B), cache.max_len, S), self.model, *inputs)
        if mirrored:
            self._write_back(cache, buffers, range(self.num_layers), B, T, S)
        cache.length = T + S
        return logits[:B], hidden[:B]

    def draft(self, cache: KVCache, hidden_BSD: torch.Tensor, ids_BS: torch.Tensor, positions_BS: torch.Tensor,
              mask_BT: torch.Tensor, start: int, keep: int) -> torch.Tensor:
        """The first MTP module's drafting forward (`mtp_forward`) over slots start..start+S of its cache layer;
        mask_BT [B, start + S] marks each row's real slots (the new ones too: a rejected draft's is a hole).
        Returns the logits of the last `keep` slots [B, keep, V]."""
        (B, S), D = ids_BS.shape, hidden_BSD.shape[-1]
        inputs, buffers, mirrored = self._inputs(cache, start, ids_BS, positions_BS, mask_BT)
        hidden = hidden_BSD.new_zeros(bucket(B), S, D)
        hidden[:B] = hidden_BSD
        logits = self._run(_draft, False, ("draft", bucket(B), cache.max_len, S, keep), self.model, hidden, *inputs,
                           keep)
        if mirrored:
            self._write_back(cache, buffers, [self.num_layers], B, start, S)
        return logits[:B]

    def _inputs(self, cache: KVCache, T: int, ids_BS, positions_BS, mask_BT) -> tuple[tuple, list, bool]:
        """A graph's inputs for S new tokens at slots T..T+S: (ids, positions, per-query mask, slots, buffers)
        padded to the batch's bucket; the buffers, and whether they are a padded copy of the cache's."""
        (B, S), dev = ids_BS.shape, ids_BS.device
        Bb, cap = bucket(B), cache.max_len
        # per-query mask over the whole capacity: each row's real slots, causal among the S new ones
        mask = torch.zeros(Bb, 1, S, cap, dtype=torch.bool, device=dev)
        mask[:B, 0, :, :T + S] = mask_BT[:, None, :T + S]
        mask[B:, 0, :, T:T + S] = True  # (padding rows: themselves)
        mask[:, 0, :, T:T + S] &= torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        # fresh, padded copies: a graph is guarded on its inputs' strides too
        ids, positions = torch.zeros(2, Bb, S, dtype=torch.long, device=dev)
        ids[:B], positions[:B] = ids_BS, positions_BS
        buffers, mirrored = self._buffers(cache, Bb)
        return (ids, positions, mask, torch.arange(T, T + S, device=dev), buffers), buffers, mirrored

    def _write_back(self, cache: KVCache, buffers: list, layers, B: int, T: int, S: int) -> None:
        """Copy the new entries of a padded copy's layers back into the batch's cache."""
        for i in layers:
            for b, m in zip(cache.buffers[i], buffers[i]):
                b[:, T:T + S] = m[:B, T:T + S]
        self._mirror_length = T + S

    def _buffers(self, cache: KVCache, Bb: int) -> tuple[list, bool]:
        """Every cache layer's buffers (the MTP module's too, when the cache has its layer) with Bb rows: the
        cache's own when it has Bb rows, else a padded copy kept while the cache's rows and slots stay put."""
        if any(b is None for b in cache.buffers):  # (a batch whose prompts were all one token: nothing prefilled yet)
            like = self._like()
            for i, bufs in enumerate(cache.buffers):
                if bufs is None:
                    cache.buffers[i] = tuple(torch.zeros(cache.batch_size, cache.max_len, *s, dtype=cache.dtype or d,
                                                         device=like.device) for s, d in self._entry_shapes())
        if cache.batch_size == Bb:
            self._mirror = self._mirror_key = None
            return cache.buffers, False
        key = (cache.version, Bb)  # (versions are unique across caches)
        # (an eager step in between, for a batch over max_batch, appends without a version change)
        if key != self._mirror_key or cache.length > self._mirror_length:
            self._mirror = [tuple(b.new_zeros(Bb, *b.shape[1:]).index_copy_(0, torch.arange(b.shape[0]), b)
                                  for b in bufs) for bufs in cache.buffers]
            self._mirror_key = key
        return self._mirror, True

    def _like(self) -> torch.Tensor:
        return next(self.model.parameters())

    def _entry_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        cfg, dtype = self.model.config, self._like().dtype
        if cfg.is_mla:
            return [((cfg.kv_lora_rank + cfg.qk_rope_head_dim,), dtype)]
        return [((cfg.num_key_value_heads, cfg.attn_head_dim), dtype)] * 2

    def select(self, logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
               top_p_B: torch.Tensor, noise_BV: torch.Tensor, filters: Filters) -> torch.Tensor:
        """`sampling.select`, as a graph (one per filters, logits dtype, one row or more; any batch size) over a
        vocabulary of SELECT_MIN_VOCAB or more."""
        if logits_BV.shape[-1] < SELECT_MIN_VOCAB:
            return select(logits_BV, temperature_B, top_k_B, top_p_B, noise_BV, filters)
        key = ("select", filters, logits_BV.dtype, min(logits_BV.shape[0], 2))
        return self._run(select, True, key, logits_BV, temperature_B, top_k_B, top_p_B, noise_BV, filters)

    def _run(self, fn, dynamic: bool, key: tuple, *args):
        """fn's graph for these inputs (dynamo keeps one per shape set, guarded; the first call compiles it)."""
        graph = _graphs.get((fn, BACKEND))
        if graph is None:
            graph = _graphs[fn, BACKEND] = torch.compile(fn, backend=BACKEND, fullgraph=True, dynamic=dynamic)
        key, done = (BACKEND, *key), _compiled.setdefault(self.model, set())
        if key in done:
            return graph(*args)
        t = time.perf_counter()
        try:
            out = graph(*args)
        except Exception as e:  # (compilation runs before the graph touches the cache: eager can take over)
            _failed.add(self.model)
            raise CompileFailed(f"compiling the decode step failed ({type(e).__name__}: {e})") from e
        done.add(key)
        self.compile_seconds += time.perf_counter() - t
        return out


BACKEND = "inductor"
"""torch.compile's backend ("aot_eager" traces the same graph without generating code: tests use it to
check shapes and graph breaks in seconds)."""
_graphs: dict = {}
"""(function, backend) -> its torch.compile wrapper (which holds the graphs)."""
_failed: weakref.WeakSet = weakref.WeakSet()
"""Models whose decode step failed to compile (no C++ compiler, an unsupported op): they decode eagerly."""
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {(backend, "step" | "draft" | "select", shapes...)} of the graphs compiled for it in this process."""
