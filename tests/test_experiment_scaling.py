"""The `scaling` experiment (DeepSeek LLM §3 at micro scale) and `nanoseek scaling plan`, without training:
the fits recover known exponents from synthetic points, the budgets are matched in compute, the whole
runner pipeline works on synthetic losses, and the plan CLI prints the laws of laws.py."""
import dataclasses
import json
import math

import numpy as np
import pytest

from nanoseek.cli import main
from nanoseek.experiments import micro
from nanoseek.experiments.core import Context, matched_errors, run_experiment
from nanoseek.experiments.scaling import (
    FULL,
    PRESET,
    QUICK,
    SEQ_LEN,
    ScalingExperiment,
    bracket,
    fit_hyperparameters,
    fit_isoflops,
    hyper_optimum,
    isoflop_minimum,
    model_overrides,
    model_scale,
    plan_variants,
)
from nanoseek.scaling import (
    deepseek_llm_flops_per_token,
    optimal_batch_size,
    optimal_data_scale,
    optimal_learning_rate,
    optimal_model_scale,
    training_flops_per_token,
)
from nanoseek.scaling.cli import budget_plan, suggest_shape

BATCH_EXP, LR_EXP, MODEL_EXP = 0.3271, -0.125, 0.5243


# ---------------------------------------------------------------------------- fits on synthetic points
def _bowl(c, b, e, b_opt, e_opt):
    """A loss surface with its minimum at (b_opt, e_opt), tilted (a cross term) and falling with compute."""
    x, y = np.log(b / b_opt), np.log(e / e_opt)
    return 3.0 * c ** -0.02 * (1 + 0.01 * x**2 + 0.02 * y**2 + 0.005 * x * y)


def test_near_optimal_fit_recovers_known_batch_and_lr_exponents():
    compute = np.geomspace(1e17, 1e20, 5)
    b_opt, e_opt = 0.292 * compute**BATCH_EXP, 0.3118 * compute**LR_EXP
    # one log grid for every budget, wide enough to hold every near-optimal region, 8 points per octave
    bs = np.exp2(np.arange(np.log2(b_opt.min()) - 3, np.log2(b_opt.max()) + 3, 1 / 8))
    es = np.exp2(np.arange(np.log2(e_opt.min()) - 3, np.log2(e_opt.max()) + 3, 1 / 8))
    pts = [(c, b, e, _bowl(c, b, e, bo, eo)) for c, bo, eo in zip(compute, b_opt, e_opt) for b in bs for e in es]
    fit = fit_hyperparameters(*zip(*pts))
    assert fit.batch_exp == pytest.approx(BATCH_EXP, abs=0.01)
    assert fit.lr_exp == pytest.approx(LR_EXP, abs=0.01)
    assert fit.batch_coef == pytest.approx(0.292, rel=0.3) and fit.lr_coef == pytest.approx(0.3118, rel=0.3)
    assert all(o.near > 10 and not o.at_edge for o in fit.optima)
    assert [o.compute for o in fit.optima] == pytest.approx(list(compute))


def test_near_optimal_region_is_the_papers_quarter_percent():
    b = np.array([1, 2, 4, 8, 16.0])
    e = np.full(5, 1e-3)
    loss = np.array([3.02, 3.005, 3.0, 3.0074, 3.2])  # 3.0074 is within 0.25% of 3.0, 3.02 is not
    o = hyper_optimum(7.0, b, e, loss)
    assert o.near == 3 and o.batch == pytest.approx((2 * 4 * 8) ** (1 / 3)) and o.loss == 3.0
    assert not o.at_edge and hyper_optimum(7.0, b, e, loss[::-1]).near == 3
    assert hyper_optimum(7.0, b, e, [2.9, 3, 3, 3, 3]).at_edge  # the best point at the grid's edge
    assert hyper_optimum(7.0, b, e, [math.nan, 3.1, 3.0, 3.0, math.inf]).near == 2  # diverged runs never count
    with pytest.raises(ValueError, match="no finite loss"):
        hyper_optimum(7.0, b, e, [math.nan] * 5)


