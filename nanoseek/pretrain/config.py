"""Run configuration for pretraining: nested dataclasses, loaded from TOML and overridden with --set.

    cfg = load_run_config("configs/small-v3.toml", ["optim.lr=3e-4", "balance.strategy=none"])
    print(to_toml(cfg))              # the resolved config, every field commented with its docstring

Every field carries a one-line docstring (the string under it), shown by `nanoseek pretrain
--show-config` and written as comments into DIR/config.toml. A TOML table maps onto a section;
unknown keys fail with the valid ones listed; values are type-checked against the field's type.
`--set section.key=value` parses `value` as a TOML literal (3e-4, true, [0.8, 0.9], "text") and
falls back to a bare string, so `--set schedule.lr_schedule=cosine` needs no quotes.
TOML has no null: model overrides spell None as "null" (e.g. `q_lora_rank = "null"`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.train.config import (  # noqa: F401  (field_docs, flatten, to_toml: part of this module's API)
    assignments,
    field_docs,
    flatten,
    null,
    parse_toml,
    read_toml,
    to_toml,
    unknown_key,
    update,
)
from nanoseek.train.config import describe as _describe
from nanoseek.train.schedules import (
    BatchSizeRamp,
    bias_update_speed_schedule,
    build_lr_schedule,
    mtp_weight_schedule,
)

LR_SCHEDULE_NAMES = ("deepseek-multistep", "warmup-constant-cosine", "cosine", "constant")
BALANCE_STRATEGIES = ("none", "aux_free", "seq_aux", "v3", "v2")
DTYPES = ("fp32", "bf16")


@dataclass
class ModelSection:
    """Which model to train."""

    preset: str = "small-v3"
    """ModelConfig preset to start from (tiny-v3, tiny-v2, tiny-dense, small-v3, ...)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields replacing the preset's, e.g. {num_hidden_layers = 4, n_routed_experts = 64}."""
    init_from: str = ""
    """Start from the weights of this HF-layout model directory ("" = fresh initialization)."""


@dataclass
class DataSection:
    """Where the tokens come from."""

    dataset: str = ""
    """Prepared dataset directory (`nanoseek data prepare`); "" = build one from `sources`."""
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    """Text used to build the dataset when `dataset` is "": files, directories or "stdlib"."""
    tokenizer: str = ""
    """Tokenizer directory used to build the dataset; "" = train one with the model's vocab_size."""
    max_bytes: int = 0
    """Cap on the text read when building the tokenizer and dataset (0 = all of it)."""
    val_fraction: float = 0.01
    """Fraction of documents held out when building the dataset."""
    cache_dir: str = ""
    """Directory where built datasets are kept and reused across runs ("" = DIR/data)."""
    seq_len: int = 256
    """Tokens per training sequence (main-model positions; MTP's extra targets come on top)."""


@dataclass
class OptimSection:
    """AdamW with DeepSeek's settings (DeepSeek LLM §2.3, V3 §4.2)."""

    lr: float = 3e-3
    """Peak learning rate (the schedule scales it)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings; norms and biases are never decayed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""


@dataclass
class ScheduleSection:
    """Learning-rate schedule (in optimizer steps) and batch-size ramp (in tokens)."""

    lr_schedule: str = "warmup-constant-cosine"
    """deepseek-multistep | warmup-constant-cosine | cosine | constant."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final LR / peak LR for cosine and warmup-constant-cosine (V3: 2.2e-5 / 2.2e-4)."""
    milestones: list[float] = field(default_factory=lambda: [0.8, 0.9])
    """deepseek-multistep: fractions of the steps where the LR drops."""
    factors: list[float] = field(default_factory=lambda: [0.316, 0.1])
    """deepseek-multistep: LR / peak from each milestone on."""
    decay_start: float = 0.676
    """warmup-constant-cosine: fraction of the steps where the cosine decay starts (V3: 10/14.8)."""
    decay_end: float = 0.966
    """warmup-constant-cosine: fraction of the steps where it reaches the floor (V3: 14.3/14.8)."""
    batch_ramp_start: int = 0
    """Batch-size ramp: sequences per step at the start (0 = no ramp; a multiple of train.batch_size)."""
    batch_ramp_tokens: int = 0
    """Batch-size ramp: tokens over which the batch grows to batch_size × grad_accum."""


