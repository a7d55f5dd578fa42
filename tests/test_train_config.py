"""Run configs (TOML + --set), the optimizer's parameter groups, the MTP loss alignment, token dropping."""
import dataclasses
import importlib.resources
import math
import typing
from pathlib import Path

import pytest
import tomllib
import torch

from nanoseek.posttrain.config import PostConfig
from nanoseek.pretrain.config import PretrainConfig
from nanoseek.train.config import field_docs

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_one_line_docstring():
    for section in [PretrainConfig] + [typing.get_type_hints(PretrainConfig)[f.name] for f in dataclasses.fields(PretrainConfig)]:
        docs = field_docs(section)
        for f in dataclasses.fields(section):
            assert docs.get(f.name), f"{section.__name__}.{f.name} has no docstring"
    text = PretrainConfig.describe()
    assert "optim.lr (float, default 0.003): Peak learning rate" in text


@pytest.mark.parametrize("name", ["tiny.toml", "small-v3.toml"])
def test_shipped_configs_load_validate_and_round_trip(name):
    cfg = PretrainConfig.load(ROOT / "configs" / name)
    assert PretrainConfig.from_toml_text(cfg.to_toml()) == cfg
    assert cfg.model.model_config(bos_token_id=0, eos_token_id=1).num_nextn_predict_layers == 1


def test_shipped_configs_resolve_by_name_without_the_repository(tmp_path, monkeypatch):
    """An installed wheel has no configs/ folder beside the user: the shipped configs are package data, found by
    name (`--config small-v3`) or by the documented `configs/NAME.toml` from any directory."""
    monkeypatch.chdir(tmp_path)
    names = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
    assert names == ["grpo-arithmetic.toml", "r1-zero.toml", "r1.toml", "small-v3.toml", "tiny.toml"]
    shipped = importlib.resources.files("nanoseek") / "configs"
    for name in names:
        assert (shipped / name).read_text() == (ROOT / "configs" / name).read_text()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "configs/*.toml" in package_data["nanoseek"]
    reference = PretrainConfig.load(ROOT / "configs" / "small-v3.toml")
    assert PretrainConfig.load("small-v3") == reference
    assert PretrainConfig.load("small-v3.toml") == reference
    assert PretrainConfig.load("configs/small-v3.toml") == reference
    assert PostConfig.load("grpo-arithmetic") == PostConfig.load(ROOT / "configs" / "grpo-arithmetic.toml")
    (tmp_path / "tiny.toml").write_text("[train]\nsteps = 70\n")  # a file of that name here wins
    assert PretrainConfig.load("tiny.toml").train.steps == 70
    with pytest.raises(FileNotFoundError, match=r"config file not found: smal-v3 \(shipped configs: "
                                                r"grpo-arithmetic, r1, r1-zero, small-v3, tiny\)"):
        PretrainConfig.load("smal-v3")
    with pytest.raises(FileNotFoundError, match="config file not found: elsewhere/tiny.toml"):
        PretrainConfig.load("elsewhere/tiny.toml")


def test_set_parses_typed_values_and_model_overrides():
    cfg = PretrainConfig.load(ROOT / "configs" / "tiny.toml", [
        "optim.lr=3e-4", "train.steps=77", "train.compile=true", "schedule.lr_schedule=cosine",
        "schedule.milestones=[0.6, 0.9]", "data.sources=[\"a.txt\", \"b\"]", "optim.grad_clip=2",
        "model.overrides.q_lora_rank=null", "model.overrides.n_routed_experts=16", "model.tokenizer=\"\"",
    ])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 77 and cfg.train.compile is True
    assert cfg.schedule.lr_schedule == "cosine" and cfg.schedule.milestones == [0.6, 0.9]
    assert cfg.data.sources == ["a.txt", "b"] and cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.model.overrides == {"vocab_size": 512, "q_lora_rank": "null", "n_routed_experts": 16}
    m = cfg.model.model_config()
    assert m.q_lora_rank is None and m.n_routed_experts == 16 and m.vocab_size == 512


