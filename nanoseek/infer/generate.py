"""`nanoseek.generate`: batched generation in one call (a thin layer over `nanoseek.infer.engine`), and
`sample_completions`, the texts of it that evaluation and post-training score.

Prompts of different lengths are left-padded and prefilled in one forward, then decoded one token
per step over the KV cache (MLA attends over its latent cache, absorbed), or up to two per step
with MTP speculative decoding.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.utils import progress_bar


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop_tokens: Sequence[int] | None = None, pad_id: int | None = None, *,
             stop_strings: Sequence[str] = (), tokenizer=None, speculative: bool = False,
             compile: bool | str = "auto") -> list[list[int]]:
    """New token ids for each prompt. A stop token (default: the model's eos) ends its row and is kept;
    a stop string (needs `tokenizer`) ends its row after the token that completes it. `seed` seeds
    one generator for the whole batch. `speculative` drafts with the model's MTP module (same
    output: greedy tokens are identical, sampled ones have the same distribution).
    `pad_id` is accepted for compatibility: padding is masked, so its value never matters. `compile`: as
    `Engine`'s (compiled decode forwards; the same tokens).
    For text, log-probs (GRPO's sampling log-probs), streaming or statistics use `nanoseek.infer.Engine`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop_tokens=stop_tokens,
                            stop_strings=tuple(stop_strings))
    engine = Engine(model, tokenizer, speculative=speculative, compile=compile)
    return [c.tokens for c in engine.generate(prompts, params)]


@dataclass
class Sample:
    """One sampled completion: token ids (with the EOS when it stopped), its text (without EOS)."""

    tokens: list[int]
    text: str
    stopped: bool

    @property
    def truncated(self) -> bool:
        return not self.stopped


def sample_completions(model, tok, prompts: Sequence[str] | Sequence[list[int]], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                       batch_size: int = 256, progress: str | None = None,
                       compile: bool | str = "auto") -> list[Sample]:
    """One completion per prompt, in batches of `batch_size` (batch i seeded with seed + i).

    Prompts are texts (encoded with BOS) or token ids; generation stops at EOS. `progress` names a progress bar
    over the prompts (None: none)."""
    out: list[Sample] = []
    with progress_bar(progress is not None, total=len(prompts), desc=progress, unit="sample") as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = [tok.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in prompts[i:i + batch_size]]
            new = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=None if seed is None else seed + i, stop_tokens=[tok.eos_id], pad_id=tok.pad_id,
                           compile=compile)
            for ids in new:
                stopped = bool(ids) and ids[-1] == tok.eos_id
                out.append(Sample(list(ids), tok.decode(ids[:-1] if stopped else ids), stopped))
            bar.update(len(chunk))
    return out
