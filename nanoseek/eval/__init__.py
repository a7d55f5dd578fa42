"""Evaluation: perplexity / bits per byte, task accuracy, pass@k, cons@k."""
