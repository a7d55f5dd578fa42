"""Supervised fine-tuning: completion-only NLL on chat or prompt/completion data, with packing
(DeepSeek-R1 §2.3.1 cold start, §2.3.3 the SFT on rejection-sampled data; DeepSeek-V3 §5.1).

    from nanoseek.posttrain.config import PostConfig
    from nanoseek.posttrain.sft import sft
    sft(PostConfig.load("configs/r1-zero.toml", ["data.train=data.jsonl", "train.steps=200"]), "runs/sft")

Data (`data.train`, jsonl; one row per example):
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
        rendered with the tokenizer's DeepSeek-R1 chat format; loss on every assistant turn and its EOS.
    {"prompt": "12+79=", "completion": "<think>…</think><answer>91</answer>"}
        BOS + prompt + completion + EOS, loss on completion + EOS (the plain format of the micro tasks).
With `data.train` empty the rows are generated from the task in the `data.styles` mix (e.g. 30%
"think" traces and 70% "buggy" bare answers: the bimodal base of the micro R1-Zero).

Loss: Σ masked −log p / Σ mask over the whole step (every completion token weighs the same,
micro-batches included). Packing (`data.pack`) concatenates examples into rows of up to
`data.seq_len` tokens; each example keeps its BOS and restarts its positions, so its rotary phases
are those it has at inference (there is no block-diagonal mask: like DeepSeek-V3's packed
pretraining, an example may attend to the ones before it in its row).

The data order is a permutation per epoch from (seed, epoch), so the loop's position is two integers
and a resumed run sees exactly the batches an uninterrupted one would. Under torchrun every rank draws
the same global batch of train.batch_size rows and trains on its contiguous share; the NLL is divided
by the global batch's completion tokens (summed over ranks), so 1 and N ranks take the same steps
(`nanoseek.posttrain.trainer` on data parallelism).
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek.data.chat import render_chat
from nanoseek.data.files import read_rows
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.policy_losses import token_logprobs
from nanoseek.posttrain.trainer import (
    PostTrainer,
    build_policy,
    collate,
    encode_pair,
    forward_logits,
)
from nanoseek.tasks.rewards import ANSWER_CLOSE, ANSWER_OPEN, TAGS
from nanoseek.train.loop import autocast, micro_slices


# ---------------------------------------------------------------------- data
def style_plan(n: int, styles: dict[str, float], seed: int) -> list[str]:
    """n style names in the given shares (largest remainder), in a seeded random order."""
    total = sum(styles.values())
    exact = {s: n * w / total for s, w in styles.items()}
    counts = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: counts[s] - exact[s])[: n - sum(counts.values())]:
        counts[s] += 1
    plan = [s for s, c in counts.items() for _ in range(c)]
    random.Random(f"styles/{seed}").shuffle(plan)
    return plan


def task_sft_rows(task, n: int, seed: int, styles: dict[str, float], tag_bare: bool = False) -> list[dict]:
    """{"prompt", "completion", "style"} rows for n train-split problems in the `styles` mix.

    `tag_bare` writes answers without reasoning as "<answer>81</answer>": then the reasoning and the
    answering mode part at the first token (<think> vs <answer>) with probabilities equal to their
    shares, so a bimodal base answers greedily without thinking as soon as the bare share is the
    larger, instead of only once it has learned the answers' first digits. The style "shortcut" is the
    task's `shortcut_style`."""
    resolved: dict[str, float] = {}
    for s, w in styles.items():
        s = task.shortcut_style if s == "shortcut" else s
        resolved[s] = resolved.get(s, 0) + w
    styles = resolved
    unknown = [s for s in styles if s not in task.styles]
    if unknown:
        raise ValueError(f"data.styles {unknown} are not styles of task {task.name!r}; allowed: "
                         f"{[*task.styles, 'shortcut']}")

    examples = task.examples(n, seed=seed, split="train")
    rows = []
    for e, s in zip(examples, style_plan(n, styles, seed)):
        completion = task.sft_example(e, s)
        if tag_bare and not any(t in completion for t in TAGS):
            completion = f"{ANSWER_OPEN}{completion}{ANSWER_CLOSE}"
        rows.append({"prompt": e.prompt, "completion": completion, "style": s})
    return rows