@pytest.mark.parametrize("sets, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' in [optim]; valid keys: lr, beta1, beta2, eps"),
    (["optimizer.lr=1"], "unknown config key 'optimizer' in the run config (sections); valid keys: model, data"),
    (["optim.lr=fast"], "optim.lr = 'fast' is invalid: expected float"),
    (["train.steps=1.5"], "train.steps = 1.5 is invalid: expected int"),
    (["train.compile=1"], "train.compile = 1 is invalid: expected bool"),
    (["schedule.milestones=0.8"], "schedule.milestones = 0.8 is invalid: expected list[float]"),
    (["model.overrides.hiden_size=8"], "unknown config key 'model.overrides.hiden_size'"),
    (["lr=3"], "must be section.key"),
    (["optim.lr"], "expected section.key=value"),
    (["balance.bias_update_speed=-1"], "balance.bias_update_speed = -1.0 is invalid: must be >= 0"),
    (["model.overrides.seq_aux_alpha=-1"], "seq_aux_alpha"),
    # a string where a number or flag belongs was a TypeError traceback, or silently kept
    (["model.overrides.rms_norm_eps=\"x\""], "ModelConfig.rms_norm_eps = 'x' is invalid: must be a float"),
    (["model.overrides.first_k_dense_replace=\"1\""], "ModelConfig.first_k_dense_replace = '1' is invalid: must be an int"),
    (["model.overrides.n_routed_experts=\"8\""], "ModelConfig.n_routed_experts = '8' is invalid: must be an int or null"),
    (["model.overrides.tie_word_embeddings=\"yes\""], "ModelConfig.tie_word_embeddings = 'yes' is invalid: must be a bool"),
    (["model.overrides.max_position_embeddings=\"a\""], "max_position_embeddings = 'a' is invalid: must be an int"),
    (["model.overrides.initializer_range=\"a\""], "initializer_range = 'a' is invalid: must be a float"),
    (["model.overrides.quantization_config=\"a\""], "quantization_config = 'a' is invalid: must be an object or null"),
    (["model.overrides.hidden_size=true"], "ModelConfig.hidden_size = True is invalid: must be an int"),
    (["train.micro_batch_size=3"], "train.micro_batch_size = 3 is invalid: must divide train.batch_size = 8"),
    (["schedule.lr_schedule=linear"], "allowed: deepseek-multistep, warmup-constant-cosine, cosine, constant"),
    (["train.steps=0"], "train.steps = 0 is invalid: must be >= 1"),
    (["schedule.lr_schedule=deepseek-multistep", "schedule.milestones=[0.9, 0.8]"], "strictly increasing"),
    (["schedule.lr_schedule=deepseek-multistep", "schedule.factors=[0.3]"], "one factor per milestone"),
    (["schedule.batch_ramp_start=3"], "schedule.batch_ramp_tokens = 0 is invalid"),
    (["schedule.batch_ramp_start=3", "schedule.batch_ramp_tokens=1000"], "must be a multiple of multiple=8"),
    (["mtp.switch_at=2"], "mtp.switch_at = 2.0 is invalid: must be a fraction in [0, 1]"),
    (["optim.moments_dtype=fp16"], "optim.moments_dtype = 'fp16' is invalid: allowed: auto, fp32, bf16"),
    (["model.preset=huge"], None),
])
def test_config_errors_name_the_key_the_value_and_what_is_allowed(sets, message):
    with pytest.raises(ValueError) as e:
        cfg = PretrainConfig.load(ROOT / "configs" / "tiny.toml", sets)
        cfg.model.model_config()
    if message:
        assert message in str(e.value)
    else:
        assert "huge" in str(e.value) and "small-v3" in str(e.value)


