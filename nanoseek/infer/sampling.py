"""Next-token selection: greedy, temperature, top-k, top-p (nucleus) and repetition penalty.

`distributions` turns a batch of logits into the distributions actually sampled from, each row with
its own settings; speculative decoding needs these as tensors (it compares target and draft
probabilities), ordinary decoding just draws from them.

A draw is argmax(p / e) with e ~ Exp(1) drawn from the row's generator: what `torch.multinomial(p, 1)`
computes on CPU (the same draws, so the same tokens for the same seed), split so that the draws come from
the generators eagerly and everything after them is plain tensor math a compiled graph can hold (`select`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class SamplingParams:
    """How one sequence is continued (every field may differ between the rows of a batch)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style: logits of tokens already in the prompt or the output are divided (if > 0) or
    multiplied (if < 0) by it (1 = off)."""
    stop_tokens: Sequence[int] | None = None
    """Token ids that end the sequence and are kept in the output; None = the model's eos."""
    stop_strings: Sequence[str] = ()
    """Texts that end the sequence once decoded (needs a tokenizer); cut from the returned text."""
    seed: int | None = None
    """Seeds this row's own random generator (None = torch's global generator)."""
    logprobs: bool = False
    """Also return log p(token) under the model at this temperature (before top-k/top-p, penalty and bias)."""
    top_logprobs: int = 0
    """With logprobs, also return the k most likely tokens and their log p at each step."""
    logit_bias: Mapping[int, float] | None = None
    """Token id -> value added to its logit before selection (OpenAI's logit_bias; -100 bans, +100 forces)."""

    def validate(self) -> "SamplingParams":
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("stop_strings", all(isinstance(s, str) and s for s in self.stop_strings), "non-empty strings"),
            ("top_logprobs", isinstance(self.top_logprobs, int) and self.top_logprobs >= 0
             and (self.logprobs or not self.top_logprobs), "an integer >= 0, and > 0 only with logprobs"),
            ("logit_bias", self.logit_bias is None or all(
                isinstance(t, int) and t >= 0 and _finite(v) for t, v in self.logit_bias.items()),
             "a mapping of token ids to finite numbers"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: must be {allowed}")
        return self


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BT: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present: positive logits / p, negative logits * p."""
    if penalty == 1.0:
        return logits_BV
    picked = logits_BV.gather(1, seen_BT)
    return logits_BV.scatter(1, seen_BT, torch.where(picked > 0, picked / penalty, picked * penalty))


def penalize(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty_B: torch.Tensor) -> torch.Tensor:
    """The same penalty with a per-row factor and a [B, V] mask of the tokens seen so far."""
    p = penalty_B[:, None].to(logits_BV.dtype)
    return torch.where(seen_BV, torch.where(logits_BV > 0, logits_BV / p, logits_BV * p), logits_BV)


class Filters(NamedTuple):
    """Which steps of `distributions` a batch's rows need, known from their parameters without a sync."""

    top_k: int
    """How many top logits the top-k step ranks: 0 when no row has top_k, else the largest k a row uses
    (the vocabulary for a row without top_k)."""
    top_p: bool
    """Some row has top_p < 1."""
    greedy: bool
    """Some row has temperature 0."""

    @staticmethod
    def of(params: Sequence[SamplingParams], vocab_size: int) -> Filters:
        ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
        return Filters(max(ks) if any(p.top_k > 0 for p in params) else 0, any(p.top_p < 1 for p in params),
                       any(p.temperature == 0 for p in params))


def distributions(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor, filters: Filters | None = None) -> torch.Tensor:
    """Per-row sampling distributions [B, V] (fp32); greedy rows (temperature 0) are one-hot. `filters`
    (these rows' `Filters`) says which steps to take; None reads it from the tensors (a sync each, which a
    compiled graph cannot have)."""
    logits = logits_BV.float()
    greedy = temperature_B == 0
    scaled = logits / torch.where(greedy, 1.0, temperature_B.float())[:, None]
    V = logits.shape[-1]
    if filters is None:
        k = torch.where(top_k_B > 0, top_k_B.clamp(max=V), V)
        filters = Filters(int(k.max()) if bool((top_k_B > 0).any()) else 0, bool((top_p_B < 1).any()),
                          bool(greedy.any()))
    if filters.top_k:
        k = torch.where(top_k_B > 0, top_k_B.clamp(max=V), V)
        kth = scaled.topk(filters.top_k, dim=-1).values.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if filters.top_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p_B[:, None]  # keep the smallest prefix whose mass reaches top_p
        scaled = scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(-1)
    if filters.greedy:
        one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def select(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor,
           noise_BV: torch.Tensor, filters: Filters | None = None) -> torch.Tensor:
    """One token per row [B]: its distribution's sample under `noise` (`exponential` draws; ones on greedy
    rows, whose distribution is one-hot). No sync and no generator: a compiled decoder compiles it."""
    return (distributions(logits_BV, temperature_B, top_k_B, top_p_B, filters) / noise_BV).argmax(-1)


def exponential(generators: Sequence[torch.Generator | None], n: int, device) -> torch.Tensor:
    """Exp(1) draws [B, n], row i's from generators[i]; rows sharing a generator draw together, in row order,
    as `torch.multinomial(probs[rows], 1, generator=gen)` does, so argmax(probs / draws) is its sample."""
    if all(g is generators[0] for g in generators):  # (one generator: no regrouping)
        return torch.empty(len(generators), n, device=device).exponential_(generator=generators[0])
    out = torch.empty(len(generators), n, device=device)
    for gen, rows in _group(generators, device):
        out[rows] = torch.empty(len(rows), n, device=device).exponential_(generator=gen)
    return out


def uniform(generators: Sequence[torch.Generator | None], device) -> torch.Tensor:
    """One U[0, 1) draw per row [B], from each row's generator."""
    out = torch.empty(len(generators), device=device)
    for gen, rows in _group(generators, device):
        out[rows] = torch.rand(len(rows), generator=gen, device=device)
    return out


def _group(generators, device):
    groups: dict[int, tuple] = {}
    for i, g in enumerate(generators):
        groups.setdefault(id(g), (g, []))[1].append(i)
    for gen, rows in groups.values():
        yield gen, torch.tensor(rows, device=device)


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row [B] with the same settings for every row; temperature 0 is greedy."""
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p).validate()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    B, dev = logits_BV.shape[0], logits_BV.device
    probs = distributions(logits_BV, torch.full((B,), float(temperature), device=dev),
                          torch.full((B,), top_k, device=dev), torch.full((B,), float(top_p), device=dev))
    return (probs / exponential([generator] * B, probs.shape[1], dev)).argmax(-1)
