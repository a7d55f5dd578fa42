"""Parallelism applied to a built model: expert parallelism (`expert`)."""