@dataclass
class BalanceSection:
    """Load balancing of the routed experts (V2 §2.2.3-4, V3 §2.1.2, aux-loss-free 2408.15664)."""

    strategy: str = "v3"
    """none | aux_free (bias update) | seq_aux (V3 sequence-wise loss) | v3 (both) | v2 (α1, α2, α3 losses)."""
    bias_update_speed: float = 0.001
    """γ of the aux-loss-free update b_i += γ·sign(mean load − load_i)."""
    bias_update_until: float = 1.0
    """Fraction of the steps after which γ = 0 (V3: 14.3/14.8 of the tokens)."""
    center_bias: bool = False
    """Keep the routing biases zero-mean after each update (selection unchanged, no drift)."""
    seq_aux_alpha: float = 0.0001
    """α of the V3 sequence-wise balance loss (seq_aux, v3)."""
    expert_aux_alpha: float = 0.003
    """α1, V2 expert-level balance loss (v2)."""
    device_aux_alpha: float = 0.05
    """α2, V2 device-level balance loss over model ep_size devices (v2)."""
    comm_aux_alpha: float = 0.02
    """α3, V2 communication balance loss (v2; only with device-limited routing, model topk_devices)."""
    capacity_factor: float = 0.0
    """V2 device-level token dropping in training: capacity per device (0 = off; V2: 1.0)."""
    no_drop_fraction: float = 0.1
    """Fraction of each batch's sequences never dropped (V2: ~10%)."""


@dataclass
class MTPSection:
    """Multi-token-prediction loss L = L_main + λ/D Σ_k L_k (V3 §2.2); depth D = model num_nextn_predict_layers."""

    weight: float = 0.3
    """λ until `switch_at` (V3: 0.3)."""
    weight_after: float = 0.1
    """λ after `switch_at` (V3: 0.1)."""
    switch_at: float = 0.676
    """Fraction of the steps where λ switches (V3: 10/14.8 of the tokens)."""


@dataclass
class TrainSection:
    """The training loop."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the batch ramp overrides it while ramping)."""
    dtype: str = "bf16"
    """fp32 or bf16 (autocast; master weights and optimizer state stay fp32)."""
    device: str = "auto"
    """cpu, cuda (or cuda:N), or auto (cuda when available)."""
    compile: bool = False
    """torch.compile the model."""
    fp8: bool = False
    """Block-scaled FP8 linear layers (V3 §3.3, emulated on CPU)."""
    seed: int = 0
    """Seeds initialization and data order."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (bit-identical resumes on any thread count)."""
    spike_factor: float = 3.0
    """Skip a step whose total loss exceeds this × its running mean (0 = off); non-finite losses always skip."""
    spike_warmup: int = 20
    """Accepted steps before spike detection starts."""
    max_bad_steps: int = 3
    """Consecutive skipped steps that trigger a rollback to the last checkpoint."""
    max_rollbacks: int = 3
    """Rollbacks allowed before the run stops with an error."""


@dataclass
class EvalSection:
    """Held-out evaluation."""

    every: int = 50
    """Evaluate every N steps (and at the end; 0 = only at the end)."""
    batches: int = 0
    """Held-out batches per evaluation (0 = the whole held-out split)."""
    batch_size: int = 8
    """Sequences per held-out batch."""


@dataclass
class CheckpointSection:
    """Resumable checkpoints in DIR/checkpoints."""

    every: int = 100
    """Checkpoint every N steps (and at the end; 0 = only at the end)."""
    keep: int = 2
    """Checkpoints kept (oldest removed first)."""


@dataclass
class LogSection:
    """Metrics and progress."""

    tensorboard: bool = True
    """Also write TensorBoard events to DIR/tensorboard when tensorboard is installed."""
    progress: bool = True
    """Show a tqdm progress bar."""
    expert_load_every: int = 0
    """Write the full per-layer expert load every N steps (0 = only at evaluations)."""


