"""Distillation vs RL for a smaller model (DeepSeek-R1 §4.1, Table 6, at micro scale).

R1: Qwen-32B SFT'd on R1's traces (R1-Distill-Qwen-32B, AIME 72.6) beats Qwen-32B trained by
large-scale RL alone (R1-Zero-Qwen-32B, 47.0). Here:

* teacher  — the micro R1-Zero's RL model (benchmarks/r1_zero.py / `nanoseek pipeline r1-zero`; built
             with the pipeline's defaults when --teacher-run has none);
* student  — a smaller tiny-v3 (hidden 32, 2 layers: 89K parameters, the teacher 233K) given the
             same bimodal base SFT as the teacher's base, with the teacher's tokenizer;
* distill  — rejection-sample the teacher (k samples per train prompt; keep correct, well-formed),
             then SFT the student base on those traces for --minutes of training;
* RL       — GRPO on the student base with the teacher's RL recipe for the same --minutes.

Both arms start from the same student base and get the same training-time budget; the teacher's
sampling time is reported separately (R1 likewise counts the teacher's data as given).

    .venv/bin/python benchmarks/distill_vs_rl.py --out runs/bench-distill --minutes 0.5

Prints both arms' held-out greedy accuracy at 1/8, 1/4, 1/2 and all of the training-time budget.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nanoseek.posttrain.config import PostConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-distill")
    p.add_argument("--teacher-run", default="runs/bench-r1-zero", help="an r1-zero pipeline directory")
    p.add_argument("--minutes", type=float, default=0.5, help="training time of each arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", default="{num_nextn_predict_layers=0, rope_scaling=\"null\", seq_aux_alpha=0.0, "
                                        "hidden_size=32, num_hidden_layers=2}",
                   help="ModelConfig overrides of the tiny-v3 student (TOML inline table)")
    args = p.parse_args()

    from nanoseek.posttrain.distill import distill
    from nanoseek.posttrain.grpo import grpo
    from nanoseek.posttrain.sft import sft
    from nanoseek.posttrain.trainer import read_summary
    from nanoseek.recipes.r1 import load_pipeline_config, plan, run_pipeline, stage_defaults
    from nanoseek.train.metrics import read_metrics

    out = Path(args.out)
    common = [f"train.threads={args.threads}", f"train.seed={args.seed}", "log.progress=false"]
    teacher_run = Path(args.teacher_run)
    if read_summary(teacher_run / "02-rl") is None:
        run_pipeline("r1-zero", teacher_run, overrides=[f"pipeline.threads={args.threads}",
                                                        f"pipeline.seed={args.seed}", "pipeline.progress=false"])
    teacher = teacher_run / "02-rl" / "model"
    teacher_eval = read_summary(teacher_run / "02-rl")["eval"]

    # The student base: the r1-zero base recipe, smaller, with the teacher's tokenizer.
    stages = {s.name: s for s in plan("r1-zero", out / "unused", load_pipeline_config("r1-zero"))}
    base_cfg = stages["base"].config
    base_cfg = base_cfg.with_overrides([*common, f"model.overrides={args.student}",
                                        f"model.tokenizer={json.dumps(str(teacher))}"]).validate()
    student_base = out / "student-base"
    if read_summary(student_base) is None:
        sft(base_cfg, student_base)
    base_eval = read_summary(student_base)["eval"]
    init = [f"model.init_from={json.dumps(str(student_base / 'model'))}", "task.name=arithmetic",
            "eval.examples=200", "eval.max_new_tokens=48", "eval.at_start=false", "train.steps=100000",
            f"train.time_limit={60 * args.minutes}", *common]

    # Arm 1: distillation (traces sampled once from the teacher, then SFT for the time budget).
    t0 = time.perf_counter()
    d_cfg = PostConfig().with_overrides([
        *init, "eval.every=20", f"distill.teacher={json.dumps(str(teacher))}", "rejection.prompts=1500",
        "rejection.samples=4",
        "rejection.temperature=1.0", "rejection.max_new_tokens=48", "optim.lr=1e-3", "train.batch_size=64"]).validate()
    distilled = read_summary(out / "distill") or distill(d_cfg, out / "distill")
    wall_distill = time.perf_counter() - t0

    # Arm 2: GRPO with the teacher's RL recipe (the r1-zero "rl" stage), same training-time budget.
    rl_cfg = stage_defaults("r1-zero", "rl").with_overrides([*init, "eval.every=4"]).validate()
    rl = read_summary(out / "grpo") or grpo(rl_cfg, out / "grpo")

    traces = distilled.get("traces", {})
    rows = [("teacher (RL model)", teacher_eval, None), ("student base (SFT, bimodal)", base_eval, None),
            ("student + GRPO", rl["eval"], rl["train_time"]), ("student + distillation", distilled["eval"],
                                                                 distilled["train_time"])]
    print(f"\n{'model':<30} {'greedy acc':>10} {'<think>':>8} {'length':>7} {'train s':>8}")
    for name, ev, t in rows:
        print(f"{name:<30} {ev['greedy_accuracy']:>10.3f} {ev['think_rate']:>8.3f} {ev['mean_length']:>7.1f} "
              f"{'' if t is None else f'{t:.0f}':>8}")
    print(f"teacher traces: {traces}; distillation wall time incl. teacher sampling {wall_distill:.0f} s")

    # held-out greedy accuracy of each arm at equal training time (the last evaluation before t)
    budget = 60 * args.minutes
    times = [budget * f for f in (1 / 8, 1 / 4, 1 / 2, 1)]
    curves = {name: [(r["train_time"], r["eval_greedy_accuracy"]) for r in read_metrics(out / name)
                     if "eval_greedy_accuracy" in r] for name in ("distill", "grpo")}

    def at(curve, t):
        seen = [acc for s, acc in curve if s <= t + 1e-6]
        return seen[-1] if seen else base_eval["greedy_accuracy"]

    print(f"\n{'training s':>10} {'distill':>8} {'GRPO':>8}")
    for t in times:
        print(f"{t:>10.1f} {at(curves['distill'], t):>8.3f} {at(curves['grpo'], t):>8.3f}")
    result = {"teacher": teacher_eval, "student_base": base_eval, "grpo": rl, "distill": distilled,
              "minutes": args.minutes, "traces": traces,
              "matched_time": [{"train_s": t, "distill": at(curves["distill"], t), "grpo": at(curves["grpo"], t)}
                               for t in times]}
    (out / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
