"""LR / batch-size / coefficient schedules (DeepSeek LLM §2.3, V2 §3.1.2, V3 §4.2) at their key steps."""

import math

import pytest
import torch

from nanoseek.train.schedules import (
    BatchSizeRamp,
    ConstantLR,
    CosineLR,
    MultiStepLR,
    PiecewiseConstant,
    WarmupConstantCosineLR,
    bias_update_speed_schedule,
    build_lr_schedule,
    mtp_weight_schedule,
)


def test_deepseek_llm_multistep_key_steps():
    s = build_lr_schedule("deepseek-multistep", peak_lr=4.2e-4, total_steps=10_000, warmup_steps=2000)
    assert isinstance(s, MultiStepLR)
    assert s(0) == pytest.approx(4.2e-4 / 2000)
    assert s(999) == pytest.approx(4.2e-4 / 2)
    assert s(1999) == 4.2e-4 and s(2000) == 4.2e-4 and s(7999) == 4.2e-4
    assert s(8000) == pytest.approx(4.2e-4 * 0.316)
    assert s(8999) == pytest.approx(4.2e-4 * 0.316)
    assert s(9000) == pytest.approx(4.2e-5)  # ×0.1 of the max, not of the previous stage
    assert s(50_000) == pytest.approx(4.2e-5)
    assert s.multiplier(8500) == pytest.approx(0.316)


def test_v2_multistep_in_tokens():
    # V2: steps at ~60% and ~90% of 8.1T tokens, each ×0.316; schedule driven by tokens seen
    s = MultiStepLR(peak_lr=2.4e-4, total_steps=8.1e12, warmup_steps=2000 * 2304 * 4096,
                    milestones=(0.6, 0.9), factors=(0.316, 0.316**2))
    assert s(4.0e12) == 2.4e-4
    assert s(0.6 * 8.1e12) == pytest.approx(2.4e-4 * 0.316)
    assert s(7.5e12) == pytest.approx(2.4e-4 * 0.0999, rel=1e-3)


def test_v3_warmup_constant_cosine_key_tokens():
    """V3: 2.2e-4 until 10T tokens, cosine to 2.2e-5 by 14.3T, then 2.2e-5 (of 14.8T total)."""
    s = build_lr_schedule("warmup-constant-cosine", peak_lr=2.2e-4, min_lr=2.2e-5, total_steps=14.8e12,
                          warmup_steps=2000 * 3072 * 4096)
    assert isinstance(s, WarmupConstantCosineLR) and s.decay_start == 10 / 14.8 and s.decay_end == 14.3 / 14.8
    assert s(0) < 1e-12
    assert s(5e12) == 2.2e-4 and s(9.999e12) == 2.2e-4
    assert s(10e12) == pytest.approx(2.2e-4)
    assert s(12.15e12) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
    assert s(11e12) == pytest.approx(2.2e-5 + 1.98e-4 * 0.5 * (1 + math.cos(math.pi / 4.3)))
    assert s(14.3e12) == pytest.approx(2.2e-5) and s(14.8e12) == pytest.approx(2.2e-5)
    assert s(20e12) == pytest.approx(2.2e-5)


