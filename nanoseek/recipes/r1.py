"""The DeepSeek-R1 training pipelines at micro scale (DeepSeek-R1 §2.2 R1-Zero, §2.3 R1).

    from nanoseek.recipes.r1 import run_pipeline
    report = run_pipeline("r1-zero", "runs/r1-zero")                 # or "r1"; returns the report dict
    report = run_pipeline("r1", "runs/r1", overrides=["rl.train.steps=20", "common.train.threads=1"])

r1-zero (arithmetic): base → rl
    base          SFT of a fresh tiny-v3 on a bimodal corpus — 30% correct <think> scratchpad traces,
                  70% <answer> tags holding the task's shortcut answer (arithmetic: carries dropped;
                  countdown: a bare expression, guessed without search) — the stand-in for a pretrained
                  model that "solves it sometimes but not reliably": greedy, it answers at once and
                  is right only without carries; sampled, it thinks 30% of the time and is then mostly
                  right (skipped when pipeline.base names a model)
    rl            GRPO straight on the base with the accuracy reward: R1-Zero
r1 (bilingual addition, two toy languages): base → cold_start → reasoning_rl → rejection → sft → rl
    base          as above, with reasoning half in the prompt's language and half in the other one
    cold_start    SFT on a few hundred well-formed traces in the prompt's language (§2.3.1)
    reasoning_rl  GRPO with accuracy + language-consistency reward (§2.3.2)
    rejection     k samples per prompt from reasoning_rl; keep correct, well-formed, single-language (§2.3.3)
    sft           SFT of the base on the rejection-sampled data (R1 retrains the base, §2.3.3)
    rl            the final RL on prompts of both languages with accuracy + language + format rewards
                  (§2.3.4 "all scenarios": at micro scale the rule-based rewards stand in for the
                  helpfulness / harmlessness reward models)

Every stage is a run directory OUT/NN-name (the usual metrics.jsonl, model/, checkpoints/,
config.toml, summary.json). A finished stage (summary.json present, same config) is reused; an
interrupted one, or one given more steps (or other keys a resumed run may change: train.steps,
train.time_limit, eval.*, checkpoint.*), resumes from its last checkpoint; a stage whose config
changed otherwise is refused rather than silently redone. A stage's model feeds the next, so
resuming an earlier stage does not redo the later ones: delete their directories to redo them. After each stage the held-out accuracy and language consistency (and <think>
use, format rate, response length; pass@1 / cons@k with eval.k) are printed and collected in
OUT/report.json and OUT/report.md.

Configuration: each stage's PostConfig is the stage's built-in defaults (`STAGES`: typed PostConfigs),
then the [pipeline] options below, then the [common] tables of the TOML file / `--set
common.section.key=value`, then that stage's own tables ([rl.grpo] ... / `--set rl.grpo.beta=0.04`).
"""
from __future__ import annotations

import json
import os
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from nanoseek.infer.generate import sample_completions
from nanoseek.parallel.mesh import rank
from nanoseek.posttrain.config import GRPO_LR, PostConfig
from nanoseek.posttrain.grpo import grpo
from nanoseek.posttrain.rejection import rejection_sample_run
from nanoseek.posttrain.sft import sft
from nanoseek.posttrain.trainer import build_policy, read_summary
from nanoseek.utils import torch_threads
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.config import assignments, coerce, read_toml, unknown_key
from nanoseek.utils import atomic_write_text

PIPELINES = ("r1-zero", "r1")


@dataclass
class PipelineSection:
    """Options of the pipeline itself."""

    base: str = ""
    """An existing base model directory to start from ("" = build the micro base, stage "base")."""
    seed: int = 0
    """Seed of every stage (train.seed)."""
    threads: int = 0
    """torch threads of every stage (0 = torch's default)."""
    eval_examples: int = 200
    """Held-out problems evaluated after each stage."""
    eval_k: int = 0
    """Samples per problem for pass@1 / cons@k after each stage (0 = greedy metrics only)."""
    progress: bool = True
    """Progress bars."""
    check_base: bool = True
    """R1-Zero: probe the base before RL and stop, saying why, if it never reasons its way to a right answer
    (false: run RL anyway, e.g. a smoke test of a base trained for a few steps)."""


