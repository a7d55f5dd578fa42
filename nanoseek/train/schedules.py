"""Learning-rate, batch-size and coefficient schedules of the DeepSeek papers.

- DeepSeek LLM §2.3: linear warmup (2000 steps), then multi-step: ×0.316 of the peak after 80% of
  training tokens, ×0.1 after 90%. The step form lets a run be continued from the 80% checkpoint
  with more tokens, the reason the paper preferred it to cosine at equal final loss.
- DeepSeek-V2 §3.1.2: the same form with steps at ~60% and ~90%, each ×0.316; batch 2304 → 9216
  over the first 225B tokens.
- DeepSeek-V3 §4.2: warmup over 2K steps to 2.2e-4, constant until 10T of 14.8T tokens, cosine to
  2.2e-5 over 4.3T; batch 3072 → 15360 over the first 469B tokens; bias update speed γ = 0.001
  for 14.3T tokens then 0; MTP weight λ = 0.3 for 10T tokens then 0.1.

Every schedule is a frozen dataclass called with a step — any monotone unit (optimizer steps or
tokens seen) used consistently for all of its fields. Warmup is (step + 1) / warmup_steps, so a
0-based step counter reaches the peak on the last warmup step and never takes a zero-LR update.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass


def _fail(owner: object, name: str, value, allowed: str):
    raise ValueError(f"{type(owner).__name__}.{name}={value!r} is invalid: {allowed}")


def _check_positive(owner, name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        _fail(owner, name, value, "must be a finite number > 0")


def _check_non_negative(owner, name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        _fail(owner, name, value, "must be a finite number >= 0")


def _check_fraction(owner, name: str, value) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        _fail(owner, name, value, "must be a fraction of total_steps in (0, 1]")


def _check_step(step) -> None:
    if not (isinstance(step, (int, float)) and step >= 0):
        raise ValueError(f"step={step!r} is invalid: must be a number >= 0")


def _check_warmup(owner, warmup_steps, end: float, end_name: str) -> None:
    _check_non_negative(owner, "warmup_steps", warmup_steps)
    if warmup_steps > end:
        _fail(owner, "warmup_steps", warmup_steps, f"must end by {end_name} ({end:g})")


def _check_floor(owner, min_lr, peak_lr) -> None:
    _check_non_negative(owner, "min_lr", min_lr)
    if min_lr > peak_lr:
        _fail(owner, "min_lr", min_lr, f"must be <= peak_lr ({peak_lr:g})")


class LRSchedule:
    """Base of the LR schedules: ``schedule(step)`` is the LR, ``multiplier(step)`` its ratio to
    peak_lr (for torch.optim.lr_scheduler.LambdaLR with the optimizer's lr set to peak_lr)."""

    peak_lr: float
    warmup_steps: float

    def __call__(self, step: float) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        return self._after_warmup(step)

    def _after_warmup(self, step: float) -> float:
        raise NotImplementedError

    def multiplier(self, step: float) -> float:
        return self(step) / self.peak_lr


@dataclass(frozen=True)
class MultiStepLR(LRSchedule):
    """DeepSeek LLM: warmup, then peak_lr·factors[i] from milestones[i]·total_steps on.

    Factors are relative to the peak, not cumulative: DeepSeek LLM (0.8, 0.9) → (0.316, 0.1);
    V2 (0.6, 0.9) → (0.316, 0.316²).
    """

    peak_lr: float
    total_steps: float
    warmup_steps: float = 2000
    milestones: tuple[float, ...] = (0.8, 0.9)
    factors: tuple[float, ...] = (0.316, 0.1)

    def __post_init__(self):
        _check_positive(self, "peak_lr", self.peak_lr)
        _check_positive(self, "total_steps", self.total_steps)
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "factors", tuple(self.factors))
        if len(self.factors) != len(self.milestones):
            _fail(self, "factors", self.factors, f"needs one factor per milestone ({len(self.milestones)})")
        for m in self.milestones:
            _check_fraction(self, "milestones", m)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            _fail(self, "milestones", self.milestones, "must be strictly increasing")
        for f in self.factors:
            _check_positive(self, "factors", f)
        first = self.milestones[0] * self.total_steps if self.milestones else self.total_steps
        _check_warmup(self, self.warmup_steps, first, "the first milestone")

    def _after_warmup(self, step: float) -> float:
        passed = bisect.bisect_right([m * self.total_steps for m in self.milestones], step)
        return self.peak_lr * (self.factors[passed - 1] if passed else 1.0)


@dataclass(frozen=True)
class WarmupConstantCosineLR(LRSchedule):
    """DeepSeek-V3: warmup, constant peak until decay_start, cosine down to min_lr at decay_end, then
    min_lr. V3: peak 2.2e-4, min 2.2e-5, total 14.8T tokens, decay_start 10/14.8, decay_end 14.3/14.8
    (the defaults), warmup 2K steps."""

    peak_lr: float
    total_steps: float
    warmup_steps: float = 2000
    decay_start: float = 10.0 / 14.8
    decay_end: float = 14.3 / 14.8
    min_lr: float = 0.0

    def __post_init__(self):
        _check_positive(self, "peak_lr", self.peak_lr)
        _check_positive(self, "total_steps", self.total_steps)
        _check_fraction(self, "decay_start", self.decay_start)
        _check_fraction(self, "decay_end", self.decay_end)
        if self.decay_end < self.decay_start:
            _fail(self, "decay_end", self.decay_end, f"must be >= decay_start ({self.decay_start:g})")
        _check_warmup(self, self.warmup_steps, self.decay_start * self.total_steps, "decay_start")
        _check_floor(self, self.min_lr, self.peak_lr)

    def _after_warmup(self, step: float) -> float:
        start, end = self.decay_start * self.total_steps, self.decay_end * self.total_steps
        if step < start:
            return self.peak_lr
        if step >= end:
            return self.min_lr
        return _cosine(self.peak_lr, self.min_lr, (step - start) / (end - start))