def test_cosine_and_constant():
    c = build_lr_schedule("cosine", peak_lr=1e-3, total_steps=1100, warmup_steps=100, min_lr=1e-4)
    assert isinstance(c, CosineLR)
    assert c(49) == pytest.approx(5e-4) and c(99) == 1e-3 and c(100) == pytest.approx(1e-3)
    assert c(600) == pytest.approx(5.5e-4)
    assert c(1100) == pytest.approx(1e-4) and c(5000) == pytest.approx(1e-4)
    values = [c(i) for i in range(100, 1101)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert CosineLR(peak_lr=1.0, total_steps=10, warmup_steps=10)(10) == 0.0
    k = build_lr_schedule("constant", peak_lr=3e-6)
    assert isinstance(k, ConstantLR) and k(0) == k(10**9) == 3e-6
    assert ConstantLR(peak_lr=1.0, warmup_steps=4)(1) == 0.5


def test_multiplier_drives_torch_lambda_lr():
    s = MultiStepLR(peak_lr=0.1, total_steps=10, warmup_steps=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.peak_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.multiplier)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([s(i) for i in range(10)])
    assert seen[0] == pytest.approx(0.05)  # the first update already has a nonzero LR


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("deepseek-multistep", dict(peak_lr=1.0, total_steps=100, warmup_steps=-1), r"warmup_steps=-1 .*>= 0"),
        ("deepseek-multistep", dict(peak_lr=1.0, total_steps=100, warmup_steps=90), r"warmup_steps=90 .*first milestone"),
        ("deepseek-multistep", dict(peak_lr=1.0, total_steps=100, warmup_steps=0, milestones=(0.8, 1.2)),
         r"milestones=1.2 .*\(0, 1\]"),
        ("deepseek-multistep", dict(peak_lr=1.0, total_steps=100, warmup_steps=0, milestones=(0.9, 0.8)),
         "strictly increasing"),
        ("deepseek-multistep", dict(peak_lr=1.0, total_steps=100, warmup_steps=0, factors=(0.3,)), "one factor per milestone"),
        ("deepseek-multistep", dict(peak_lr=0.0, total_steps=100), r"peak_lr=0.0 .*> 0"),
        ("warmup-constant-cosine", dict(peak_lr=1e-4, total_steps=100, warmup_steps=0, min_lr=1e-3), r"min_lr=0.001 .*<= peak_lr"),
        ("warmup-constant-cosine", dict(peak_lr=1e-4, total_steps=100, warmup_steps=0, decay_start=0.0),
         r"decay_start=0.0 .*\(0, 1\]"),
        ("warmup-constant-cosine", dict(peak_lr=1e-4, total_steps=100, warmup_steps=0, decay_start=0.9, decay_end=0.5),
         r"decay_end=0.5 .*>= decay_start"),
        ("cosine", dict(peak_lr=1e-4, total_steps=100, warmup_steps=200), r"warmup_steps=200 .*total_steps"),
        ("cosine", dict(peak_lr=1e-4, total_steps=float("nan")), "total_steps=nan"),
        ("cosine", dict(peak_lr=1e-4, total_steps=100, min_lr=-1.0), r"min_lr=-1.0"),
        ("linear", dict(peak_lr=1e-4), r"name='linear' is unknown; allowed: deepseek-multistep"),
        ("constant", dict(peak_lr=1e-4, total_steps=5), r"unknown field\(s\) \['total_steps'\]; allowed: peak_lr"),
        ("cosine", dict(peak_lr=1e-4), r"missing required field\(s\) \['total_steps'\]"),
    ],
)
def test_invalid_lr_schedules_name_field_value_and_rule(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_lr_schedule(name, **kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step=-1"):
        ConstantLR(peak_lr=1.0)(-1)


def test_batch_size_ramp_v3():
    r = BatchSizeRamp(start=3072, end=15360, ramp_tokens=469e9, multiple=16)
    assert r(0) == 3072
    assert r(234.5e9) == 9216  # halfway
    assert r(469e9) == 15360 and r(1e13) == 15360
    sizes = [r(t) for t in range(0, 500_000_000_001, 10_000_000_000)]
    assert all(s % 16 == 0 for s in sizes) and sizes == sorted(sizes)
    assert r(1e9) == 3072 + 16 * round(12288 * 1e9 / 469e9 / 16)
    v2 = BatchSizeRamp(start=2304, end=9216, ramp_tokens=225e9)
    assert v2(112.5e9) == 5760 and v2(300e9) == 9216


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start=3000, end=15360, ramp_tokens=1e9, multiple=16), r"start=3000 .*multiple of multiple=16"),
        (dict(start=0, end=16, ramp_tokens=1e9), r"start=0 .*int > 0"),
        (dict(start=16, end=32, ramp_tokens=0), r"ramp_tokens=0 .*> 0"),
    ],
)
def test_batch_size_ramp_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeRamp(**kwargs)


def test_v3_bias_speed_and_mtp_weight():
    gamma = bias_update_speed_schedule(switch_at=14.3e12)
    assert gamma(0) == 0.001 and gamma(14.3e12 - 1) == 0.001 and gamma(14.3e12) == 0.0
    lam = mtp_weight_schedule(switch_at=10e12)
    assert lam(9e12) == 0.3 and lam(10e12) == 0.1 and lam(14.8e12) == 0.1


def test_piecewise_constant_general_and_validation():
    p = PiecewiseConstant(values=[1.0, 2.0, 3.0], boundaries=[10, 20])
    assert [p(x) for x in (0, 9.9, 10, 19, 20, 1e9)] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert PiecewiseConstant(values=(5.0,), boundaries=())(123) == 5.0
    with pytest.raises(ValueError, match=r"values=\(1.0,\) .*len\(boundaries\) \+ 1 = 2"):
        PiecewiseConstant(values=(1.0,), boundaries=(5,))
    with pytest.raises(ValueError, match=r"boundaries=\(20, 10\) .*strictly increasing"):
        PiecewiseConstant(values=(1.0, 2.0, 3.0), boundaries=(20, 10))
