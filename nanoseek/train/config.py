"""The one config system: run configs as nested dataclasses, TOML in, TOML out, `--set` overrides.

Every run config (`nanoseek.pretrain.config.PretrainConfig`, `nanoseek.posttrain.config.PostConfig`)
is a `RunConfig`: a root dataclass of sections, each a dataclass whose fields carry a one-line
docstring (the string under the field). The sections every run shares are defined here once
([model], [optim], [schedule], [train], [checkpoint], [log]); a root adds its own ([data], [balance],
[grpo], ...) and may change a shared section's defaults. This module holds the machinery too: typed
loading with errors that name the key and list the valid ones, `--set` parsing, TOML writing that
reads back to an equal config, and the key listing for `--keys`.

    cfg = PretrainConfig.load("configs/small-v3.toml", ["optim.lr=3e-4", "train.steps=50"])
    print(cfg.to_toml())             # the resolved config, every field commented with its docstring

TOML has no null: the string "null" stands for None where a field allows it (`null`).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import math
import os
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

import tomllib

from nanoseek.config import PRESETS, ModelConfig
from nanoseek.parallel.pipeline import SCHEDULES as PP_SCHEDULES
from nanoseek.quant.fp8 import ACCUMULATIONS
from nanoseek.train.schedules import (
    LR_SCHEDULES,
    BatchSizeRamp,
    LRSchedule,
    build_lr_schedule,
)


def null(value):
    """TOML has no null: the string "null" (or "none") stands for None in model overrides."""
    if isinstance(value, str) and value.lower() in ("null", "none"):
        return None
    if isinstance(value, dict):
        return {k: null(v) for k, v in value.items()}
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of a dataclass (attribute docstrings, read from source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def sections(root: type) -> dict[str, type]:
    """{section name: section dataclass} of a root config class."""
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in fields(root)}


def type_name(tp) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def coerce(value, tp, name: str):
    """`value` as type `tp` (int, float, bool, str, list[X], dict), or a ValueError naming `name`."""
    def fail():
        raise ValueError(f"{name} = {value!r} is invalid: expected {type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ValueError:
                pass
        fail()
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            fail()
        return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        fail()
    raise TypeError(f"unsupported config type {tp} for {name}")


def unknown_key(key: str, where: str, valid) -> ValueError:
    return ValueError(f"unknown config key {key!r} in {where}; valid keys: {', '.join(valid)}")


def update(cfg, data: dict, merged: Collection[tuple[str, str]] = (),
           checks: Mapping[tuple[str, str], Callable[[Any], None]] | None = None):
    """A copy of `cfg` updated by nested dicts (a parsed TOML file). Dict fields named in `merged` are
    updated key by key (a table adds to the default rather than replacing it); `checks` validate a
    field's value before it is set."""
    cfg = copy.deepcopy(cfg)
    secs = sections(type(cfg))
    if not isinstance(data, dict):
        raise ValueError(f"a run config must be a table of sections, got {type(data).__name__}")
    for name, values in data.items():
        if name not in secs:
            raise unknown_key(name, "the run config (sections)", secs)
        if not isinstance(values, dict):
            raise ValueError(f"[{name}] must be a table of keys, got {values!r}")
        section = getattr(cfg, name)
        hints = typing.get_type_hints(secs[name])
        valid = [f.name for f in fields(section)]
        for key, value in values.items():
            if key not in valid:
                raise unknown_key(f"{name}.{key}", f"[{name}]", valid)
            value = coerce(value, hints[key], f"{name}.{key}")
            if checks and (name, key) in checks:
                checks[name, key](value)
            if (name, key) in merged:
                value = {**getattr(section, key), **value}
            setattr(section, key, value)
    return cfg


