"""R1 at micro scale: R1-Zero's accuracy and length over GRPO, and distillation vs RL on a smaller student
at equal training time (DeepSeek-R1 §2.2 / Fig. 2–3, §4.1 / Table 6).

Per seed, every artefact is built once under DIR/shared/seed-N and reused by the variants that need it:

* r1-zero/         `nanoseek pipeline r1-zero`: the bimodal base (tiny-v3, 233K parameters, SFT on 30%
                   <think> column traces + 70% dropped-carry answers in <answer> tags: greedy it answers
                   at once, right only without carries) → `rl_steps` of GRPO with the accuracy reward (G 8,
                   16 prompts per step, T 1, β 0, token-level loss; a step budget, so that the teacher does
                   not depend on the machine's load). Variants "base" and "r1-zero"; the first of them to
                   run builds it (run_pipeline reuses finished stages and resumes interrupted ones).
* student-base/    a smaller tiny-v3 (hidden 32, 2 layers: 89K parameters) given the same bimodal base SFT
                   with the teacher's tokenizer. Variant "student-base"; both student arms start from it.

Then, each in its own run directory, the two student arms get the same training-time budget
(`arm_seconds`, train.time_limit, the matched quantity; the measured seconds are reported too):

* student+grpo     GRPO on the student base with the teacher's RL recipe (R1-Zero-Qwen-32B);
* student+distill  SFT of the student base on traces rejection-sampled from that seed's r1-zero model
                   (k samples per train prompt, correct and well-formed kept, one per prompt) —
                   R1-Distill-Qwen-32B. The teacher's sampling time is reported apart (R1 likewise takes
                   the teacher's 800k samples as given).

Every model is scored on the same 200 held-out problems, greedy: accuracy, <think> use, mean response
length in tokens. Times are training seconds (the loop's train_time: optimizer steps and rollouts,
not evaluations).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from nanoseek.experiments.core import (
    Check,
    Context,
    Experiment,
    Metric,
    Variant,
    fmt_stat,
)
from nanoseek.posttrain.config import PostConfig
from nanoseek.posttrain.distill import distill
from nanoseek.posttrain.grpo import grpo
from nanoseek.posttrain.rejection import rejection_sample_run
from nanoseek.posttrain.sft import sft
from nanoseek.posttrain.trainer import read_summary
from nanoseek.recipes.r1 import load_pipeline_config, plan, run_pipeline
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics
from nanoseek.utils import atomic_write_text

STUDENT = {"num_nextn_predict_layers": 0, "rope_scaling": "null", "seq_aux_alpha": 0.0,
           "hidden_size": 32, "num_hidden_layers": 2}
"""ModelConfig overrides of the tiny-v3 student: small enough that RL alone finds the traces late (a
hidden-48 student catches up by GRPO within 7.5 s, docs/LOG.md)."""

TEACHER_CURVES = ("R1-Zero: held-out accuracy vs GRPO step", "R1-Zero: mean length (tokens) vs GRPO step")
STUDENT_CURVE = "student: held-out accuracy vs train s"


@dataclass(frozen=True)
class Plan:
    rl_steps: int
    """R1-Zero's GRPO steps."""
    rl_eval_every: int
    """GRPO steps between held-out evaluations of R1-Zero (the curves' points)."""
    arm_seconds: float
    """Each student arm's training time: the matched budget."""
    grpo_eval_every: int
    distill_eval_every: int
    base_steps: int = 800
    """SFT steps of both bimodal bases (the traces are learned late: forced-<think> accuracy 55% at 600, 88%
    at 800, docs/LOG.md)."""
    eval_examples: int = 200
    trace_prompts: int = 1500
    trace_samples: int = 4
    check_base: bool = True
    """Stop when the base never reasons its way to a right answer (pipeline.check_base; off for smoke plans)."""


QUICK = Plan(rl_steps=40, rl_eval_every=5, arm_seconds=8, grpo_eval_every=3, distill_eval_every=10)
FULL = Plan(rl_steps=120, rl_eval_every=10, arm_seconds=30, grpo_eval_every=4, distill_eval_every=20)

ARMS = ("student+grpo", "student+distill")


