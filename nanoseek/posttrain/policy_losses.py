"""Policy-optimization objectives: GRPO (DeepSeekMath §4.1; R1), DPO, and the token log-probs they share.

GRPO drops PPO's value model: G completions are sampled per prompt, each gets a rule-based reward,
and its advantage is the reward standardized within its group. The clipped surrogate uses the ratio
ρ = π_θ/π_old per token, and a KL penalty to a reference policy uses the k3 estimator
π_ref/π_θ − log(π_ref/π_θ) − 1 (unbiased, always ≥ 0). Aggregation decides how tokens are weighed:
"token" (DAPO; every token of the batch equally), "sequence" (DeepSeekMath: mean per completion,
then mean over completions — favours short completions), "dr_grpo" (sum over a constant length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

AGGREGATIONS = ("token", "sequence", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k3", "k2", "k1")


def token_logprobs(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """log π(target_t | <t) per position [B, S], computed in fp32."""
    return -F.cross_entropy(logits_BSV.float().transpose(1, 2), targets_BS, reduction="none")


def token_entropy(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position [B, S] (a collapse detector)."""
    logp = logits_BSV.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Â_i = (r_i − mean_group) / std, for rewards [n_groups * G] laid out group by group.

    scale: "group" (GRPO: the group's std, Bessel-corrected as TRL), "batch" (the whole batch's std,
    avoiding the difficulty bias of per-group scaling), "none" (Dr. GRPO: no division).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale {scale!r} is invalid: allowed {', '.join(ADVANTAGE_SCALES)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    return centred.flatten()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ."""
    d = ref_logp - logp
    if estimator == "k3":
        return d.exp() - d - 1
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k1":
        return -d
    raise ValueError(f"KL estimator {estimator!r} is invalid: allowed {', '.join(KL_ESTIMATORS)}")


@dataclass
class GRPOStats:
    loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float | None = None, aggregation: str = "token", kl_estimator: str = "k3",
              max_len: int | None = None) -> tuple[torch.Tensor, GRPOStats]:
    """The negated GRPO objective over completion tokens.

    logp, old_logp, ref_logp, mask: [N, T] per completion token (mask 1 on real tokens);
    advantages: [N] one per completion; eps_high: clip-higher (DAPO), default eps_low.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is invalid: allowed {', '.join(AGGREGATIONS)}")
    mask = mask.to(logp.dtype)
    eps_high = eps_low if eps_high is None else eps_high
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
    if aggregation == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif aggregation == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = GRPOStats(loss=loss.item(), kl=((kl * mask).sum() / n).item(),
                          clip_fraction=((clipped.to(mask.dtype) * mask).sum() / n).item(),
                          ratio_mean=((ratio * mask).sum() / n).item())
    return loss, stats


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]).

    Inputs are summed completion log-probs [N]; returns (mean loss, per-pair reward margin)."""
    margin = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
    return -F.logsigmoid(margin).mean(), margin.detach()