@dataclass
class RunConfig:
    """A pretraining run (`nanoseek pretrain`)."""

    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: DataSection = field(default_factory=DataSection)
    """The data."""
    optim: OptimSection = field(default_factory=OptimSection)
    """The optimizer."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """LR schedule and batch ramp."""
    balance: BalanceSection = field(default_factory=BalanceSection)
    """Expert load balancing."""
    mtp: MTPSection = field(default_factory=MTPSection)
    """Multi-token prediction."""
    train: TrainSection = field(default_factory=TrainSection)
    """The loop."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Logging."""

    # ------------------------------------------------------------------ derived
    def model_config(self, **token_ids):
        """The ModelConfig of this run: preset + overrides + the balance strategy's loss weights.

        token_ids (bos_token_id, eos_token_id, pad_token_id) come from the tokenizer."""

        if self.model.preset not in PRESETS:
            raise ValueError(f"model.preset = {self.model.preset!r} is invalid: allowed: {', '.join(PRESETS)}")
        overrides = {k: null(v) for k, v in self.model.overrides.items()}
        cfg = ModelConfig.preset(self.model.preset, **{**overrides, **token_ids})
        b = self.balance
        on = b.strategy
        return cfg.replace(
            seq_aux_alpha=b.seq_aux_alpha if on in ("seq_aux", "v3") else 0.0,
            expert_aux_alpha=b.expert_aux_alpha if on == "v2" else 0.0,
            device_aux_alpha=b.device_aux_alpha if on == "v2" and cfg.ep_size > 1 else 0.0,
            comm_aux_alpha=b.comm_aux_alpha if on == "v2" and cfg.topk_devices is not None else 0.0,
            mtp_loss_weight=self.mtp.weight,
        )

    @property
    def uses_bias_update(self) -> bool:
        return self.balance.strategy in ("aux_free", "v3")

    def lr_schedule(self):
        """The LR schedule over optimizer steps."""

        s, total, peak = self.schedule, self.train.steps, self.optim.lr
        kwargs: dict[str, Any] = {"peak_lr": peak, "warmup_steps": s.warmup_steps}
        if s.lr_schedule != "constant":
            kwargs["total_steps"] = total
        if s.lr_schedule == "deepseek-multistep":
            kwargs.update(milestones=tuple(s.milestones), factors=tuple(s.factors))
        elif s.lr_schedule == "warmup-constant-cosine":
            kwargs.update(decay_start=s.decay_start, decay_end=s.decay_end, min_lr=peak * s.min_lr_ratio)
        elif s.lr_schedule == "cosine":
            kwargs.update(min_lr=peak * s.min_lr_ratio)
        try:
            return build_lr_schedule(s.lr_schedule, **kwargs)
        except ValueError as e:
            raise ValueError(f"[schedule] is invalid for train.steps = {total}: {e}") from None

    def batch_ramp(self):
        """BatchSizeRamp in sequences per step, or None."""

        s, t = self.schedule, self.train
        if not s.batch_ramp_start:
            return None
        try:
            return BatchSizeRamp(s.batch_ramp_start, t.batch_size * t.grad_accum, s.batch_ramp_tokens,
                                 multiple=t.batch_size)
        except ValueError as e:
            raise ValueError(f"schedule.batch_ramp_* with train.batch_size = {t.batch_size} and train.grad_accum = "
                             f"{t.grad_accum} is invalid: {e}") from None

    def mtp_schedule(self):

        return mtp_weight_schedule(self.mtp.switch_at * self.train.steps, self.mtp.weight, self.mtp.weight_after)

    def bias_speed_schedule(self):

        speed = self.balance.bias_update_speed if self.uses_bias_update else 0.0
        return bias_update_speed_schedule(self.balance.bias_update_until * self.train.steps, speed, 0.0)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        """Fail with the field, the value and what is allowed; builds every schedule once."""
        def bad(name, allowed):
            section, key = name.split(".")
            raise ValueError(f"{name} = {getattr(getattr(self, section), key)!r} is invalid: {allowed}")

        def positive(name, minimum=1):
            section, key = name.split(".")
            if getattr(getattr(self, section), key) < minimum:
                bad(name, f"must be >= {minimum}")

        for name in ("data.seq_len", "train.steps", "train.batch_size", "train.grad_accum", "eval.batch_size",
                     "checkpoint.keep"):
            positive(name)
        for name in ("data.max_bytes", "train.threads", "eval.every", "eval.batches", "checkpoint.every",
                     "train.spike_warmup", "train.max_rollbacks", "log.expert_load_every", "schedule.warmup_steps"):
            positive(name, 0)
        positive("train.max_bad_steps", 1)
        if not (self.train.device in ("auto", "cpu") or self.train.device.split(":")[0] == "cuda"):
            bad("train.device", "allowed: auto, cpu, cuda, cuda:N")
        if self.train.dtype not in DTYPES:
            bad("train.dtype", f"allowed: {', '.join(DTYPES)}")
        if self.schedule.lr_schedule not in LR_SCHEDULE_NAMES:
            bad("schedule.lr_schedule", f"allowed: {', '.join(LR_SCHEDULE_NAMES)}")
        if self.balance.strategy not in BALANCE_STRATEGIES:
            bad("balance.strategy", f"allowed: {', '.join(BALANCE_STRATEGIES)}")
        if not 0 < self.data.val_fraction < 1:
            bad("data.val_fraction", "must be in (0, 1): evaluation needs a held-out split")
        if not self.optim.lr > 0 or not math.isfinite(self.optim.lr):
            bad("optim.lr", "must be a finite number > 0")
        for name in ("optim.beta1", "optim.beta2"):
            if not 0 <= getattr(self.optim, name.split(".")[1]) < 1:
                bad(name, "must be in [0, 1)")
        for name in ("optim.eps", "optim.weight_decay", "optim.grad_clip", "train.spike_factor",
                     "balance.bias_update_speed", "balance.seq_aux_alpha", "balance.expert_aux_alpha",
                     "balance.device_aux_alpha", "balance.comm_aux_alpha", "balance.capacity_factor",
                     "mtp.weight", "mtp.weight_after"):
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if not (value >= 0 and math.isfinite(value)):
                bad(name, "must be a finite number >= 0")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            bad("schedule.min_lr_ratio", "must be in [0, 1]")
        for name in ("balance.bias_update_until", "mtp.switch_at", "balance.no_drop_fraction"):
            section, key = name.split(".")
            if not 0 <= getattr(getattr(self, section), key) <= 1:
                bad(name, "must be a fraction in [0, 1]")
        if self.schedule.batch_ramp_start and not self.schedule.batch_ramp_tokens:
            bad("schedule.batch_ramp_tokens", "must be > 0 when schedule.batch_ramp_start is set")
        if self.train.fp8 and self.train.compile:
            bad("train.fp8", "FP8 layers use a custom autograd function; do not combine with train.compile")
        self.lr_schedule()
        self.batch_ramp()
        self.mtp_schedule()
        self.bias_speed_schedule()
        if not self.model.init_from:
            self.model_config()  # preset and overrides must make a valid ModelConfig
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_model_overrides(overrides: dict) -> None:

    valid = [f.name for f in fields(ModelConfig) if f.name != "extra"]
    for key in overrides:
        if key not in valid:
            raise unknown_key(f"model.overrides.{key}", "[model.overrides] (ModelConfig fields)", valid)


def from_dict(data: dict, base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from nested dicts (a parsed TOML file): `base` (default: the defaults) updated by `data`."""
    return update(base if base is not None else RunConfig(), data, merged={("model", "overrides")},
                  checks={("model", "overrides"): _check_model_overrides})


def apply_overrides(cfg: RunConfig, items: list[str]) -> RunConfig:
    """Apply `section.key=value` strings (`--set`); `model.overrides.FIELD=value` sets a ModelConfig field."""
    return from_dict(assignments(items), cfg)


def from_toml_text(text: str, where: str = "<string>") -> RunConfig:
    return from_dict(parse_toml(text, where))


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, updated by the TOML file at `path` (if given), then by `--set` strings; validated."""
    cfg = RunConfig()
    if path is not None:
        data = read_toml(path)
        try:
            cfg = from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def describe() -> str:
    """Every key with its type, default and docstring (for --help)."""
    return _describe(RunConfig)
