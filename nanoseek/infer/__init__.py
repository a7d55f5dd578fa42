"""Inference: KV caches, sampling, batched generation."""
