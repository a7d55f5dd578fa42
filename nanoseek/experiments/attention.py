"""`mla`: Multi-head Latent Attention vs MHA, GQA and MQA at matched parameters (DeepSeek-V2 §2.1, App. D).

Four dense models differ only in their attention; each one's SwiGLU width is set so that every model
has the MHA model's parameter count (within a few hundred parameters). The cache column is measured:
the bytes one token occupies in a real bf16 KV cache (`nanoseek.infer.cache.KVCache`) after a forward
of the trained model, summed over layers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.experiments import micro
from nanoseek.experiments.core import Check, Context, Metric, Variant
from nanoseek.experiments.micro import BPB, TRAIN_LOSS, MicroPretraining
from nanoseek.infer.cache import KVCache
from nanoseek.interop.hf import load_pretrained

HEADS, HEAD_DIM, HIDDEN, LAYERS = 8, 16, 128, 2
MHA_FFN = 384  # the MHA model's SwiGLU width; the others get theirs from the parameter match

ATTENTION = {
    "MHA": dict(attention_type="mha", num_key_value_heads=HEADS, head_dim=HEAD_DIM),
    "GQA-2": dict(attention_type="gqa", num_key_value_heads=2, head_dim=HEAD_DIM),
    "MQA": dict(attention_type="mqa", num_key_value_heads=1, head_dim=HEAD_DIM),
    # V2's proportions: d_c = 4·d_h and d_h^R = d_h/2, a cache of (d_c + d_h^R) = 4.5·d_h values per token
    # and layer, GQA with 2.25 groups; queries uncompressed at this width (V2-Lite does the same).
    "MLA": dict(attention_type="mla", kv_lora_rank=4 * HEAD_DIM, qk_rope_head_dim=HEAD_DIM // 2,
                qk_nope_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, q_lora_rank=None),
}


def attention_model(name: str, ffn: int) -> dict:
    """ModelConfig overrides of one variant: a dense 2-layer model (no MoE, no MTP, plain RoPE)."""
    return dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, n_routed_experts=0,
                intermediate_size=ffn, first_k_dense_replace=0, num_nextn_predict_layers=0, rope_scaling=None,
                seq_aux_alpha=0.0, **ATTENTION[name])


def matched_ffn(name: str) -> int:
    """The SwiGLU width that gives variant `name` the MHA model's parameter count (3·hidden per unit/layer)."""
    target = micro.param_counts(micro.model_config(**attention_model("MHA", MHA_FFN)))["params"]
    base = micro.param_counts(micro.model_config(**attention_model(name, MHA_FFN)))["params"]
    return MHA_FFN + round((target - base) / (3 * HIDDEN * LAYERS))


def kv_bytes_per_token(model) -> int:
    """Bytes one token takes in a bf16 KV cache of the model, all layers: measured on a real cache."""
    cache = KVCache(model.config.num_hidden_layers, 1, 8, torch.bfloat16)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]), cache=cache)
    return cache.bytes_per_token_per_layer() * model.config.num_hidden_layers


class MLAExperiment(MicroPretraining):
    name = "mla"
    title = "MLA vs MHA / GQA / MQA at matched parameters"
    claim = ("MLA caches as little as GQA with 2.25 groups (4.5·d_h values per token and layer, MHA 2·n_h·d_h) yet "
             "models language at least as well as MHA, and better than MQA")
    paper = ("DeepSeek-V2 §2.1, App. D.1-2: KV cache per token MHA 2·n_h·d_h·l, GQA 2·n_g·d_h·l, MQA 2·d_h·l, MLA "
             "4.5·d_h·l; small MoE: MHA vs MLA 110.6K vs 15.6K elements/token, BBH 37.9 vs 39.0, MMLU 48.7 vs 50.0")
    metrics = (BPB, Metric("kv_bytes", "KV cache bytes/token (bf16)", fmt=",.0f"), TRAIN_LOSS)
    matched_on = {"params": None, "tokens": None}
    matched_keys = ("params", "tokens")
    models = {name: (attention_model(name, matched_ffn(name)), []) for name in ATTENTION}
    checks = (Check("val_bpb", "MLA", "not_worse", "MHA", tol=0.005), Check("kv_bytes", "MLA", "less", "MHA"),
              Check("val_bpb", "MLA", "less", "MQA"))
    notes = (f"Dense models, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads × {HEAD_DIM}; MLA d_c {4 * HEAD_DIM}, "
             f"d_h^R {HEAD_DIM // 2}; SwiGLU widths matched to MHA's parameters; fp32; full plan 400 steps × 16 × 128 "
             "tokens (0.8M) of stdlib Python, quick 200 × 8 × 64. 'At least as well' allows 0.5% of bits/byte. V2 "
             "compares 7B-scale models over 1.33T tokens; a 2-layer model trained on 0.8M tokens may rank attention "
             "variants by optimisation speed rather than capacity.")

    def measure(self, variant: Variant, run_dir: Path, ctx: Context) -> dict:
        return {"kv_bytes": kv_bytes_per_token(load_pretrained(run_dir / "model").eval())}
