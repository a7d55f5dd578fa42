"""nanoseek: the DeepSeek recipe (LLM, V2, V3, R1) as one readable PyTorch codebase."""
import torch

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.infer.generate import generate
from nanoseek.model import DeepSeekForCausalLM, ModelOutput

torch.set_flush_denormal(True)  # denormals make fp32 CPU steps ~100x slower

__version__ = "0.1.0"
__all__ = ["ModelConfig", "DeepSeekForCausalLM", "ModelOutput", "load_tokenizer", "generate"]

