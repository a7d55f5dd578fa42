"""What every post-training command shares (DeepSeek-R1 §2–3 at any scale): the policy and its tokenizer,
sequence batches with a completion mask, sampling through the one inference engine, held-out task
evaluation, and `PostTrainer`, the loop around a method's `train_step`.

A run directory is the pretraining one (`nanoseek.train.pretrain`): DIR/metrics.jsonl (one JSON
record per step, at least `step` and `loss`; evaluations add `eval_*` keys), DIR/model (HF layout +
tokenizer), DIR/checkpoints (resumable: weights, AdamW state, loop state; written atomically by
`nanoseek.train.checkpoint`), DIR/config.toml (the resolved config), plus DIR/summary.json once the
run has finished (what a pipeline checks to reuse a stage).

Everything random in a step is seeded from (train.seed, step), never from a running generator, so a
resumed run draws the same prompts and samples as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.train.post_config import PostConfig, flatten_post, post_from_toml_text, post_to_toml

# Config keys that may change when a run is resumed; anything else must match the saved config.
RESUMABLE_CHANGES = ("train.steps", "train.threads", "train.time_limit", "train.device", "eval.", "checkpoint.",
                     "log.")


# ---------------------------------------------------------------------- model and tokenizer
def build_policy(cfg: PostConfig, texts: Sequence[str] | None = None, *, init_from: str | None = None,
                 tokenizer: str | None = None, overrides: dict | None = None):
    """(model, tokenizer): from `init_from` (default model.init_from; its tokenizer, model.overrides applied
    and the weights loaded strictly) or a fresh `model.preset` whose tokenizer is `tokenizer` (default
    model.tokenizer) or a byte-level BPE trained on `texts`. `overrides` replaces model.overrides (pass {}
    for a teacher or a reference, whose saved config is already what it is)."""
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer_from_texts
    from nanoseek.model.transformer import DeepSeekForCausalLM
    from nanoseek.train.checkpoint import load_model_state
    from nanoseek.train.toml_config import null

    overrides = {k: null(v) for k, v in (cfg.model.overrides if overrides is None else overrides).items()}
    source = cfg.model.init_from if init_from is None else init_from
    tokenizer = cfg.model.tokenizer if tokenizer is None else tokenizer
    torch.manual_seed(cfg.train.seed)
    if source:
        if not Path(source, "config.json").is_file():
            raise FileNotFoundError(f"model.init_from = {source!r}: no config.json there (expected an HF-layout "
                                    "model directory, e.g. a run's DIR/model)")
        tok = load_tokenizer(tokenizer or source)
        model = DeepSeekForCausalLM(ModelConfig.from_pretrained(source).replace(**overrides))
        load_model_state(model, source)
        return model, tok
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        if not texts:
            raise ValueError("a fresh model (model.init_from = \"\") needs model.tokenizer or training texts to "
                             "train a tokenizer on")
        tok = train_tokenizer_from_texts(texts, cfg.model.vocab_size, None, progress=False)
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = DeepSeekForCausalLM(ModelConfig.preset(cfg.model.preset, **{**overrides, **ids}))
    return model, tok


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

    def slice(self, i: int, j: int) -> "SeqBatch":
        return SeqBatch(self.ids[i:j], self.loss_mask[i:j], None if self.positions is None else self.positions[i:j])

    def to(self, device) -> "SeqBatch":
        return SeqBatch(self.ids.to(device), self.loss_mask.to(device),
                        None if self.positions is None else self.positions.to(device))


def collate(rows: Sequence[tuple[list[int], list[int]]] | Sequence[tuple[list[int], list[int], list[int]]],
            pad_id: int) -> SeqBatch:
    """Rows of (ids, mask) or (ids, mask, positions) into a right-padded SeqBatch.

    Right padding needs no attention mask: causal attention never looks right, and padded targets are
    masked out of every loss."""
    L = max(len(r[0]) for r in rows)
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
    from nanoseek.train.policy_losses import token_logprobs

    with autocast(dtype, batch.ids.device):
        logits, _ = forward_logits(model, batch)
    return (token_logprobs(logits, batch.ids[:, 1:]) * batch.loss_mask).sum(-1)


def autocast(dtype: str, device: torch.device | str = "cpu"):
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_slices(n: int, micro: int) -> list[tuple[int, int]]:
    micro = micro or n
    return [(i, min(i + micro, n)) for i in range(0, n, micro)]


# ---------------------------------------------------------------------- sampling
@dataclass
class Sample:
    """One sampled completion: token ids (with the EOS when it stopped), its text (without EOS)."""

    tokens: list[int]
    text: str
    stopped: bool

    @property
    def truncated(self) -> bool:
        return not self.stopped


def sample_completions(model, tok, prompts: Sequence[str] | Sequence[list[int]], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                       batch_size: int = 256) -> list[Sample]:
    """One completion per prompt from `nanoseek.generate`, the engine shared with eval and chat.

    Prompts are texts (encoded with BOS) or token ids; generation stops at EOS."""
    from nanoseek.infer.generate import generate

    out: list[Sample] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tok.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in prompts[i:i + batch_size]]
        new = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=None if seed is None else seed + i, stop_tokens=[tok.eos_id], pad_id=tok.pad_id)
        for ids in new:
            stopped = bool(ids) and ids[-1] == tok.eos_id
            out.append(Sample(list(ids), tok.decode(ids[:-1] if stopped else ids), stopped))
    return out


# ---------------------------------------------------------------------- evaluation
def eval_examples(cfg: PostConfig, task):
    return task.examples(cfg.eval.examples, seed=cfg.eval.seed, split="test")


def evaluate(model, tok, task, examples, cfg: PostConfig) -> dict:
    """`nanoseek.eval.tasks.evaluate_task` with the [eval] settings; keys prefixed "eval_"."""
    from nanoseek.eval.tasks import evaluate_task

    e = cfg.eval
    result = evaluate_task(model, tok, task, examples, k=e.k, temperature=e.temperature, top_p=e.top_p,
                           max_new_tokens=e.max_new_tokens, seed=e.seed)
    return {f"eval_{k}": v for k, v in result.items()}


# ---------------------------------------------------------------------- the loop
class PostTrainer:
    """Base of the SFT / DPO / GRPO / distillation trainers.

    Subclasses implement `setup()` (data, `self.model`, `self.tok`), `train_step()` (one optimizer
    step's update and its metrics record, which must hold "loss") and, when their data stream has a
    position, `extra_state()` / `load_extra_state()`. `run()` does the rest: resume, evaluation,
    metrics, checkpoints, export, time limit and summary."""

    command = "post"

    def __init__(self, cfg: PostConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool | None = None):
        from nanoseek import fastpath
        from nanoseek.train.checkpoint import open_run_dir
        from nanoseek.train.optim import build_optimizer
        from nanoseek.train.pretrain import resolve_device

        self.cfg = cfg.validate()
        self.progress = cfg.log.progress if progress is None else progress
        self.out, self._resume_from = open_run_dir(out_dir, resume)
        if self._resume_from is not None:
            self._check_resumable_config()
        self._threads_before = torch.get_num_threads()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.train.device)
        self.task = cfg.build_task()
        self.model = self.tok = None
        self.setup()
        fastpath.enable(self.model).to(self.device)
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, (o.beta1, o.beta2), o.eps, o.weight_decay)
        self.lr_schedule = cfg.lr_schedule()
        self.step = 0
        self.train_time = 0.0
        self.last_checkpoint_step = -1
        self.eval_set = eval_examples(cfg, self.task) if self.task is not None else None

    # ------------------------------------------------------------------ hooks
    def setup(self) -> None:
        raise NotImplementedError

    def train_step(self) -> dict:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def _check_resumable_config(self) -> None:
        saved_path = self.out / "config.toml"
        if not saved_path.is_file():
            return
        saved = flatten_post(post_from_toml_text(saved_path.read_text(encoding="utf-8")))
        now = flatten_post(self.cfg)
        changed = [k for k in now if now[k] != saved.get(k) and not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:6])
            raise ValueError(f"cannot resume {self.out} with a different config ({diffs}); only "
                             f"{', '.join(RESUMABLE_CHANGES)} may change")

    def set_lr(self) -> float:
        from nanoseek.train.optim import set_lr
        lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, lr)
        return lr

    def optimizer_step(self) -> float:
        """Clip, step, zero; returns the gradient norm before clipping (non-finite: the step is skipped)."""
        from nanoseek.train.optim import clip_grad_norm
        norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip)
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def evaluate(self) -> dict:
        if self.task is None:
            return {}
        was_training = self.model.training
        try:
            return evaluate(self.model, self.tok, self.task, self.eval_set, self.cfg)
        finally:
            self.model.train(was_training)

    def save_checkpoint(self) -> None:
        from nanoseek.train.checkpoint import export_model, save_checkpoint

        state = {"command": self.command, "train_time": self.train_time, "extra": self.extra_state(),
                 "config": post_to_toml(self.cfg, comments=False)}
        save_checkpoint(self.out, self.step, self.model, self.optimizer, state, keep_last=self.cfg.checkpoint.keep)
        export_model(self.model, self.tok, self.out / "model")
        self.last_checkpoint_step = self.step

    def _resume(self) -> None:
        from nanoseek.train.checkpoint import load_checkpoint
        from nanoseek.train.metrics import truncate_metrics

        state = load_checkpoint(self._resume_from, self.model, self.optimizer)
        if state.get("command", self.command) != self.command:
            raise ValueError(f"{self._resume_from} is a `{state.get('command')}` checkpoint, not `{self.command}`")
        self.step = int(state["step"])
        self.train_time = float(state.get("train_time", 0.0))
        self.load_extra_state(state.get("extra", {}))
        truncate_metrics(self.out, self.step)

    def _out_of_time(self) -> bool:
        limit = self.cfg.train.time_limit
        return bool(limit) and self.train_time >= limit

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train to train.steps (or train.time_limit); returns the summary also written to DIR/summary.json."""
        from tqdm import tqdm

        from nanoseek.train.metrics import MetricsLogger, read_metrics
        from nanoseek.utils import atomic_write_text

        cfg = self.cfg
        try:
            if self._resume_from is not None:
                self._resume()
            else:
                for name in ("metrics.jsonl", "summary.json"):
                    (self.out / name).unlink(missing_ok=True)  # an earlier attempt that never checkpointed
            atomic_write_text(self.out / "config.toml", post_to_toml(cfg))
            last: dict = {}
            with MetricsLogger(self.out, cfg.log.tensorboard) as metrics, \
                    tqdm(total=cfg.train.steps, initial=self.step, disable=not self.progress, unit="step",
                         desc=self.command, dynamic_ncols=True) as bar:
                if self.step == 0 and cfg.eval.at_start and self.task is not None:
                    start = {"step": 0, "loss": None, **self.evaluate()}
                    metrics.write(start)
                    bar.write(_eval_line(start))
                while self.step < cfg.train.steps and not self._out_of_time():
                    self.model.train()
                    t0 = time.perf_counter()
                    record = self.train_step()
                    elapsed = time.perf_counter() - t0
                    self.step += 1
                    self.train_time += elapsed
                    record = {"step": self.step, **record, "step_time": elapsed, "train_time": self.train_time}
                    final = self.step >= cfg.train.steps or self._out_of_time()
                    if final or (cfg.eval.every and self.step % cfg.eval.every == 0):
                        record.update(self.evaluate())
                        if "eval_greedy_accuracy" in record:
                            bar.write(_eval_line(record))
                    metrics.write(record)
                    last = record
                    if not final and cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self.save_checkpoint()
                    bar.n = self.step
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "reward_mean") if
                                     isinstance(record.get(k), float)}, refresh=False)
                    bar.refresh()
            if self.last_checkpoint_step != self.step:
                self.save_checkpoint()
        finally:
            torch.set_num_threads(self._threads_before)
        records = read_metrics(self.out)
        evals = [r for r in records if "eval_greedy_accuracy" in r]
        summary = {"command": self.command, "steps": self.step, "train_time": self.train_time,
                   "loss": last.get("loss") if last else None,
                   "start_eval": _strip(evals[0]) if evals and evals[0]["step"] == 0 else None,
                   "eval": _strip(evals[-1]) if evals else None,
                   "model_dir": os.fspath(self.out / "model"), "metrics": os.fspath(self.out / "metrics.jsonl"),
                   "config": os.fspath(self.out / "config.toml")}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary


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
    from nanoseek.utils import atomic_write_text

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