# ---------------------------------------------------------------------- the stages' defaults
def _common(kind: str) -> PostConfig:
    """What every stage of a pipeline shares: the task, completion lengths, checkpoints every 100 steps (an
    interrupted stage resumes from its last one; they take milliseconds here)."""
    cfg, new_tokens = PostConfig(), 48 if kind == "r1-zero" else 64
    return replace(cfg, task=replace(cfg.task, name="arithmetic" if kind == "r1-zero" else "bilingual"),
                   eval=replace(cfg.eval, at_start=False, max_new_tokens=new_tokens),
                   grpo=replace(cfg.grpo, max_new_tokens=new_tokens),
                   rejection=replace(cfg.rejection, max_new_tokens=new_tokens),
                   checkpoint=replace(cfg.checkpoint, every=100))


def _base(cfg: PostConfig, styles: dict[str, float]) -> PostConfig:
    """SFT of a fresh tiny-v3 (MLA, 8 routed + 1 shared experts) without MTP, YaRN or the balance loss, which
    tiny RL runs do not need, on the bimodal corpus `styles`. A constant LR: the traces are learned late
    (forced-<think> accuracy 22% at step 400, 55% at 600, 88% at 800) and a cosine decay stalls them
    (measured, docs/LOG.md)."""
    tiny = {"vocab_size": 300, "num_nextn_predict_layers": 0, "rope_scaling": "null", "seq_aux_alpha": 0.0}
    return replace(cfg, model=replace(cfg.model, preset="tiny-v3", overrides=tiny),
                   data=replace(cfg.data, styles=styles, tag_bare=True), optim=replace(cfg.optim, lr=3e-3, beta2=0.95),
                   train=replace(cfg.train, steps=800, batch_size=64),
                   schedule=replace(cfg.schedule, lr_schedule="constant", warmup_steps=20))


def _sft(cfg: PostConfig, steps: int, batch_size: int, **schedule) -> PostConfig:
    return replace(cfg, optim=replace(cfg.optim, lr=1e-3), train=replace(cfg.train, steps=steps, batch_size=batch_size),
                   schedule=replace(cfg.schedule, **schedule))


def _grpo(cfg: PostConfig, steps: int, **weights: float) -> PostConfig:
    return replace(cfg, optim=replace(cfg.optim, lr=GRPO_LR, beta2=0.99), train=replace(cfg.train, steps=steps),
                   grpo=replace(cfg.grpo, group_size=8, prompts_per_step=16, temperature=1.0),
                   task=replace(cfg.task, weights=weights))


@dataclass(frozen=True)
class StageSpec:
    command: str
    """sft | grpo | rejection."""
    init: str | None
    """The stage whose model it starts from (None: a fresh model)."""
    defaults: Callable[[PostConfig], PostConfig]
    """The stage's PostConfig from the pipeline's common one."""


STAGES: dict[str, dict[str, StageSpec]] = {
    "r1-zero": {
        "base": StageSpec("sft", None, lambda c: _base(c, {"think": 0.3, "shortcut": 0.7})),
        "rl": StageSpec("grpo", "base", lambda c: _grpo(c, 60)),
    },
    "r1": {
        "base": StageSpec("sft", None, lambda c: _base(c, {"think": 0.15, "switched": 0.15, "shortcut": 0.7})),
        "cold_start": StageSpec("sft", "base", lambda c: _sft(
            replace(c, data=replace(c.data, styles={"think": 1.0}),
                    task=replace(c.task, train_size=300, train_seed=11)), steps=40, batch_size=32)),
        "reasoning_rl": StageSpec("grpo", "cold_start", lambda c: _grpo(c, 30, accuracy=1.0, language=1.0)),
        "rejection": StageSpec("rejection", "reasoning_rl", lambda c: replace(
            c, rejection=replace(c.rejection, prompts=1000, samples=4, seed=7))),
        "sft": StageSpec("sft", "base", lambda c: _sft(c, steps=150, batch_size=64, lr_schedule="cosine",
                                                       warmup_steps=10)),
        "rl": StageSpec("grpo", "sft", lambda c: _grpo(c, 30, accuracy=1.0, language=1.0, format=1.0)),
    },
}


