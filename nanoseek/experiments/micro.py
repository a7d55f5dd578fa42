"""The micro pretraining setting the architecture experiments share.

Every variant is a fresh model pretrained on the same tokens: Python's standard library (2 MB, 2% of
the documents held out), a 512-token byte-level BPE built once into the experiments' cache, the same
sequence order for the same seed, fp32 (this machine's bf16 is not reliably faster), V3's optimizer
(AdamW 0.9/0.95/0.1, clip 1.0, warmup-constant-cosine). Only the model (and, where an experiment says
so, a training switch) differs between variants. Held-out bits per byte is measured on the whole
held-out split with the main model only (MTP modules off).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from nanoseek.config import ModelConfig
from nanoseek.data.shards import TokenSplit
from nanoseek.experiments.core import Context, Experiment, Metric, Variant
from nanoseek.pretrain.config import PretrainConfig
from nanoseek.pretrain.dataset import resolve_dataset
from nanoseek.pretrain.trainer import pretrain
from nanoseek.scaling import count_params, training_flops_per_token
from nanoseek.train.metrics import read_metrics

VOCAB = 512
PRESET = "tiny-v3"
# Every model: the 512-token vocabulary and plain RoPE over the positions trained (tiny-v3's YaRN exists
# to test YaRN, not to help a 128-token context).
BASE = dict(vocab_size=VOCAB, rope_scaling=None, max_position_embeddings=256)
DATA = ["data.sources=['stdlib']", "data.max_bytes=2000000", "data.val_fraction=0.02"]


@dataclass(frozen=True)
class Budget:
    """Tokens per run = steps × batch_size × seq_len, the same for every variant of an experiment."""

    steps: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 20
    evals: int = 4

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


QUICK = Budget(steps=200, batch_size=8, seq_len=64, warmup=10, evals=2)
FULL = Budget(steps=400)


def setting() -> dict:
    """The data and base-model settings every micro run shares (part of each run's fingerprint)."""
    return {"data": DATA, "base": BASE}


def model_config(preset: str = PRESET, **overrides) -> ModelConfig:
    """The experiments' base model: tiny-v3 (MLA, 8 routed top-2 + 1 shared, MTP depth 1) with a 512-token
    vocabulary, changed by `overrides` (ModelConfig fields); `preset` tiny-dense for dense DeepSeek-LLM."""
    return ModelConfig.preset(preset, **{**BASE, **overrides})


def param_counts(cfg: ModelConfig) -> dict[str, float]:
    """Total and activated parameters (the papers' convention, MTP modules excluded) and non-embedding
    training FLOPs per token at the budget's sequence length are what variants are matched on."""
    counts = count_params(**cfg.to_dict())
    return {"params": counts.total, "active params": counts.activated}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return training_flops_per_token(seq_len, **cfg.to_dict()).non_embedding


def pretrain_variant(run_dir: Path, ctx: Context, seed: int, budget: Budget, model: dict,
                     sets: list[str] = (), preset: str = PRESET) -> tuple[dict, list[dict]]:
    """Pretrain a fresh `model_config(preset, **model)` for `budget` into run_dir (resuming a killed run);
    returns the run's summary and metrics records. `sets` are extra `--set` overrides (training switches)."""
    cfg = PretrainConfig().with_overrides([
        f"model.preset={preset}", *DATA, f"data.cache_dir={str(ctx.cache)!r}", f"data.seq_len={budget.seq_len}",
        f"optim.lr={budget.lr}", "schedule.lr_schedule=warmup-constant-cosine", f"schedule.warmup_steps={budget.warmup}",
        f"train.steps={budget.steps}", f"train.batch_size={budget.batch_size}", "train.dtype=fp32",
        f"train.seed={seed}", f"train.threads={ctx.threads}",
        f"eval.every={max(1, budget.steps // budget.evals)}", "eval.batches=0",
        "checkpoint.every=100", "checkpoint.keep=1", "log.progress=false", "log.tensorboard=false", *sets])
    cfg.model.overrides = {**BASE, **model}
    summary = pretrain(cfg.validate(), run_dir, resume=True, progress=False)
    return summary, read_metrics(run_dir)


def held_out_tokens(ctx: Context) -> torch.Tensor:
    """The held-out split every run is evaluated on, as one token sequence (int64)."""
    data = PretrainConfig().with_overrides([*DATA, f"data.cache_dir={str(ctx.cache)!r}"]).data
    return torch.from_numpy(TokenSplit(resolve_dataset(data, "", ctx.cache, VOCAB, progress=False), "val")
                            .tokens().astype(np.int64))


def held_out(ctx: Context, n_seq: int, seq_len: int) -> torch.Tensor:
    """[n_seq, seq_len] consecutive windows of the held-out split (fewer if it is shorter)."""
    tokens = held_out_tokens(ctx)
    n_seq = min(n_seq, len(tokens) // seq_len)
    return tokens[:n_seq * seq_len].view(n_seq, seq_len)


def lm_metrics(summary: dict, records: list[dict]) -> dict[str, float]:
    """Held-out loss and bits per byte, the training loss over the last 10% of steps, and the load balance
    (MaxVio_global on the held-out set, MaxVio_batch over the last 10% of steps; means over MoE layers)."""
    train = [r for r in records if "loss" in r]
    tail = train[-max(1, len(train) // 10):]
    metrics = {"val_bpb": summary["val_bpb"], "val_loss": summary["val_loss"],
               "train_loss": statistics.fmean(r["loss"] for r in tail)}
    if "max_vio_global_mean" in summary:
        metrics["max_vio_global"] = summary["max_vio_global_mean"]
        metrics["max_vio_batch"] = statistics.fmean(r["max_vio_batch_mean"] for r in tail)
    return metrics


def val_curve(records: list[dict]) -> list[list[float]]:
    """[[tokens, held-out bits per byte], ...] over the run."""
    return [[r["tokens"], r["val_bpb"]] for r in records if "val_bpb" in r and "tokens" in r]


BPB = Metric("val_bpb", "held-out bits/byte")
TRAIN_LOSS = Metric("train_loss", "train loss (last 10%)")
CURVE = "held-out bits/byte vs tokens"


class MicroPretraining(Experiment):
    """Variants = ModelConfig overrides (+ training switches) pretrained on the micro budget."""

    models: ClassVar[dict[str, tuple[dict, list[str]]]] = {}
    """Variant → (ModelConfig overrides, --set overrides)."""
    matched_keys: tuple[str, ...] = ("params", "active params", "tokens")

    def setting(self) -> dict:
        return setting()

    def plan(self, quick: bool) -> tuple[str, Budget]:
        """The preset the variants' overrides apply to, and the budget each trains for."""
        return PRESET, QUICK if quick else FULL

    def variants(self, quick: bool) -> list[Variant]:
        preset, budget = self.plan(quick)
        out = []
        for name, (model, sets) in self.models.items():
            counts = {**param_counts(model_config(preset, **model)), "tokens": budget.tokens}
            out.append(Variant(name, {"preset": preset, "model": model, "sets": sets, "budget": asdict(budget)},
                               {k: v for k, v in counts.items() if k in self.matched_keys}))
        return out

    def run(self, variant: Variant, seed: int, run_dir: Path, ctx: Context) -> dict:
        summary, records = pretrain_variant(run_dir, ctx, seed, Budget(**variant.spec["budget"]),
                                            variant.spec["model"], variant.spec["sets"], variant.spec["preset"])
        metrics = {**lm_metrics(summary, records), **self.measure(variant, run_dir, ctx)}
        return {"metrics": metrics, "curves": {CURVE: val_curve(records)}}

    def measure(self, variant: Variant, run_dir: Path, ctx: Context) -> dict:
        """Metrics beyond the language-model ones, from the trained model in run_dir/model."""
        return {}