def test_isoflop_fit_recovers_known_model_and_data_exponents():
    compute = np.geomspace(1e17, 1e21, 4)
    m_opt = 0.1715 * compute**MODEL_EXP
    pts = []
    for i, (c, mo) in enumerate(zip(compute, m_opt)):
        # 5 scales around the optimum, off-centre by a different amount per budget
        for m in mo * np.geomspace(0.2, 4.0, 5) * 1.3 ** (i % 2):
            pts.append((c, m, 2.0 + 0.1 * np.log(m / mo) ** 2 - 0.05 * i))
    fit = fit_isoflops(*zip(*pts))
    assert fit.errors == (None,) * 4
    assert fit.model_exp == pytest.approx(MODEL_EXP, abs=1e-6) and fit.data_exp == pytest.approx(1 - MODEL_EXP, abs=1e-6)
    assert fit.model_coef == pytest.approx(0.1715, rel=1e-4) and fit.data_coef == pytest.approx(1 / 0.1715, rel=1e-4)
    assert fit.model_opt == pytest.approx(tuple(m_opt), rel=1e-6)
    assert fit.data_opt == pytest.approx(tuple(compute / m_opt), rel=1e-6)


def test_isoflop_parabola_goes_through_the_best_scale_and_its_neighbours():
    m = np.array([1e4, 2e4, 4e4, 8e4, 1.6e5])
    # a minimum at 2e4·√2 with one steep tail (too few steps): the local parabola finds it, a global one would not
    loss = 3.0 + 0.1 * np.log(m / (2e4 * 2**0.5)) ** 2 + np.array([0, 0, 0, 0.5, 1.5])
    assert list(bracket(m, loss)) == [0, 1, 2]
    assert isoflop_minimum(m, loss)[0] == pytest.approx(2e4 * 2**0.5)
    a, b, _ = np.polyfit(np.log(m), loss, 2)
    assert math.exp(-b / (2 * a)) < 0.8 * 2e4 * 2**0.5  # the all-points vertex, pulled off by the tail
    assert list(bracket(m[::-1], loss[::-1])) == [4, 3, 2]  # indices into the inputs, in M order


def test_isoflop_not_bracketed_is_nan_not_a_crash():
    m = np.array([1e4, 2e4, 4e4])
    assert isoflop_minimum(m, [3.1, 3.0, 3.1])[0] == pytest.approx(2e4)
    with pytest.raises(ValueError, match="largest model scale .* not bracketed"):
        isoflop_minimum(m, [3.3, 3.1, 3.0])  # still falling at the largest scale
    with pytest.raises(ValueError, match="smallest model scale .* not bracketed"):
        isoflop_minimum(m, [3.0, 3.1, 3.05])
    with pytest.raises(ValueError, match="need >= 3 distinct"):
        isoflop_minimum(m, [3.0, math.nan, 3.0])
    fit = fit_isoflops([1e10] * 3 + [1e11] * 3, [*m, *(m * 3)], [3.1, 3.0, 3.1, 3.3, 3.1, 3.0])
    assert not math.isnan(fit.model_opt[0]) and math.isnan(fit.model_opt[1]) and "not bracketed" in fit.errors[1]
    assert math.isnan(fit.model_exp) and math.isnan(fit.data_exp)


# ---------------------------------------------------------------------------- matched budgets
@pytest.mark.parametrize("plan", [QUICK, FULL], ids=["quick", "full"])
def test_variants_are_matched_in_compute_per_budget(plan):
    variants = plan_variants(plan)
    assert matched_errors(variants, ScalingExperiment.matched_on) == []
    budgets = {v.spec["budget"] for v in variants}
    assert len(budgets) >= 3
    for v in variants:
        k, s = v.spec["budget"], v.spec
        assert v.matched[f"C{k}"] == v.matched["M"] * v.matched["D"]
        assert v.matched["D"] == s["steps"] * s["batch_size"] * s["seq_len"]
        assert v.matched[f"C{k}"] == pytest.approx(s["compute"], rel=0.01)
    for k in budgets:
        hp = [v for v in variants if v.spec["budget"] == k and "hp" in v.spec["parts"]]
        iso = {v.matched["M"] for v in variants if v.spec["budget"] == k and "iso" in v.spec["parts"]}
        assert len({v.spec["batch_size"] for v in hp}) >= 3 and len({v.spec["lr"] for v in hp}) >= 3
        assert len({v.matched[f"C{k}"] for v in hp}) == 1  # the grid is exactly matched: D fixed, steps = D / B
        assert len(iso) >= 3
    # perturbing one variant's compute by 3% breaks the match, and only its budget's
    v0 = variants[0]
    k = v0.spec["budget"]
    bad = dataclasses.replace(v0, matched={**v0.matched, f"C{k}": v0.matched[f"C{k}"] * 1.03})
    errors = matched_errors([bad, *variants[1:]], ScalingExperiment.matched_on)
    assert len(errors) == 1 and errors[0].startswith(f"C{k} differs")


