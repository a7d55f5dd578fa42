"""FLOPs/params counts and scaling-law fits (DeepSeek LLM §3) against closed-form and published numbers."""

from dataclasses import asdict, dataclass, replace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek

from nanoseek.scaling import (
    count_params,
    deepseek_llm_flops_per_token,
    deepseek_llm_param_counts,
    fit_isoflop,
    fit_power_law,
    optimal_batch_size,
    optimal_data_scale,
    optimal_learning_rate,
    optimal_model_scale,
    training_flops_per_token,
)

V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
          num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
          n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, kv_lora_rank=512,
          q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
          num_nextn_predict_layers=1, routed_scaling_factor=2.5, n_group=8, topk_group=4)
V2 = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
          num_hidden_layers=60, num_attention_heads=128, n_shared_experts=2, n_routed_experts=160,
          num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=1536,
          qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128)
V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
               num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
               qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128)
# REFERENCE.md's tiny parity config (HF names).
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2,
            first_k_dense_replace=1, rope_parameters={"rope_type": "yarn"})


def test_deepseek_llm_paper_example():
    """DeepSeek LLM §3.2: 24 layers, d 2048, vocab 102400, seq 4096 → N1 1.21B, N2 1.42B, M 9.66B."""
    n1, n2 = deepseek_llm_param_counts(n_layer=24, d_model=2048, vocab_size=102400)
    m = deepseek_llm_flops_per_token(n_layer=24, d_model=2048, seq_len=4096)
    assert round(n1 / 1e9, 2) == 1.21 and round(n2 / 1e9, 2) == 1.42 and round(m / 1e9, 2) == 9.66
    assert m == 72 * 24 * 2048**2 + 12 * 24 * 2048 * 4096
    # the paper's point: 6·N1 and 6·N2 mis-state M at this scale by −25% and −12%
    assert 6 * n1 / m == pytest.approx(0.75, abs=0.01) and 6 * n2 / m == pytest.approx(0.88, abs=0.01)


def test_dense_mha_with_swiglu_8_3_reproduces_m_exactly():
    d, layers, seq, vocab = 3072, 10, 4096, 102400
    cfg = dict(attention_type="mha", hidden_size=d, num_hidden_layers=layers, num_attention_heads=24,
               head_dim=128, intermediate_size=8 * d // 3, vocab_size=vocab, n_routed_experts=None)
    f = training_flops_per_token(seq, **cfg)
    assert f.non_embedding == deepseek_llm_flops_per_token(layers, d, seq)
    assert f.router == 0 and f.mtp == 0 and f.lm_head == 6 * d * vocab
    assert f.total == f.non_embedding + f.lm_head


def test_tiny_mla_moe_flops_counted_by_hand():
    # multiply-adds per token per layer (D 64, H 4, nope 16, rope 16, v 16, q_lora 48, kv_lora 32):
    attn = 64 * 48 + 48 * 4 * 32 + 64 * (32 + 16) + 32 * 4 * (16 + 16) + 4 * 16 * 64  # 20480
    scores = 4 * (32 + 16) * 40  # q·k over 32 dims and p·v over 16, 40 keys
    dense = 3 * 64 * 128  # layer 0
    moe = (2 + 1) * 3 * 64 * 32  # 2 routed + 1 shared expert, layers 1 and 2
    router = 64 * 8
    f = training_flops_per_token(40, **TINY)
    assert f.attention_proj == 6 * 3 * attn == 6 * 3 * 20480
    assert f.attention_scores == 6 * 3 * scores
    assert f.mlp == 6 * (dense + 2 * moe)
    assert f.router == 6 * 2 * router
    assert f.lm_head == 6 * 64 * 256 and f.mtp == 0
    assert f.total == 6 * 163328


def test_mtp_adds_eh_proj_a_layer_and_a_head():
    base = training_flops_per_token(40, **TINY)
    with_mtp = training_flops_per_token(40, **TINY, num_nextn_predict_layers=2)
    layer = 6 * (20480 + 4 * 48 * 40 + 3 * 3 * 64 * 32 + 64 * 8)  # an MoE decoder layer
    assert with_mtp.mtp == 2 * (6 * 2 * 64 * 64 + layer + base.lm_head)
    assert with_mtp.non_embedding == base.non_embedding


def test_attention_variants_and_moe_layer_freq():
    dense = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, head_dim=64,
                 intermediate_size=1365, vocab_size=1000)
    mha = training_flops_per_token(128, attention_type="mha", **dense)
    gqa = training_flops_per_token(128, attention_type="gqa", num_key_value_heads=2, **dense)
    mqa = training_flops_per_token(128, attention_type="mqa", num_key_value_heads=8, **dense)
    assert mha.attention_proj - gqa.attention_proj == 6 * 4 * 2 * 512 * (8 - 2) * 64
    assert mha.attention_proj - mqa.attention_proj == 6 * 4 * 2 * 512 * (8 - 1) * 64
    assert mha.attention_scores == gqa.attention_scores == mqa.attention_scores  # K/V are shared, not removed
    moe = dict(dense, attention_type="mha", n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=64)
    every_other = training_flops_per_token(128, moe_layer_freq=2, **moe)
    assert every_other.router == 6 * 2 * 512 * 4  # layers 0 and 2