def encode_rows(rows: Sequence[dict], tok, seq_len: int, completion_only: bool = True,
                where: str = "data") -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask over ids) per row; rows longer than seq_len are cut (their EOS may be lost)."""
    out = []
    for i, row in enumerate(rows):
        if "messages" in row:
            ids, mask = tok.encode_chat(row["messages"])
        elif "prompt" in row and "completion" in row:
            if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise ValueError(f"{where} row {i}: prompt and completion must be strings")
            ids, mask = encode_pair(tok, row["prompt"], row["completion"])
        else:
            raise ValueError(f"{where} row {i}: expected {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}}, "
                             f"got keys {sorted(row)}")
        if not completion_only:
            mask = [1] * len(ids)
        out.append((ids[:seq_len], mask[:seq_len]))
    return out


def pack(examples: Sequence[tuple[list[int], list[int]]], seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy sequential packing into rows of <= seq_len tokens: (ids, mask, positions) per row."""
    rows, ids, mask, pos = [], [], [], []
    for e_ids, e_mask in examples:
        if ids and len(ids) + len(e_ids) > seq_len:
            rows.append((ids, mask, pos))
            ids, mask, pos = [], [], []
        ids, mask, pos = ids + e_ids, mask + e_mask, pos + list(range(len(e_ids)))
    if ids:
        rows.append((ids, mask, pos))
    return rows


def load_sft_data(cfg: PostConfig, task) -> list[dict]:
    """The configured rows: data.train, or generated from the task."""
    if cfg.data.train:
        return read_rows(cfg.data.train, cfg.data.fields, "data.fields")
    if task is None:
        raise ValueError("no SFT data: set data.train (a jsonl file) or task.name (generated data)")
    return task_sft_rows(task, cfg.task.train_size, cfg.task.train_seed, cfg.data.styles, cfg.data.tag_bare)


def row_texts(rows: Sequence[dict]) -> list[str]:
    """Texts a fresh tokenizer is trained on."""
    return [render_chat(r["messages"], False) if "messages" in r else r.get("prompt", "") + r.get("completion", "")
            for r in rows]


