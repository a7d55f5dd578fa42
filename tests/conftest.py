import os

import pytest
import torch

from nanoseek.data import train_tokenizer

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # pytest -n 2 runs two workers on two cores
# compiled decoding only where a test asks for it (compile=True): a compile costs 10-80 s (subprocesses inherit it)
os.environ.setdefault("NANOSEEK_COMPILE", "0")

# The parity config of REFERENCE.md: YaRN (40 tokens > 32 original), groups, bias, query compression.
TINY_V3_HF = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
    "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48,
    "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_nope_head_dim": 16, "n_group": 4, "topk_group": 2,
    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": True, "max_position_embeddings": 128,
    "rope_interleave": True, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                        "mscale": 1.0, "mscale_all_dim": 1.0},
}
# V2 style: softmax, no query compression, group_limited_greedy, mscale != 1.
TINY_V2_HF = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 2,
    "n_routed_experts": 8, "routed_scaling_factor": 1.0, "kv_lora_rank": 32, "q_lora_rank": None,
    "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_nope_head_dim": 16, "n_group": 4, "topk_group": 2,
    "topk_method": "group_limited_greedy", "num_experts_per_tok": 3, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "max_position_embeddings": 128, "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rope_theta": 10000.0,
}


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small byte-level BPE (512 tokens) trained on Python's own sources, one per test module."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(["stdlib"], 512, out, max_bytes=300_000, progress=False)
    return out
