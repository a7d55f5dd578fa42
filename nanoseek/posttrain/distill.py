"""Distillation: SFT a smaller student on a stronger teacher's reasoning traces (DeepSeek-R1 §2.4, §4.1).

R1 fine-tuned Qwen and Llama base models on the ~800k samples curated with DeepSeek-R1 (§2.3.3),
SFT only, no RL, and found this beats running large-scale RL on the small model itself
(R1 Table 6: R1-Distill-Qwen-32B 72.6 AIME pass@1 vs R1-Zero-Qwen-32B 47.0). Here:

* the traces are `distill.traces` (an SFT jsonl) or are rejection-sampled from `distill.teacher` with
  the [rejection] settings (`nanoseek.posttrain.rejection`) into DIR/traces.jsonl;
* the student is `model.init_from` (a smaller base) or a fresh `model.preset` with the teacher's
  tokenizer, trained by the SFT loop (`nanoseek.posttrain.sft`);
* optional logit distillation (`distill.logit_weight` > 0, Hinton et al. 2015) adds, on every
  completion token, τ² · KL(p_teacher^τ ‖ p_student^τ) computed from a teacher forward on the same
  batch — which needs the same vocabulary, hence the shared tokenizer.

    cfg = PostConfig.load(None, ["distill.teacher=runs/rl/model", "model.init_from=runs/small-base/model"])
    distill(cfg, "runs/distill")

Under torchrun the student trains like SFT (each rank its share of every global batch, losses over the
global token count) and the teacher is a frozen, unsharded copy on every rank: it takes no gradient and
no optimizer state, its forwards on a rank's micro-batches need no collective, and the traces are
rejection-sampled with it before the student is sharded, each rank its share of the prompts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nanoseek.data.files import read_rows
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.rejection import rejection_sample_ranks
from nanoseek.posttrain.sft import EpochSampler, SFTTrainer
from nanoseek.posttrain.trainer import build_policy, forward_logits, update_summary
from nanoseek.train.loop import autocast
from nanoseek.utils import read_jsonl, write_jsonl


class DistillTrainer(SFTTrainer):
    command = "distill"
    pipelined = False  # (the teacher's logits term is not pipelined yet)

    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.distill
        if not d.teacher:
            raise ValueError("distill needs a teacher: set distill.teacher to a model directory "
                             "(e.g. an RL run's DIR/model)")
        if not Path(d.teacher, "config.json").is_file():
            raise FileNotFoundError(f"distill.teacher = {d.teacher!r}: no config.json there")
        need_teacher = d.logit_weight > 0 or not d.traces
        teacher = None
        if need_teacher:
            teacher, teacher_tok = build_policy(cfg, init_from=d.teacher, tokenizer=d.teacher, overrides={})
            teacher.to(self.device).eval().requires_grad_(False)
        traces_file = self.out / "traces.jsonl"
        self.trace_stats = None
        if d.traces:
            rows = read_rows(d.traces, cfg.data.fields, "data.fields")
        elif self._resume_from is not None and traces_file.is_file():
            rows = read_jsonl(traces_file)
        else:
            if self.task is None:
                raise ValueError("distill without distill.traces samples the teacher: it needs a task (task.name)")
            r = cfg.rejection
            examples = self.task.examples(r.prompts, seed=r.seed, split="train")
            rows, self.trace_stats = rejection_sample_ranks(teacher, teacher_tok, self.task, examples, r.samples,
                                                            r.temperature, r.top_p, r.max_new_tokens,
                                                            r.require_format, r.require_language, r.max_per_prompt,
                                                            seed=cfg.train.seed)
            if not rows:
                raise ValueError(f"the teacher {d.teacher} produced no acceptable trace in {len(examples)} prompts")
            if self.main:
                write_jsonl(traces_file, rows)
        # a fresh student speaks the teacher's tokens; a pretrained one keeps its own (checked below for logits)
        self.model, self.tok = build_policy(cfg, tokenizer=cfg.model.tokenizer or ("" if cfg.model.init_from
                                                                                   else d.teacher))
        self.teacher = teacher if d.logit_weight > 0 else None
        if self.teacher is not None and self.teacher.config.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"logit distillation needs one vocabulary: the teacher has "
                             f"{self.teacher.config.vocab_size} tokens, the student {self.model.config.vocab_size} "
                             "(give the student the teacher's tokenizer)")
        self.rows = self.prepare_rows(rows)
        self.sampler = EpochSampler(len(self.rows), cfg.train.batch_size, cfg.train.seed)
        self.n_traces = len(rows)

    def extra_loss(self, batch, logits):
        if self.teacher is None:
            return None, {}

        tau = self.cfg.distill.temperature
        with torch.no_grad(), autocast(self.cfg.train.dtype, self.device):
            t_logits, _ = forward_logits(self.teacher, batch)
        t_logp = (t_logits.float() / tau).log_softmax(-1)
        s_logp = (logits.float() / tau).log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1) * tau * tau  # [B, T]
        kl_sum = (kl * batch.loss_mask).sum()
        return self.cfg.distill.logit_weight * kl_sum, {"distill_kl": kl_sum.item()}


def distill(cfg: PostConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool | None = None) -> dict:
    """Distill per `cfg` into `out_dir`; returns the run summary, with the trace statistics under "traces"."""
    trainer = DistillTrainer(cfg, out_dir, resume=resume, progress=progress)
    summary = trainer.run()
    traces = trainer.trace_stats or {"kept": trainer.n_traces}
    if not trainer.main:  # (rank 0 alone writes DIR/summary.json)
        return {**summary, "traces": traces}
    return update_summary(out_dir, traces=traces)