class EpochSampler:
    """Batches of indices from a permutation per (seed, epoch); `state` is (epoch, position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.pos)
            out += self._perm[self.pos:self.pos + take].tolist()
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)


# ---------------------------------------------------------------------- trainer
class SFTTrainer(PostTrainer):
    command = "sft"
    pipelined = True

    def setup(self) -> None:
        cfg = self.cfg
        rows = load_sft_data(cfg, self.task)
        self.model, self.tok = build_policy(cfg, row_texts(rows))
        self.rows = self.prepare_rows(rows)
        self.sampler = EpochSampler(len(self.rows), cfg.train.batch_size, cfg.train.seed)
        if self.dims.pp > 1:
            local, M = cfg.train.batch_size // self.dp_size, self.dims.microbatches
            if cfg.data.pack or cfg.train.micro_batch_size or local % M:
                raise ValueError(f"sft with parallel.pp > 1: data.pack must be false (packed rows carry their own "
                                 f"positions), train.micro_batch_size 0, and parallel.microbatches = {M} must "
                                 f"divide each rank's batch of {local}")

    def prepare_rows(self, rows):
        examples = encode_rows(rows, self.tok, self.cfg.data.seq_len, self.cfg.sft.completion_only,
                               self.cfg.data.train or "generated data")
        if self.cfg.data.pack:
            # a fixed seeded order before packing, so which examples share a row does not depend on the file order
            order = np.random.default_rng([self.cfg.train.seed, 1 << 20]).permutation(len(examples))
            return pack([examples[i] for i in order], self.cfg.data.seq_len)
        return examples

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

    def extra_loss(self, batch, logits) -> tuple[torch.Tensor | None, dict]:
        """Added to the NLL of a micro-batch (distillation's logit term); per-token sum over masked tokens."""
        return None, {}

    def train_step(self) -> dict:
        if self.pipeline is not None:
            return self._pipelined_step()
        cfg = self.cfg
        lr = self.lr
        B = cfg.train.batch_size  # (global: this rank trains on its share)
        rows = [self.rows[i] for i in self.local_share(self.sampler.next())]
        # padded to the global batch's longest row, as in one process: padding tokens pass through the MoE
        # router, so they count in the sequence-wise balance loss
        length = int(self.reduce(torch.tensor(max(len(r[0]) for r in rows)), "max"))
        batch = collate(rows, self.tok.pad_id, length).to(self.device)
        # the step's global token count: every token of the global batch weighs the same on any number of ranks
        n_tokens = self.reduce(batch.loss_mask.sum()).clamp(min=1)
        scale = self.dp_size  # (FSDP averages gradients over the ranks; the losses below are shares of a sum)
        nll_sum, aux_sum, extras = 0.0, 0.0, {}
        for i, j in micro_slices(len(batch), self.micro_batch):
            mb = batch.slice(i, j)
            with autocast(cfg.train.dtype, self.device):
                logits, aux = forward_logits(self.model, mb)
            nll = -(token_logprobs(logits, mb.ids[:, 1:]) * mb.loss_mask).sum()
            loss = nll / n_tokens
            extra, stats = self.extra_loss(mb, logits)
            if extra is not None:
                loss = loss + extra / n_tokens
            if aux is not None:
                loss = loss + aux * (j - i) / B
                aux_sum += aux.item() * (j - i) / B
            (loss * scale).backward()
            nll_sum += nll.item()
            for k, v in stats.items():
                extras[k] = extras.get(k, 0.0) + v
        grad_norm = self.optimizer_step()
        sums = self.reduce_values({"nll": nll_sum, "aux": aux_sum, **extras}, "sum")
        n = n_tokens.item()
        record = {"loss": sums.pop("nll") / n, "lr": lr, "grad_norm": grad_norm, "tokens": int(n),
                  "epoch": self.sampler.epoch}
        aux_sum = sums.pop("aux")
        if aux_sum:
            record["aux_loss"] = aux_sum
        record.update({k: v / n for k, v in sums.items()})
        return record

    # ------------------------------------------------------------------ pipelined (parallel.pp > 1)
    def _pipelined_step(self) -> dict:
        """`train_step` through the pipeline: rows padded to data.seq_len (the pipeline's buffers have one
        shape; padding is causal and masked, so only the balance loss sees it), the masked targets -100."""
        cfg = self.cfg
        rows = [self.rows[i] for i in self.local_share(self.sampler.next())]
        batch = collate(rows, self.tok.pad_id, cfg.data.seq_len).to(self.device)
        target = batch.ids[:, 1:].masked_fill(batch.loss_mask == 0, -100)
        n_tokens = self.reduce(batch.loss_mask.sum()).clamp(min=1)
        # the schedule averages the micro-batches' losses, FSDP the ranks': each loss is scaled back to a share
        # of the global batch's sums, as in `train_step`
        rows_per_micro = len(rows) // self.dims.microbatches
        self._weights = (self.dims.microbatches * self.dp_size / n_tokens,
                         self.dims.microbatches * self.dp_size * rows_per_micro / cfg.train.batch_size)
        self._parts = []
        with autocast(cfg.train.dtype, self.device):
            self.pipeline.step(batch.ids[:, :-1], target)
        parts = self._parts[-self.dims.microbatches:]  # (see Pipeline.step)
        parts = torch.tensor(parts).sum(0) if parts else torch.zeros(2, dtype=torch.float64)
        nll_sum, aux_sum = self.reduce(self.reduce(parts, over="pp")).tolist()
        grad_norm = self.optimizer_step()
        n = n_tokens.item()
        record = {"loss": nll_sum / n, "lr": self.lr, "grad_norm": grad_norm, "tokens": int(n),
                  "epoch": self.sampler.epoch}
        if aux_sum:
            record["aux_loss"] = aux_sum
        return record

    def pipeline_loss(self, outputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        """A micro-batch's masked NLL over the global token count plus its share of the balance loss."""
        logits, aux = outputs[0], outputs[-1].sum()
        nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum", ignore_index=-100)
        per_token, per_row = self._weights
        aux_share = aux * per_row / (self.dims.microbatches * self.dp_size)
        self._parts.append([nll.item(), aux_share.item()])
        return nll * per_token + aux * per_row


def sft(cfg: PostConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool | None = None) -> dict:
    """Supervised fine-tuning per `cfg` into `out_dir`; returns the run summary (see PostTrainer.run)."""
    return SFTTrainer(cfg, out_dir, resume=resume, progress=progress).run()