@dataclass(frozen=True)
class CosineLR(LRSchedule):
    """Warmup, then a half cosine from peak_lr to min_lr at total_steps (min_lr afterwards)."""

    peak_lr: float
    total_steps: float
    warmup_steps: float = 0
    min_lr: float = 0.0

    def __post_init__(self):
        _check_positive(self, "peak_lr", self.peak_lr)
        _check_positive(self, "total_steps", self.total_steps)
        _check_warmup(self, self.warmup_steps, self.total_steps, "total_steps")
        _check_floor(self, self.min_lr, self.peak_lr)

    def _after_warmup(self, step: float) -> float:
        span = self.total_steps - self.warmup_steps
        if step >= self.total_steps or span == 0:
            return self.min_lr
        return _cosine(self.peak_lr, self.min_lr, (step - self.warmup_steps) / span)


@dataclass(frozen=True)
class ConstantLR(LRSchedule):
    """Warmup (optional), then peak_lr forever — the usual choice for short SFT/RL runs."""

    peak_lr: float
    warmup_steps: float = 0

    def __post_init__(self):
        _check_positive(self, "peak_lr", self.peak_lr)
        _check_non_negative(self, "warmup_steps", self.warmup_steps)

    def _after_warmup(self, step: float) -> float:
        return self.peak_lr


def _cosine(high: float, low: float, progress: float) -> float:
    return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))


LR_SCHEDULES: dict[str, type[LRSchedule]] = {
    "deepseek-multistep": MultiStepLR,
    "warmup-constant-cosine": WarmupConstantCosineLR,
    "cosine": CosineLR,
    "constant": ConstantLR,
}


def build_lr_schedule(name: str, **kwargs) -> LRSchedule:
    """Build an LR schedule by name: one of LR_SCHEDULES, with that class's fields as kwargs."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr schedule name={name!r} is unknown; allowed: {', '.join(LR_SCHEDULES)}")
    cls = LR_SCHEDULES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"lr schedule {name!r} got unknown field(s) {unknown}; allowed: {', '.join(fields)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"lr schedule {name!r} is missing required field(s) {missing}")
    return cls(**kwargs)


@dataclass(frozen=True)
class BatchSizeRamp:
    """Batch size (in sequences) growing linearly with tokens seen from start to end over
    ramp_tokens, rounded to the nearest multiple (e.g. of the data-parallel size), then end.
    V3: 3072 → 15360 over 469e9 tokens; V2: 2304 → 9216 over 225e9."""

    start: int
    end: int
    ramp_tokens: float
    multiple: int = 1

    def __post_init__(self):
        for name in ("start", "end", "multiple"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                _fail(self, name, value, "must be an int > 0")
        _check_positive(self, "ramp_tokens", self.ramp_tokens)
        for name in ("start", "end"):
            if getattr(self, name) % self.multiple:
                _fail(self, name, getattr(self, name), f"must be a multiple of multiple={self.multiple}")

    def __call__(self, tokens_seen: float) -> int:
        _check_step(tokens_seen)
        size = self.start + (self.end - self.start) * min(1.0, tokens_seen / self.ramp_tokens)
        return int(math.floor(size / self.multiple + 0.5)) * self.multiple


@dataclass(frozen=True)
class PiecewiseConstant:
    """values[i] on [boundaries[i-1], boundaries[i]): a coefficient that switches at given steps/tokens."""

    values: tuple[float, ...]
    boundaries: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(self.values))
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        if len(self.values) != len(self.boundaries) + 1:
            _fail(self, "values", self.values, f"needs len(boundaries) + 1 = {len(self.boundaries) + 1} entries")
        for b in self.boundaries:
            _check_non_negative(self, "boundaries", b)
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            _fail(self, "boundaries", self.boundaries, "must be strictly increasing")

    def __call__(self, step: float) -> float:
        _check_step(step)
        return self.values[bisect.bisect_right(self.boundaries, step)]


def bias_update_speed_schedule(switch_at: float, before: float = 0.001, after: float = 0.0) -> PiecewiseConstant:
    """Aux-loss-free balancing speed γ: V3 uses 0.001 for the first 14.3T tokens, then 0 (bias frozen)."""
    return PiecewiseConstant((before, after), (switch_at,))


def mtp_weight_schedule(switch_at: float, before: float = 0.3, after: float = 0.1) -> PiecewiseConstant:
    """MTP loss weight λ: V3 uses 0.3 for the first 10T tokens, then 0.1."""
    return PiecewiseConstant((before, after), (switch_at,))
