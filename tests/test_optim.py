"""AdamW with BF16 moments (issue 16, V3 §3.3.3): FP32 moments give torch's AdamW bit for bit; BF16 moments give a
per-tensor reference of the same algorithm bit for bit and torch's AdamW up to BF16 rounding; the state measured
per parameter is 8 bytes (FP32 moments) or 4 (BF16)."""
import copy
import math

import pytest
import torch

from nanoseek import DeepSeekForCausalLM, ModelConfig, fastpath
from nanoseek.train.optim import (
    BF16AdamW,
    build_optimizer,
    param_groups,
    state_bytes_per_param,
)

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekForCausalLM(ModelConfig.preset("tiny-v3"))


def backward(model):
    """A loss that reaches every parameter (the MTP module's too), the same batch each time."""
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    sum(logits.float().square().mean() for logits in [out.logits, *out.mtp_logits]).backward()


def train(model, make_optimizer, steps):
    """A copy of `model` after `steps` optimizer steps, and its optimizer."""
    model = copy.deepcopy(model)
    opt = make_optimizer(model)
    for _ in range(steps):
        backward(model)
        opt.step()
        opt.zero_grad()
    return model, opt


def torch_adamw(model):
    return torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, foreach=True)


def bf16_adamw(moments_dtype=torch.bfloat16, bucket=1 << 24):
    def make(model):
        opt = BF16AdamW(param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, moments_dtype=moments_dtype)
        opt.bucket = bucket
        return opt
    return make


def reference_step(model, state):
    """AdamW as the papers write it, one tensor at a time, moments upcast from BF16 and rounded back after."""
    for group in param_groups(model, WD):
        for _, p in group["params"]:
            s = state.setdefault(p, {"t": 0, "m": torch.zeros_like(p, dtype=torch.bfloat16),
                                     "v": torch.zeros_like(p, dtype=torch.bfloat16)})
            s["t"] += 1
            g = p.grad
            with torch.no_grad():
                p.mul_(1 - LR * group["weight_decay"])
                m = s["m"].float().lerp(g, 1 - BETAS[0])
                v = torch.addcmul(s["v"].float() * BETAS[1], g, g, value=1 - BETAS[1])
                denom = v.sqrt() / math.sqrt(1 - BETAS[1] ** s["t"]) + EPS
                p.addcdiv_(m, denom, value=-LR / (1 - BETAS[0] ** s["t"]))
            s["m"], s["v"] = m.bfloat16(), v.bfloat16()
            p.grad = None


def params(model):
    return [p.detach() for p in model.parameters()]


def test_fp32_moments_are_torch_adamw_bit_for_bit(model):
    expected, _ = train(model, torch_adamw, 3)
    for bucket in (1 << 24, 5000):  # one bucket; many (tensors bigger than a bucket go alone)
        got, _ = train(model, bf16_adamw(torch.float32, bucket), 3)
        assert all(torch.equal(a, b) for a, b in zip(params(got), params(expected)))


def test_bf16_moments_match_a_per_tensor_reference_bit_for_bit(model):
    got, opt = train(model, bf16_adamw(bucket=5000), 4)
    reference, state = copy.deepcopy(model), {}
    for _ in range(4):
        backward(reference)
        reference_step(reference, state)
    assert all(torch.equal(a, b) for a, b in zip(params(got), params(reference)))
    for p, s in zip(got.parameters(), reference.parameters()):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["exp_avg"], state[s]["m"]) and torch.equal(opt.state[p]["exp_avg_sq"], state[s]["v"])


def test_bf16_moments_stay_within_bf16_rounding_of_torch_adamw(model):
    # both optimizers get torch's trajectory's gradients: the difference is the moments' storage alone, not a
    # trajectory that a flipped expert choice would amplify
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt, torch_opt = bf16_adamw()(ours), torch_adamw(theirs)
    for step in range(1, 9):
        backward(theirs)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.grad = q.grad.clone()
        opt.step()
        torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
        diff = max((p - q).abs().max() for p, q in zip(params(ours), params(theirs)))
        if step == 1:  # step 1 updates from the FP32 moments before they are stored: torch's numbers exactly
            assert diff == 0
        # Adam's update is lr·m̂/√v̂, about lr at most; from step 2 on the moments it reads carry BF16's rounding
        # (8 significant bits: <= 2^-8 relative each, a few of them through the running averages), so each
        # update is within a few 2^-8·lr of torch's (measured: max |diff| <= 1.2·step·lr·2^-8 over 8 steps)
        assert diff <= 2 * step * LR * 2 ** -8
    assert diff > 0


@pytest.mark.parametrize("moments_dtype, expected", [(torch.float32, 8.0), (torch.bfloat16, 4.0)])
def test_state_bytes_per_parameter_and_the_fastpath_hook(model, moments_dtype, expected):
    fast = fastpath.enable(copy.deepcopy(model))
    opt = build_optimizer(fast, LR, moments_dtype=moments_dtype)
    assert state_bytes_per_param(opt) == 0.0  # (AdamW creates its state at the first step)
    caches = [m._decode_cache for m in fast.modules() if isinstance(getattr(m, "_decode_cache", None),
                                                                    fastpath.DecodeCache)]
    for cache in caches:
        cache.key = "stale"
    backward(fast)
    opt.step()
    assert state_bytes_per_param(opt) == expected
    assert caches and all(cache.key is None for cache in caches)  # the step cleared the decode caches
    if moments_dtype == torch.bfloat16:  # a state dict round trip keeps the moments in BF16, unchanged
        state = copy.deepcopy(opt.state_dict())
        opt.load_state_dict(state)
        assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in opt.state.values())
        assert all(torch.equal(s["exp_avg"], state["state"][i]["exp_avg"]) for i, s in enumerate(opt.state.values()))
