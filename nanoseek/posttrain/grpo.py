"""GRPO: reinforcement learning with rule-based rewards and group-relative advantages
(DeepSeekMath §4.1; DeepSeek-R1 §2.2 R1-Zero, §2.3.2 reasoning RL, §2.3.4 all-scenario RL).

    from nanoseek.posttrain.config import PostConfig
    from nanoseek.posttrain.grpo import grpo
    grpo(PostConfig.load(None, ["model.init_from=runs/base/model", "task.name=arithmetic"]), "runs/grpo")

One step:
1. draw `prompts_per_step` problems of the task's train split (seeded by (seed, step));
2. sample G = `group_size` completions of each from the policy with `nanoseek.generate` — the same
   engine as evaluation and chat — at `temperature` / `top_p`;
3. score them with the task's rule-based rewards (`Task.group_rewards`: accuracy, format, language
   consistency, length terms, as `task.weights` says) and standardize within each group
   (`advantage_scale` group | batch | none);
4. take `mu` optimizer steps on the clipped surrogate (ε low, ε_high), each against the log-probs of
   the policy that sampled the batch (with μ = 1 those equal the current ones, so the ratio is 1 and
   only its gradient matters), minus β·KL(π‖π_ref) by the k3 estimator; tokens are aggregated
   token-level (DAPO), per sequence (DeepSeekMath) or over a constant length (Dr. GRPO).

The policy runs in eval mode throughout: the models have no dropout and eval mode also turns off
the MoE balance losses and token dropping, so the log-probs being optimized belong to exactly the
function that sampled the rollouts ("dropout off" of the RL recipes). With β = 0 no reference model
is built; with β > 0 the reference is the starting policy, reset to the current one every
`ref_reset_every` steps (R1: 400) and saved in DIR/reference so a resumed run has it.

Data parallelism (torchrun; see `nanoseek.posttrain.trainer`): every rank draws the same
`prompts_per_step` problems and samples the groups of its contiguous share of them (prompts_per_step
must divide by the ranks), so a prompt's G completions, and its group-relative advantage, stay on one
rank; "batch" advantage scaling and the logged statistics use every rank's rewards (gathered). The
rollouts run on `generation_model()`, a full unsharded copy of the policy per rank, re-gathered from
the FSDP shards after each optimizer step: decoding through the sharded model would need every rank's
forwards in lockstep. The update runs on the sharded policy with losses divided by the global token
(or sequence) count. The reference is an unsharded frozen copy per rank (no gradient, no optimizer
state, forwards without collectives), reset from the gathered policy. Ranks sample with their own seeds:
N ranks draw from the same distribution as one process, not the same completions.

Logged per step: reward mean and std, the share of groups whose rewards are all equal (they carry
no signal), accuracy, format and <think> rates (and language consistency when the task scores it),
KL, entropy, clip fraction, ratio mean, response length, truncation rate, rollout and update time.
"""
from __future__ import annotations

import copy
import os
import random
import time
from pathlib import Path
from statistics import mean

import torch

from nanoseek.infer.generate import sample_completions
from nanoseek.parallel.mesh import gather_objects
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.policy_losses import (
    group_advantages,
    grpo_loss,
    token_entropy,
    token_logprobs,
)
from nanoseek.posttrain.trainer import (
    PostTrainer,
    SeqBatch,
    build_policy,
    collate,
    forward_logits,
    rank_seed,
)
from nanoseek.train.checkpoint import export_model
from nanoseek.train.loop import autocast, micro_slices


def rollout_batch(prompt_ids: list[list[int]], samples, pad_id: int, mask_truncated: bool = False) -> SeqBatch:
    """Prompt + completion rows; the loss mask covers the sampled tokens (the EOS included: stopping is
    an action too), and none of a truncated completion's when `mask_truncated`."""
    rows = []
    for p, s in zip(prompt_ids, samples):
        keep = 0 if (mask_truncated and s.truncated) else 1
        rows.append((p + s.tokens, [0] * len(p) + [keep] * len(s.tokens)))
    return collate(rows, pad_id)


