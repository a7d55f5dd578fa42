"""Inference: KV caches, sampling, the batched engine (streaming, continuous batching, MTP speculative
decoding), chat, and the OpenAI-compatible server (`nanoseek.infer.server`, needs FastAPI + uvicorn); their
commands (`generate`, `chat`, `serve`) are in `nanoseek.infer.cli`."""
from nanoseek.infer.cache import KVCache
from nanoseek.infer.engine import Batch, Completion, DecodeStats, Delta, Engine
from nanoseek.infer.generate import generate
from nanoseek.infer.sampling import SamplingParams

__all__ = ["Batch", "Completion", "DecodeStats", "Delta", "Engine", "KVCache", "SamplingParams", "generate"]
