"""Next-token selection: greedy, temperature, top-k, top-p (nucleus) and repetition penalty."""
from __future__ import annotations

import torch


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BT: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present: positive logits / p, negative logits * p."""
    if penalty == 1.0:
        return logits_BV
    picked = logits_BV.gather(1, seen_BT)
    return logits_BV.scatter(1, seen_BT, torch.where(picked > 0, picked / penalty, picked * penalty))


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row [B]; temperature 0 is greedy."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling parameters: temperature={temperature} (>= 0), top_p={top_p} "
                         f"(in (0, 1]), top_k={top_k} (>= 0)")
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