def stage_defaults(kind: str, name: str) -> PostConfig:
    """The built-in PostConfig of one stage of a pipeline (before [pipeline], [common] and its own tables)."""
    return STAGES[kind][name].defaults(_common(kind))


@dataclass
class Stage:
    name: str
    command: str
    init: str | None
    config: PostConfig
    dir: Path


@dataclass
class PipelineConfig:
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    common: dict = field(default_factory=dict)
    """[common] PostConfig tables (checked when each stage's config is built)."""
    stages: dict = field(default_factory=dict)
    """[STAGE] PostConfig tables of single stages."""


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_pipeline_config(kind: str, path: str | os.PathLike | None = None,
                         overrides: Sequence[str] = ()) -> PipelineConfig:
    """[pipeline] options, [common] tables and per-stage tables from a TOML file and `--set` strings.

    `--set` keys: pipeline.KEY, common.SECTION.KEY, STAGE.SECTION.KEY (and .DICTKEY for dict fields)."""
    if kind not in PIPELINES:
        raise ValueError(f"pipeline {kind!r} is unknown; allowed: {', '.join(PIPELINES)}")
    stages = STAGES[kind]
    data = _merge(read_toml(path) if path is not None else {}, assignments(list(overrides)))
    cfg = PipelineConfig()
    hints = typing.get_type_hints(PipelineSection)
    valid = [f.name for f in fields(PipelineSection)]
    for name, value in data.items():
        if name == "pipeline":
            for k, v in value.items():
                if k not in valid:
                    raise unknown_key(f"pipeline.{k}", "[pipeline]", valid)
                setattr(cfg.pipeline, k, coerce(v, hints[k], f"pipeline.{k}"))
        elif name == "common":
            cfg.common = value
        elif name in stages:
            cfg.stages[name] = value
        else:
            raise ValueError(f"unknown table {name!r} in the {kind} pipeline config; allowed: pipeline, common, "
                             f"{', '.join(stages)}")
    if cfg.pipeline.eval_examples < 1:
        raise ValueError(f"pipeline.eval_examples = {cfg.pipeline.eval_examples!r} is invalid: must be >= 1")
    return cfg


def plan(kind: str, out: str | os.PathLike, cfg: PipelineConfig) -> list[Stage]:
    """The stages with their resolved PostConfigs (validated) and run directories."""
    out, p = Path(out), cfg.pipeline
    stages: list[Stage] = []
    dirs: dict[str, Path] = {}
    names = [n for n in STAGES[kind] if not (n == "base" and p.base)]
    for i, name in enumerate(names, 1):
        spec = STAGES[kind][name]
        run_dir = dirs[name] = out / f"{i:02d}-{name}"
        post = stage_defaults(kind, name)
        post = replace(post, train=replace(post.train, seed=p.seed, threads=p.threads),
                       eval=replace(post.eval, examples=p.eval_examples, k=p.eval_k),
                       log=replace(post.log, progress=p.progress))
        if spec.init is not None:
            source = p.base if (spec.init == "base" and p.base) else os.fspath(dirs[spec.init] / "model")
            post = replace(post, model=replace(post.model, init_from=source))
        if spec.command == "sft" and name == "sft" and "rejection" in dirs:
            post = replace(post, data=replace(post.data, train=os.fspath(dirs["rejection"] / "data.jsonl")))
        try:
            post = PostConfig.from_dict(_merge(cfg.common, cfg.stages.get(name, {})), post).validate()
        except ValueError as e:
            raise ValueError(f"stage {name!r}: {e}") from None
        stages.append(Stage(name, spec.command, spec.init, post, run_dir))
    return stages