class GRPOTrainer(PostTrainer):
    command = "grpo"

    def setup(self) -> None:
        cfg = self.cfg
        if self.task is None:
            raise ValueError("grpo needs a task (task.name) for its prompts and rewards")
        if not cfg.model.init_from:
            raise ValueError("grpo needs a starting model: set model.init_from (RL from a random init has no signal: "
                             "nothing is ever rewarded)")
        self.model, self.tok = build_policy(cfg)
        self.pool = self.task.examples(cfg.task.train_size, seed=cfg.task.train_seed, split="train")
        if cfg.grpo.prompts_per_step % self.dp_size:
            raise ValueError(f"grpo.prompts_per_step = {cfg.grpo.prompts_per_step} must be a multiple of the "
                             f"{self.dp_size} data-parallel ranks (each rank samples whole groups)")
        if len(self.pool) < cfg.grpo.prompts_per_step:
            raise ValueError(f"task.train_size = {cfg.task.train_size} is smaller than grpo.prompts_per_step = "
                             f"{cfg.grpo.prompts_per_step}")
        self._prompt_ids = {}
        self.ref = None
        if cfg.grpo.beta > 0:
            ref_dir = self.out / "reference"
            if self._resume_from is not None and (ref_dir / "config.json").is_file():
                self.ref, _ = build_policy(cfg, init_from=os.fspath(ref_dir), tokenizer=os.fspath(ref_dir),
                                           overrides={})
            else:
                self.ref = copy.deepcopy(self.model)
                self._save_reference()
            self.ref.to(self.device).eval().requires_grad_(False)

    def _save_reference(self) -> None:
        export_model(self.ref, self.tok, Path(self.out) / "reference")

    def prompt_ids(self, example) -> list[int]:
        if example.prompt not in self._prompt_ids:
            self._prompt_ids[example.prompt] = self.tok.encode(example.prompt, add_bos=True)
        return self._prompt_ids[example.prompt]

    def train_step(self) -> dict:
        cfg, g = self.cfg, self.cfg.grpo
        G, seed = g.group_size, cfg.train.seed
        lr = self.lr
        if self.ref is not None and g.ref_reset_every and self.step and self.step % g.ref_reset_every == 0:
            self.ref.load_state_dict(self.generation_model().state_dict())
            self._save_reference()

        # 1-2. rollouts: every rank draws the same prompts and samples its share's groups on its full copy
        t0 = time.perf_counter()
        rng = random.Random(f"grpo/{seed}/{self.step}")
        examples = self.local_share(rng.sample(self.pool, g.prompts_per_step))
        prompts = [self.prompt_ids(e) for e in examples for _ in range(G)]
        self.model.eval()
        samples = sample_completions(self.generation_model(), self.tok, prompts, g.max_new_tokens, g.temperature,
                                     g.top_p, seed=rank_seed(seed * 1_000_003 + self.step, self.dp_rank),
                                     batch_size=len(prompts))
        rollout_time = time.perf_counter() - t0

        # 3. rewards and advantages (a group is on one rank; "batch" scaling needs every rank's rewards)
        rewards, scores = [], []
        for k, e in enumerate(examples):
            group = samples[k * G:(k + 1) * G]
            rewards += self.task.group_rewards(e, [s.text for s in group], [len(s.tokens) for s in group])
            scores += [self.task.score(e, s.text) for s in group]
        lengths = [len(s.tokens) for s in samples]
        shares = gather_objects((rewards, scores, lengths, [float("<think>" in s.text) for s in samples],
                                 [float(s.truncated) for s in samples]))
        r = torch.tensor([x for part in shares for x in part[0]])  # the global batch's rewards, rank by rank
        adv = group_advantages(r, G, g.advantage_scale)
        first = sum(len(part[0]) for part in shares[:self.dp_rank])
        adv = adv[first:first + len(rewards)].to(self.device)
        batch = rollout_batch(prompts, samples, self.tok.pad_id, g.mask_truncated).to(self.device)
        n_tokens = self.reduce(batch.loss_mask.sum()).clamp(min=1)  # (the global batch's)
        N = len(r)
        slices = micro_slices(len(batch), cfg.train.micro_batch_size)
        scale = self.dp_size  # (FSDP averages gradients over the ranks; each rank's loss is its share of the sum)

        # 4. the update: old (sampling-policy) and reference log-probs first, then μ steps
        t1 = time.perf_counter()
        targets = batch.ids[:, 1:]
        old = ref = None
        with torch.no_grad(), autocast(cfg.train.dtype, self.device):
            if g.mu > 1:
                old = torch.cat([token_logprobs(forward_logits(self.model, batch.slice(i, j))[0], targets[i:j])
                                 for i, j in slices])
            if self.ref is not None:
                ref = torch.cat([token_logprobs(forward_logits(self.ref, batch.slice(i, j))[0], targets[i:j])
                                 for i, j in slices])
        stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "entropy": 0.0}
        if g.mu > 1:
            stats["clip_fraction_last"] = 0.0
        grad_norms = []
        for it in range(g.mu):
            for i, j in slices:
                mb = batch.slice(i, j)
                with autocast(cfg.train.dtype, self.device):
                    logits, _ = forward_logits(self.model, mb)
                logp = token_logprobs(logits, targets[i:j])
                old_mb = logp.detach() if old is None else old[i:j]
                loss, st = grpo_loss(logp, old_mb, adv[i:j], mb.loss_mask, None if ref is None else ref[i:j],
                                     beta=g.beta, eps_low=g.epsilon, eps_high=g.epsilon_high,
                                     aggregation=g.aggregation, kl_estimator=g.kl_estimator,
                                     max_len=g.max_new_tokens)
                # weight of this micro-batch in the step's aggregate (token-level: its share of the tokens)
                tok_w = (mb.loss_mask.sum() / n_tokens).item()
                w = tok_w if g.aggregation == "token" else (j - i) / N
                (loss * (w * scale)).backward()
                if it == 0:
                    stats["loss"] += st.loss * w
                    stats["kl"] += st.kl * tok_w
                    stats["clip_fraction"] += st.clip_fraction * tok_w
                    stats["ratio_mean"] += st.ratio_mean * tok_w
                    with torch.no_grad():
                        ent = token_entropy(logits.detach())
                        stats["entropy"] += ((ent * mb.loss_mask).sum() / n_tokens).item()
                elif it == g.mu - 1:
                    stats["clip_fraction_last"] += st.clip_fraction * tok_w
            grad_norms.append(self.optimizer_step())
        update_time = time.perf_counter() - t1
        stats = self.reduce_values(stats, "sum")  # (each rank's terms are shares of the global sums)
        times = self.reduce_values({"rollout_time": rollout_time, "update_time": update_time}, "max")

        scores = [x for part in shares for x in part[1]]
        lengths = [x for part in shares for x in part[2]]
        groups = r.view(-1, G)
        record = {
            **stats, "lr": lr, "grad_norm": grad_norms[0],
            "reward_mean": r.mean().item(), "reward_std": r.std().item() if len(r) > 1 else 0.0,
            "frac_zero_std": (groups.std(1) == 0).float().mean().item() if G > 1 else 1.0,
            "accuracy": mean(s["accuracy"] for s in scores), "format_rate": mean(s["format"] for s in scores),
            "think_rate": mean(x for part in shares for x in part[3]),
            "response_length": mean(lengths), "response_length_max": max(lengths),
            "truncated_fraction": mean(x for part in shares for x in part[4]),
            **times, "tokens": int(n_tokens.item()),
            "rollout_tokens_per_s": sum(lengths) / max(times["rollout_time"], 1e-9),  # generated, all ranks
        }
        if "language" in scores[0]:
            record["language_consistency"] = mean(s["language"] for s in scores)
        return record


def grpo(cfg: PostConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool | None = None) -> dict:
    """GRPO per `cfg` into `out_dir`; returns the run summary (see PostTrainer.run)."""
    return GRPOTrainer(cfg, out_dir, resume=resume, progress=progress).run()