def test_model_scale_is_the_papers_m_for_every_shape():
    shapes = {(v.spec["n_layer"], v.spec["d_model"]) for plan in (QUICK, FULL) for v in plan_variants(plan)}
    for n_layer, d in shapes:
        cfg = micro.model_config(PRESET, **model_overrides(n_layer, d))
        flops = training_flops_per_token(SEQ_LEN, **cfg.to_dict())
        assert flops.non_embedding == model_scale(n_layer, d) == deepseek_llm_flops_per_token(n_layer, d, SEQ_LEN)
    with pytest.raises(ValueError, match="multiple of 6"):
        model_overrides(1, 16)


# ---------------------------------------------------------------------------- the runner on synthetic losses
class _SyntheticScaling(ScalingExperiment):
    """Losses from known laws instead of training: B_opt ∝ C^0.33, η_opt ∝ C^−0.125, M_opt ∝ C^0.5."""

    def run(self, variant, seed, run_dir, ctx):
        s = variant.spec
        c, m = s["compute"], model_scale(s["n_layer"], s["d_model"])
        mid = QUICK.budgets[1].compute
        b_opt, e_opt, m_opt = 512 * (c / mid) ** 0.33, 1e-2 * (c / mid) ** -0.125, 5e4 * (c / mid) ** 0.5
        batch = s["batch_size"] * s["seq_len"]
        hp = 0.05 * np.log(batch / b_opt) ** 2 + 0.02 * np.log(s["lr"] / e_opt) ** 2
        iso = 0.1 * np.log(m / m_opt) ** 2
        loss = 4.0 * (c / mid) ** -0.05 + hp + iso + 0.001 * seed
        return {"metrics": {"val_loss": float(loss), "val_bpb": float(loss) / 1.2, "train_loss": float(loss)}}


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    results = run_experiment(_SyntheticScaling(), Context(out=out, quick=True, seeds=2), log=lambda _: None)
    return out, results


def test_runner_pipeline_on_synthetic_losses(synthetic_results):
    out, results = synthetic_results
    rows = {r["name"]: r for r in results["variants"]}
    fit = rows["fit"]["metrics"]
    assert fit["model_exp"]["mean"] == pytest.approx(0.5, abs=1e-6)  # the parabolas are exact
    assert fit["data_exp"]["mean"] == pytest.approx(0.5, abs=1e-6)
    assert fit["batch_exp"]["mean"] > 0.1 and fit["lr_exp"]["mean"] < -0.1  # a coarse 3×3 grid: the signs
    assert len(fit["model_exp"]["values"]) == 2
    assert {f"opt{k}" for k in (1, 2, 3)} <= set(rows)
    assert rows["opt2"]["metrics"]["B_opt"]["mean"] == pytest.approx(512)
    assert results["verdict"] == "reproduced" and len(results["checks"]) == 4
    assert "M_opt ∝ C^0.50" in results["headline"]
    report = (out / "report.md").read_text()
    assert "C1 (matched)" in report and "| fit |" in report and "multi-step LR" in report
    json.loads((out / "results.json").read_text())
    pytest.importorskip("matplotlib")
    for name in ("metrics.png", "scaling_grid.png", "scaling_hparams.png", "scaling_isoflop.png"):
        assert (out / name).stat().st_size > 0 and f"]({name})" in report


