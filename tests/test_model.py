"""Model internals: MLA absorbed vs naive, caches, router properties, MoE cost, MTP, parameter counts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.infer.cache import KVCache
from nanoseek.model.moe import MoE, Routing, balance_loss, update_router_bias


def _model(preset="tiny-v3", **kw):
    return nanoseek.DeepSeekForCausalLM(ModelConfig.preset(preset, **kw)).eval()


# ---------------------------------------------------------------- attention and caches
@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2"])
def test_absorbed_mla_matches_naive(seed, preset):
    """The absorbed form (W^UK folded into the query, W^UV into the output): same logits as the naive
    path, and gradients still reach the weights."""
    model = _model(preset, attention_bias=True)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        naive = model(ids).logits
        for attn in (layer.self_attn for layer in model.model.layers):
            attn.absorb = True
        absorbed = model(ids).logits
    assert (naive - absorbed).abs().max() <= 1e-5
    model(ids).logits.square().mean().backward()
    attn = model.model.layers[0].self_attn
    for proj in (attn.kv_b_proj, attn.o_proj, attn.kv_a_proj_with_mqa, getattr(attn, "q_b_proj", None) or attn.q_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-dense"])
def test_incremental_decoding_matches_full_forward(seed, preset):
    """Prefill 25 tokens into the cache, then decode one at a time (absorbed MLA): same logits."""
    model = _model(preset)
    ids = torch.randint(0, 256, (2, 40))
    cache = KVCache(model.config.num_hidden_layers, batch_size=2, max_len=64)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :25], cache=cache).logits]
        steps += [model(ids[:, t:t + 1], cache=cache).logits for t in range(25, 40)]
    assert cache.length == 40
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_mla_cache_holds_latent_and_rope_key_only(seed):
    cfg = ModelConfig.preset("tiny-v3")
    model = nanoseek.DeepSeekForCausalLM(cfg).eval()
    cache = KVCache(cfg.num_hidden_layers, batch_size=1, max_len=16, dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 8)), cache=cache)
    assert cache.bytes_per_token_per_layer() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    mha_bytes = 2 * cfg.num_attention_heads * cfg.qk_head_dim * 2  # K and V of an MHA model, bf16
    assert cache.bytes_per_token_per_layer() < mha_bytes


def test_cache_overflow_is_a_clear_error(seed):
    model = _model()
    cache = KVCache(3, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------- router
def _router_cfg(method, E, groups, kept, k, devices=1, kept_devices=None, scoring="sigmoid"):
    return ModelConfig.preset("tiny-v3", n_routed_experts=E, n_group=groups, topk_group=kept,
                              num_experts_per_tok=k, topk_method=method, ep_size=devices,
                              topk_devices=kept_devices, scoring_func=scoring)


@st.composite
def router_setups(draw):
    method = draw(st.sampled_from(["greedy", "group_limited_greedy", "noaux_tc"]))
    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 4))
    E = groups * per_group
    kept = draw(st.integers(1, groups))
    devices = draw(st.sampled_from([d for d in (1, 2, 4) if E % d == 0]))
    kept_devices = draw(st.one_of(st.none(), st.integers(1, devices)))
    limit = kept * per_group if method != "greedy" else E
    if kept_devices is not None:
        limit = min(limit, kept_devices * E // devices)
    k = draw(st.integers(1, max(1, min(limit, 4))))
    scoring = draw(st.sampled_from(["sigmoid", "softmax"]))
    if method != "greedy" and groups > 1 and kept_devices is not None:
        kept_devices = None  # keep the kept-set arithmetic of the assertion simple
    return _router_cfg(method, E, groups, kept, k, devices, kept_devices, scoring), draw(st.integers(0, 10_000))


@settings(max_examples=60, deadline=None)
@given(router_setups())
def test_router_properties(setup):
    cfg, seed = setup
    torch.manual_seed(seed)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(32, cfg.hidden_size)
    r = moe.gate(x)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    # k distinct experts per token
    assert r.indices.shape == (32, K)
    assert all(len(set(row)) == K for row in r.indices.tolist())
    # only from the kept groups / devices
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        groups_used = (r.indices // (E // cfg.n_group))
        assert all(len(set(row)) <= cfg.topk_group for row in groups_used.tolist())
    if cfg.topk_devices is not None:
        devices_used = r.indices // (E // cfg.ep_size)
        assert all(len(set(row)) <= cfg.topk_devices for row in devices_used.tolist())
    # gate values are the affinities of the chosen experts (normalized, scaled)
    chosen = r.scores.gather(1, r.indices)
    expected = chosen / chosen.sum(-1, keepdim=True) if cfg.norm_topk_prob else chosen
    torch.testing.assert_close(r.weights, expected * cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        torch.testing.assert_close(r.weights.sum(-1), torch.full((32,), cfg.routed_scaling_factor))
    assert r.load.sum() == 32 * K
    # the bias changes selection, never the gate values of a given selection
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.randn(E))
    rb = moe.gate(x)
    torch.testing.assert_close(rb.weights, (lambda c: (c / c.sum(-1, keepdim=True) if cfg.norm_topk_prob else c)
                                            * cfg.routed_scaling_factor)(rb.scores.gather(1, rb.indices)))
    torch.testing.assert_close(rb.scores, r.scores)


def test_bias_steers_selection(seed):
    cfg = _router_cfg("noaux_tc", 8, 1, 1, 2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[5] = 10.0  # a huge bias forces expert 5 for every token
    r = moe.gate(x)
    assert (r.indices == 5).any(-1).all()


def test_aux_free_bias_update_moves_towards_balance():
    cfg = _router_cfg("noaux_tc", 4, 1, 1, 1)
    moe = MoE(cfg)
    load = torch.tensor([10.0, 0.0, 5.0, 5.0])
    update_router_bias(moe.gate, load, speed=0.001)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    update_router_bias(moe.gate, load, speed=0.001, center=True)
    assert abs(moe.gate.e_score_correction_bias.sum().item()) < 1e-7


def test_balance_losses_known_values():
    """Perfectly uniform routing: f_i = 1 and P_i = 1/E, so each loss equals its α."""
    E, K, S = 8, 2, 8
    cfg = ModelConfig.preset("tiny-v3", seq_aux_alpha=0.0, expert_aux_alpha=0.01, device_aux_alpha=0.05,
                             comm_aux_alpha=0.02, ep_size=4, topk_devices=2, n_group=1, topk_group=1)
    indices = torch.arange(S * K).remainder(E).view(S, K)  # every expert exactly twice
    scores = torch.full((S, E), 1.0 / E)
    r = Routing(weights=torch.ones(S, K), indices=indices, scores=scores)
    # device loss: f'_d = 1, P'_d = 2/8 over 4 devices -> 1; comm: each token hits 1 device per pair
    sends = torch.zeros(S, 4)
    sends.scatter_(1, indices // 2, 1.0)
    f_comm = sends.sum(0) * 4 / (2 * S)
    expected = 0.01 * 1.0 + 0.05 * 1.0 + 0.02 * (f_comm * 0.25).sum().item()
    assert math.isclose(balance_loss(cfg, r, 1, S).item(), expected, rel_tol=1e-6)
    seq_cfg = cfg.replace(seq_aux_alpha=1e-4, expert_aux_alpha=0.0, device_aux_alpha=0.0, comm_aux_alpha=0.0)
    assert math.isclose(balance_loss(seq_cfg, r, 1, S).item(), 1e-4, rel_tol=1e-6)


def test_moe_cost_follows_active_not_total_experts(seed):
    """Matmul FLOPs at fixed experts-per-token and expert width do not grow with the expert count."""
    flops = {}
    for E in (8, 64):
        cfg = ModelConfig.preset("tiny-v3", n_routed_experts=E, n_group=1, topk_group=1, num_experts_per_tok=2)
        moe = MoE(cfg).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            moe(torch.randn(1, 64, cfg.hidden_size))
        flops[E] = counter.get_total_flops()
    router = lambda E: 2 * 64 * 64 * E  # noqa: E731  the gate's own x·W_g^T grows with E, as it must
    assert flops[64] - router(64) == flops[8] - router(8)
    # and equals the closed form: K experts + shared expert, 3 matmuls each, per token
    cfg = ModelConfig.preset("tiny-v3")
    per_token = 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * (2 + cfg.n_shared_experts)
    assert flops[8] - router(8) == 64 * per_token


# ---------------------------------------------------------------- MTP
def test_mtp_shapes_and_causality(seed):
    model = _model()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        out = model(ids)
        assert [t.shape for t in out.mtp_logits] == [(2, 19, 300)]
        # depth 1 at position i sees tokens up to i+1; changing token 10 leaves positions < 9 unchanged
        ids2 = ids.clone()
        ids2[:, 10] = (ids2[:, 10] + 1) % 256
        out2 = model(ids2)
    d = (out.mtp_logits[0] - out2.mtp_logits[0]).abs().amax(dim=(0, 2))
    # (up to float rounding: the changed token regroups the routed rows, so summation orders differ)
    assert d[:9].max() < 1e-6 and d[9] > 1e-3
    assert model(ids, mtp=False).mtp_logits == []


def test_training_mode_reports_balance_stats(seed):
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("tiny-v3"))
    out = model.train()(torch.randint(0, 256, (2, 16)))
    n_moe = 2 + 1  # layers 1, 2 and the MTP layer
    assert out.expert_load.shape == (n_moe, 8)
    assert out.expert_load.sum(1).tolist() == [2 * 16 * 2] * 2 + [2 * 15 * 2]
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert out.dropped_fraction is None  # token dropping is off
    (out.logits.mean() + out.aux_loss).backward()
    assert model.model.layers[1].mlp.gate.weight.grad is not None
    assert model.eval()(torch.randint(0, 256, (2, 16))).aux_loss is None


def test_balance_loss_and_load_survive_activation_checkpointing(seed):
    """Balance loss and expert load come out of forward, so recomputing the decoder layers in the backward
    pass changes nothing: same loss, load and gradients of every parameter."""
    cfg = ModelConfig.preset("tiny-v3", seq_aux_alpha=0.01, expert_aux_alpha=0.02)
    model = nanoseek.DeepSeekForCausalLM(cfg).train()
    ids = torch.randint(0, 256, (2, 16))
    runs = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        out = model(ids)
        (out.logits.square().mean() + out.mtp_logits[0].square().mean() + 10 * out.aux_loss).backward()
        runs.append((out.aux_loss.detach(), out.expert_load, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, load, grads), (loss_ckpt, load_ckpt, grads_ckpt) = runs
    torch.testing.assert_close(loss_ckpt, loss)
    assert torch.equal(load_ckpt, load)
    assert grads.keys() == grads_ckpt.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, msg=name)
    assert grads["model.layers.1.mlp.gate.weight"].abs().sum() > 0


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("preset,total,active,active_tol", [
    ("deepseek-v3", 671e9, 37e9, 0.015),
    ("deepseek-v2-lite", 15.7e9, 2.4e9, 0.025),
    ("deepseek-llm-7b", 6.9e9, None, None),
    ("deepseek-llm-67b", 67.4e9, None, None),
])
def test_published_parameter_counts(preset, total, active, active_tol):
    """Totals within 1%. DeepSeek's activated figures are rounded and exclude the input embedding
    (a lookup): V3 36.63B vs "37B" (-1.0%), V2-Lite 2.45B vs "2.4B" (+2.1%)."""
    with torch.device("meta"):
        model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset(preset))
    assert abs(model.num_parameters() / total - 1) < 0.01
    if active:
        assert abs(model.num_parameters(active=True, embedding=False) / active - 1) < active_tol
    if preset == "deepseek-v3":  # the MTP module adds ~11.6B on top (DeepSeek: 685B on disk incl. copies)
        assert 11e9 < model.num_parameters(mtp=True) - model.num_parameters() < 12e9


def test_small_v3_size():
    model = nanoseek.DeepSeekForCausalLM(ModelConfig.preset("small-v3"))
    assert 20e6 <= model.num_parameters(mtp=True) <= 40e6
