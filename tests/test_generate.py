"""Batched generation over the KV cache: exact greedy parity with transformers, sampling controls."""
import warnings

import pytest
import torch

import nanoseek
from conftest import TINY_V2_HF, TINY_V3_HF

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind,cfg", [("v3", TINY_V3_HF), ("v2", TINY_V2_HF)])
def test_greedy_matches_transformers_generate(tmp_path, seed, kind, cfg):
    Config, Model = {"v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
                     "v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}[kind]
    hf = Model(Config(**cfg, attn_implementation="eager", pad_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns = nanoseek.DeepSeekForCausalLM.from_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]  # different lengths
    L = max(map(len, prompts))
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), 1
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, L:].tolist()
    assert nanoseek.generate(ns, prompts, max_new_tokens=24, stop_tokens=[]) == ref


def test_sampling_controls(seed):
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    prompts = [[3, 4, 5], [6, 7]]
    greedy = nanoseek.generate(model, prompts, max_new_tokens=12, stop_tokens=[])
    # top-k 1 and a vanishing top-p are greedy at any temperature
    assert nanoseek.generate(model, prompts, max_new_tokens=12, temperature=1.0, top_k=1, stop_tokens=[]) == greedy
    assert nanoseek.generate(model, prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, stop_tokens=[]) == greedy
    a = nanoseek.generate(model, prompts, max_new_tokens=12, temperature=2.0, seed=7, stop_tokens=[])
    b = nanoseek.generate(model, prompts, max_new_tokens=12, temperature=2.0, seed=7, stop_tokens=[])
    c = nanoseek.generate(model, prompts, max_new_tokens=12, temperature=2.0, seed=8, stop_tokens=[])
    assert a == b and a != c and a != greedy
    # a stop token ends its row and is kept
    stop = greedy[0][3]
    out = nanoseek.generate(model, prompts, max_new_tokens=12, stop_tokens=[stop])
    assert out[0] == greedy[0][: greedy[0].index(stop) + 1]


def test_generate_rejects_bad_input(seed):
    model = nanoseek.DeepSeekForCausalLM(nanoseek.ModelConfig.preset("tiny-v3")).eval()
    with pytest.raises(ValueError, match="at least one token"):
        nanoseek.generate(model, [[1], []])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        nanoseek.generate(model, [[1, 999]])
    with pytest.raises(ValueError, match="top_p"):
        nanoseek.generate(model, [[1]], temperature=1.0, top_p=0.0)
