"""The pretraining run config: the shared sections (`nanoseek.train.config`) plus [data], [balance],
[mtp] and [eval] of a pretraining run.

    cfg = PretrainConfig.load("configs/small-v3.toml", ["optim.lr=3e-4", "balance.bias_update_speed=0"])
    print(cfg.to_toml())             # the resolved config, every field commented with its docstring

Every field carries a one-line docstring (the string under it), shown by `nanoseek pretrain --keys`
and written as comments into DIR/config.toml. A TOML table maps onto a section; unknown keys fail
with the valid ones listed; values are type-checked against the field's type. `--set
section.key=value` parses `value` as a TOML literal (3e-4, true, [0.8, 0.9], "text") and falls back
to a bare string, so `--set schedule.lr_schedule=cosine` needs no quotes. The balance-loss weights are
model fields (`--set model.overrides.seq_aux_alpha=1e-4`), so they live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
from nanoseek.train.schedules import (
    PiecewiseConstant,
    bias_update_speed_schedule,
    mtp_weight_schedule,
)


@dataclass
class DataSection:
    """Where the tokens come from."""

    dataset: str = ""
    """Prepared dataset directory (`nanoseek data prepare`); "" = build one from `sources`."""
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    """Text used to build the dataset when `dataset` is "": files, directories or "stdlib"."""
    text_column: str = "text"
    """The field of record-file rows (.jsonl, .json, .parquet, saved datasets) that holds a document's text."""
    max_bytes: int = 0
    """Cap on the text read when building the tokenizer and dataset (0 = all of it)."""
    val_fraction: float = 0.01
    """Fraction of documents held out when building the dataset."""
    cache_dir: str = ""
    """Directory where built datasets are kept and reused across runs ("" = DIR/data)."""
    seq_len: int = 256
    """Tokens per training sequence (main-model positions; MTP's extra targets come on top)."""
    document_mask: bool = False
    """Attend within each packed document only: a block-diagonal causal mask cut at the BOS that starts every
    document (or, for documents without one, after each EOS), as Llama 3 pretrains. DeepSeek-V3 packs without
    one (§4.1), the default; the demo's quick plan uses it (docs/LOG.md). Attention then takes an explicit mask
    instead of the causal kernel."""


@dataclass
class BalanceSection:
    """Auxiliary-loss-free load balancing and token dropping (V2 §2.2.4, V3 §2.1.2, 2408.15664); the balance
    losses' weights are model fields (model.overrides.seq_aux_alpha, expert_aux_alpha, ...)."""

    bias_update_speed: float = 0.001
    """γ of the aux-loss-free update b_i += γ·sign(mean load − load_i) (0 = off)."""
    bias_update_until: float = 1.0
    """Fraction of the steps after which γ = 0 (V3: 14.3/14.8 of the tokens)."""
    center_bias: bool = False
    """Keep the routing biases zero-mean after each update (selection unchanged, no drift)."""
    capacity_factor: float = 0.0
    """V2 device-level token dropping in training: capacity per device (0 = off; V2: 1.0)."""
    no_drop_fraction: float = 0.1
    """Fraction of each batch's sequences never dropped (V2: ~10%)."""
    expert_load_every: int = 0
    """Write the full per-layer expert load to the metrics every N steps (0 = only at evaluations)."""


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
class EvalSection:
    """Held-out language-model evaluation (loss, bits per byte, MaxVio)."""

    every: int = 50
    """Evaluate every N steps (and at the end; 0 = only at the end)."""
    batches: int = 0
    """Held-out batches per evaluation (0 = the whole held-out split)."""
    batch_size: int = 8
    """Sequences per held-out batch."""


@dataclass
class PretrainConfig(RunConfig):
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
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Data and expert parallelism (torchrun)."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints."""
    log: LogSection = field(default_factory=LogSection)
    """Logging."""

    resumable = RunConfig.resumable + ("data.cache_dir",)

    def mtp_schedule(self) -> PiecewiseConstant:
        return mtp_weight_schedule(self.mtp.switch_at * self.train.steps, self.mtp.weight, self.mtp.weight_after)

    def bias_speed_schedule(self) -> PiecewiseConstant:
        b = self.balance
        return bias_update_speed_schedule(b.bias_update_until * self.train.steps, b.bias_update_speed, 0.0)

    def validate(self) -> "PretrainConfig":
        super().validate()
        self.at_least(["data.seq_len", "eval.batch_size"], 1)
        self.at_least(["data.max_bytes", "eval.every", "eval.batches", "balance.expert_load_every",
                       "balance.bias_update_speed", "balance.capacity_factor", "mtp.weight", "mtp.weight_after"], 0)
        if not 0 < self.data.val_fraction < 1:
            self.fail("data.val_fraction", "must be in (0, 1): evaluation needs a held-out split")
        self.fractions(["balance.bias_update_until", "mtp.switch_at", "balance.no_drop_fraction"])
        if self.schedule.batch_ramp_start and not self.schedule.batch_ramp_tokens:
            self.fail("schedule.batch_ramp_tokens", "must be > 0 when schedule.batch_ramp_start is set")
        self.batch_ramp()
        self.mtp_schedule()
        self.bias_speed_schedule()
        if not self.model.init_from:
            self.model.model_config()  # preset and overrides must make a valid ModelConfig
        return self
