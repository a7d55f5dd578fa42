"""The DeepSeek model family as the papers write it: MLA / MHA / GQA attention, DeepSeekMoE (router,
token dispatcher, experts, balance losses, token dropping), MTP, RoPE + YaRN. Hardware fast paths
with the same numbers live apart, in `nanoseek.fastpath`."""
from nanoseek.model.transformer import DeepSeekForCausalLM, ModelOutput

__all__ = ["DeepSeekForCausalLM", "ModelOutput"]
