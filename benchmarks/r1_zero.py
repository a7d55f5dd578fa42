"""R1-Zero at micro scale (issue 5 acceptance): GRPO on a bimodal arithmetic base raises held-out greedy
accuracy, response length and <think> use within a fixed wall-clock budget on 2 CPU cores.

The base (stage "base" of `nanoseek pipeline r1-zero`) is a tiny-v3 SFT'd on 2-digit additions, 40%
correct <think> column traces and 60% bare <answer> tags holding the dropped-carry answer, so it
answers greedily without thinking and mostly wrong while its sampled traces are often right. Then GRPO
(G 8, 16 prompts per step, T 1, accuracy reward, β 0, μ 1, token-level loss) runs for `--minutes` of
training time; the held-out greedy accuracy is measured every `--eval-every` steps. Prints the curve
(step, training seconds, greedy accuracy, <think> use, mean response length) and the gain.

    .venv/bin/python benchmarks/r1_zero.py --out runs/bench-r1-zero            # 5 minutes of GRPO
    .venv/bin/python benchmarks/r1_zero.py --minutes 1 --threads 1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-r1-zero")
    p.add_argument("--minutes", type=float, default=5.0, help="GRPO training-time budget")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra pipeline overrides (STAGE.section.key=value)")
    args = p.parse_args()

    from nanoseek.recipes.r1 import run_pipeline
    from nanoseek.train.metrics import read_metrics

    sets = [f"pipeline.threads={args.threads}", f"pipeline.seed={args.seed}", "pipeline.progress=false",
            "rl.train.steps=100000", f"rl.train.time_limit={60 * args.minutes}", f"rl.eval.every={args.eval_every}",
            *args.set]
    report = run_pipeline("r1-zero", args.out, overrides=sets)
    base, rl = report["stages"]
    print(f"\nGRPO curve ({Path(args.out) / '02-rl' / 'metrics.jsonl'}):")
    print(f"{'step':>5} {'train s':>8} {'greedy acc':>10} {'<think>':>8} {'length':>7} {'reward':>7}")
    print(f"{0:>5} {0:>8.0f} {base['greedy_accuracy']:>10.3f} {base['think_rate']:>8.3f} {base['mean_length']:>7.1f}")
    reward = None
    for r in read_metrics(Path(args.out) / "02-rl"):
        reward = r.get("reward_mean", reward)
        if "eval_greedy_accuracy" in r:
            print(f"{r['step']:>5} {r['train_time']:>8.0f} {r['eval_greedy_accuracy']:>10.3f} "
                  f"{r['eval_think_rate']:>8.3f} {r['eval_mean_length']:>7.1f} {reward:>7.3f}")
    gain = rl["greedy_accuracy"] - base["greedy_accuracy"]
    result = {"base": base, "rl": rl, "gain_points": 100 * gain, "grpo_train_seconds": rl["train_time"],
              "grpo_steps": rl["steps"], "base_train_seconds": base["train_time"]}
    print(f"\nheld-out greedy accuracy {100 * base['greedy_accuracy']:.1f}% -> {100 * rl['greedy_accuracy']:.1f}% "
          f"(+{100 * gain:.1f} points) in {rl['steps']} GRPO steps / {rl['train_time']:.0f} s; <think> use "
          f"{100 * base['think_rate']:.0f}% -> {100 * rl['think_rate']:.0f}%, mean length {base['mean_length']:.1f} -> "
          f"{rl['mean_length']:.1f} tokens (base SFT took {base['train_time']:.0f} s)")
    (Path(args.out) / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
