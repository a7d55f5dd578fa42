"""nanoseek.fastpath: each fast path gives the plain model's numbers (and follows weight changes)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek import fastpath
from nanoseek.config import ModelConfig
from nanoseek.infer.cache import KVCache
from nanoseek.infer.engine import Engine


def _model(preset="tiny-v3", **kw):
    return nanoseek.DeepSeekForCausalLM(ModelConfig.preset(preset, **kw)).eval()


def _fast(model):
    return fastpath.enable(copy.deepcopy(model))


def test_enable_swaps_classes_in_place_and_keeps_the_state(seed):
    model = _model()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert fastpath.enable(model) is model and fastpath.enable(model) is model  # idempotent
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert type(model.lm_head) is fastpath.FastLMHead
    assert type(model.model.layers[0].self_attn) is fastpath.FastMLA
    assert type(model.model.layers[1].mlp) is fastpath.FastMoE
    assert type(model.model.layers[1].mlp.experts) is fastpath.FastExperts
    assert type(model.model.norm) is fastpath.FastRMSNorm


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-dense"])
def test_fast_model_matches_plain_model(seed, preset):
    """Full forward (naive attention, grouped experts) and incremental decoding (absorbed attention,
    per-token experts, the LM head's decode layouts) of the fast model give the plain model's logits."""
    plain = _model(preset, attention_bias=True)
    fast = _fast(plain)
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    for B in (1, 2):
        steps = {}
        for name, m in (("plain", plain), ("fast", fast)):
            cache = KVCache(m.config.num_hidden_layers, batch_size=B, max_len=32)
            with torch.inference_mode():
                steps[name] = [m(ids[:B, :20], cache=cache).logits]
                steps[name] += [m(ids[:B, t:t + 1], cache=cache).logits for t in range(20, 30)]
        torch.testing.assert_close(torch.cat(steps["fast"], 1), torch.cat(steps["plain"], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2"])
@pytest.mark.parametrize("fuse", [False, True])
def test_fused_absorbed_attention_matches_plain_absorbed_and_naive(seed, preset, fuse):
    """Both cached absorbed forms (W^UK/W^UV applied per step, or multiplied into the query and output
    projections ahead of time) against the plain absorbed and naive paths; with grad on, the weights
    are built differentiably."""
    plain = _model(preset, attention_bias=True)
    fast = _fast(plain)
    for attn in (layer.self_attn for layer in fast.model.layers):
        attn.absorb, attn.fuse = True, fuse
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        naive = plain(ids).logits
        for attn in (layer.self_attn for layer in plain.model.layers):
            attn.absorb = True
        absorbed = plain(ids).logits
        fused = fast(ids).logits
    assert (fused - naive).abs().max() <= 1e-5 and (fused - absorbed).abs().max() <= 1e-5
    fast(ids).logits.square().mean().backward()
    attn = fast.model.layers[0].self_attn
    for proj in (attn.kv_b_proj, attn.o_proj, attn.kv_a_proj_with_mqa, getattr(attn, "q_b_proj", None) or attn.q_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_per_token_experts_match_grouped(seed):
    """The per-token MoE path (few tokens, no grad, CPU), with its 1- and 2-thread kernels, against the
    plain MoE's dispatcher and grouped experts."""
    cfg = ModelConfig.preset("tiny-v3", n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=3)
    model = nanoseek.DeepSeekForCausalLM(cfg).eval()
    plain = model.model.layers[1].mlp
    fast = fastpath.enable(copy.deepcopy(plain))
    x = torch.randn(10, 4, cfg.hidden_size)
    with torch.no_grad():
        expected = plain(x)[0]
        threads, per_token = torch.get_num_threads(), {}
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                per_token[n] = torch.cat([fast(x[b:b + 1])[0] for b in range(10)])  # 4 tokens per call
        finally:
            torch.set_num_threads(threads)
        grouped = fast(x)[0]  # 40 tokens: the grouped path
    for y in (*per_token.values(), grouped):
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_lm_head_decode_layouts_match_plain(seed):
    """One row (column-major copy), 2-16 rows (W·hᵀ) and more rows, against F.linear."""
    plain = torch.nn.Linear(64, 300)
    head = copy.deepcopy(plain)
    fastpath._swap(head, fastpath.FastLMHead)
    for rows in (1, 2, 7, 16, 17):
        h = torch.randn(1, rows, 64)
        with torch.no_grad():
            torch.testing.assert_close(head(h), plain(h), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the cached layout follows an in-place change of the weight
        head.weight.mul_(2)
        plain.weight.mul_(2)
        torch.testing.assert_close(head(h[:, :1]), plain(h[:, :1]), atol=1e-5, rtol=1e-5)


def test_bf16_emulation_matches_bf16_autocast(seed, monkeypatch):
    """Under bf16 autocast, fp32 kernels on bf16-rounded operands (linears, grouped experts, MLA's attention)
    give what torch's bf16 kernels give, forward and gradients, up to bf16 rounding."""
    monkeypatch.setattr(fastpath, "CPU_BF16_GEMM_IS_SLOW", True)
    plain = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3", seq_aux_alpha=0.01)).train()
    fast = _fast(plain)
    ids = torch.randint(0, 256, (2, 24))
    grads, logits = [], []
    for m in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids)
            loss = sum(t.float().logsumexp(-1).mean() for t in (out.logits, *out.mtp_logits)) + out.aux_loss
        loss.backward()
        logits.append(out.logits.float())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert logits[1].dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits[1], logits[0], atol=2e-2, rtol=2e-2)
    for name, g in grads[0].items():
        g_fast = grads[1][name]
        cos = F.cosine_similarity(g_fast.flatten().double(), g.flatten().double(), dim=0)
        assert cos > 0.999, name
        torch.testing.assert_close(g_fast, g, atol=2e-2 * g.abs().max().item() + 1e-6, rtol=0.05, msg=name)


