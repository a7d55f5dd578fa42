"""The r1 experiment (nanoseek/experiments/r1.py): matched budgets, and its orchestration end to end on tiny settings
(what each stage learns is tested in test_post_*.py; `nanoseek experiment r1 --quick` measures it)."""
import json
from dataclasses import replace
from pathlib import Path

from nanoseek.experiments import Context, get, run_experiment
from nanoseek.experiments import r1 as r1_module
from nanoseek.experiments.core import matched_errors
from nanoseek.experiments.r1 import (
    ARMS,
    STUDENT_CURVE,
    TEACHER_CURVES,
    Plan,
    R1Experiment,
)
from nanoseek.utils import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = Plan(rl_steps=2, rl_eval_every=1, arm_seconds=0.3, grpo_eval_every=1, distill_eval_every=2,
            base_steps=6, eval_examples=4, trace_prompts=12, trace_samples=2, check_base=False)


def test_student_arms_are_matched_on_training_time():
    exp = get("r1")
    assert isinstance(exp, R1Experiment)
    for quick in (True, False):
        variants = exp.variants(quick)
        assert matched_errors(variants, exp.matched_on) == []
        budgets = {v.name: v.matched.get("train seconds") for v in variants}
        assert budgets[ARMS[0]] == budgets[ARMS[1]] == exp.plans[quick].arm_seconds
        arm = next(v for v in variants if v.name == ARMS[1])
        arm.matched["train seconds"] *= 1.05  # one arm given 5% more time
        assert matched_errors(variants, exp.matched_on)


def test_old_benchmark_scripts_are_gone():
    assert not (ROOT / "benchmarks" / "r1_zero.py").exists()
    assert not (ROOT / "benchmarks" / "distill_vs_rl.py").exists()


def _solved_traces(cfg, out_dir):
    """The tiny teacher solves nothing yet: stand in correct traces for its rejection sampling."""
    task = cfg.build_task()
    r = cfg.rejection
    rows = [{"prompt": e.prompt, "completion": task.sft_example(e)}
            for e in task.examples(r.prompts, seed=r.seed, split="train")]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(out_dir) / "data.jsonl", rows)
    return {"prompts": r.prompts, "samples": r.prompts * r.samples, "kept": len(rows),
            "data": str(Path(out_dir) / "data.jsonl")}


def test_runs_every_variant_builds_shared_artefacts_once_and_reuses_them(tmp_path, monkeypatch):
    monkeypatch.setattr(r1_module, "rejection_sample_run", _solved_traces)
    ctx = Context(out=tmp_path / "r1", quick=True, seeds=1, threads=1)
    exp = R1Experiment(quick_plan=TINY)
    results = run_experiment(exp, ctx, log=lambda line: None)
    rows = {row["name"]: row for row in results["variants"]}
    assert list(rows) == ["base", "r1-zero", "student-base", *ARMS]
    for name, row in rows.items():
        assert {"accuracy", "think_rate", "length", "train_s", "steps"} <= set(row["metrics"]), name
    for name in ARMS:
        assert rows[name]["matched"] == {"train seconds": TINY.arm_seconds}
        assert rows[name]["metrics"]["train_s"]["mean"] >= TINY.arm_seconds
    assert rows["student+distill"]["metrics"]["traces"]["mean"] == TINY.trace_prompts
    assert len(results["checks"]) == 3 and "R1-Zero accuracy" in results["headline"]

    shared = ctx.out / "shared" / "seed-0"
    run = json.loads((ctx.out / "runs" / "r1-zero" / "seed-0" / "result.json").read_text())
    assert set(run["curves"]) == set(TEACHER_CURVES) and [x for x, _ in run["curves"][TEACHER_CURVES[0]]] == [0, 1, 2]
    grpo_run = json.loads((ctx.out / "runs" / "student+grpo" / "seed-0" / "result.json").read_text())
    assert len(grpo_run["curves"][STUDENT_CURVE]) >= 2
    built = {p: p.stat().st_mtime_ns for p in (shared / "r1-zero" / "02-rl" / "summary.json",
                                               shared / "student-base" / "summary.json")}

    # a run killed after training (no result.json) is rebuilt from its finished stages, without training
    distill_dir = ctx.out / "runs" / "student+distill" / "seed-0"
    saved = json.loads((distill_dir / "result.json").read_text())["metrics"]
    trained = (distill_dir / "distill" / "summary.json").stat().st_mtime_ns
    variant = next(v for v in exp.variants(True) if v.name == "student+distill")
    assert R1Experiment(quick_plan=TINY).run(variant, 0, distill_dir, ctx)["metrics"] == saved
    assert (distill_dir / "distill" / "summary.json").stat().st_mtime_ns == trained

    # a longer arm budget reruns the arms from the same teacher and student base
    longer = replace(TINY, arm_seconds=0.5)
    results = run_experiment(R1Experiment(quick_plan=longer), ctx, log=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in built} == built
    arm = next(row for row in results["variants"] if row["name"] == "student+grpo")
    assert arm["matched"] == {"train seconds": 0.5} and arm["metrics"]["train_s"]["mean"] >= 0.5

    # more R1-Zero steps rebuild the shared artefacts rather than training the old teacher on
    exp = R1Experiment(quick_plan=replace(longer, rl_steps=3))
    shared_dir = exp._shared(exp.plans[True], 0, ctx)
    assert shared_dir == shared and not (shared / "r1-zero").exists()