def assignments(items: list[str]) -> dict:
    """`--set` strings as nested dicts: `section.key=value`, or `section.dictfield.KEY=value` for one
    entry of a dict field (deeper keys nest further: a pipeline's `STAGE.section.key`); values are TOML
    literals or bare strings (`parse_value`)."""
    data: dict[str, dict] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r} is invalid: expected section.key=value, e.g. optim.lr=3e-4")
        value = parse_value(text.strip())
        *tables, name = key.split(".")
        if not tables:
            raise ValueError(f"--set {item!r} is invalid: the key must be section.key (or section.dictfield.KEY)")
        node = data
        for table in tables:
            node = node.setdefault(table, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {table!r} is set to a value and cannot hold keys")
        node[name] = value
    return data


def parse_value(text: str):
    """A TOML literal (3e-4, true, [1, 2], "s", {a = 1}), or the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def shipped_configs() -> list[str]:
    """Names of the run configs shipped in the package (nanoseek/configs; configs/ in the repository)."""
    return sorted(f.name[:-len(".toml")] for f in (files("nanoseek") / "configs").iterdir() if f.name.endswith(".toml"))


def resolve_config(path: str | os.PathLike):
    """The config file `path` names: itself when it exists, else the shipped config it names — `small-v3`,
    `small-v3.toml` or the repository's `configs/small-v3.toml` — so the documented commands work from an
    installed wheel, in any directory."""
    if os.path.isfile(path):
        return Path(path)
    p = Path(path)
    if p.parent in (Path("."), Path("configs")):
        shipped = files("nanoseek") / "configs" / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(f"config file not found: {path} (shipped configs: {', '.join(shipped_configs())})")


def read_toml(path: str | os.PathLike) -> dict:
    try:
        return tomllib.loads(resolve_config(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def parse_toml(text: str, where: str = "<string>") -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML ({e})") from None


# ---------------------------------------------------------------------- writing
def toml_value(value) -> str:
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


# ---------------------------------------------------------------------- the shared sections
DTYPES = ("fp32", "bf16")


@dataclass
class ModelSection:
    """The model: a fresh one from a preset, or a saved one."""

    preset: str = "small-v3"
    """ModelConfig preset of a fresh model (tiny-v3, tiny-v2, tiny-dense, small-v3, ...)."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields replacing the preset's or the saved model's, e.g. {num_hidden_layers = 4,
    n_routed_experts = 64, seq_aux_alpha = 0.0} (the balance-loss weights are model fields)."""
    init_from: str = ""
    """Start from the weights of this HF-layout model directory ("" = fresh initialization)."""
    tokenizer: str = ""
    """Tokenizer directory ("" = the saved model's, or a byte-level BPE of the model's vocab_size trained on
    the training text)."""

    def model_config(self, **token_ids) -> ModelConfig:
        """The saved model's config (init_from) or the preset's, with `overrides` and the tokenizer's ids."""
        overrides = {k: null(v) for k, v in self.overrides.items()}
        if self.init_from:
            if not os.path.isfile(os.path.join(self.init_from, "config.json")):
                raise FileNotFoundError(f"model.init_from = {self.init_from!r}: no config.json there (expected an "
                                        "HF-layout model directory, e.g. a run's DIR/model)")
            return ModelConfig.from_pretrained(self.init_from).replace(**{**overrides, **token_ids})
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset = {self.preset!r} is invalid: allowed: {', '.join(PRESETS)}")
        return ModelConfig.preset(self.preset, **{**overrides, **token_ids})


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
    moments_dtype: str = "auto"
    """AdamW moments' storage: fp32 (8 bytes/parameter), bf16 (4; V3 §3.3.3: master weights, gradients and the
    update math stay fp32), or auto = bf16 when train.fp8, else fp32."""

    def moments(self, fp8: bool) -> str:
        """moments_dtype resolved: auto is bf16 for FP8 runs (as V3), fp32 otherwise."""
        return ("bf16" if fp8 else "fp32") if self.moments_dtype == "auto" else self.moments_dtype


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
    """Batch-size ramp (pretraining): sequences per step at the start (0 = no ramp; a multiple of the
    micro-batch), growing to train.batch_size."""
    batch_ramp_tokens: int = 0
    """Batch-size ramp (pretraining): tokens over which the batch grows to train.batch_size."""

    def build(self, steps: int, peak_lr: float) -> LRSchedule:
        """The LR schedule over `steps` optimizer steps (a warmup longer than the run ends with it)."""
        kwargs: dict[str, Any] = {"peak_lr": peak_lr, "warmup_steps": min(self.warmup_steps, steps)}
        if self.lr_schedule != "constant":
            kwargs["total_steps"] = steps
        if self.lr_schedule == "deepseek-multistep":
            kwargs.update(milestones=tuple(self.milestones), factors=tuple(self.factors))
        elif self.lr_schedule == "warmup-constant-cosine":
            kwargs.update(decay_start=self.decay_start, decay_end=self.decay_end, min_lr=peak_lr * self.min_lr_ratio)
        elif self.lr_schedule == "cosine":
            kwargs.update(min_lr=peak_lr * self.min_lr_ratio)
        try:
            return build_lr_schedule(self.lr_schedule, **kwargs)
        except ValueError as e:
            raise ValueError(f"[schedule] is invalid for train.steps = {steps}: {e}") from None