def test_decode_caches_follow_weight_changes(seed):
    """The absorbed MLA weights, expert views and LM-head copy kept for decoding are rebuilt when a
    parameter changes in place (an optimizer step) or is replaced (a load)."""
    model = fastpath.enable(_model(n_group=1, topk_group=1))
    for attn in (layer.self_attn for layer in model.model.layers):
        attn.fuse = True
    ids = torch.randint(0, 256, (1, 12))

    def decoded_last_logits():
        cache = KVCache(model.config.num_hidden_layers, batch_size=1, max_len=16)
        with torch.inference_mode():
            model(ids[:, :-1], cache=cache)
            return model(ids[:, -1:], cache=cache).logits[0, -1]

    before = decoded_last_logits()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids).logits.square().mean().backward()
    opt.step()
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
    assert not torch.allclose(before, expected, atol=1e-4)
    torch.testing.assert_close(decoded_last_logits(), expected, atol=1e-5, rtol=1e-5)
    other = _model(n_group=1, topk_group=1)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors
    with torch.no_grad():
        expected = other(ids).logits[0, -1]
    torch.testing.assert_close(decoded_last_logits(), expected, atol=1e-5, rtol=1e-5)

    # fused AdamW updates the weights in place without bumping their versions: the engine clears the caches
    engine = Engine(model)
    before = engine.generate([ids[0].tolist()], max_new_tokens=4, stop_tokens=[])[0].tokens
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(ids).logits.square().mean().backward()
    opt.step()
    reference = copy.deepcopy(model)  # fresh tensors, no decode caches
    after = engine.generate([ids[0].tolist()], max_new_tokens=4, stop_tokens=[])[0].tokens
    assert after == Engine(reference).generate([ids[0].tolist()], max_new_tokens=4, stop_tokens=[])[0].tokens
    with torch.no_grad():
        assert reference(ids).logits[0, -1].argmax() != other(ids).logits[0, -1].argmax() or after != before
