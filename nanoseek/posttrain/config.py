"""Run configuration of the post-training commands (sft, dpo, grpo, distill, rejection-sample, eval):
the shared sections (`nanoseek.train.config`) with post-training defaults, plus [task], [data], the
methods' sections and [eval]; loaded from TOML and overridden with `--set section.key=value`.

    cfg = PostConfig.load("configs/grpo-arithmetic.toml", ["grpo.beta=0.04", "train.steps=50"])
    print(cfg.to_toml())

Each command reads the sections it needs ([sft] for sft, [grpo] for grpo, ...) and ignores the others,
so one file can describe a whole family of runs. Every field carries a one-line docstring.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from nanoseek.posttrain.policy_losses import (
    ADVANTAGE_SCALES,
    AGGREGATIONS,
    KL_ESTIMATORS,
)
from nanoseek.tasks import TASKS, make_task
from nanoseek.tasks.base import Task
from nanoseek.train.config import (
    CheckpointSection,
    LogSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
)

DATA_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")  # what SFT and DPO rows hold


@dataclass
class TaskSection:
    """The verifiable task: generated data, rollout prompts, rule-based rewards, evaluation."""

    name: str = "arithmetic"
    """arithmetic | countdown | bilingual | file (a data file: options path, format, verifier, fields, test_path, limits)
    ("" = no task: file data only, no task evaluation)."""
    options: dict = field(default_factory=dict)
    """Task constructor options, e.g. {digits = 2, ops = ["+"]}, {languages = ["en", "xx"]}, {template = "r1zero"}."""
    weights: dict = field(default_factory=dict)
    """Reward weights (accuracy, format, tag_count, tinyzero, answered, language, length, overlong); {} = the task's."""
    train_seed: int = 1
    """Seed of the training problems (generated SFT data, rollout and pair prompts)."""
    train_size: int = 6000
    """Training problems drawn from the task's train split."""


@dataclass
class PostDataSection:
    """Supervised data."""

    train: str = ""
    """Data file (.jsonl, .jsonl.gz, .json, .parquet or a `datasets` save_to_disk folder): {"messages": [...]} or
    {"prompt", "completion"} rows (SFT), {"prompt", "chosen", "rejected"} (DPO); "" = generated from the task."""
    fields: dict = field(default_factory=dict)
    """data.train's (and distill.traces') column for each field it is read for, e.g. {prompt = "question",
    completion = "answer"}."""
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
    """Data file of teacher traces, SFT rows (their columns named by data.fields) ("" = rejection-sample them from
    the teacher with [rejection])."""
    logit_weight: float = 0.0
    """Weight of the token KL(teacher ‖ student) on completion tokens, added to the SFT loss (0 = off)."""
    temperature: float = 1.0
    """Softening temperature of the logit distillation."""


