"""What every post-training command shares (DeepSeek-R1 §2–3 at any scale): the policy and its tokenizer,
sequence batches with a completion mask, sampling through the one inference engine, held-out task
evaluation, and `PostTrainer`, the loop around a method's `train_step`.

A run directory is the pretraining one (`nanoseek.pretrain.trainer`): DIR/metrics.jsonl (one JSON
record per step, at least `step` and `loss`; evaluations add `eval_*` keys), DIR/model (HF layout +
tokenizer), DIR/checkpoints (resumable: weights, AdamW state, loop state; written atomically by
`nanoseek.train.checkpoint`), DIR/config.toml (the resolved config), plus DIR/summary.json once the
run has finished (what a pipeline checks to reuse a stage).

Everything random in a step is seeded from (train.seed, step), never from a running generator, so a
resumed run draws the same prompts and samples as an uninterrupted one.

Data parallelism (torchrun; `nanoseek.train.loop` joins the group and shards `self.model` with FSDP2).
A step's global batch (examples, pairs, prompts) is drawn identically on every rank, and each rank
trains on its contiguous share (`shard`). Losses are normalized by the step's GLOBAL count (tokens,
pairs, sequences: summed over ranks with `reduce`) and multiplied by the number of data-parallel ranks,
because FSDP averages gradients over ranks: the gradient is then the one-process gradient of the same
global batch, and the logged numbers are reduced over ranks before they are written.

Generation (GRPO rollouts, task evaluation, on-policy DPO pairs, rejection sampling) does not go
through the sharded model: every forward of an FSDP module all-gathers its parameters, so all ranks
would have to decode in lockstep although their sequences stop at different lengths. Instead each rank
samples from a full, unsharded copy of the policy (`generation_model`), gathered from the shards
(`full_model_state(..., everywhere=True)`: from the shards and the pipeline stages, on every rank) the first time it is needed after an
optimizer step — the trainer / rollout split of verl and OpenRLHF; at nanoseek's scale the copy is
cheap. Frozen models (GRPO's reference, the distillation teacher) are such unsharded copies too: they
take no gradient and no optimizer state, and their forwards need no collective. Sampling on rank r is
seeded `rank_seed(seed, r)` (rank 0: the one-process seed), so N ranks draw from the same distribution
as one process but not the same samples (one generator serves a whole generated batch). Held-out
evaluation splits the examples over the ranks and averages their metrics weighted by examples: greedy
metrics equal the one-process ones.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanoseek import fastpath
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer_from_texts
from nanoseek.eval.tasks import evaluate_task
from nanoseek.interop.hf import load_weights
from nanoseek.model.transformer import DeepSeekForCausalLM
from nanoseek.parallel.mesh import gather_objects
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.policy_losses import token_logprobs
from nanoseek.quant.fp8 import FP8Recipe, convert_to_fp8
from nanoseek.train.checkpoint import full_model_state
from nanoseek.train.loop import Trainer, autocast
from nanoseek.utils import atomic_write_text


# ---------------------------------------------------------------------- model and tokenizer
def build_policy(cfg: PostConfig, texts: Sequence[str] | None = None, *, init_from: str | None = None,
                 tokenizer: str | None = None, overrides: dict | None = None):
    """(model, tokenizer): from `init_from` (default model.init_from; its tokenizer, model.overrides applied
    and the weights loaded strictly) or a fresh `model.preset` whose tokenizer is `tokenizer` (default
    model.tokenizer) or a byte-level BPE of the model's vocab_size trained on `texts`. `overrides` replaces
    model.overrides (pass {} for a teacher or a reference, whose saved config is already what it is). The
    model runs the CPU fast paths (`nanoseek.fastpath`), like every model the loop trains."""
    section = replace(cfg.model, **{k: v for k, v in (("init_from", init_from), ("overrides", overrides),
                                                      ("tokenizer", tokenizer)) if v is not None})
    torch.manual_seed(cfg.train.seed)
    if section.init_from:
        model = DeepSeekForCausalLM(section.model_config())
        load_weights(model, section.init_from)
        return fastpath.enable(model), load_tokenizer(section.tokenizer or section.init_from)
    if section.tokenizer:
        tok = load_tokenizer(section.tokenizer)
    elif texts:
        tok = train_tokenizer_from_texts(texts, section.model_config().vocab_size, None, progress=False)
    else:
        raise ValueError("a fresh model (model.init_from = \"\") needs model.tokenizer or training texts to "
                         "train a tokenizer on")
    model = DeepSeekForCausalLM(section.model_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    return fastpath.enable(model), tok


# ---------------------------------------------------------------------- sequences
def encode_pair(tok, prompt: str, completion: str, eos: bool = True) -> tuple[list[int], list[int]]:
    """(ids, mask) of BOS + prompt + completion (+ EOS); mask is 1 on completion tokens (and the EOS).

    Prompt and completion are encoded separately, as the sampler produced them: a completion's tokens
    never merge with the prompt's, so training and generation see the same token boundaries."""
    p = tok.encode(prompt, add_bos=True)
    c = tok.encode(completion) + ([tok.eos_id] if eos else [])
    return p + c, [0] * len(p) + [1] * len(c)


