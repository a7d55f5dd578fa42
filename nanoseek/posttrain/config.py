"""Run configuration of the post-training commands (sft, dpo, grpo, distill, rejection-sample, eval):
one dataclass of sections, loaded from TOML and overridden with `--set section.key=value`, exactly as
the pretraining config (both through `nanoseek.train.config`).

    cfg = load_post_config("configs/grpo-arithmetic.toml", ["grpo.beta=0.04", "train.steps=50"])
    print(post_to_toml(cfg))

Each command reads the sections it needs ([sft] for sft, [grpo] for grpo, ...) and ignores the others,
so one file can describe a whole family of runs. Every field carries a one-line docstring.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from nanoseek.posttrain.policy_losses import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    KL_ESTIMATORS,
)
from nanoseek.pretrain.config import CheckpointSection, OptimSection
from nanoseek.tasks import TASKS, make_task
from nanoseek.train.config import (  # noqa: F401  (read_toml: part of this module's API)
    assignments,
    describe,
    flatten,
    parse_toml,
    read_toml,
    to_toml,
    update,
)
from nanoseek.train.schedules import build_lr_schedule

DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ModelSection:
    """The policy (student) model."""

    init_from: str = ""
    """HF-layout model directory (with its tokenizer) to start from; "" = a fresh model from `preset`."""
    preset: str = "tiny-v3"
    """ModelConfig preset of a fresh model (tiny-v3, tiny-dense, small-v3, ...)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields replacing the preset's (fresh models) or the checkpoint's
    (e.g. {num_nextn_predict_layers = 0})."""
    tokenizer: str = ""
    """Tokenizer directory for a fresh model ("" = train a byte-level BPE of `vocab_size` on the training texts)."""
    vocab_size: int = 300
    """Vocabulary of the tokenizer trained for a fresh model."""


@dataclass
class TaskSection:
    """The verifiable task: generated data, rollout prompts, rule-based rewards, evaluation."""

    name: str = "arithmetic"
    """arithmetic | countdown | bilingual ("" = no task: file data only, no task evaluation)."""
    options: dict = field(default_factory=dict)
    """Task constructor options, e.g. {digits = 2, ops = ["+"]}, {languages = ["en", "xx"]}, {template = "r1zero"}."""
    weights: dict = field(default_factory=dict)
    """Reward weights (accuracy, format, tag_count, tinyzero, answered, language, length, overlong); {} = the task's."""
    train_seed: int = 1
    """Seed of the training problems (generated SFT data, rollout and pair prompts)."""
    train_size: int = 6000
    """Training problems drawn from the task's train split."""


@dataclass
class DataSection:
    """Supervised data."""

    train: str = ""
    """jsonl file: {"messages": [...]} or {"prompt", "completion"} rows (SFT), {"prompt", "chosen", "rejected"}
    (DPO); "" = generated from the task."""
    styles: dict = field(default_factory=lambda: {"think": 1.0})
    """Generated SFT data: task style -> share, e.g. {think = 0.3, buggy = 0.7} for a bimodal base."""
    tag_bare: bool = False
    """Generated SFT data: write bare-style answers as <answer>…</answer>, so a base's two modes part at the
    first token."""
    seq_len: int = 96
    """Longest training sequence in tokens (longer examples are cut; packing fills sequences up to it)."""
    pack: bool = False
    """Pack several examples into each sequence (each keeps its BOS and restarts its positions)."""


@dataclass
class ScheduleSection:
    """Learning-rate schedule over optimizer steps."""

    lr_schedule: str = "constant"
    """constant | cosine."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final LR / peak LR of the cosine schedule."""


@dataclass
class TrainSection:
    """The loop."""

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences (sft, distill) or pairs (dpo) per step; grpo uses grpo.prompts_per_step x grpo.group_size."""
    micro_batch_size: int = 0
    """Split each step into micro-batches of this many sequences (0 = one pass); same update, less memory."""
    dtype: str = "fp32"
    """fp32 or bf16 autocast (fp32 is faster for tiny models on CPU)."""
    device: str = "auto"
    """cpu, cuda (or cuda:N), or auto (cuda when available)."""
    seed: int = 0
    """Seeds initialization, data order and sampling."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default; 1 per process when tests run in parallel)."""
    time_limit: float = 0.0
    """Stop at the first step boundary after this many seconds of training (0 = off)."""


