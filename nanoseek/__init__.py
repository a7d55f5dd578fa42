"""nanoseek: the DeepSeek recipe (LLM, V2, V3, R1) as one readable PyTorch codebase."""
import torch

from nanoseek.config import ModelConfig
from nanoseek.model import DeepSeekForCausalLM, ModelOutput

torch.set_flush_denormal(True)  # denormals make fp32 CPU steps ~100x slower

__version__ = "0.1.0"
__all__ = ["ModelConfig", "DeepSeekForCausalLM", "ModelOutput", "load_tokenizer", "generate"]


def __getattr__(name):  # light import: tokenizer and generation load on first use
    if name == "load_tokenizer":
        from nanoseek.data.tokenizer import load_tokenizer
        return load_tokenizer
    if name == "generate":
        from nanoseek.infer.generate import generate
        return generate
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
