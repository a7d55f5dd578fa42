"""Direct preference optimization, sigmoid loss (Rafailov et al. 2023; DeepSeek LLM §5.2 used DPO after SFT).

    L = −log σ(β [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

Pairs come from a jsonl file ({"prompt", "chosen", "rejected"} rows, plain text; the prompt is
encoded with BOS, each answer with EOS) or are built on-policy from a task: `dpo.samples`
completions of each of `dpo.prompts` train problems are sampled from the starting model, and a
prompt with at least one verified-correct and one incorrect completion yields the pair (first
correct, first incorrect). The pairs are written to DIR/pairs.jsonl.

`dpo.nll_weight` > 0 adds the chosen completions' mean token NLL (Pang et al. 2024, Iterative
Reasoning Preference Optimization): plain DPO on reasoning pairs can lower the chosen likelihood
together with the rejected one and drift off-distribution once it overfits a small pair set.

The reference policy is the starting model, and it never changes, so its log-probs are computed
once, before the first update, and kept in DIR/reference_logps.safetensors: no second model lives
in memory, and a resumed run uses the same numbers. Under torchrun each rank samples and scores its
share of the prompts and pairs before the policy is sharded, and trains on its share of every global
batch of train.batch_size pairs (the losses divided by the global pair and token counts). Logged: loss, reward margin (β × the bracket),
reward accuracy (share of pairs with a positive margin), chosen and rejected implicit rewards.
"""
from __future__ import annotations

import os
import random

import torch
from safetensors.torch import load_file, save_file

from nanoseek.data.files import read_rows
from nanoseek.infer.generate import sample_completions
from nanoseek.parallel.mesh import gather_objects
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.policy_losses import dpo_loss, token_logprobs
from nanoseek.posttrain.sft import EpochSampler
from nanoseek.posttrain.trainer import (
    PostTrainer,
    build_policy,
    collate,
    encode_pair,
    forward_logits,
    rank_seed,
    sequence_logprobs,
    update_summary,
)
from nanoseek.train.loop import autocast, micro_slices
from nanoseek.utils import read_jsonl, write_jsonl


