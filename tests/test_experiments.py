"""The experiment suite (`nanoseek experiment`): verdict rules, matched budgets, exact quantities, and one
--quick run end to end through the CLI."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import DeepSeekForCausalLM
from nanoseek.experiments import EXPERIMENTS, get
from nanoseek.experiments.attention import (
    ATTENTION,
    HEAD_DIM,
    HEADS,
    LAYERS,
    kv_bytes_per_token,
)
from nanoseek.experiments.core import (
    Check,
    Context,
    Experiment,
    Metric,
    Variant,
    matched_errors,
    overall_verdict,
    run_experiment,
    summarize_values,
)
from nanoseek.experiments.micro import model_config
from nanoseek.experiments.moe import devices_per_token
from nanoseek.experiments.summary import BEGIN, END, write_summary


def stats(**variants):
    return {name: {"m": summarize_values(values)} for name, values in variants.items()}


@pytest.mark.parametrize("a, b, kind, expected", [
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "less", "reproduced"),
    ([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], "less", "not reproduced"),
    ([1.0, 1.5, 0.5], [1.2, 1.7, 0.7], "less", "reproduced"),  # the values' spreads overlap, every seed agrees
    ([1.0, 1.5, 0.5], [1.2, 1.3, 0.7], "less", "inconclusive"),  # one seed of three disagrees
    ([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], "greater", "reproduced"),
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "greater", "not reproduced"),
])
def test_comparison_verdicts(a, b, kind, expected):
    """Paired per seed: the differences' mean ± std decides, not the two variants' own spreads."""
    assert Check("m", "a", kind, "b").verdict(stats(a=a, b=b)) == expected


def test_not_worse_and_bound_verdicts():
    s = stats(a=[1.004, 1.004], b=[1.0, 1.0], c=[1.2, 1.21], d=[1.0, 1.02])
    assert Check("m", "a", "not_worse", "b", tol=0.005).verdict(s) == "reproduced"
    assert Check("m", "a", "not_worse", "b", tol=0.001).verdict(s) == "not reproduced"  # disjoint, beyond tol
    assert Check("m", "d", "not_worse", "b", tol=0.0).verdict(s) == "inconclusive"  # worse on average, not every seed
    assert Check("m", "c", "not_worse", "b", tol=0.5).verdict(s) == "reproduced"
    wide = stats(e=[0.95, 1.04], b=[1.0, 1.0])  # better on average, but the spread reaches past the tolerance
    assert Check("m", "e", "not_worse", "b", tol=0.0).verdict(wide) == "inconclusive"
    with pytest.raises(ValueError, match="cannot be paired"):
        Check("m", "a", "less", "b").verdict(stats(a=[1.0, 2.0], b=[1.0]))
    assert Check("m", "b", "below", bound=1.1).verdict(s) == "reproduced"
    assert Check("m", "c", "below", bound=1.1).verdict(s) == "not reproduced"
    assert Check("m", "d", "below", bound=1.01).verdict(s) == "inconclusive"
    assert Check("m", "c", "above", bound=1.1).verdict(s) == "reproduced"
    assert Check("m", "b", "above", bound=1.1).verdict(s) == "not reproduced"
    assert overall_verdict(["reproduced", "inconclusive"]) == "inconclusive"
    assert overall_verdict(["reproduced", "not reproduced", "inconclusive"]) == "not reproduced"
    assert overall_verdict(["reproduced", "reproduced"]) == "reproduced"


def test_summarize_values_is_sample_std():
    s = summarize_values([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(1.2909944, rel=1e-6) and s["values"] == [1.0, 2.0, 3.0, 4.0]
    assert summarize_values([3.0])["std"] == 0.0


def test_matched_errors_catch_a_mismatch():
    vs = [Variant("a", {}, {"params": 100, "tokens": 10}), Variant("b", {}, {"params": 101.9, "tokens": 10}),
          Variant("c", {}, {"params": 150, "tokens": 10})]
    assert matched_errors(vs, {"params": ("a", "b"), "tokens": None}) == []
    assert "params" in matched_errors(vs, {"params": None})[0]
    assert "not computed" in matched_errors(vs, {"flops": None})[0]


@pytest.mark.parametrize("name", ["mla", "moe", "balance", "routing", "fp8"])
def test_variants_are_matched(name):
    """Every experiment's variants agree on their matched quantities (≤ 2%), in both plans, and the quantities
    are what the table claims: recomputed here from the variants' configs."""
    exp = get(name)
    for quick in (True, False):
        variants = exp.variants(quick)
        assert matched_errors(variants, exp.matched_on) == []
        for v in variants:
            assert set(exp.matched_on) <= set(v.matched)
            b = v.spec["budget"]
            assert v.matched["tokens"] == b["steps"] * b["batch_size"] * b["seq_len"]
            model = DeepSeekForCausalLM(model_config(v.spec["preset"], **v.spec["model"]))
            if "params" in v.matched:  # the main model, MTP modules excluded (as the papers count)
                main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
                assert v.matched["params"] == main