@pytest.mark.parametrize(
    "cfg, total_b, activated_b",
    [(V3, 671, 37), (V2, 236, 21), (V2_LITE, 15.7, 2.4)],
    ids=["v3", "v2", "v2-lite"],
)
def test_param_counts_match_papers(cfg, total_b, activated_b):
    p = count_params(**cfg)
    assert p.total / 1e9 == pytest.approx(total_b, rel=0.005)
    assert p.activated / 1e9 == pytest.approx(activated_b, rel=0.03)
    assert p.embedding == cfg["vocab_size"] * cfg["hidden_size"]


def test_moe_flops_are_six_times_activated_matmul_params_plus_scores():
    """Independent cross-check of the two counters on V3: only norms separate them."""
    seq = 4096
    f = training_flops_per_token(seq, **dict(V3, num_nextn_predict_layers=0))
    p = count_params(**V3)
    norms = 61 * (2 * 7168 + 1536 + 512) + 7168
    assert f.total - f.attention_scores == 6 * (p.activated - norms)
    assert f.attention_scores == 6 * 61 * 128 * (192 + 128) * seq
    # at 4K context the score term is ~22% of the total, which the 6·N rule (here 220 GFLOPs) misses
    assert f.attention_scores / f.total == pytest.approx(0.22, abs=0.01)


def test_accepts_dataclass_fields_and_names_missing_ones():
    @dataclass
    class Cfg:  # stands in for the lead's ModelConfig: extra fields are ignored
        hidden_size: int = 64
        num_hidden_layers: int = 3
        num_attention_heads: int = 4
        vocab_size: int = 256
        intermediate_size: int = 128
        attention_type: str = "mla"
        q_lora_rank: int | None = 48
        kv_lora_rank: int = 32
        qk_nope_head_dim: int = 16
        qk_rope_head_dim: int = 16
        v_head_dim: int = 16
        n_routed_experts: int = 8
        n_shared_experts: int = 1
        num_experts_per_tok: int = 2
        moe_intermediate_size: int = 32
        first_k_dense_replace: int = 1
        rms_norm_eps: float = 1e-6
        topk_method: str = "noaux_tc"

    assert training_flops_per_token(40, **asdict(Cfg())) == training_flops_per_token(40, **TINY)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        training_flops_per_token(40, **dict(TINY, kv_lora_rank=None))
    with pytest.raises(ValueError, match="attention_type='gqb'"):
        training_flops_per_token(40, **dict(TINY, attention_type="gqb"))
    with pytest.raises(ValueError, match="seq_len"):
        training_flops_per_token(0, **TINY)


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-dense"])
def test_counts_match_the_built_model(preset):
    """Params against numel() and matmul FLOPs against torch's FlopCounterMode on a real forward
    (attention scores excluded: sdpa may not be counted; MTP off: it sees S-1 tokens)."""
    cfg = replace(nanoseek.ModelConfig.preset(preset), num_nextn_predict_layers=0)
    model = nanoseek.DeepSeekForCausalLM(cfg).eval()
    assert count_params(**asdict(cfg)).total == sum(p.numel() for p in model.parameters())
    batch, seq = 2, 48
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (batch, seq)))
    f = training_flops_per_token(seq, **asdict(cfg))
    forward_mm = (f.total - f.attention_scores) // 3 * batch * seq
    flops = counter.get_flop_counts()["Global"]  # routed experts run as grouped matmuls where torch has them
    assert flops[torch.ops.aten.mm] + flops.get(torch.ops.aten._grouped_mm, 0) == forward_mm