def onpolicy_pairs(model, tok, task, examples, samples: int, temperature: float, max_new_tokens: int,
                   seed: int = 0) -> tuple[list[dict], dict]:
    """Preference pairs from the model's own samples: (pairs, stats).

    A pair is (first correct, first incorrect) completion of a prompt; a truncated completion counts
    as incorrect. Prompts whose samples are all right or all wrong give no pair."""
    prompts = [e.prompt for e in examples for _ in range(samples)]
    out = sample_completions(model, tok, prompts, max_new_tokens, temperature, seed=seed)
    pairs = []
    for k, e in enumerate(examples):
        group = out[k * samples:(k + 1) * samples]
        good = [s.text for s in group if s.stopped and task.is_correct(e, s.text)]
        bad = [s.text for s in group if not (s.stopped and task.is_correct(e, s.text))]
        if good and bad:
            pairs.append({"prompt": e.prompt, "chosen": good[0], "rejected": bad[0]})
    correct = sum(s.stopped and task.is_correct(examples[i // samples], s.text) for i, s in enumerate(out))
    return pairs, {"prompts": len(examples), "samples": len(out), "sample_accuracy": correct / max(len(out), 1),
                   "pairs": len(pairs)}


def merge_pair_stats(parts: list[dict]) -> dict:
    """The statistics of `onpolicy_pairs` over the ranks' shares of the prompts."""
    samples = sum(p["samples"] for p in parts)
    return {"prompts": sum(p["prompts"] for p in parts), "samples": samples,
            "sample_accuracy": sum(p["sample_accuracy"] * p["samples"] for p in parts) / max(samples, 1),
            "pairs": sum(p["pairs"] for p in parts)}


class DPOTrainer(PostTrainer):
    command = "dpo"

    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.dpo
        if not cfg.model.init_from:
            raise ValueError("dpo needs a starting model (the reference policy): set model.init_from")
        self.model, self.tok = build_policy(cfg)
        pairs_file = self.out / "pairs.jsonl"
        if cfg.data.train:
            pairs = read_rows(cfg.data.train, cfg.data.fields, "data.fields")
            for i, p in enumerate(pairs):
                if not all(isinstance(p.get(k), str) for k in ("prompt", "chosen", "rejected")):
                    raise ValueError(f"{cfg.data.train} row {i}: a DPO pair needs string prompt, chosen and rejected")
            self.pair_stats = {"pairs": len(pairs), "source": cfg.data.train}
        elif self._resume_from is not None and pairs_file.is_file():
            pairs = read_jsonl(pairs_file)
            self.pair_stats = {"pairs": len(pairs), "source": os.fspath(pairs_file)}
        else:
            if self.task is None:
                raise ValueError("no DPO pairs: set data.train (a jsonl of prompt/chosen/rejected) or task.name "
                                 "(on-policy pairs)")
            rng = random.Random(f"dpo/{cfg.train.seed}")
            pool = self.task.examples(cfg.task.train_size, seed=cfg.task.train_seed, split="train")
            examples = rng.sample(pool, min(d.prompts, len(pool)))
            self.model.to(self.device)  # (not sharded yet: each rank samples its share of the prompts)
            parts = gather_objects(onpolicy_pairs(self.model, self.tok, self.task, self.local_share(examples),
                                                  d.samples, d.temperature, d.max_new_tokens,
                                                  seed=rank_seed(cfg.train.seed, self.dp_rank)))
            pairs = [p for rank_pairs, _ in parts for p in rank_pairs]
            self.pair_stats = merge_pair_stats([stats for _, stats in parts])
            if not pairs:
                raise ValueError(f"no on-policy pair: none of {len(examples)} prompts had both a correct and an "
                                 "incorrect sample (raise dpo.samples or dpo.temperature)")
        if not cfg.data.train and self.main:
            write_jsonl(pairs_file, pairs)
        self.pairs = pairs
        self.rows = []
        for p in pairs:
            self.rows.append(encode_pair(self.tok, p["prompt"], p["chosen"]))
            self.rows.append(encode_pair(self.tok, p["prompt"], p["rejected"]))
        self.sampler = EpochSampler(len(pairs), cfg.train.batch_size, cfg.train.seed)
        ref_file = self.out / "reference_logps.safetensors"
        if self._resume_from is not None and ref_file.is_file():
            self.ref_logps = load_file(ref_file)["logps"]
        else:
            self.model.to(self.device)
            # each rank scores its share of the pairs (whole pairs: rows 2i, 2i + 1), then all have all
            mine = [r for i in self.local_share(range(len(pairs))) for r in (2 * i, 2 * i + 1)]
            self.ref_logps = torch.cat(gather_objects(self._logps(mine)))
            if self.main:
                save_file({"logps": self.ref_logps.contiguous()}, ref_file)

    @torch.no_grad()
    def _logps(self, rows) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        rows = list(rows)
        out = []
        for i in range(0, len(rows), 256):
            batch = collate([self.rows[r] for r in rows[i:i + 256]], self.tok.pad_id).to(self.device)
            out.append(sequence_logprobs(self.model, batch, self.cfg.train.dtype).float().cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = self.lr
        P = cfg.train.batch_size  # pairs in the global batch; this rank trains on its share
        pair_idx = self.local_share(self.sampler.next())
        # rows 2i (chosen) and 2i + 1 (rejected), interleaved so a micro-batch holds whole pairs
        rows = [r for i in pair_idx for r in (2 * i, 2 * i + 1)]
        batch = collate([self.rows[r] for r in rows], self.tok.pad_id).to(self.device)
        ref = self.ref_logps[rows].to(self.device)
        totals = {"loss": 0.0, "margin": 0.0, "reward_accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
                  "chosen_nll": 0.0}
        chosen_tokens = self.reduce(batch.loss_mask[0::2].sum()).clamp(min=1)  # (the global batch's)
        scale = self.dp_size  # (FSDP averages gradients over the ranks; each rank's loss is its share of the sum)
        self.model.eval()  # no dropout / balance losses: the same function as the reference log-probs
        for i, j in micro_slices(len(rows), 2 * self.micro_batch):
            mb = batch.slice(i, j)
            with autocast(cfg.train.dtype, self.device):
                logits, _ = forward_logits(self.model, mb)
            logp = (token_logprobs(logits, mb.ids[:, 1:]) * mb.loss_mask).sum(-1)
            loss, margin = dpo_loss(logp[0::2], logp[1::2], ref[i:j][0::2], ref[i:j][1::2], cfg.dpo.beta)
            share = (j - i) / 2 / P
            nll = -logp[0::2].sum() / chosen_tokens  # this micro-batch's part of the step's per-token NLL
            total = loss * share + (cfg.dpo.nll_weight * nll if cfg.dpo.nll_weight else 0.0)
            (total * scale).backward()
            totals["chosen_nll"] += nll.item()
            with torch.no_grad():
                b = cfg.dpo.beta
                totals["loss"] += loss.item() * share
                totals["margin"] += margin.mean().item() * share
                totals["reward_accuracy"] += (margin > 0).float().mean().item() * share
                totals["chosen_reward"] += (b * (logp[0::2] - ref[i:j][0::2])).mean().item() * share
                totals["rejected_reward"] += (b * (logp[1::2] - ref[i:j][1::2])).mean().item() * share
        grad_norm = self.optimizer_step()
        return {**self.reduce_values(totals, "sum"), "lr": lr, "grad_norm": grad_norm, "pairs": len(self.pairs)}


def dpo(cfg: PostConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool | None = None) -> dict:
    """DPO per `cfg` into `out_dir`; returns the run summary, with the pair statistics under "pairs"."""
    trainer = DPOTrainer(cfg, out_dir, resume=resume, progress=progress)
    summary = trainer.run()
    if not trainer.main:  # (rank 0 alone writes DIR/summary.json)
        return {**summary, "pairs": trainer.pair_stats}
    return update_summary(out_dir, pairs=trainer.pair_stats)