def test_kv_cache_bytes_match_the_closed_forms():
    """V2 Table 1 per token: MHA 2·n_h·d_h·l, GQA 2·n_g·d_h·l, MQA 2·d_h·l, MLA (d_c + d_h^R)·l values; bf16."""
    exp = get("mla")
    expected = {"MHA": 2 * HEADS * HEAD_DIM, "GQA-2": 2 * 2 * HEAD_DIM, "MQA": 2 * HEAD_DIM,
                "MLA": 4 * HEAD_DIM + HEAD_DIM // 2}
    assert set(expected) == set(ATTENTION)
    for v in exp.variants(quick=True):
        model = DeepSeekForCausalLM(model_config(**v.spec["model"])).eval()
        assert kv_bytes_per_token(model) == expected[v.name] * LAYERS * 2
    assert expected["MLA"] / (2 * HEAD_DIM) == 2.25  # MLA's cache is GQA's with 2.25 groups (V2 §2.1.4)


def test_devices_per_token_counts_distinct_devices():
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 24))
    base = dict(n_routed_experts=16, num_experts_per_tok=4, ep_size=4, n_group=1, topk_group=1)
    counts = {}
    for m in (1, 2, None):
        torch.manual_seed(1)
        model = DeepSeekForCausalLM(model_config(**base, topk_devices=m)).eval()
        counts[m] = devices_per_token(model, x)
        # independent count: the selected experts' devices, from the gates' own outputs
        seen = []
        hooks = [layer.gate.register_forward_hook(lambda _m, _i, r, seen=seen: seen.append(r.indices // 4))
                 for layer in model.moe_layers()]
        with torch.no_grad():
            model(x, mtp=False)
        for h in hooks:
            h.remove()
        expected = sum(len(set(row.tolist())) for dev in seen for row in dev) / sum(len(dev) for dev in seen)
        assert counts[m] == pytest.approx(expected)
    assert counts[1] == 1.0 and 1.0 < counts[2] <= 2.0 < counts[None] <= 4.0


def test_registry_and_unknown_name():
    assert list(EXPERIMENTS) == ["mla", "moe", "balance", "routing", "mtp", "fp8", "scaling", "r1"]
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        get("nope")


def test_quick_experiment_end_to_end(tmp_path):
    """`nanoseek experiment moe --quick` through the CLI: results.json in the issue's schema, the report and its
    plots; a second invocation reuses every finished run; `summary` writes RESULTS.md and the README table."""
    out = tmp_path / "moe"
    cmd = [sys.executable, "-m", "nanoseek", "experiment", "moe", "--quick", "--threads", "1", "--out", str(out),
           "--cache", str(tmp_path / "cache")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    r = json.loads((out / "results.json").read_text())
    assert {"experiment", "claim", "paper", "verdict", "variants", "config", "wall_s"} <= set(r)
    assert r["experiment"] == "moe" and r["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert [v["name"] for v in r["variants"]] == ["DeepSeekMoE", "GShard", "Dense"]
    for v in r["variants"]:
        assert set(v) >= {"name", "matched", "metrics"} and v["matched"]["tokens"] > 0
        m = v["metrics"]["val_bpb"]
        assert set(m) == {"mean", "std", "values"} and len(m["values"]) == 1 and 0 < m["mean"] < 8
    assert [c["check"] for c in r["checks"]] == [c.describe() for c in get("moe").checks]
    report = (out / "report.md").read_text()
    assert r["verdict"] in report and "DeepSeekMoE" in report
    assert (out / "metrics.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0

    stamp = (out / "runs" / "GShard" / "seed-0" / "result.json").stat().st_mtime_ns
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    assert (out / "runs" / "GShard" / "seed-0" / "result.json").stat().st_mtime_ns == stamp  # reused, not rerun

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\nrest\n")
    write_summary({"moe": r}, tmp_path, str(tmp_path / "docs" / "RESULTS.md"), str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert f"| [moe](docs/results/moe/report.md) | {r['claim']} |" in text
    assert r["verdict"] in (tmp_path / "docs" / "RESULTS.md").read_text()
    assert (tmp_path / "docs" / "results" / "moe" / "report.md").read_text() == report
    assert (tmp_path / "docs" / "results" / "moe" / "metrics.png").is_file()
    with pytest.raises(ValueError, match="markers"):
        write_summary({"moe": r}, tmp_path, None, str(out / "report.md"))


class _Counting(Experiment):
    """No training: a metric from the spec, counting the runs it does."""

    name, metrics = "counting", (Metric("m", "m"),)
    checks = (Check("m", "a", "less", "b"),)

    def __init__(self, value_a):
        self.value_a, self.calls = value_a, []

    def variants(self, quick):
        return [Variant("a", {"v": self.value_a}), Variant("b", {"v": 5.0})]

    def run(self, variant, seed, run_dir, ctx):
        self.calls.append((variant.name, seed))
        (run_dir / "partial").write_text("x")
        return {"metrics": {"m": variant.spec["v"] + 0.1 * seed}}


def test_runs_are_reused_and_rerun_when_the_variant_changes(tmp_path):
    ctx = Context(out=tmp_path, seeds=2)
    exp = _Counting(1.0)
    r = run_experiment(exp, ctx, log=lambda _: None)
    assert exp.calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1)] and r["verdict"] == "reproduced"
    assert r["variants"][0]["metrics"]["m"]["values"] == [1.0, 1.1]
    exp = _Counting(1.0)
    run_experiment(exp, ctx, log=lambda _: None)
    assert exp.calls == []  # every run finished: reused
    # a changed variant reruns, and an interrupted run started with another spec is cleared first
    (tmp_path / "runs" / "a" / "seed-1" / "result.json").unlink()
    (tmp_path / "runs" / "a" / "seed-1" / "spec.json").write_text('{"spec": {"v": 0}, "quick": false}')
    exp = _Counting(9.0)
    r = run_experiment(exp, ctx, log=lambda _: None)
    assert exp.calls == [("a", 0), ("a", 1)] and r["verdict"] == "not reproduced"
    assert (tmp_path / "report.md").read_text().count("not reproduced") >= 2


def test_fp8_error_is_measured_beside_bf16s_own_error_against_fp32():
    def runs(*losses):
        return [{"metrics": {"train_loss": t, "val_loss": v}} for t, v in losses]

    rows = get("fp8").derive({"FP32": runs((2.0, 3.0), (2.2, 3.0)), "BF16": runs((2.02, 3.03), (2.2, 2.97)),
                              "FP8": runs((2.0402, 3.03), (2.178, 3.0))}, Context(out=Path(".")))
    fp8, floor = rows
    assert (fp8["name"], floor["name"]) == ("FP8 vs BF16", "BF16 vs FP32")
    assert fp8["metrics"]["rel_train_loss_error"]["values"] == pytest.approx([0.01, 0.01])
    assert fp8["metrics"]["rel_val_loss_error"]["values"] == pytest.approx([0.0, 0.01010101])
    assert floor["metrics"]["rel_train_loss_error"]["values"] == pytest.approx([0.01, 0.0])
    assert floor["metrics"]["rel_val_loss_error"]["values"] == pytest.approx([0.01, 0.01])
    assert fp8["metrics"]["bf16_seed_spread"]["mean"] == pytest.approx(statistics.stdev([2.02, 2.2]) / 2.11)
