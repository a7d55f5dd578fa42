"""The DeepSeek model family: MLA / MHA / GQA attention, DeepSeekMoE, MTP, RoPE + YaRN."""
from nanoseek.model.transformer import DeepSeekForCausalLM, ModelOutput

__all__ = ["DeepSeekForCausalLM", "ModelOutput"]