def test_toml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        PretrainConfig.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        PretrainConfig.load(bad)
    bad.write_text("[optim]\nlr = '1e-3'\n")
    with pytest.raises(ValueError, match="bad.toml: optim.lr = '1e-3' is invalid: expected float"):
        PretrainConfig.load(bad)


def test_balance_weights_live_in_the_model_config_only():
    # the balance-loss weights are model fields; [balance] holds the bias update and token dropping
    balance_keys = {f.name for f in dataclasses.fields(PretrainConfig().balance)}
    assert not {"seq_aux_alpha", "expert_aux_alpha", "device_aux_alpha", "comm_aux_alpha"} & balance_keys
    cfg = PretrainConfig().with_overrides(["model.overrides.seq_aux_alpha=0", "model.overrides.expert_aux_alpha=0.003",
                                           "balance.bias_update_speed=0"]).validate()
    m = cfg.model.model_config()
    assert (m.seq_aux_alpha, m.expert_aux_alpha) == (0.0, 0.003) and cfg.bias_speed_schedule()(0) == 0.0
    assert PretrainConfig().model.model_config().seq_aux_alpha == 1e-4  # V3: sequence-wise loss + bias update
    assert PretrainConfig().bias_speed_schedule()(0) == 0.001
    assert "mtp_loss_weight" not in PretrainConfig().model.model_config().to_dict()


def test_gamma_and_lambda_schedules_switch_at_their_fractions():
    cfg = PretrainConfig().with_overrides(["train.steps=100", "balance.bias_update_until=0.9",
                                           "mtp.switch_at=0.7"]).validate()
    assert cfg.bias_speed_schedule()(89) == 0.001 and cfg.bias_speed_schedule()(90) == 0.0
    assert cfg.mtp_schedule()(69) == 0.3 and cfg.mtp_schedule()(70) == 0.1
    lr = cfg.lr_schedule()  # V3 warmup-constant-cosine: peak until 67.6%, floor 10% of peak at 96.6%
    assert lr(50) == cfg.optim.lr and lr(99) == pytest.approx(0.1 * cfg.optim.lr)


