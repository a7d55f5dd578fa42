"""The inference engine shared by evaluation, RL rollouts, chat and the server.

`Batch` is a running batch over one KV cache (continuous batching): `add` prefills new prompts
together and merges them into the running rows (left-padded, so every row's newest token sits in the
same slot), `step` runs one forward of the main model for all rows and emits each row's next
token(s), and a row leaves as soon as it finishes or is `remove`d. Each row has its own sampling
parameters, stop tokens and strings, random generator and incremental text.

The token fed to a step is always the row's newest token, which is not in the cache yet; after a
prompt's prefill (all but its last token) that is the prompt's last token, so every token comes out
of the same decode path.

With `speculative=True` the model's first MTP module drafts one token per row (DeepSeek-V3 §2.2 and
§5.4.3) and the main model verifies it in the same forward that computes the next distribution: the
step feeds [newest, draft], accepts the draft with probability min(1, p(draft)/q(draft)) and else
samples from the normalized max(0, p - q) (Leviathan et al. 2023; greedy: accept iff the draft is
the argmax), so the output has exactly the main model's distribution (greedy: its exact tokens).
An accepted draft also yields the token after it from the same forward: up to two tokens per
forward. A rejected draft's slot is rolled back (`cache.length`) when every row rejected it and is
masked out for that row otherwise. The MTP module then runs over the new slots with its own cache
layer to draft the next token.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from nanoseek import fastpath
from nanoseek.infer.cache import KVCache
from nanoseek.infer.compiled import CompiledDecoder, CompileFailed, compile_pays
from nanoseek.infer.sampling import (
    Filters,
    SamplingParams,
    distributions,
    exponential,
    penalize,
    select,
    uniform,
)
from nanoseek.infer.text import IncrementalText


@dataclass
class Delta:
    """What one row produced in one step."""

    key: Hashable
    tokens: list[int]
    """New token ids (0, 1 or, with speculative decoding, 2); a stop token is included."""
    text: str = ""
    """New text (needs a tokenizer); stop tokens are not rendered, stop strings are cut."""
    logprobs: list[float] | None = None
    """log p of each new token, when the row asked for them."""
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per new token, the row's top_logprobs most likely (token, log p), most likely first."""
    finish_reason: str | None = None
    """None while running; then "stop" (stop token or string) or "length"."""


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class DecodeStats:
    prefill_tokens: int = 0
    forwards: int = 0
    """Decode forwards of the main model (one per step)."""
    row_steps: int = 0
    """Rows advanced, summed over steps."""
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    compile_seconds: float = 0.0
    """Seconds the decode forwards spent compiling graphs (compiled decoding; apart from steady-state speed)."""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens each row gained per main-model forward (1 without speculation, up to 2 with it)."""
        return self.tokens / self.row_steps if self.row_steps else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "acceptance_rate": self.acceptance_rate, "tokens_per_forward": self.tokens_per_forward}


class _Row:
    def __init__(self, key, prompt: list[int], params: SamplingParams, generator, stop: set[int], text):
        self.key, self.prompt, self.params, self.generator, self.stop, self.text = key, prompt, params, generator, stop, text
        self.tokens: list[int] = []
        self.finish_reason: str | None = None


class Batch:
    def __init__(self, model, tokenizer=None, *, speculative: bool = False, cache_dtype: torch.dtype | None = None,
                 compile: bool = False):
        cfg = model.config
        if speculative and not cfg.num_nextn_predict_layers:
            raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.model, self.tokenizer, self.speculative, self.cache_dtype = model, tokenizer, speculative, cache_dtype
        fastpath.clear_caches(model)  # the weights may have changed since the last batch (RL between rollouts)
        self.device = next(model.parameters()).device
        self.vocab_size = cfg.vocab_size
        self.num_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = cfg.eos_token_id
        self.default_stop = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        if tokenizer is not None:
            self.default_stop.add(tokenizer.eos_id)
        self.stats = DecodeStats()
        compile = compile and not CompiledDecoder.failed(model)
        self.compiled = CompiledDecoder(model, cfg.num_hidden_layers) if compile else None
        """Decode forwards as compiled graphs (nanoseek.infer.compiled); prefill stays eager."""
        self.rows: list[_Row] = []
        self._pending: list[Delta] = []
        self._keys = itertools.count()
        self._clear()

    def _clear(self):
        self.cache: KVCache | None = None
        self.mask = self.pos = self.last = self.draft = self.q = self.seen = self._bias = None
        self._dense = True
        self._params = self._filters = None

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows or self._pending)

    @property
    def keys(self) -> list:
        return [r.key for r in self.rows]

    # ------------------------------------------------------------------ joining
    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
            keys: Sequence[Hashable] | None = None,
            generators: Sequence[torch.Generator | None] | None = None) -> list[Hashable]:
        """Prefill `prompts` together and join them to the batch; returns their keys.
        `generators` (one per prompt) overrides each params.seed (rows may share one generator)."""
        if not prompts:
            return []
        params = [params or SamplingParams()] * len(prompts) if not isinstance(params, (list, tuple)) else list(params)
        keys = list(keys) if keys is not None else [next(self._keys) for _ in prompts]
        if not len(params) == len(keys) == len(prompts):
            raise ValueError("add() needs as many params and keys as prompts")
        new = []
        for i, (prompt, p, key) in enumerate(zip(prompts, params, keys)):
            p.validate()
            ids = [int(t) for t in prompt]
            if not ids:
                raise ValueError("every prompt needs at least one token")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
            if any(t >= self.vocab_size for t in p.logit_bias or ()):
                raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
            if p.stop_strings and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer (Engine(model, tokenizer))")
            if generators is not None:
                gen = generators[i]
            else:
                gen = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
            stop = self.default_stop if p.stop_tokens is None else {int(t) for t in p.stop_tokens}
            text = IncrementalText(self._decode, p.stop_strings) if self.tokenizer is not None else None
            row = _Row(key, ids, p, gen, stop, text)
            if p.max_new_tokens == 0:
                row.finish_reason = "length"
                self._pending.append(Delta(key, [], "", [] if p.logprobs else None,
                                           [] if p.top_logprobs else None, "length"))
            else:
                new.append(row)
        if new:
            self._prefill_and_join(new)
        return keys

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _prefill_and_join(self, new: list[_Row]) -> None:
        dev, G = self.device, len(new)
        # rows with the same prompt (a GRPO group, n samples of one request) share one prefill row
        first: dict[tuple[int, ...], int] = {}
        src = [first.setdefault(tuple(r.prompt), len(first)) for r in new]
        once = [new[src.index(u)] for u in range(len(first))]
        pre = [r.prompt[:-1] for r in once]
        L = max(map(len, pre))
        self.stats.prefill_tokens += sum(map(len, pre))
        cache = KVCache(self.num_layers, len(once), L + self._room(new), self.cache_dtype,
                        buckets=self.compiled is not None)
        mask = torch.zeros(len(once), L, dtype=torch.bool, device=dev)
        for b, p in enumerate(pre):
            mask[b, L - len(p):] = True
        dense = bool(mask.all())
        mtp_logits = None
        if L:
            ids = torch.full((len(once), L), self.pad_id, dtype=torch.long, device=dev)
            for b, p in enumerate(pre):
                if p:
                    ids[b, L - len(p):] = torch.tensor(p, device=dev)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(ids, attention_mask=None if dense else mask, position_ids=positions, cache=cache,
                             logits_to_keep=1)
            if self.speculative:  # the MTP input at slot i: h_i and the token after it, t_{i+1}
                nxt = torch.full((len(once), L), self.pad_id, dtype=torch.long, device=dev)
                for b, r in enumerate(once):
                    if len(r.prompt) > 1:
                        nxt[b, L - len(pre[b]):] = torch.tensor(r.prompt[1:], device=dev)
                mtp_logits, _ = self.model.mtp_forward(out.hidden_states, nxt, None if dense else mask, positions,
                                                       cache, start=0, logits_to_keep=1)
        if len(once) < G:
            rows = torch.tensor(src, device=dev)
            cache.select(rows)
            mask = mask[rows]
            mtp_logits = mtp_logits[rows] if mtp_logits is not None else None
        last = torch.tensor([r.prompt[-1] for r in new], device=dev)
        pos = torch.tensor([len(r.prompt) - 1 for r in new], device=dev)
        # join: left-pad whichever side is shorter so the newest slots line up
        if self.rows:
            T = max(self.cache.length, L)
            pad_old, pad_new = T - self.cache.length, T - L
            self.cache.shift(pad_old)
            cache.shift(pad_new)
            self.cache = KVCache.cat([self.cache, cache], max_len=T + self._room(self.rows + new))
            self.mask = torch.cat([_pad_left(self.mask, pad_old), _pad_left(mask, pad_new)])
            self.pos, self.last = torch.cat([self.pos, pos]), torch.cat([self.last, last])
        else:
            self.cache, self.mask, self.pos, self.last = cache, mask, pos, last
        self.rows += new
        self._dense = bool(self.mask.all())
        self._params = None
        if self.seen is not None or any(r.params.repetition_penalty != 1 for r in new):
            self._rebuild_seen()
        if self.speculative:
            q = self._dist_rows(mtp_logits[:, -1] if mtp_logits is not None else None, new, len(self.rows) - G)
            draft = self._draw(q, range(len(self.rows) - G, len(self.rows)))
            self.q = q if self.q is None else torch.cat([self.q, q])
            self.draft = draft if self.draft is None else torch.cat([self.draft, draft])

    def _room(self, rows: list[_Row]) -> int:
        # cache slots the rows may still need (grown on demand past 1024)
        per_step = 2 if self.speculative else 1
        return per_step * min(max((r.params.max_new_tokens - len(r.tokens) for r in rows), default=0), 1024)

    def _dist_rows(self, logits, new, offset):
        """Draft distributions for newly joined rows: the MTP's where the prompt gave it something to
        draft from, else a one-hot on an arbitrary token (still exact: it is accepted with prob. p)."""
        G = len(new)
        q = torch.zeros(G, self.vocab_size, device=self.device)
        q[torch.arange(G), torch.tensor([r.prompt[-1] for r in new], device=self.device)] = 1.0
        if logits is not None:
            has = torch.tensor([len(r.prompt) > 1 for r in new], device=self.device)
            rows = range(offset, offset + G)
            q = torch.where(has[:, None], self._distributions(logits, rows), q)
        return q

    # ------------------------------------------------------------------ leaving
    def remove(self, key: Hashable) -> bool:
        """Drop a running row (e.g. its client went away); False if there is no such row."""
        for i, r in enumerate(self.rows):
            if r.key == key:
                self._keep([j for j in range(len(self.rows)) if j != i])
                self._trim()
                return True
        self._pending = [d for d in self._pending if d.key != key]
        return False

    def _keep(self, idx: list[int]) -> None:
        if len(idx) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in idx]
        if not self.rows:
            self._clear()
            return
        t = torch.tensor(idx, device=self.device)
        self.cache.select(t)
        self.mask, self.pos, self.last = self.mask[t], self.pos[t], self.last[t]
        if self.speculative:
            self.draft, self.q = self.draft[t], self.q[t]
        if self.seen is not None:
            self.seen = self.seen[t]
        self._params = None
        self._dense = bool(self.mask.all())

    def _trim(self) -> None:
        """Drop leading slots that are padding in every row (left behind by rows that left)."""
        if self._dense or not self.rows or not self.mask.shape[1]:  # dense: no padding (and no per-step ops)
            return
        lead = int(self.mask.any(0).long().argmax())
        if lead >= max(16, self.cache.length // 4):
            self.cache.shift(-lead)
            self.mask = self.mask[:, lead:]
            self._dense = bool(self.mask.all())

    # ------------------------------------------------------------------ sampling helpers
    def _param_tensors(self):
        """(temperature, top_k, top_p, penalty) per row, whether any row changes its logits before
        selection (penalty or bias: then plain argmax is not greedy), any row wants logprobs, all are greedy."""
        if self._params is None:
            dev, ps = self.device, [r.params for r in self.rows]
            self._bias = None
            if any(p.logit_bias for p in ps):
                self._bias = torch.zeros(len(ps), self.vocab_size, device=dev)
                for b, p in enumerate(ps):
                    for t, v in (p.logit_bias or {}).items():
                        self._bias[b, t] = v
            self._params = (torch.tensor([p.temperature for p in ps], device=dev),
                            torch.tensor([p.top_k for p in ps], device=dev),
                            torch.tensor([p.top_p for p in ps], device=dev),
                            torch.tensor([p.repetition_penalty for p in ps], device=dev),
                            any(p.repetition_penalty != 1 for p in ps) or self._bias is not None,
                            any(p.logprobs for p in ps), all(p.temperature == 0 for p in ps))
            self._filters = Filters.of(ps, self.vocab_size)
        return self._params

    def _distributions(self, logits_BV, rows, seen=None):
        temp, top_k, top_p, penalty, *_ = self._param_tensors()
        rows = torch.as_tensor(list(rows), device=self.device)
        if self.seen is not None:  # some row has a repetition penalty (1 leaves the others as they are)
            seen = self.seen[rows] if seen is None else seen
            logits_BV = penalize(logits_BV, seen, penalty[rows])
        if self._bias is not None:
            logits_BV = logits_BV.float() + self._bias[rows]
        return distributions(logits_BV, temp[rows], top_k[rows], top_p[rows])

    def _draw(self, probs_BV, rows) -> torch.Tensor:
        return (probs_BV / self._noise(rows, probs_BV.shape[1])).argmax(-1)

    def _noise(self, rows, n: int) -> torch.Tensor:
        """`exponential` draws [len(rows), n] from the sampled rows' generators; ones on greedy rows (which
        draw nothing: their distributions are one-hot)."""
        rows = list(rows)
        sampled = [j for j, i in enumerate(rows) if self.rows[i].params.temperature != 0]
        if len(sampled) == len(rows):
            return exponential([self.rows[i].generator for i in rows], n, self.device)
        noise = torch.ones(len(rows), n, device=self.device)
        if sampled:
            noise[sampled] = exponential([self.rows[rows[j]].generator for j in sampled], n, self.device)
        return noise

    def _sample(self, logits_BV) -> torch.Tensor:
        """Every row's next token: penalty and bias applied, then `select` (a graph, over a large vocabulary,
        when the decode step is compiled)."""
        temp, top_k, top_p, penalty, *_ = self._param_tensors()
        if self.seen is not None:
            logits_BV = penalize(logits_BV, self.seen, penalty)
        if self._bias is not None:
            logits_BV = logits_BV.float() + self._bias
        args = (logits_BV, temp, top_k, top_p, self._noise(range(len(self.rows)), logits_BV.shape[-1]), self._filters)
        tok = self._compiled("select", *args)
        return select(*args) if tok is None else tok

    def _compiled(self, method: str, *args):
        """self.compiled.<method>(*args), its compile time counted; None without a compiled decoder, or when
        the graph failed to compile (the batch then decodes eagerly)."""
        if self.compiled is None:
            return None
        before = self.compiled.compile_seconds
        try:
            out = getattr(self.compiled, method)(*args)
        except CompileFailed as e:
            warnings.warn(f"{e}; decoding eagerly", stacklevel=3)
            self.compiled = None
            return None
        self.stats.compile_seconds += self.compiled.compile_seconds - before
        return out

    def _rebuild_seen(self):
        self.seen = torch.zeros(len(self.rows), self.vocab_size, dtype=torch.bool, device=self.device)
        for b, r in enumerate(self.rows):
            self.seen[b, torch.tensor(r.prompt + r.tokens, device=self.device)] = True

    def _logprobs(self, logits_BV, tokens_B) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """log p of each row's token under the model at its temperature, and the rows' top_logprobs."""
        temp = self._param_tensors()[0]
        logp = (logits_BV.float() / torch.where(temp == 0, 1.0, temp)[:, None]).log_softmax(-1)
        chosen = logp.gather(1, tokens_B[:, None])[:, 0].tolist()
        k = max(r.params.top_logprobs for r in self.rows)
        if not k:
            return chosen, None
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Advance every row by one forward; returns one Delta per row (and per finished add)."""
        deltas, self._pending = self._pending, []
        if not self.rows:
            return deltas
        B, T, S = len(self.rows), self.cache.length, 2 if self.speculative else 1
        ids = torch.stack([self.last, self.draft], 1) if self.speculative else self.last[:, None]
        self.cache.reserve(T + S)
        mask = torch.cat([self.mask, self.mask.new_ones(B, S)], 1)
        positions = self.pos[:, None] + torch.arange(S, device=self.device)
        out = None
        if B <= CompiledDecoder.max_batch and (got := self._compiled("forward", self.cache, ids, positions, mask)):
            out = SimpleNamespace(logits=got[0], hidden_states=got[1])
        if out is None:
            out = self.model(ids, attention_mask=None if self._dense else mask, position_ids=positions,
                             cache=self.cache, logits_to_keep=S)
        self.stats.forwards += 1
        self.stats.row_steps += B
        self.mask = mask
        if self.speculative:
            deltas += self._verify(out, T)
            self._trim()
            return deltas
        logits = out.logits[:, -1]
        *_, any_penalty, any_logprobs, all_greedy = self._param_tensors()
        tok = logits.argmax(-1) if all_greedy and not any_penalty else self._sample(logits)
        lp, top = self._logprobs(logits, tok) if any_logprobs else (None, None)
        self.pos, self.last = self.pos + 1, tok
        toks = tok.tolist()
        deltas += [self._emit(b, [toks[b]], lp and [lp[b]], top and [top[b]]) for b in range(B)]
        self._finish_rows()
        self._trim()
        return deltas

    def _verify(self, out, T: int) -> list[Delta]:
        B, dev = len(self.rows), self.device
        l0, l1 = out.logits[:, 0], out.logits[:, 1]
        rows = range(B)
        *_, any_penalty, any_logprobs, all_greedy = self._param_tensors()
        if all_greedy and not any_penalty:  # the rule below reduces to this (p and q one-hot)
            target = l0.argmax(-1)
            accept = target == self.draft
            first, second = target, l1.argmax(-1)
        else:
            p0 = self._distributions(l0, rows)
            d = self.draft[:, None]
            ratio = (p0.gather(1, d) / self.q.gather(1, d))[:, 0]
            gens = [r.generator for r in self.rows]
            greedy = torch.tensor([r.params.temperature == 0 for r in self.rows], device=dev)
            accept = torch.where(greedy, ratio >= 1, uniform(gens, dev) < ratio)
            residual = (p0 - self.q).clamp_min(0)
            total = residual.sum(-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p0)
            first = torch.where(accept, self.draft, self._draw(residual, rows))
            seen1 = None
            if self.seen is not None:
                seen1 = self.seen.clone()
                seen1[torch.arange(B, device=dev), self.draft] = True
            second = self._draw(self._distributions(l1, rows, seen1), rows)
        lp0, top0 = self._logprobs(l0, first) if any_logprobs else (None, None)
        lp1, top1 = self._logprobs(l1, second) if any_logprobs else (None, None)
        self.stats.drafted += B
        self.stats.accepted += int(accept.sum())
        acc, f, s = accept.tolist(), first.tolist(), second.tolist()
        n = [2 if a else 1 for a in acc]
        deltas = [self._emit(b, [f[b], s[b]][:n[b]], lp0 and [lp0[b], lp1[b]][:n[b]],
                             top0 and [top0[b], top1[b]][:n[b]]) for b in range(B)]
        pos0 = self.pos
        self.pos = self.pos + 1 + accept.long()
        self.last = torch.where(accept, second, first)
        keep = self._finish_rows(extra=(out.hidden_states, first, second, accept, pos0))
        if keep is None:
            return deltas
        hidden, first, second, accept, pos0 = keep
        if not bool(accept.any()):  # every row rejected its draft: roll the cache back one slot
            self.cache.length = T + 1
            self.mask = self.mask[:, : T + 1]
        elif not bool(accept.all()):  # rows that rejected keep a masked hole in the draft's slot
            self.mask[:, T + 1] = accept
            self._dense = False
        # draft the next token: MTP input at slot i is (h_i, the token after i)
        S = self.cache.length - T
        nxt = torch.stack([first, second], 1)[:, :S]
        positions = pos0[:, None] + torch.arange(S, device=dev)
        # each row drafts from its last accepted slot: the last one unless it rejected (then the first)
        keep = 1 if S == 1 or bool(accept.all()) else 2
        logits = None
        if len(self.rows) <= CompiledDecoder.max_batch:
            logits = self._compiled("draft", self.cache, hidden[:, :S], nxt, positions, self.mask, T, keep)
        if logits is None:
            logits, _ = self.model.mtp_forward(hidden[:, :S], nxt, None if self._dense else self.mask, positions,
                                               self.cache, start=T, logits_to_keep=keep)
        lq = logits[:, -1] if keep == 1 else logits[torch.arange(len(self.rows), device=dev), accept.long()]
        if self._param_tensors()[-1] and not self._param_tensors()[4]:
            self.draft = lq.argmax(-1)  # greedy drafts: q is one-hot on them
            self.q = torch.zeros(lq.shape, device=dev).scatter_(1, self.draft[:, None], 1.0)
        else:
            self.q = self._distributions(lq, range(len(self.rows)))
            self.draft = self._draw(self.q, range(len(self.rows)))
        return deltas

    def _emit(self, b: int, tokens: list[int], logprobs: list[float] | None, top: list | None = None) -> Delta:
        row, kept = self.rows[b], []
        for t in tokens:
            kept.append(t)
            row.tokens.append(t)
            if t in row.stop:
                row.finish_reason = "stop"
            elif row.text is not None and row.text.push(t):
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.params.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason:
                break
        if self.seen is not None:
            self.seen[b, torch.tensor(kept, device=self.device)] = True
        if not row.params.logprobs:
            logprobs = None
        top = [t[:row.params.top_logprobs] for t in top[:len(kept)]] if top and row.params.top_logprobs else None
        self.stats.tokens += len(kept)
        text = ""
        if row.text is not None:
            if row.finish_reason:
                row.text.flush()
            text = row.text.release(final=row.finish_reason is not None)
        return Delta(row.key, kept, text, logprobs[:len(kept)] if logprobs is not None else None, top,
                     row.finish_reason)

    def _finish_rows(self, extra=None):
        """Drop finished rows (and the same rows of `extra` tensors); returns the kept `extra`."""
        idx = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        if not idx:
            self._keep(idx)
            return None
        if extra is not None and len(idx) < len(self.rows):
            t = torch.tensor(idx, device=self.device)
            extra = tuple(x[t] for x in extra)
        self._keep(idx)
        return extra