class R1Experiment(Experiment):
    name = "r1"
    title = "R1-Zero and distillation vs RL (DeepSeek-R1 at micro scale)"
    claim = ("GRPO with a rule-based accuracy reward on a base model raises held-out accuracy and response length "
             "(R1-Zero); a small student distilled from the RL model beats the same student trained by RL at "
             "equal training time")
    paper = ("R1-Zero AIME pass@1 15.6% → 71.0% with growing response length (R1 §2.2, Fig. 2–3); "
             "R1-Distill-Qwen-32B 72.6 vs R1-Zero-Qwen-32B (RL) 47.0 (Table 6)")
    metrics = (
        Metric("accuracy", "held-out greedy accuracy", lower_is_better=False, fmt=".3f"),
        Metric("think_rate", "<think> use", lower_is_better=False, fmt=".3f"),
        Metric("length", "mean length (tokens)", lower_is_better=False, fmt=".1f"),
        Metric("train_s", "train seconds (measured)", fmt=".1f"),
        Metric("steps", "optimizer steps", lower_is_better=False, fmt=".0f"),
        Metric("sampling_s", "teacher sampling s", fmt=".1f"),
        Metric("traces", "teacher traces kept", lower_is_better=False, fmt=".0f"),
    )
    matched_on: ClassVar[dict[str, tuple[str, ...] | None]] = {"train seconds": ARMS}
    checks = (
        Check("accuracy", "r1-zero", "greater", "base"),
        Check("length", "r1-zero", "greater", "base"),
        Check("accuracy", "student+distill", "greater", "student+grpo"),
    )
    notes = ("Micro setting: 2-digit additions; a 233K-parameter tiny-v3 'base' SFT'd to be bimodal (greedy it "
             "answers at once with a dropped-carry bug, sampled it sometimes writes a correct <think> column "
             "trace), so GRPO with the accuracy reward (40 steps quick, 120 full) only has to select the "
             "reasoning mode — R1-Zero's premise that RL elicits what the base can sometimes do. Response length grows because the correct "
             "mode is the long one (a bare answer is ~9 tokens, a trace ~28), not through open-ended reflection "
             "as in R1-Zero's AIME runs, and it plateaus once every answer is a trace. The student (89K "
             "parameters) gets the same bimodal base; its two arms have equal training seconds (8 quick, 30 "
             "full). Distillation needs ~1 s to copy the teacher's traces, while GRPO must first discover them "
             "by sampling and still climbs at the end of the budget: given long enough it catches up on this "
             "task (a 122K-parameter student reached 100% by GRPO in 7.5 s, docs/LOG.md), so the gap measured "
             "here is one of efficiency at equal time, where R1's Table 6 compares a 32B model after >10K RL "
             "steps on problems it cannot exhaust. The teacher's sampling time is reported but not charged to "
             "distillation, as R1 takes the teacher's data as given. The arms' budgets are wall-clock training "
             "seconds on shared CPU cores, so the steps they buy vary with the machine's load.")

    def __init__(self, quick_plan: Plan = QUICK, full_plan: Plan = FULL):
        self.plans = {True: quick_plan, False: full_plan}
        self._reports: dict[Path, dict] = {}  # the teacher pipelines this process has run or reused

    # ------------------------------------------------------------------ variants
    def variants(self, quick: bool) -> list[Variant]:
        p = asdict(self.plans[quick])
        return [Variant(name, {"variant": name, "plan": p, "student": STUDENT},
                        {"train seconds": p["arm_seconds"]} if name in ARMS else {})
                for name in ("base", "r1-zero", "student-base", *ARMS)]

    def run(self, variant: Variant, seed: int, run_dir: Path, ctx: Context) -> dict:
        p = self.plans[ctx.quick]
        shared = self._shared(p, seed, ctx)
        if variant.name in ("base", "r1-zero"):
            report = self._teacher(p, seed, shared, ctx)
            base, rl = report["stages"]
            if variant.name == "base":
                return {"metrics": _row_metrics(base)}
            return {"metrics": _row_metrics(rl), "curves": _teacher_curves(base, Path(rl["dir"]))}
        student = self._student_base(p, seed, shared, ctx)
        if variant.name == "student-base":
            return {"metrics": _summary_metrics(student)}
        arm = self._distill(p, seed, shared, run_dir, ctx) if variant.name == "student+distill" else \
            self._grpo(p, seed, shared, run_dir, ctx)
        d = Path(arm["model_dir"]).parent
        curve = [[0.0, student["eval"]["greedy_accuracy"]]] + [
            [r["train_time"], r["eval_greedy_accuracy"]] for r in read_metrics(d) if "eval_greedy_accuracy" in r]
        metrics = _summary_metrics(arm)
        if "sampling_s" in arm:
            metrics |= {"sampling_s": arm["sampling_s"], "traces": arm["traces"]["kept"]}
        return {"metrics": metrics, "curves": {STUDENT_CURVE: curve}}

    def headline(self, table: list[dict]) -> str:
        s = {row["name"]: row["metrics"] for row in table}
        parts = []
        if "accuracy" in s.get("base", {}) and "accuracy" in s.get("r1-zero", {}):
            parts.append(f"R1-Zero accuracy {fmt_stat(s['base']['accuracy'], '.3f')} → "
                         f"{fmt_stat(s['r1-zero']['accuracy'], '.3f')}, length {fmt_stat(s['base']['length'], '.1f')}"
                         f" → {fmt_stat(s['r1-zero']['length'], '.1f')} tokens")
        if all("accuracy" in s.get(n, {}) for n in ARMS):
            budget = next(row["matched"]["train seconds"] for row in table if row["name"] == ARMS[0])
            parts.append(f"student at equal {budget:g} s: distill {fmt_stat(s['student+distill']['accuracy'], '.3f')}"
                         f" vs GRPO {fmt_stat(s['student+grpo']['accuracy'], '.3f')}")
        return "; ".join(parts)

    # ------------------------------------------------------------------ the shared artefacts
    def _shared(self, p: Plan, seed: int, ctx: Context) -> Path:
        """DIR/shared/seed-N, emptied when the settings its artefacts were built with changed (a pipeline stage
        given more steps would otherwise resume, i.e. train on from the old run)."""
        d = ctx.out / "shared" / f"seed-{seed}"
        spec = {"rl_steps": p.rl_steps, "rl_eval_every": p.rl_eval_every, "base_steps": p.base_steps,
                "eval_examples": p.eval_examples, "student": STUDENT}
        stamp = d / "spec.json"
        if stamp.is_file() and json.loads(stamp.read_text()) != spec:
            shutil.rmtree(d)
        if not stamp.is_file():
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stamp, json.dumps(spec) + "\n")
        return d

    def _pipeline_overrides(self, p: Plan, seed: int, ctx: Context) -> list[str]:
        return [f"pipeline.seed={seed}", f"pipeline.threads={ctx.threads}", "pipeline.progress=false",
                f"pipeline.eval_examples={p.eval_examples}", f"base.train.steps={p.base_steps}",
                f"rl.train.steps={p.rl_steps}", f"rl.eval.every={p.rl_eval_every}",
                f"pipeline.check_base={str(p.check_base).lower()}"]

    def _teacher(self, p: Plan, seed: int, shared: Path, ctx: Context) -> dict:
        """The seed's micro R1-Zero (base → GRPO); run_pipeline reuses it once built."""
        out = shared / "r1-zero"
        if out not in self._reports or not Path(self._reports[out]["final_model"]).is_dir():
            self._reports[out] = run_pipeline("r1-zero", out, overrides=self._pipeline_overrides(p, seed, ctx))
        return self._reports[out]

    def _stage_configs(self, p: Plan, seed: int, shared: Path, ctx: Context) -> dict[str, PostConfig]:
        """The teacher pipeline's resolved stage configs (the students reuse its recipes)."""
        cfg = load_pipeline_config("r1-zero", None, self._pipeline_overrides(p, seed, ctx))
        return {s.name: s.config for s in plan("r1-zero", shared / "r1-zero", cfg)}

    def _student_base(self, p: Plan, seed: int, shared: Path, ctx: Context) -> dict:
        """The smaller student's bimodal base: the teacher's base recipe, the teacher's tokenizer."""
        d = shared / "student-base"
        summary = read_summary(d)
        if summary is not None:
            return summary
        report = self._teacher(p, seed, shared, ctx)
        tokenizer = Path(report["stages"][0]["dir"]) / "model"
        student = "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in STUDENT.items()) + "}"
        cfg = self._stage_configs(p, seed, shared, ctx)["base"].with_overrides(
            [f"model.overrides={student}", f"model.tokenizer={json.dumps(str(tokenizer))}"]).validate()
        return sft(cfg, d, resume=latest_checkpoint(d) is not None)

    def _arm_overrides(self, p: Plan, shared: Path, eval_every: int) -> list[str]:
        return [f"model.init_from={json.dumps(str(shared / 'student-base' / 'model'))}", "train.steps=1000000",
                f"train.time_limit={p.arm_seconds}", f"eval.every={eval_every}"]

    def _grpo(self, p: Plan, seed: int, shared: Path, run_dir: Path, ctx: Context) -> dict:
        """RL alone: the teacher's GRPO stage, from the student base, for the arm's budget."""
        d = run_dir / "grpo"
        summary = read_summary(d)
        if summary is not None:
            return summary
        cfg = self._stage_configs(p, seed, shared, ctx)["rl"].with_overrides(
            self._arm_overrides(p, shared, p.grpo_eval_every)).validate()
        return grpo(cfg, d, resume=latest_checkpoint(d) is not None)

    def _distill(self, p: Plan, seed: int, shared: Path, run_dir: Path, ctx: Context) -> dict:
        """Distillation: rejection-sample the seed's R1-Zero model, then SFT the student base on the kept traces
        for the arm's budget."""
        d, traces = run_dir / "distill", run_dir / "traces"
        stats_file = traces / "stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
        summary = read_summary(d)
        if summary is not None and stats is not None:
            return {**summary, "sampling_s": stats["seconds"]}
        report = self._teacher(p, seed, shared, ctx)
        teacher = Path(report["final_model"])
        stages = self._stage_configs(p, seed, shared, ctx)
        if stats is None:
            t0 = time.perf_counter()
            stats = rejection_sample_run(stages["rl"].with_overrides([
                f"model.init_from={json.dumps(str(teacher))}", f"rejection.prompts={p.trace_prompts}",
                f"rejection.samples={p.trace_samples}", "rejection.temperature=1.0"]).validate(), traces)
            stats["seconds"] = time.perf_counter() - t0
            atomic_write_text(stats_file, json.dumps(stats, indent=1) + "\n")
        if not stats["kept"]:
            raise ValueError(f"the teacher {teacher} gave no correct, well-formed trace in {stats['samples']} samples "
                             f"(see {stats_file}): train it longer (rl_steps)")
        cfg = PostConfig().with_overrides([  # (its defaults: AdamW 1e-3 constant, batch 64, fp32)
            "task.name=arithmetic", f"eval.examples={p.eval_examples}", "eval.max_new_tokens=48", "eval.at_start=false",
            f"train.seed={seed}", f"train.threads={ctx.threads}", "log.progress=false",
            *self._arm_overrides(p, shared, p.distill_eval_every), f"distill.teacher={json.dumps(str(teacher))}",
            f"distill.traces={json.dumps(stats['data'])}"]).validate()
        summary = distill(cfg, d, resume=latest_checkpoint(d) is not None)
        return {**summary, "sampling_s": stats["seconds"]}


def _eval_metrics(ev: dict) -> dict[str, float]:
    return {"accuracy": ev["greedy_accuracy"], "think_rate": ev["think_rate"], "length": ev["mean_length"]}


def _row_metrics(row: dict) -> dict[str, float]:
    """A pipeline report row's held-out metrics and training time."""
    return {**_eval_metrics(row), "train_s": row["train_time"], "steps": row["steps"]}


def _summary_metrics(summary: dict) -> dict[str, float]:
    return {**_eval_metrics(summary["eval"]), "train_s": summary["train_time"], "steps": summary["steps"]}


def _teacher_curves(base: dict, rl_dir: Path) -> dict[str, list[list[float]]]:
    """R1-Zero's held-out accuracy and length at each evaluation, from the base (step 0) on (steps line up across
    seeds, unlike seconds)."""
    evals = [r for r in read_metrics(rl_dir) if "eval_greedy_accuracy" in r]
    acc = [[0, base["greedy_accuracy"]]] + [[r["step"], r["eval_greedy_accuracy"]] for r in evals]
    length = [[0, base["mean_length"]]] + [[r["step"], r["eval_mean_length"]] for r in evals]
    return dict(zip(TEACHER_CURVES, (acc, length)))