def test_paper_hyperparameter_laws_reproduce_deepseek_llm_7b_and_67b():
    """DeepSeek LLM Table 2 set the 7B/67B batch and LR from the fits; recompute them from C = M·D."""
    c7 = deepseek_llm_flops_per_token(30, 4096, 4096) * 2.0e12
    c67 = deepseek_llm_flops_per_token(95, 8192, 4096) * 2.0e12
    assert optimal_learning_rate(c7) == pytest.approx(4.2e-4, rel=0.03)
    assert optimal_batch_size(c7) == pytest.approx(2304 * 4096, rel=0.05)
    assert optimal_learning_rate(c67) == pytest.approx(3.2e-4, rel=0.05)
    assert optimal_batch_size(c67) == pytest.approx(4608 * 4096, rel=0.12)
    # the allocation laws multiply back to C (coefficients 0.1715·5.8316 ≈ 1, exponents sum to 1)
    for c in (1e17, 1e20, 1e24):
        assert optimal_model_scale(c) * optimal_data_scale(c) == pytest.approx(c, rel=1e-3)
    assert optimal_model_scale(1e20) == pytest.approx(0.1715 * 1e20**0.5243)


def test_fit_power_law_recovers_exponents():
    x = np.logspace(17, 21, 9)
    coef, exp = fit_power_law(x, 0.2920 * x**0.3271)
    assert coef == pytest.approx(0.2920, rel=1e-9) and exp == pytest.approx(0.3271, rel=1e-12)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.05, x.size))
    coef, exp = fit_power_law(x, 0.3118 * x**-0.125 * noise)
    assert exp == pytest.approx(-0.125, abs=0.02)
    with pytest.raises(ValueError, match="x must be finite and > 0"):
        fit_power_law([1, -2], [1, 2])
    with pytest.raises(ValueError, match="2 distinct"):
        fit_power_law([3, 3], [1, 2])


def _isoflop_points(a=0.5243, coef=0.1715, curvature=0.02):
    budgets = np.logspace(17, 20, 7)
    cs, ms, ls = [], [], []
    for c in budgets:
        m_star = coef * c**a
        for m in m_star * np.exp(np.linspace(-1.5, 1.0, 6)):  # off-centre on purpose
            cs.append(c)
            ms.append(m)
            ls.append(1.7 + 40 * c**-0.08 + curvature * np.log(m / m_star) ** 2)
    return np.array(cs), np.array(ms), np.array(ls)


def test_isoflop_recovers_synthetic_allocation_exponents():
    fit = fit_isoflop(*_isoflop_points())
    assert fit.model_exp == pytest.approx(0.5243, abs=1e-9) and fit.data_exp == pytest.approx(0.4757, abs=1e-9)
    assert fit.model_coef == pytest.approx(0.1715, rel=1e-6)
    assert fit.data_coef == pytest.approx(1 / 0.1715, rel=1e-6)  # = 5.831, the paper's 5.8316 up to rounding
    assert len(fit.compute) == 7 and all(m * d == pytest.approx(c) for c, m, d in zip(fit.compute, fit.model_opt, fit.data_opt))
    assert fit.loss_opt[0] == pytest.approx(1.7 + 40 * 1e17**-0.08)


def test_isoflop_rejects_unbracketed_or_thin_budgets():
    cs, ms, ls = _isoflop_points(curvature=-0.02)
    with pytest.raises(ValueError, match="not convex"):
        fit_isoflop(cs, ms, ls)
    cs, ms, ls = _isoflop_points()
    with pytest.raises(ValueError, match="need >= 3"):
        fit_isoflop(cs[4:], ms[4:], ls[4:])  # first budget keeps 2 scales
    with pytest.raises(ValueError, match="2 distinct compute budgets"):
        fit_isoflop(cs[:6], ms[:6], ls[:6])
    with pytest.raises(ValueError, match="same length"):
        fit_isoflop(cs, ms, ls[:-1])