def _pad_left(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], n), mask], 1) if n else mask


class Engine:
    """Batched generation for a model (and optionally its tokenizer, for text and stop strings).

    `stream` yields, after every forward, the list of `Delta`s of the rows that advanced; `generate`
    collects them into `Completion`s. `new_batch()` gives a `Batch` to drive directly (the server
    adds requests to it while it runs). `stats` holds the last call's `DecodeStats`.

    `compile`: run the decode forwards as compiled graphs (`nanoseek.infer.compiled`: the same tokens, about
    2x the tokens/s on CPU, after a compile per batch bucket); "auto" where that pays (`compile_pays`),
    False for eager.
    """

    def __init__(self, model, tokenizer=None, *, speculative: bool = False, cache_dtype: torch.dtype | None = None,
                 compile: bool | str = "auto"):
        self.model, self.tokenizer, self.speculative, self.cache_dtype = model, tokenizer, speculative, cache_dtype
        fastpath.enable(model)  # (in place: the same parameters, decoded faster)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self.compile = compile_pays(model) if compile == "auto" else compile and CompiledDecoder.available()
        self.stats = DecodeStats()

    def new_batch(self) -> Batch:
        return Batch(self.model, self.tokenizer, speculative=self.speculative, cache_dtype=self.cache_dtype,
                     compile=self.compile)

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
               **kwargs) -> Iterator[list[Delta]]:
        """Yield each step's deltas; keys are prompt indices. `params` is one SamplingParams for all
        prompts (its seed seeds one generator shared by the batch) or one per prompt; or pass the
        SamplingParams fields as keyword arguments."""
        if not prompts:
            raise ValueError("generation needs at least one prompt")
        if params is None:
            params = SamplingParams(**kwargs)
        elif kwargs:
            raise ValueError("pass either params or sampling keyword arguments, not both")
        generators = None
        if isinstance(params, SamplingParams) and params.seed is not None:
            dev = next(self.model.parameters()).device
            generators = [torch.Generator(device=dev).manual_seed(params.validate().seed)] * len(prompts)
        batch = self.new_batch()
        was_training = self.model.training
        self.model.eval()
        try:
            batch.add(prompts, params, keys=range(len(prompts)), generators=generators)
            while batch:
                yield batch.step()
        finally:
            self.stats = batch.stats
            self.model.train(was_training)

    @torch.inference_mode()
    def score(self, prompt: Sequence[int], top: int = 0) -> tuple[list[float | None], list[list[tuple[int, float]]] | None]:
        """The log-probability of each prompt token given the ones before it (None for the first, which
        has no context), and with `top` the `top` most likely tokens and their log p at each position
        (None first): what OpenAI's `echo` with `logprobs` returns, and loglikelihood evaluation needs."""
        if not prompt:
            raise ValueError("scoring needs at least one token")
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.tensor([list(prompt)], device=next(self.model.parameters()).device)
            logp = self.model(ids).logits[0, :-1].float().log_softmax(-1)
        finally:
            self.model.train(was_training)
        chosen = [None, *logp.gather(1, ids[0, 1:, None])[:, 0].tolist()]
        if not top:
            return chosen, None
        values, idx = logp.topk(min(top, logp.shape[-1]), dim=-1)
        return chosen, [None, *(list(zip(i, v)) for i, v in zip(idx.tolist(), values.tolist()))]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **kwargs) -> list[Completion]:
        tokens: list[list[int]] = [[] for _ in prompts]
        texts, logprobs, tops = [""] * len(prompts), [None] * len(prompts), [None] * len(prompts)
        finish = ["length"] * len(prompts)
        for deltas in self.stream(prompts, params, **kwargs):
            for d in deltas:
                tokens[d.key] += d.tokens
                texts[d.key] += d.text
                if d.logprobs is not None:
                    logprobs[d.key] = (logprobs[d.key] or []) + d.logprobs
                if d.top_logprobs is not None:
                    tops[d.key] = (tops[d.key] or []) + d.top_logprobs
                if d.finish_reason:
                    finish[d.key] = d.finish_reason
        return [Completion(*c) for c in zip(tokens, texts, finish, map(len, prompts), logprobs, tops)]