def _run_stage(stage: Stage, log: Callable[[str], None]) -> dict:
    """Run (or resume, or reuse) one stage; returns its summary."""
    d, cfg = stage.dir, stage.config
    saved = d / "config.toml"
    changed: list[str] = []
    if saved.is_file():
        before = PostConfig.from_toml_text(saved.read_text(encoding="utf-8")).flatten()
        now = cfg.flatten()
        changed = [k for k in now if before.get(k) != now[k] and not k.startswith(("log.", "train.threads"))]
        fixed = [k for k in changed if not k.startswith(PostConfig.resumable)]
        if fixed or (changed and stage.command == "rejection"):
            raise ValueError(f"stage {stage.name!r} in {d} was run with another config ({', '.join(changed[:5])} "
                             "differ); use another --out, or delete that stage directory to redo it")
    summary = read_summary(d)
    if summary is not None and not changed:
        log(f"[{stage.name}] finished earlier in {d}: reused")
        return summary
    resume = latest_checkpoint(d) is not None
    log(f"[{stage.name}] {'resuming' if resume else 'running'} `{stage.command}` in {d}"
        + (f" from {cfg.model.init_from}" if cfg.model.init_from else ""))
    if stage.command == "sft":
        return sft(cfg, d, resume=resume)
    if stage.command == "grpo":
        return grpo(cfg, d, resume=resume)
    if stage.command == "rejection":
        return _rejection_stage(cfg, d)
    raise ValueError(f"unknown stage command {stage.command!r}")