@dataclass
class TrainSection:
    """The training loop (`nanoseek.train.loop`)."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per optimizer step (post-training: examples, pairs (dpo); grpo: grpo.prompts_per_step x
    grpo.group_size)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass; a step accumulates batch_size / micro_batch_size of them (0 = the
    whole batch in one pass): same update, less memory."""
    dtype: str = "bf16"
    """fp32 or bf16 (autocast; master weights stay fp32, AdamW moments: optim.moments_dtype)."""
    device: str = "auto"
    """cpu, cuda (or cuda:N), or auto (cuda when available)."""
    compile: bool = False
    """torch.compile the model's training forward."""
    fp8: bool = False
    """Block-scaled FP8 GEMMs (V3 §3.3, emulated on CPU): linear layers and the routed experts."""
    fp8_accumulation: str = "v3"
    """How FP8 GEMMs accumulate (emulated): v3 (~14-bit tensor-core sums promoted to FP32 every 128 of K),
    limited (the 14-bit sums over all of K, no promotion), fp32 (exact; the fastest to emulate)."""
    seed: int = 0
    """Seeds initialization, data order and sampling."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default; 1 per process when tests run in parallel)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (bit-identical resumes on any thread count)."""
    time_limit: float = 0.0
    """Stop at the first step boundary after this many seconds of training (0 = off)."""
    spike_factor: float = 3.0
    """Skip a step whose loss exceeds this × its running mean (0 = off); non-finite losses always skip."""
    spike_warmup: int = 20
    """Accepted steps before spike detection starts."""
    max_bad_steps: int = 3
    """Consecutive skipped steps that trigger a rollback to the last checkpoint."""
    max_rollbacks: int = 3
    """Rollbacks allowed before the run stops with an error."""

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size


@dataclass
class ParallelSection:
    """Data and expert parallelism under torchrun (`docs/PARALLELISM.md`); a plain process is one rank. The
    data-parallel degree dp_replicate x dp_shard is the world size; expert parallelism is carved from it."""

    dp_replicate: int = 1
    """Replicas (HSDP's outer dimension): parameters are replicated across them, gradients all-reduced."""
    dp_shard: int = 0
    """FSDP2 ranks within a replica: parameters, gradients and AdamW state sharded (0 = world size / dp_replicate)."""
    ep: int = 1
    """Expert-parallel degree: each rank holds n_routed_experts / ep experts (tokens travel by all-to-all);
    divides dp_shard. The model's ep_size (device-limited routing) must equal it."""
    pp: int = 1
    """Pipeline-parallel stages' ranks: the decoder layers are cut into pp (V-shaped and looped schedules: 2·pp)
    stages; world size = pp x dp_replicate x dp_shard."""
    pp_schedule: str = "1f1b"
    """torch.distributed.pipelining schedule: gpipe, 1f1b, interleaved-1f1b, zbv, dualpipev."""
    microbatches: int = 0
    """Micro-batches a step's per-rank batch is cut into for the pipeline (0 = the number of stages)."""
    pp_layers: list[int] = field(default_factory=list)
    """Decoder layers per stage ([] = even split; the last stage also holds the head and the MTP modules)."""
    timeout: float = 600.0
    """Seconds a collective waits for the other ranks before the job fails (a rank that died or hangs)."""


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
    """Show progress: a bar on a terminal, a plain line every 30 s in a log."""


