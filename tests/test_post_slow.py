"""The post-training acceptance runs at full micro scale (`make test-slow`; minutes each, 2 threads)."""
import pytest

pytestmark = pytest.mark.slow


def test_r1_zero_grpo_gains_20_points_within_5_minutes(tmp_path):
    """Issue 5: from a bimodal base, GRPO raises held-out greedy accuracy by >= 20 points within 5
    minutes on 2 cores, and response length and <think> use grow (`nanoseek experiment r1` measures the curve)."""
    from nanoseek.recipes.r1 import run_pipeline

    report = run_pipeline("r1-zero", tmp_path / "r1-zero", overrides=[
        "pipeline.threads=2", "pipeline.progress=false", "rl.train.steps=100000", "rl.train.time_limit=300"])
    base, rl = report["stages"]
    assert rl["train_time"] < 310
    assert rl["greedy_accuracy"] >= base["greedy_accuracy"] + 0.20, (base, rl)
    assert rl["think_rate"] > base["think_rate"] + 0.5 and rl["mean_length"] > base["mean_length"] + 5


def test_pipeline_r1_full_reports_accuracy_and_language_consistency(tmp_path):
    from nanoseek.recipes.r1 import run_pipeline

    report = run_pipeline("r1", tmp_path / "r1", overrides=["pipeline.threads=2", "pipeline.progress=false"])
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == ["base", "cold_start", "reasoning_rl", "rejection", "sft", "rl"]
    assert rows["rejection"]["kept"] > 100
    for name in ("cold_start", "reasoning_rl", "sft", "rl"):
        assert rows[name]["think_rate"] > 0.9, rows[name]
    assert rows["rl"]["greedy_accuracy"] > rows["base"]["greedy_accuracy"] + 0.3
    assert rows["reasoning_rl"]["language_consistency"] >= rows["cold_start"]["language_consistency"] - 0.02
    assert rows["rl"]["language_consistency"] > 0.9


@pytest.mark.parametrize("task,gains", [
    ('common.task.options={ops = ["+"]}', True),
    ('common.task.options={ops = ["-"]}', True),  # measured: 56.0% -> 97.0%
    ('common.task.options={ops = ["*"]}', False),  # the base's sampled traces: 31% of samples, none right
    ('common.task.name="countdown"', False),  # 27% of samples, none right
])
def test_r1_zero_defaults_on_each_task_variant_gain_or_say_why_not(tmp_path, task, gains):
    """Issue 18.11: with its defaults R1-Zero gains >= 20 points, or stops before RL with the base's diagnosis
    (a base that never reasons its way to a right answer gives RL nothing to reinforce)."""
    from nanoseek.recipes.r1 import run_pipeline

    sets = ["pipeline.seed=13", "pipeline.threads=1", "pipeline.progress=false", task]
    if not gains:
        with pytest.raises(ValueError, match=r"sometimes reasons.*, 0\.0% of those are right"):
            run_pipeline("r1-zero", tmp_path / "z", overrides=sets, log=lambda line: None)
        return
    base, rl = run_pipeline("r1-zero", tmp_path / "z", overrides=sets, log=lambda line: None)["stages"]
    assert rl["greedy_accuracy"] >= base["greedy_accuracy"] + 0.20, (base, rl)