def reasoning_probe(cfg: PostConfig, problems: int = 64) -> dict:
    """Whether the model RL starts from (cfg.model.init_from) "sometimes reasons", R1-Zero's precondition:
    grpo.group_size completions per training problem at GRPO's temperature, as its rollouts sample them.
    think_rate: share opening <think>; think_accuracy: share of those that are right; signal: share of
    problems whose group holds right and wrong answers, the only ones with a non-zero GRPO advantage."""
    g = cfg.grpo
    with torch_threads(cfg.train.threads):
        model, tok = build_policy(cfg)
        task = cfg.build_task(tok.prompt_format)
        examples = task.examples(problems, seed=cfg.task.train_seed, split="train")
        samples = sample_completions(model.eval(), tok, [e.prompt for e in examples for _ in range(g.group_size)],
                                     g.max_new_tokens, g.temperature, g.top_p, seed=cfg.train.seed)
    right = [task.is_correct(examples[i // g.group_size], s.text) for i, s in enumerate(samples)]
    think = [i for i, s in enumerate(samples) if "<think>" in task.prefix + s.text]  # (prefix: a prefilled <think>)
    groups = [right[i:i + g.group_size] for i in range(0, len(right), g.group_size)]
    return {"samples": len(samples), "think_rate": len(think) / len(samples),
            "think_accuracy": sum(right[i] for i in think) / len(think) if think else 0.0,
            "signal": sum(any(r) and not all(r) for r in groups) / len(groups)}


def _check_reasons(stage: Stage, log: Callable[[str], None]) -> None:
    """Stop R1-Zero before RL when its base never reasons its way to a right answer: RL can only reinforce
    what the policy sometimes does (the subtraction base of issue 18 sampled no correct trace)."""
    p = reasoning_probe(stage.config)
    line = (f"{100 * p['think_rate']:.1f}% of {p['samples']} sampled completions open <think>, "
            f"{100 * p['think_accuracy']:.1f}% of those are right; {100 * p['signal']:.1f}% of problems give GRPO "
            "a signal (right and wrong answers in one group)")
    if p["think_accuracy"] == 0 or p["signal"] == 0:
        raise ValueError(f"R1-Zero needs a base that sometimes reasons, and {stage.config.model.init_from} does not: "
                         f"{line}. Train the base longer (base.train.steps), give it more reasoning traces "
                         "(base.data.styles), or start from a stronger model (pipeline.base)")
    log(f"[{stage.name}] the base sometimes reasons: {line}")


def _rejection_stage(cfg: PostConfig, d: Path) -> dict:
    t0 = time.perf_counter()
    stats = rejection_sample_run(cfg, d)
    if not stats["kept"]:
        raise ValueError(f"rejection sampling in {d} kept no completion out of {stats['samples']}: the RL model "
                         "solves nothing well-formed yet (train the previous stage longer)")
    summary = {"command": "rejection", "rejection": stats, "train_time": time.perf_counter() - t0,
               "data": stats["data"], "eval": None}
    atomic_write_text(d / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


REPORT_KEYS = (("greedy_accuracy", "accuracy"), ("language_consistency", "language consistency"),
               ("think_rate", "<think> use"), ("format_rate", "format"), ("mean_length", "length"))


def _report_row(stage: Stage, summary: dict) -> dict:
    row = {"stage": stage.name, "command": stage.command, "dir": os.fspath(stage.dir),
           "train_time": summary.get("train_time"), "steps": summary.get("steps")}
    if summary.get("eval"):
        row.update({k: v for k, v in summary["eval"].items() if k != "step"})
    if summary.get("rejection"):
        r = summary["rejection"]
        row.update({"kept": r["kept"], "samples": r["samples"], "kept_fraction": r["kept_fraction"]})
    return row


def _line(row: dict) -> str:
    if "kept" in row:
        return (f"[{row['stage']}] kept {row['kept']} of {row['samples']} samples "
                f"({100 * row['kept_fraction']:.1f}%) as SFT data")
    parts = []
    for key, name in REPORT_KEYS:
        if key in row:
            parts.append(f"{name} {row[key]:.1f}" if key == "mean_length" else f"{name} {100 * row[key]:.1f}%")
    for key in row:
        if key.startswith(("pass@", "cons@")):
            parts.append(f"{key} {100 * row[key]:.1f}%")
    return f"[{row['stage']}] " + ", ".join(parts)


def report_markdown(kind: str, rows: list[dict]) -> str:
    cols = [k for k, _ in REPORT_KEYS if any(k in r for r in rows)]
    extra = sorted({k for r in rows for k in r if k.startswith(("pass@", "cons@"))})
    head = ["stage", "command", *[dict(REPORT_KEYS)[c] for c in cols], *extra, "train time (s)"]
    lines = [f"# nanoseek pipeline {kind}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], r["command"]]
        for c in cols + extra:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.1f}" if c == "mean_length" else f"{100 * v:.1f}%"))
        if "kept" in r:
            cells[2] = f"kept {r['kept']}/{r['samples']}"
        cells.append(f"{r['train_time']:.0f}" if r.get("train_time") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_pipeline(kind: str, out: str | os.PathLike, config: str | os.PathLike | None = None,
                 overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict:
    """Run the `kind` pipeline ("r1-zero" or "r1") into `out`; returns {"stages": [row per stage], ...}.

    Each row holds the stage's held-out metrics after it ran (greedy_accuracy, language_consistency
    for the bilingual task, think_rate, format_rate, mean_length, pass@1 / cons@k with eval_k), its
    run directory and training time; OUT/report.json and OUT/report.md hold the same."""

    cfg = load_pipeline_config(kind, config, overrides)
    stages = plan(kind, out, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for stage in stages:
        if kind == "r1-zero" and cfg.pipeline.check_base and stage.command == "grpo" and read_summary(stage.dir) is None:
            _check_reasons(stage, log)
        summary = _run_stage(stage, log)
        rows.append(_report_row(stage, summary))
        log(_line(rows[-1]))
    report = {"pipeline": kind, "out": os.fspath(out), "stages": rows, "wall_time": time.perf_counter() - t0,
              "final_model": os.fspath(stages[-1].dir / "model")}
    if not rank():  # (under torchrun every rank runs the pipeline)
        atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
        atomic_write_text(out / "report.md", report_markdown(kind, rows))
    return report


def micro_r1_zero(out: str | os.PathLike = "runs/r1-zero", overrides: Sequence[str] = (), **kwargs) -> dict:
    """The micro R1-Zero (arithmetic: bimodal base → GRPO); see run_pipeline."""
    return run_pipeline("r1-zero", out, overrides=overrides, **kwargs)


def micro_r1(out: str | os.PathLike = "runs/r1", overrides: Sequence[str] = (), **kwargs) -> dict:
    """The micro R1 pipeline (bilingual addition, six stages); see run_pipeline."""
    return run_pipeline("r1", out, overrides=overrides, **kwargs)