@dataclass
class TaskEvalSection:
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
class PostConfig(RunConfig):
    """A post-training run (`nanoseek sft | dpo | grpo | distill | rejection-sample`). Each command reads the
    sections it needs ([sft] for sft, [grpo] for grpo, ...), so one file can describe a family of runs."""

    model: ModelSection = field(default_factory=lambda: ModelSection(preset="tiny-v3"))
    """The policy / student."""
    task: TaskSection = field(default_factory=TaskSection)
    """The verifiable task."""
    data: PostDataSection = field(default_factory=PostDataSection)
    """Supervised data."""
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-3, beta2=0.99, weight_decay=0.0))
    """AdamW."""
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(lr_schedule="constant", warmup_steps=0))
    """LR schedule."""
    train: TrainSection = field(default_factory=lambda: TrainSection(
        steps=100, batch_size=64, dtype="fp32", spike_factor=0.0))
    """The loop (fp32: faster than bf16 for tiny models on CPU; no spike detection: RL losses are not
    positive LM losses)."""
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
    eval: TaskEvalSection = field(default_factory=TaskEvalSection)
    """Evaluation."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Data and expert parallelism (torchrun)."""
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=0, keep=2))
    """Checkpoints."""
    log: LogSection = field(default_factory=lambda: LogSection(tensorboard=False))
    """Logging."""

    merged = RunConfig.merged | {("task", "options"), ("task", "weights")}

    def validate(self) -> PostConfig:
        super().validate()
        self.at_least(["eval.every", "eval.examples", "eval.k", "task.train_size", "grpo.beta", "grpo.ref_reset_every",
                       "grpo.epsilon", "grpo.epsilon_high", "grpo.top_p", "rejection.top_p", "eval.top_p",
                       "grpo.temperature", "rejection.temperature", "eval.temperature", "dpo.temperature",
                       "distill.logit_weight", "dpo.nll_weight"], 0)
        self.at_least(["data.seq_len", "grpo.group_size", "grpo.prompts_per_step", "grpo.mu", "grpo.max_new_tokens",
                       "dpo.prompts", "dpo.samples", "dpo.max_new_tokens", "rejection.prompts", "rejection.samples",
                       "rejection.max_new_tokens", "rejection.max_per_prompt", "eval.max_new_tokens"], 1)
        if self.schedule.batch_ramp_start:
            self.fail("schedule.batch_ramp_start", "the batch-size ramp is a pretraining schedule (leave it 0)")
        self.one_of("grpo.aggregation", AGGREGATIONS)
        self.one_of("grpo.advantage_scale", ADVANTAGE_SCALES)
        self.one_of("grpo.kl_estimator", KL_ESTIMATORS)
        if self.grpo.epsilon >= 1:
            self.fail("grpo.epsilon", "must be in [0, 1): the ratio's lower clip 1 - ε must stay positive")
        if self.grpo.group_size < 2:
            self.fail("grpo.group_size", "must be >= 2: a group of one has no relative advantage")
        for name in ("grpo.top_p", "rejection.top_p", "eval.top_p"):
            section, key = name.split(".")
            if not 0 < getattr(getattr(self, section), key) <= 1:
                self.fail(name, "must be in (0, 1]")
        if self.distill.temperature <= 0:
            self.fail("distill.temperature", "must be > 0")
        if self.task.name and self.task.name not in TASKS:
            self.fail("task.name", f"allowed: {', '.join(sorted(TASKS))} or \"\" (no task)")
        for name, column in self.data.fields.items():
            if name not in DATA_FIELDS or not isinstance(column, str):
                raise ValueError(f"data.fields.{name} is invalid: allowed: {', '.join(DATA_FIELDS)}, each naming a "
                                 "column")
        for style, share in self.data.styles.items():
            if not (isinstance(share, (int, float)) and share >= 0):
                raise ValueError(f"data.styles.{style} = {share!r} is invalid: must be a share >= 0")
        if self.data.styles and not sum(self.data.styles.values()) > 0:
            raise ValueError("data.styles is invalid: the shares must not all be zero")
        return self

    def build_task(self, prompt_format: Mapping | None = None) -> Task | None:
        """The configured Task (None when task.name is ""). `prompt_format` (what a model recorded: template,
        prefill_think) fills the options the config leaves unset, so a model is asked as it was trained."""
        if not self.task.name:
            return None
        kwargs = {**(prompt_format or {}), **self.task.options}
        if self.task.weights:
            kwargs["weights"] = dict(self.task.weights)
        try:
            return make_task(self.task.name, **kwargs)
        except TypeError as e:
            raise ValueError(f"task.options = {self.task.options!r} is invalid for task {self.task.name!r}: "
                             f"{e}") from None


# GRPO's learning rate: 10x below SFT's, as every RL stage of the pipelines uses. SFT's 1e-3 took a model that
# solved the task from 100% to 35% held-out accuracy in 3 GRPO steps (issue 18 item 11; docs/LOG.md).
GRPO_LR = 1e-4


def command_defaults(command: str) -> PostConfig:
    """The defaults a post-training command starts from (its --config file and --set apply on top)."""
    cfg = PostConfig()
    if command == "grpo":
        cfg.optim = replace(cfg.optim, lr=GRPO_LR)
    return cfg