@dataclass
class SeqBatch:
    """Right-padded sequences: ids [B, L]; targets of position t are ids[:, t + 1], scored where
    loss_mask [B, L - 1] is 1; positions [B, L] (restart inside packed rows) or None."""

    ids: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def slice(self, i: int, j: int) -> SeqBatch:
        return SeqBatch(self.ids[i:j], self.loss_mask[i:j], None if self.positions is None else self.positions[i:j])

    def to(self, device) -> SeqBatch:
        return SeqBatch(self.ids.to(device), self.loss_mask.to(device),
                        None if self.positions is None else self.positions.to(device))


def collate(rows: Sequence[tuple[list[int], list[int]]] | Sequence[tuple[list[int], list[int], list[int]]],
            pad_id: int, length: int = 0) -> SeqBatch:
    """Rows of (ids, mask) or (ids, mask, positions) into a SeqBatch right-padded to the longest row (or to
    `length`, if longer).

    Right padding needs no attention mask: causal attention never looks right, and padded targets are
    masked out of every loss."""
    L = max(length, *(len(r[0]) for r in rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.float32)
    positions = torch.zeros(len(rows), L, dtype=torch.long) if len(rows[0]) == 3 else None
    for b, r in enumerate(rows):
        n = len(r[0])
        ids[b, :n] = torch.tensor(r[0])
        mask[b, :n] = torch.tensor(r[1], dtype=torch.float32)
        if positions is not None:
            positions[b, :n] = torch.tensor(r[2])
            positions[b, n:] = torch.arange(1, L - n + 1) + (r[2][-1] if n else 0)
    return SeqBatch(ids, mask[:, 1:], positions)


def forward_logits(model, batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [B, L - 1, V] predicting ids[:, 1:], the model's balance loss or None)."""
    pos = None if batch.positions is None else batch.positions[:, :-1]
    out = model(batch.ids[:, :-1], position_ids=pos, mtp=False)
    return out.logits, out.aux_loss


def sequence_logprobs(model, batch: SeqBatch, dtype: str = "fp32") -> torch.Tensor:
    """Σ_t log π(y_t | <t) over each row's masked (completion) tokens [B]."""
    with autocast(dtype, batch.ids.device):
        logits, _ = forward_logits(model, batch)
    return (token_logprobs(logits, batch.ids[:, 1:]) * batch.loss_mask).sum(-1)


# ---------------------------------------------------------------------- ranks
def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous share of `items` (the first ranks take one more when it does not divide)."""
    n = len(items)
    return list(items[rank * n // world:(rank + 1) * n // world])


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of a rank: rank 0 keeps the one-process seed, the others draw other streams."""
    return seed + (rank << 40)


def merge_means(results: Sequence[dict], weight: str = "n") -> dict:
    """Dicts of means over disjoint shares into the means over all, weighted by each one's `weight` count
    (which is summed); empty shares ({}) are skipped; non-numeric values are taken from the first."""
    results = [r for r in results if r]
    total = sum(r[weight] for r in results)
    out = dict(results[0])
    for key, value in out.items():
        if key == weight:
            out[key] = total
        elif isinstance(value, float):
            out[key] = sum(r[key] * r[weight] for r in results) / total
    return out


# ---------------------------------------------------------------------- evaluation
def eval_examples(cfg: PostConfig, task):
    return task.examples(cfg.eval.examples, seed=cfg.eval.seed, split="test")


def evaluate(model, tok, task, examples, cfg: PostConfig, rank: int = 0, world: int = 1,
             progress: bool = False) -> dict:
    """`nanoseek.eval.tasks.evaluate_task` with the [eval] settings; keys prefixed "eval_". With `world` > 1
    every rank calls it with the same examples and evaluates its share with its (unsharded) model."""
    e = cfg.eval
    mine = shard(examples, rank, world)
    result = evaluate_task(model, tok, task, mine, k=e.k, temperature=e.temperature, top_p=e.top_p,
                           max_new_tokens=e.max_new_tokens, seed=rank_seed(e.seed, rank),
                           progress=progress and rank == 0) if mine else {}
    if world > 1:
        result = merge_means(gather_objects(result))
    return {f"eval_{k}": v for k, v in result.items()}


# ---------------------------------------------------------------------- the trainer
class PostTrainer(Trainer):
    """Base of the SFT / DPO / GRPO / distillation trainers: the shared loop (`nanoseek.train.loop`) with
    the task, its held-out set and task evaluation. Subclasses implement `setup()` (data, `self.model`,
    `self.tok`) and `train_step()`, and `extra_state()` / `load_extra_state()` when their data has a position."""

    command = "post"

    def __init__(self, cfg: PostConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool | None = None):
        self.task = cfg.build_task()
        self._rollout, self._rollout_stale = None, True
        super().__init__(cfg, out_dir, resume=resume, progress=progress)
        self.eval_set = eval_examples(cfg, self.task) if self.task is not None else None
        if self.task is not None and self.tok is not None:  # saved with the model: eval and serve follow it
            self.tok.record_prompt_format(self.task.prompt_format)

    # ------------------------------------------------------------------ ranks
    def local_share(self, items: Sequence) -> list:
        """This data-parallel rank's contiguous share of a step's global batch."""
        return shard(items, self.dp_rank, self.dp_size)

    def generation_model(self):
        """The policy to sample from: `self.model` in one process; under ranks a full unsharded copy in eval
        mode, re-gathered from the shards after each optimizer step (every rank calls it together)."""
        if self.world_size == 1:
            return self.model
        if self._rollout is None:
            copy = DeepSeekForCausalLM(self.model.config)
            if self.cfg.train.fp8:
                convert_to_fp8(copy, recipe=FP8Recipe(accumulation=self.cfg.train.fp8_accumulation))
            self._rollout = fastpath.enable(copy).to(self.device).eval().requires_grad_(False)
        if self._rollout_stale:
            state = full_model_state(self.model, self.pp_group, everywhere=True)
            self._rollout.load_state_dict(state)
            fastpath.clear_caches(self._rollout)
            self._rollout_stale = False
        return self._rollout

    def optimizer_step(self, loss: float | None = None) -> float:
        self._rollout_stale = True
        return super().optimizer_step(loss)

    def load_checkpoint(self, path) -> None:
        self._rollout_stale = True
        super().load_checkpoint(path)

    def evaluate(self) -> dict:
        if self.task is None:
            return {}
        was_training = self.model.training
        try:
            return evaluate(self.generation_model(), self.tok, self.task, self.eval_set, self.cfg,
                            self.dp_rank, self.dp_size)
        finally:
            self.model.train(was_training)

    def evaluate_at_start(self) -> bool:
        return self.cfg.eval.at_start and self.task is not None

    def eval_line(self, record: dict) -> str | None:
        return _eval_line(record) if "eval_greedy_accuracy" in record else None

    def summarize(self, records: list[dict]) -> dict:
        evals = [r for r in records if "eval_greedy_accuracy" in r]
        return {"start_eval": _strip(evals[0]) if evals and evals[0]["step"] == 0 else None,
                "eval": _strip(evals[-1]) if evals else None}


def _strip(record: dict) -> dict:
    return {k[len("eval_"):]: v for k, v in record.items() if k.startswith("eval_")} | {"step": record["step"]}


def _eval_line(record: dict) -> str:
    parts = [f"step {record['step']}: greedy accuracy {record['eval_greedy_accuracy']:.3f}"]
    for key, name in (("eval_think_rate", "<think> use"), ("eval_format_rate", "format"),
                      ("eval_language_consistency", "language consistency"), ("eval_mean_length", "mean length")):
        if key in record:
            parts.append(f"{name} {record[key]:.3f}" if key != "eval_mean_length" else f"{name} {record[key]:.1f}")
    return ", ".join(parts)


def update_summary(run_dir: str | os.PathLike, **fields) -> dict:
    """Add fields to DIR/summary.json (atomically); returns the new summary."""
    summary = {**(read_summary(run_dir) or {}), **fields}
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def read_summary(run_dir: str | os.PathLike) -> dict | None:
    """DIR/summary.json of a finished run, or None."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