# ---------------------------------------------------------------------- the root
class RunConfig:
    """Base of the root configs (dataclasses of sections): loading, `--set`, TOML, `--keys`, and the checks
    of the shared sections. A root sets `merged` (dict fields a TOML table adds to rather than replaces)
    and `resumable` (key prefixes a resumed run may change), and extends `validate`."""

    merged: ClassVar[frozenset[tuple[str, str]]] = frozenset({("model", "overrides")})
    resumable: ClassVar[tuple[str, ...]] = ("train.steps", "train.threads", "train.deterministic",
                                             "train.max_rollbacks", "train.time_limit", "train.device", "eval.",
                                             "checkpoint.", "log.", "parallel.")

    # ------------------------------------------------------------------ loading and writing
    @classmethod
    def from_dict(cls, data: dict, base=None):
        """`base` (default: the defaults) updated by nested dicts (a parsed TOML file)."""
        return update(base if base is not None else cls(), data, merged=cls.merged,
                      checks={("model", "overrides"): _check_model_overrides})

    @classmethod
    def from_toml_text(cls, text: str, where: str = "<string>"):
        return cls.from_dict(parse_toml(text, where))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None, base=None):
        """`base` (default: the defaults), updated by the TOML file at `path`, then by `--set` strings; validated."""
        cfg = copy.deepcopy(base) if base is not None else cls()
        if path is not None:
            try:
                cfg = cls.from_dict(read_toml(path), cfg)
            except ValueError as e:
                msg = str(e)
                raise ValueError(msg if msg.startswith(os.fspath(path)) else f"{path}: {msg}") from None
        if overrides:
            cfg = cls.from_dict(assignments(list(overrides)), cfg)
        return cfg.validate()

    def with_overrides(self, items: list[str]):
        """A copy with `section.key=value` strings (`--set`) applied."""
        return self.from_dict(assignments(items), self)

    def to_toml(self, comments: bool = True) -> str:
        """The config as TOML that reads back (`update`) to an equal config; comments are the docstrings."""
        lines: list[str] = []
        top = field_docs(type(self))
        for name, cls in sections(type(self)).items():
            section = getattr(self, name)
            docs = field_docs(cls)
            if lines:
                lines.append("")
            if comments:
                lines.append(f"# {' '.join((inspect.getdoc(cls) or top.get(name, '')).split())}")
            lines.append(f"[{name}]")
            nested = []
            for f in fields(section):
                value = getattr(section, f.name)
                if isinstance(value, dict):
                    nested.append((f.name, value))
                    continue
                if comments and f.name in docs:
                    lines.append(f"# {docs[f.name]}")
                lines.append(f"{f.name} = {toml_value(value)}")
            for key, value in nested:
                lines.append("")
                if comments and key in docs:
                    lines.append(f"# {docs[key]}")
                lines.append(f"[{name}.{key}]")
                lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        return "\n".join(lines) + "\n"

    def flatten(self) -> dict[str, Any]:
        """{"section.key": value} (dict fields as one value)."""
        return {f"{s}.{k}": v for s, section in dataclasses.asdict(self).items() for k, v in section.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls, only: Collection[str] | None = None, defaults=None) -> str:
        """Every key (of the sections in `only`, default all) with its type, default (`defaults`' value when
        given) and docstring."""
        out = []
        defaults = defaults if defaults is not None else cls()
        for name, section in sections(cls).items():
            if only is not None and name not in only:
                continue
            docs, hints = field_docs(section), typing.get_type_hints(section)
            out.append(f"[{name}] {' '.join((inspect.getdoc(section) or '').split())}")
            for f in fields(section):
                default = getattr(getattr(defaults, name), f.name)
                out.append(f"  {name}.{f.name} ({type_name(hints[f.name])}, default {toml_value(default)}): "
                           f"{docs.get(f.name, '')}")
        return "\n".join(out)

    def changed_keys(self, saved) -> list[str]:
        """Keys whose value differs from `saved` and that a resumed run may not change."""
        before, now = saved.flatten(), self.flatten()
        return [k for k in now if now[k] != before.get(k) and not k.startswith(self.resumable)]

    # ------------------------------------------------------------------ checks
    def fail(self, name: str, allowed: str):
        section, key = name.split(".")
        raise ValueError(f"{name} = {getattr(getattr(self, section), key)!r} is invalid: {allowed}")

    def at_least(self, names: Collection[str], minimum: float) -> None:
        for name in names:
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
                self.fail(name, f"must be >= {minimum}")

    def fractions(self, names: Collection[str]) -> None:
        for name in names:
            section, key = name.split(".")
            if not 0 <= getattr(getattr(self, section), key) <= 1:
                self.fail(name, "must be a fraction in [0, 1]")

    def one_of(self, name: str, allowed: Collection[str]) -> None:
        section, key = name.split(".")
        if getattr(getattr(self, section), key) not in allowed:
            self.fail(name, f"allowed: {', '.join(allowed)}")

    def validate(self):
        """Fail with the field, the value and what is allowed; builds the LR schedule once."""
        self.at_least(["train.steps", "train.batch_size", "checkpoint.keep"], 1)
        self.at_least(["train.micro_batch_size", "train.threads", "train.time_limit", "train.spike_warmup",
                       "train.max_rollbacks", "checkpoint.every", "schedule.warmup_steps", "optim.eps",
                       "optim.weight_decay", "optim.grad_clip", "train.spike_factor"], 0)
        self.at_least(["train.max_bad_steps", "parallel.dp_replicate", "parallel.ep", "parallel.pp"], 1)
        self.at_least(["parallel.microbatches"], 0)
        self.at_least(["parallel.dp_shard"], 0)
        self.at_least(["parallel.timeout"], 1)
        t = self.train
        if t.micro_batch_size and t.batch_size % t.micro_batch_size:
            self.fail("train.micro_batch_size", f"must divide train.batch_size = {t.batch_size}")
        if not (t.device in ("auto", "cpu") or t.device.split(":")[0] == "cuda"):
            self.fail("train.device", "allowed: auto, cpu, cuda, cuda:N")
        self.one_of("train.dtype", DTYPES)
        self.one_of("train.fp8_accumulation", ACCUMULATIONS)
        self.one_of("schedule.lr_schedule", tuple(LR_SCHEDULES))
        self.one_of("parallel.pp_schedule", PP_SCHEDULES)
        self.one_of("optim.moments_dtype", ("auto", *DTYPES))
        if t.fp8 and t.compile:
            self.fail("train.fp8", "FP8 layers use a custom autograd function; do not combine with train.compile")
        if not self.optim.lr > 0 or not math.isfinite(self.optim.lr):
            self.fail("optim.lr", "must be a finite number > 0")
        for name in ("optim.beta1", "optim.beta2"):
            if not 0 <= getattr(self.optim, name.split(".")[1]) < 1:
                self.fail(name, "must be in [0, 1)")
        self.fractions(["schedule.min_lr_ratio"])
        self.lr_schedule()
        return self

    # ------------------------------------------------------------------ derived
    def lr_schedule(self) -> LRSchedule:
        """The LR schedule over train.steps optimizer steps."""
        return self.schedule.build(self.train.steps, self.optim.lr)

    def batch_ramp(self, dp: int = 1) -> BatchSizeRamp | None:
        """BatchSizeRamp in sequences per step (multiples of dp micro-batches), or None."""
        s, t = self.schedule, self.train
        if not s.batch_ramp_start:
            return None
        try:
            return BatchSizeRamp(s.batch_ramp_start, t.batch_size, s.batch_ramp_tokens, multiple=t.micro_batch * dp)
        except ValueError as e:
            raise ValueError(f"schedule.batch_ramp_* with train.batch_size = {t.batch_size} and "
                             f"train.micro_batch_size = {t.micro_batch_size} is invalid: {e}") from None


def _check_model_overrides(overrides: dict) -> None:
    valid = [f.name for f in fields(ModelConfig) if f.name != "extra"]
    for key in overrides:
        if key not in valid:
            raise unknown_key(f"model.overrides.{key}", "[model.overrides] (ModelConfig fields)", valid)
