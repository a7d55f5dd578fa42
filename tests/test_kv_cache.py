"""KV cache sizes against the closed forms of DeepSeek-V2 §2.1.4 / Table 1, and cache surgery."""
import pytest
import torch

import nanoseek
from nanoseek.infer.cache import KVCache, cache_elements_per_token, mha_elements_per_token
from nanoseek.model.attention import MLA
from nanoseek.model.rope import RotaryEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_cache_is_latent_plus_rope_key(seed, dtype):
    cfg = nanoseek.ModelConfig.preset("tiny-v3")
    model = nanoseek.DeepSeekForCausalLM(cfg).eval()
    cache = KVCache(cfg.num_hidden_layers, batch_size=2, max_len=16, dtype=dtype)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 8)), cache=cache)
    size = dtype.itemsize
    per_layer = cache.bytes_per_token_per_layer()
    assert per_layer == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size  # (d_c + d_h^R) values
    assert cache.nbytes() == per_layer * cfg.num_hidden_layers * 2 * 16
    assert per_layer * cfg.num_hidden_layers == cache_elements_per_token(cfg) * size
    mha = mha_elements_per_token(cfg) * size  # 2·n_h·d_h·l
    assert per_layer * cfg.num_hidden_layers / mha == pytest.approx(48 / 128)  # tiny: 32+16 vs 2·4·16


def test_gqa_cache_holds_k_and_v_per_kv_head(seed):
    cfg = nanoseek.ModelConfig.preset("tiny-dense")
    model = nanoseek.DeepSeekForCausalLM(cfg).eval()
    cache = KVCache(cfg.num_hidden_layers, batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 4)), cache=cache)
    assert cache.bytes_per_token_per_layer() == 2 * cfg.num_key_value_heads * cfg.attn_head_dim * 4
    assert cache_elements_per_token(cfg) / mha_elements_per_token(cfg) == cfg.num_key_value_heads / cfg.num_attention_heads


def test_deepseek_v2_cache_reduction():
    """DeepSeek-V2's shapes, measured on one real MLA layer run on the meta device (no memory used)."""
    cfg = nanoseek.ModelConfig.preset("deepseek-v2-lite").replace(q_lora_rank=1536, num_attention_heads=128,
                                                                  hidden_size=5120, num_hidden_layers=60)
    with torch.device("meta"):
        attn = MLA(cfg, layer_idx=0).to(torch.bfloat16)
        cache = KVCache(1, batch_size=1, max_len=4)
        rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)(torch.zeros(1, 1, dtype=torch.long))
        attn(torch.zeros(1, 1, cfg.hidden_size, dtype=torch.bfloat16), rope, cache=cache)
    assert cache.bytes_per_token_per_layer() == (512 + 64) * 2
    assert (512 + 64) / 128 == 4.5  # Table 1: MLA ≈ 4.5·d_h·l
    mla, mha = cache_elements_per_token(cfg), mha_elements_per_token(cfg)
    assert (mla, mha) == (576 * 60, 2 * 128 * 128 * 60)
    assert 1 - mla / mha == pytest.approx(0.9824, abs=1e-4)  # vs an MHA cache of the same model: -98.2%
    # The paper's "-93.3% KV cache" compares deployed DeepSeek-V2 (KV elements quantized to ~6 bits on
    # average, §3.2.3) with DeepSeek 67B (GQA, 8 K/V heads of 128, 95 layers, 16-bit).
    llm67 = nanoseek.ModelConfig.preset("deepseek-llm-67b")
    bits_v2, bits_67b = mla * 6, cache_elements_per_token(llm67) * 16
    assert 1 - bits_v2 / bits_67b == pytest.approx(0.933, abs=5e-4)


def test_cache_surgery_shift_select_cat():
    def filled(B, T, fill):
        c = KVCache(2, B, T + 2)
        for layer in range(2):
            c.update(layer, 0, torch.full((B, T, 3), float(fill)) + torch.arange(T)[None, :, None])
        c.length = T
        return c

    a, b = filled(2, 3, 10), filled(1, 5, 20)
    a.shift(2)  # left-pad to length 5
    assert a.length == 5 and a.buffers[0][0][:, :2].eq(0).all() and a.buffers[0][0][0, 2:5, 0].tolist() == [10, 11, 12]
    c = KVCache.cat([a, b], max_len=9)
    assert c.batch_size == 3 and c.max_len == 9 and c.length == 5
    assert c.buffers[1][0][2, :5, 0].tolist() == [20, 21, 22, 23, 24]
    c.select(torch.tensor([2, 0]))
    assert c.batch_size == 2 and c.buffers[0][0][1, 2:5, 0].tolist() == [10, 11, 12]
    c.shift(-2)
    assert c.length == 3 and c.buffers[0][0][0, :3, 0].tolist() == [22, 23, 24]
    c.reserve(100)
    assert c.max_len >= 100 and c.buffers[0][0][1, :3, 0].tolist() == [10, 11, 12]
    with pytest.raises(ValueError, match="same length"):
        KVCache.cat([filled(1, 2, 0), filled(1, 3, 0)])