def test_unbracketed_isoflop_reads_inconclusive(tmp_path):
    class Unbracketed(_SyntheticScaling):
        def run(self, variant, seed, run_dir, ctx):  # loss falls with M at every budget: no IsoFLOP minimum
            r = super().run(variant, seed, run_dir, ctx)
            r["metrics"]["val_loss"] -= 0.2 * math.log(model_scale(variant.spec["n_layer"], variant.spec["d_model"]))
            return r

    results = run_experiment(Unbracketed(), Context(out=tmp_path, quick=True, seeds=1), log=lambda _: None)
    fit = next(r for r in results["variants"] if r["name"] == "fit")["metrics"]
    assert math.isnan(fit["model_exp"]["mean"])
    verdicts = {c["check"]: c["verdict"] for c in results["checks"]}
    assert verdicts["model_exp(fit) > 0.3"] == verdicts["model_exp(fit) < 0.8"] == "inconclusive"
    assert "M_opt ∝ C^n/a" in results["headline"]


# ---------------------------------------------------------------------------- nanoseek scaling plan
def _plan_output(capsys, *argv) -> str:
    main(["scaling", "plan", *argv])
    return capsys.readouterr().out


def test_plan_prints_the_papers_laws(capsys):
    c, seq = 1e20, 4096
    out = _plan_output(capsys, "--compute", "1e20", "--seq-len", str(seq))
    b = 0.2920 * c**0.3271  # computed here from the paper, checked against laws.py too
    assert b == pytest.approx(optimal_batch_size(c))
    assert f"{optimal_batch_size(c):.4g} tokens = {optimal_batch_size(c) / seq:.4g} sequences of 4096" in out
    assert f"η_opt     {optimal_learning_rate(c):.4g}" in out
    assert f"M_opt       {optimal_model_scale(c):.4g} non-embedding" in out
    assert f"D_opt        {optimal_data_scale(c):.4g} tokens" in out
    assert f"{optimal_data_scale(c) / optimal_batch_size(c):.4g}" in out
    assert "outside the compute the B/η laws were fitted over" in out  # 1e20 > 2e19
    assert "M/D laws" not in out  # 1e20 is inside 1e17–3e20
    assert "extrapolated" not in _plan_output(capsys, "--compute", "1e18")


def test_plan_suggests_a_shape_near_m_opt():
    for c, seq in ((1e18, 4096), (1e21, 4096), (1.5e10, 64)):
        plan = budget_plan(c, seq_len=seq)
        s = plan["shape"]
        assert s["model_scale"] == deepseek_llm_flops_per_token(s["n_layer"], s["d_model"], seq)
        assert 0.6 < s["model_scale"] / plan["model_scale"] < 1.6
    n_layer, d = suggest_shape(deepseek_llm_flops_per_token(24, 2048, 4096), 4096)
    assert 12 <= n_layer <= 24 and 1536 <= d <= 2560


def test_plan_from_a_fitted_experiment(synthetic_results, capsys):
    out_dir, results = synthetic_results
    fit = next(r for r in results["variants"] if r["name"] == "fit")["metrics"]
    c = 2e10
    out = _plan_output(capsys, "--compute", str(c), "--seq-len", "64", "--fit", str(out_dir))
    b = 10 ** fit["batch_coef_log10"]["mean"] * c ** fit["batch_exp"]["mean"]
    m = 10 ** fit["model_coef_log10"]["mean"] * c ** fit["model_exp"]["mean"]
    d = 10 ** fit["data_coef_log10"]["mean"] * c ** fit["data_exp"]["mean"]
    assert f"{b:.4g} tokens = {b / 64:.4g} sequences of 64" in out
    assert f"M_opt       {m:.4g} " in out and f"D_opt        {d:.4g} tokens" in out
    assert m * d == pytest.approx(c, rel=1e-6)  # D_opt = C / M_opt
    assert "fitted by `nanoseek experiment scaling`" in out and "extrapolated" not in out
    assert "extrapolated" in _plan_output(capsys, "--compute", "1e12", "--fit", str(out_dir))


@pytest.mark.parametrize("argv, needle", [
    (["--compute", "0"], "positive, finite"),
    (["--compute=-1e20"], "positive, finite"),
    (["--compute", "nan"], "positive, finite"),
    (["--compute", "1e20", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["--compute", "1e20", "--fit", "{tmp}/missing"], "results.json not found"),
    (["--compute", "1e20", "--fit", "{tmp}/other"], "not the results of `nanoseek experiment scaling`"),
])
def test_plan_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"experiment": "mla", "variants": []}))
    with pytest.raises(SystemExit) as e:
        main(["scaling", "plan", *[a.format(tmp=tmp_path) for a in argv]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("nanoseek scaling: error:") and err.count("\n") == 1
