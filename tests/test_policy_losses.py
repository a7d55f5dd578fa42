"""GRPO / DPO objectives and pass@k / cons@k against closed forms and brute force."""
import itertools
import math

import pytest
import torch

from nanoseek.eval.metrics import majority_answer, pass_at_k
from nanoseek.posttrain.policy_losses import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_penalty,
    token_entropy,
    token_logprobs,
)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # Bessel-corrected, as TRL
    torch.testing.assert_close(adv[:4], (torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)))
    assert adv[4:].abs().max() == 0  # a zero-variance group carries no signal
    torch.testing.assert_close(group_advantages(r, 4, scale="none")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="allowed group, batch, none"):
        group_advantages(r, 4, scale="median")


def test_k3_estimates_kl_without_bias():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    true_kl = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    est = kl_penalty(p.log()[samples], q.log()[samples], "k3")
    assert (est >= 0).all() and abs(est.mean() - true_kl) < 0.01
    assert kl_penalty(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_grpo_gradient_on_policy():
    """At ρ = 1 the gradient w.r.t. each token's log-prob is −Â / (normalizer)."""
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, aggregation="token")
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / 4)
    assert math.isclose(stats.loss, -(3 * 1.0 - 2.0) / 4, rel_tol=1e-6) and stats.clip_fraction == 0
    logp.grad = None
    grpo_loss(logp, logp.detach(), adv, mask, aggregation="sequence")[0].backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / mask.sum(1, keepdim=True) / 2)
    logp.grad = None
    grpo_loss(logp, logp.detach(), adv, mask, aggregation="dr_grpo", max_len=10)[0].backward()
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / 20)


def test_grpo_clipping_stops_the_gradient():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios e^0.5 ≈ 1.65 and e^-0.5 ≈ 0.61
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0  # above 1+ε with Â > 0: clipped
    assert stats.clip_fraction == 0.5
    logp.grad = None
    grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=1.0)[0].backward()
    assert logp.grad[0, 0] != 0  # clip-higher lets it through


def test_grpo_kl_term_pulls_towards_reference():
    logp = torch.zeros(1, 4, requires_grad=True)
    ref = torch.full((1, 4), -1.0)
    loss, stats = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 4), ref_logp=ref, beta=0.1)
    assert math.isclose(stats.kl, math.exp(-1) + 1 - 1, rel_tol=1e-6)
    loss.backward()
    assert (logp.grad > 0).all()  # lowering log π towards log π_ref lowers the loss
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 4), beta=0.1)


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    expected = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    torch.testing.assert_close(token_entropy(torch.zeros(1, 1, 8)), torch.tensor([[math.log(8)]]))


def test_dpo_loss():
    z = torch.zeros(3)
    loss, margin = dpo_loss(z, z, z, z)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and margin.abs().max() == 0
    chosen = torch.tensor([0.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0.0]), beta=0.5)
    assert math.isclose(loss.item(), -math.log(1 / (1 + math.exp(-0.5))), rel_tol=1e-6)
    loss.backward()
    assert chosen.grad < 0  # raising the chosen log-prob lowers the loss


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (7, 3, 7)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_answer():
    assert majority_answer(["3", None, "4", "4", "3", ""]) == "3"  # tie: first seen
    assert majority_answer(["7", "2", "7"]) == "7" and majority_answer([None, ""]) is None
