"""Batched generation over the KV cache: prompts of different lengths are left-padded, prefilled in
one forward, then decoded one token per step (MLA decodes over its latent cache, absorbed)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoseek.infer.cache import KVCache
from nanoseek.infer.sampling import apply_repetition_penalty, sample


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop_tokens: Sequence[int] | None = None, pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (a stop token, default the model's eos, ends a row and is kept)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cfg, device = model.config, next(model.parameters()).device
    vocab = cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if stop_tokens is None:
        eos = cfg.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    B, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(list(p), device=device)
        mask[b, longest - len(p):] = 1
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(cfg.num_hidden_layers, B, longest + max_new_tokens)
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    seen, out = ids, []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, attention_mask=mask if padded else None, position_ids=positions, cache=cache,
                       logits_to_keep=1).logits[:, -1]
        for _ in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            token = sample(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            out.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()) or len(out) == max_new_tokens:
                break
            seen = torch.cat([seen, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(token[:, None], attention_mask=mask if padded else None, position_ids=positions,
                           cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
    result = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in set(stop_tokens)), len(row))
        result.append(row[:end])
    return result
