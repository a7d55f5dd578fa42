"""Logit parity with transformers' DeepseekV3 / DeepseekV2 / Llama, both directions, fp32."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nanoseek  # noqa: E402
from nanoseek.interop.hf import CheckpointError, load_pretrained, save_pretrained  # noqa: E402
from conftest import TINY_V2_HF, TINY_V3_HF  # noqa: E402

SEQ = 40  # > original_max_position_embeddings (32): YaRN's extended range is exercised


def _randomize(hf_model):
    """Random norms and routing bias, so parity cannot pass on their default values."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in hf_model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.1)


def _hf_model(kind, cfg_dict):
    cls = {"v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
           "v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]
    model = cls[1](cls[0](**cfg_dict, attn_implementation="eager")).eval()
    _randomize(model)
    return model


def _hf_logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _ns_logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("kind,cfg", [("v3", TINY_V3_HF), ("v2", TINY_V2_HF)])
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, seed, kind, cfg):
    hf = _hf_model(kind, cfg)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers writes no MTP layer
        ns = load_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, SEQ))
    ref = _hf_logits(hf, ids)
    assert ref.abs().max() > 0.1  # a non-trivial model
    assert (_ns_logits(ns, ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("preset,kind", [("tiny-v3", "v3"), ("tiny-v2", "v2")])
def test_nanoseek_checkpoint_loads_in_transformers(tmp_path, seed, preset, kind):
    cfg = nanoseek.ModelConfig.preset(preset)
    ns = nanoseek.DeepSeekForCausalLM(cfg).eval()
    with torch.no_grad():  # exercise norms and the routing bias too
        for name, p in ns.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        for gate in ns.modules():  # transformers' V2 has no routing bias
            if hasattr(gate, "e_score_correction_bias") and cfg.topk_method == "noaux_tc":
                gate.e_score_correction_bias.copy_(torch.randn_like(gate.e_score_correction_bias) * 0.1)
    save_pretrained(ns, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == {"v3": "DeepseekV3ForCausalLM", "v2": "DeepseekV2ForCausalLM"}[kind]
    ids = torch.randint(0, 256, (2, SEQ))
    assert (_ns_logits(ns, ids) - _hf_logits(hf, ids)).abs().max() <= 1e-4
    # And back: nanoseek reloads its own checkpoint, MTP layer included, exactly.
    again = load_pretrained(tmp_path)
    assert len(again.mtp) == cfg.num_nextn_predict_layers
    for (n1, a), (n2, b) in zip(ns.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1


def test_padded_batch_matches_transformers(tmp_path, seed):
    """Left-padded prompts of different lengths: same logits on the real tokens."""
    hf = _hf_model("v3", TINY_V3_HF)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = load_pretrained(tmp_path)
    ids = torch.randint(2, 256, (3, 36))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :17] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _hf_logits(hf, ids, attention_mask=mask, position_ids=pos)
    out = _ns_logits(ns, ids, attention_mask=mask, position_ids=pos)
    assert (out - ref)[mask.bool()].abs().max() <= 1e-4


def test_dense_deepseek_llm_matches_llama(tmp_path, seed):
    """DeepSeek LLM 7B/67B ship as LlamaForCausalLM: GQA, half-split RoPE."""
    cfg = nanoseek.ModelConfig.preset("tiny-dense")
    ns = nanoseek.DeepSeekForCausalLM(cfg).eval()
    save_pretrained(ns, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 256, (2, SEQ))
    ref = _hf_logits(hf, ids)
    assert (_ns_logits(ns, ids) - ref).abs().max() <= 1e-4
    hf.save_pretrained(tmp_path / "from_hf")
    back = load_pretrained(tmp_path / "from_hf")
    assert back.config.attention_type == "gqa"
    assert (_ns_logits(back, ids) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("preset,change,field", [
    ("tiny-v2", "bias", "e_score_correction_bias is non-zero"),
    ("tiny-v2", dict(scoring_func="sigmoid"), "scoring_func = 'sigmoid'"),
    ("tiny-v2", dict(norm_topk_prob=True), "norm_topk_prob = True"),
    ("tiny-v3", dict(scoring_func="softmax"), "scoring_func = 'softmax'"),
    ("tiny-v3", dict(topk_method="group_limited_greedy"), "topk_method = 'group_limited_greedy'"),
    ("tiny-v3", dict(topk_method="greedy"), "topk_method = 'greedy'"),
    ("tiny-v3", dict(ep_size=4, topk_devices=1), "topk_devices = 1"),
])
def test_a_model_transformers_computes_differently_is_refused(tmp_path, seed, preset, change, field):
    """Routing that transformers' DeepseekV2/V3 do not implement: the export names it, and it is no false alarm
    (the model written anyway loads in transformers with other logits)."""
    cfg = nanoseek.ModelConfig.preset(preset, **({} if change == "bias" else change))
    ns = nanoseek.DeepSeekForCausalLM(cfg).eval()
    if change == "bias":
        with torch.no_grad():
            for moe in ns.moe_layers():
                moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts))
    with pytest.raises(CheckpointError, match=f"cannot export .* for transformers: .*{field}"):
        save_pretrained(ns, tmp_path / "hf")
    save_pretrained(ns, tmp_path / "ns", nanoseek_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ns", attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, SEQ))
    assert (_ns_logits(ns, ids) - _hf_logits(hf, ids)).abs().max() > 1e-3