@dataclass
class SFTSection:
    """Supervised fine-tuning (DeepSeek-R1 §2.3.1, §2.3.3)."""

    completion_only: bool = True
    """Loss on completion (assistant) tokens only; false = on every token."""


@dataclass
class DPOSection:
    """Direct preference optimization (sigmoid loss; DeepSeek LLM §5.2)."""

    beta: float = 0.1
    """β of −log σ(β·margin)."""
    nll_weight: float = 0.0
    """Add this × the chosen completions' per-token NLL (IRPO / RPO: keeps the chosen likely; 0 = plain DPO)."""
    prompts: int = 256
    """On-policy pairs: task prompts sampled."""
    samples: int = 8
    """On-policy pairs: completions per prompt (a pair is one correct and one incorrect of them)."""
    temperature: float = 1.0
    """On-policy pairs: sampling temperature."""
    max_new_tokens: int = 48
    """On-policy pairs: completion length limit."""


@dataclass
class GRPOSection:
    """Group Relative Policy Optimization (DeepSeekMath §4.1, DeepSeek-R1 §2.2)."""

    group_size: int = 8
    """G: completions sampled per prompt."""
    prompts_per_step: int = 16
    """Prompts per optimizer step (the batch is prompts_per_step x group_size completions)."""
    temperature: float = 1.0
    """Rollout temperature (R1-Zero: 1)."""
    top_p: float = 1.0
    """Rollout nucleus."""
    max_new_tokens: int = 48
    """Completion length limit."""
    epsilon: float = 0.2
    """Clip ε: ratio kept in [1 − ε, 1 + ε_high]."""
    epsilon_high: float = 0.2
    """Upper clip ε_high (DAPO clip-higher: 0.28)."""
    mu: int = 1
    """μ: optimizer steps per batch of rollouts, against the log-probs of the policy that sampled them."""
    beta: float = 0.0
    """KL weight β (0 = no reference model is loaded)."""
    kl_estimator: str = "k3"
    """k3 (GRPO, unbiased, >= 0) | k2 | k1."""
    aggregation: str = "token"
    """token (DAPO) | sequence (DeepSeekMath) | dr_grpo (sum over max_new_tokens)."""
    advantage_scale: str = "group"
    """group (GRPO) | batch | none (Dr. GRPO): what the centred rewards are divided by."""
    ref_reset_every: int = 0
    """Copy the policy into the reference every N steps (R1: 400; 0 = never)."""
    mask_truncated: bool = False
    """Leave completions cut by max_new_tokens out of the loss (DAPO overlong filtering)."""


@dataclass
class RejectionSection:
    """Rejection sampling (DeepSeek-R1 §2.3.3): keep verified, well-formed, single-language completions."""

    prompts: int = 1000
    """Task prompts sampled (from the train split)."""
    samples: int = 4
    """k completions per prompt."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 0.95
    """Sampling nucleus."""
    max_new_tokens: int = 64
    """Completion length limit (truncated completions are never kept)."""
    require_format: bool = True
    """Keep only <think>…</think><answer>…</answer> completions."""
    require_language: bool = True
    """Keep only completions whose reasoning is entirely in the prompt's language (tasks that score language)."""
    max_per_prompt: int = 1
    """Distinct completions kept per prompt."""
    seed: int = 7
    """Seed of the prompts (a train-split seed distinct from the RL prompts')."""


@dataclass
class DistillSection:
    """Distillation (DeepSeek-R1 §2.4): SFT a smaller student on a teacher's rejection-sampled traces."""

    teacher: str = ""
    """Teacher model directory (its tokenizer becomes the student's)."""
    traces: str = ""
    """SFT jsonl of teacher traces ("" = rejection-sample them from the teacher with [rejection])."""
    logit_weight: float = 0.0
    """Weight of the token KL(teacher ‖ student) on completion tokens, added to the SFT loss (0 = off)."""
    temperature: float = 1.0
    """Softening temperature of the logit distillation."""