# ---------------------------------------------------------------- optimizer, losses
def test_weight_decay_on_matrices_only_and_router_bias_outside_the_optimizer():
    from nanoseek import DeepSeekForCausalLM, ModelConfig
    from nanoseek.train.optim import build_optimizer

    model = DeepSeekForCausalLM(ModelConfig.preset("tiny-v3"))
    opt = build_optimizer(model, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert all("norm" in n or n.endswith("bias") for n in no_decay["param_names"])
    assert "model.embed_tokens.weight" in decay["param_names"] and "lm_head.weight" in decay["param_names"]
    assert any(n.endswith("experts.gate_proj") for n in decay["param_names"])
    assert not any("e_score_correction_bias" in n for g in opt.param_groups for n in g["param_names"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


def test_mtp_targets_are_shifted_by_depth():
    from nanoseek.model.transformer import ModelOutput
    from nanoseek.pretrain.losses import lm_losses, model_inputs, total_loss

    S, D, V = 6, 2, 50
    window = torch.arange(S + 1 + D)[None].repeat(2, 1)  # token value = its position
    assert model_inputs(window, S, D).shape == (2, S + D)
    # Logits that put all mass on "position + shift": zero loss iff the target is shifted by exactly that.
    def peaked(shift, n):
        return torch.nn.functional.one_hot(torch.arange(n)[None].repeat(2, 1) + shift, V).float() * 100

    out = ModelOutput(logits=peaked(1, S + D), mtp_logits=[peaked(2, S + D - 1), peaked(3, S + D - 2)])
    main, mtp = lm_losses(out, window, S)
    assert main.item() < 1e-6 and [m.item() < 1e-6 for m in mtp] == [True, True]
    assert total_loss(main, [torch.tensor(1.0), torch.tensor(3.0)], 0.3, torch.tensor(0.5)).item() == pytest.approx(
        0.3 / 2 * 4 + 0.5 + main.item())
    with pytest.raises(ValueError, match="MTP depth 1 needs 6 positions"):  # fed S tokens, not S + D
        short = ModelOutput(logits=peaked(1, S), mtp_logits=[peaked(2, S - 1), peaked(3, S - 2)])
        lm_losses(short, window[:, :S + 1], S)


# ---------------------------------------------------------------- V2 device-level token dropping
def test_device_token_drop_caps_each_device_and_spares_protected_sequences(seed):
    from nanoseek import ModelConfig
    from nanoseek.model.moe import MoE, device_token_drop

    cfg = ModelConfig.preset("tiny-v2", ep_size=4, topk_devices=None)  # 8 experts on 4 devices, top-3 greedy groups
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    B, S = 10, 16
    x = torch.randn(B * S, cfg.hidden_size)
    x[:, 0] += 3.0  # skew routing so some devices overflow
    r = moe.gate(x)
    keep = device_token_drop(cfg, r, 1.0, B, S, no_drop_fraction=0.1)
    T, K = r.indices.shape
    device = r.indices // 2
    capacity = math.ceil(T * K / 4)
    for d in range(4):
        assert keep[device == d].sum() <= capacity
    assert keep[:S].all()  # the first 10% of sequences are never dropped
    assert not keep.all()
    # within an overflowing device, every dropped pair has lower affinity than every kept unprotected one
    aff = r.scores.gather(1, r.indices)
    for d in range(4):
        on = device == d
        on[:S] = False
        if (~keep & on).any():
            assert aff[~keep & on].max() <= aff[keep & on].min()

    moe.capacity_factor = 1.0
    y_train, stats = moe.train()(x.view(B, S, -1))
    assert 0 < stats.dropped_fraction.item() < 1
    y_eval, stats = moe.eval()(x.view(B, S, -1))
    assert stats.dropped_fraction is None and not torch.allclose(y_train, y_eval)  # no dropping at eval


def test_grouped_expert_matmuls_match_the_per_expert_loop(seed):
    """The grouped-matmul experts over the dispatcher's sorted rows give the per-expert loop's outputs and
    gradients, dropped pairs included."""
    from nanoseek import ModelConfig
    from nanoseek.model.moe import Experts, TokenDispatcher

    cfg = ModelConfig.preset("tiny-v3", n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=3)
    experts, dispatcher = Experts(cfg), TokenDispatcher(16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(40, cfg.hidden_size)
    idx = torch.stack([torch.randperm(16)[:3] for _ in range(40)])
    idx[idx == 5] = 4  # leave an expert empty (a token may now pick expert 4 twice: still well defined)
    w = torch.rand(40, 3)
    keep = torch.rand(40, 3) > 0.2

    def routed():
        rows, counts, state = dispatcher.sort(x, idx, w, keep)
        assert counts[5] == 0 and counts.sum() == keep.sum() == rows.shape[0]
        return dispatcher.combine(experts(rows, counts), state)

    assert experts._can_group(x, experts.gate_proj)
    grouped = routed()
    grouped.square().sum().backward()
    grads = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    experts._can_group = lambda x, w: False  # the per-expert loop: the reference
    looped = routed()
    torch.testing.assert_close(grouped, looped, atol=1e-5, rtol=1e-5)
    looped.square().sum().backward()
    for p, g in zip(experts.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)
    # the definition: Σ_k w[t, k] · expert_{idx[t, k]}(x_t) over the kept pairs
    with torch.no_grad():
        def expert(e, v):
            return (torch.nn.functional.silu(v @ experts.gate_proj[e].T) * (v @ experts.up_proj[e].T)) @ experts.down_proj[e].T
        reference = torch.stack([sum((w[t, k] * expert(idx[t, k], x[t]) for k in range(3) if keep[t, k]),
                                     torch.zeros(cfg.hidden_size)) for t in range(40)])
    torch.testing.assert_close(looped.detach(), reference, atol=1e-5, rtol=1e-5)