@dataclass
class EvalSection:
    """Held-out task evaluation (greedy accuracy; pass@1, pass@k, cons@k with k samples)."""

    every: int = 0
    """Evaluate every N steps (0 = at the start and end only)."""
    examples: int = 200
    """Held-out (test split) problems."""
    seed: int = 0
    """Seed of the held-out problems."""
    k: int = 0
    """Samples per problem for pass@1 / pass@k / cons@k (0 = greedy metrics only)."""
    temperature: float = 0.6
    """Sampling temperature (R1's evaluation: 0.6)."""
    top_p: float = 0.95
    """Sampling nucleus (R1's evaluation: 0.95)."""
    max_new_tokens: int = 64
    """Completion length limit."""
    at_start: bool = True
    """Also evaluate the starting model (step 0)."""


@dataclass
class LogSection:
    """Metrics and progress."""

    tensorboard: bool = False
    """Also write TensorBoard events to DIR/tensorboard when tensorboard is installed."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class PostConfig:
    """A post-training run (`nanoseek sft | dpo | grpo | distill | rejection-sample`)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The policy / student."""
    task: TaskSection = field(default_factory=TaskSection)
    """The verifiable task."""
    data: DataSection = field(default_factory=DataSection)
    """Supervised data."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-3, beta2=0.99, weight_decay=0.0))
    """AdamW."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """LR schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """The loop."""
    sft: SFTSection = field(default_factory=SFTSection)
    """SFT."""
    dpo: DPOSection = field(default_factory=DPOSection)
    """DPO."""
    grpo: GRPOSection = field(default_factory=GRPOSection)
    """GRPO."""
    rejection: RejectionSection = field(default_factory=RejectionSection)
    """Rejection sampling."""
    distill: DistillSection = field(default_factory=DistillSection)
    """Distillation."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation."""
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=0, keep=2))
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Logging."""

    def validate(self) -> "PostConfig":
        """Fail with the field, the value and what is allowed."""
        def bad(name, allowed):
            section, key = name.split(".")
            raise ValueError(f"{name} = {getattr(getattr(self, section), key)!r} is invalid: {allowed}")

        def at_least(names, minimum):
            for name in names:
                section, key = name.split(".")
                value = getattr(getattr(self, section), key)
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
                    bad(name, f"must be >= {minimum}")

        at_least(["train.steps", "train.micro_batch_size", "train.threads", "train.time_limit", "eval.every",
                  "eval.examples", "eval.k", "checkpoint.every", "schedule.warmup_steps", "task.train_size",
                  "optim.eps", "optim.weight_decay", "optim.grad_clip", "grpo.beta", "grpo.ref_reset_every",
                  "grpo.epsilon", "grpo.epsilon_high", "grpo.top_p", "rejection.top_p", "eval.top_p",
                  "grpo.temperature", "rejection.temperature", "eval.temperature", "dpo.temperature",
                  "distill.logit_weight", "dpo.nll_weight"], 0)
        at_least(["train.batch_size", "data.seq_len", "grpo.group_size", "grpo.prompts_per_step", "grpo.mu",
                  "grpo.max_new_tokens", "dpo.prompts", "dpo.samples", "dpo.max_new_tokens", "rejection.prompts",
                  "rejection.samples", "rejection.max_new_tokens", "rejection.max_per_prompt",
                  "eval.max_new_tokens", "checkpoint.keep", "model.vocab_size"], 1)
        if not self.optim.lr > 0 or not math.isfinite(self.optim.lr):
            bad("optim.lr", "must be a finite number > 0")
        for name in ("optim.beta1", "optim.beta2"):
            if not 0 <= getattr(self.optim, name.split(".")[1]) < 1:
                bad(name, "must be in [0, 1)")
        if self.train.dtype not in DTYPES:
            bad("train.dtype", f"allowed: {', '.join(DTYPES)}")
        if not (self.train.device in ("auto", "cpu") or self.train.device.split(":")[0] == "cuda"):
            bad("train.device", "allowed: auto, cpu, cuda, cuda:N")
        if self.schedule.lr_schedule not in LR_SCHEDULES:
            bad("schedule.lr_schedule", f"allowed: {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            bad("schedule.min_lr_ratio", "must be in [0, 1]")
        if self.grpo.aggregation not in AGGREGATIONS:
            bad("grpo.aggregation", f"allowed: {', '.join(AGGREGATIONS)}")
        if self.grpo.advantage_scale not in ADVANTAGE_SCALES:
            bad("grpo.advantage_scale", f"allowed: {', '.join(ADVANTAGE_SCALES)}")
        if self.grpo.kl_estimator not in KL_ESTIMATORS:
            bad("grpo.kl_estimator", f"allowed: {', '.join(KL_ESTIMATORS)}")
        if self.grpo.epsilon >= 1:
            bad("grpo.epsilon", "must be in [0, 1): the ratio's lower clip 1 - ε must stay positive")
        if self.grpo.group_size < 2:
            bad("grpo.group_size", "must be >= 2: a group of one has no relative advantage")
        for name in ("grpo.top_p", "rejection.top_p", "eval.top_p"):
            section, key = name.split(".")
            if not 0 < getattr(getattr(self, section), key) <= 1:
                bad(name, "must be in (0, 1]")
        if self.distill.temperature <= 0:
            bad("distill.temperature", "must be > 0")
        if self.task.name:
            if self.task.name not in TASKS:
                bad("task.name", f"allowed: {', '.join(sorted(TASKS))} or \"\" (no task)")
        for style, share in self.data.styles.items():
            if not (isinstance(share, (int, float)) and share >= 0):
                raise ValueError(f"data.styles.{style} = {share!r} is invalid: must be a share >= 0")
        if self.data.styles and not sum(self.data.styles.values()) > 0:
            raise ValueError("data.styles is invalid: the shares must not all be zero")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build_task(self):
        """The configured Task (None when task.name is "")."""
        if not self.task.name:
            return None
        kwargs = dict(self.task.options)
        if self.task.weights:
            kwargs["weights"] = dict(self.task.weights)
        try:
            return make_task(self.task.name, **kwargs)
        except TypeError as e:
            raise ValueError(f"task.options = {self.task.options!r} is invalid for task {self.task.name!r}: "
                             f"{e}") from None

    def lr_schedule(self):
        s, peak = self.schedule, self.optim.lr
        if s.lr_schedule == "cosine":
            return build_lr_schedule("cosine", peak_lr=peak, total_steps=max(self.train.steps, 1),
                                     warmup_steps=min(s.warmup_steps, self.train.steps), min_lr=peak * s.min_lr_ratio)
        return build_lr_schedule("constant", peak_lr=peak, warmup_steps=s.warmup_steps)


# ---------------------------------------------------------------------- loading and writing
# Dict fields merged key by key (a TOML table adds to, not replaces, the default).
_MERGED_DICTS = {("model", "overrides"), ("task", "options"), ("task", "weights")}


def post_from_dict(data: dict, base: PostConfig | None = None) -> PostConfig:
    """`base` (default: the defaults) updated by nested dicts (a parsed TOML file)."""
    return update(base if base is not None else PostConfig(), data, merged=_MERGED_DICTS)


def apply_post_overrides(cfg: PostConfig, items: list[str]) -> PostConfig:
    return post_from_dict(assignments(items), cfg)


def load_post_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                     base: PostConfig | None = None) -> PostConfig:
    """`base` (default: the defaults), updated by the TOML file at `path`, then by `--set` strings; validated."""
    cfg = copy.deepcopy(base) if base is not None else PostConfig()
    if path is not None:
        try:
            cfg = post_from_dict(read_toml(path), cfg)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if overrides:
        cfg = apply_post_overrides(cfg, overrides)
    return cfg.validate()


def post_from_toml_text(text: str) -> PostConfig:
    return post_from_dict(parse_toml(text))


def post_to_toml(cfg: PostConfig, comments: bool = True) -> str:
    """The config as TOML that `load_post_config` reads back to an equal config."""
    return to_toml(cfg, comments)


def flatten_post(cfg: PostConfig) -> dict[str, Any]:
    return flatten(cfg)


def describe_post(sections: tuple[str, ...] | None = None) -> str:
    """Every key (of `sections`, default all) with its type, default and docstring (for --keys)."""
    return describe(PostConfig, sections)
