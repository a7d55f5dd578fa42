"""`scaling`: DeepSeek LLM §3's scaling laws at micro scale.

Tiny dense DeepSeek-LLM models (MHA, SwiGLU width 8/3·d, so the model scale is the paper's non-embedding
FLOPs/token M = 72·n_layer·d² + 12·n_layer·d·l_seq exactly) are pretrained for compute C = M·D, D tokens.
At each of three budgets:

- Part A (§3.1, hyperparameters): one model, a (batch size, learning rate) grid, every point D tokens
  (steps = D / batch). The near-optimal region is the points within 0.25% of the best held-out loss (the
  paper's rule); B_opt(C) and η_opt(C) are the geometric means of its batch sizes (tokens) and learning
  rates, and power laws through the budgets give their exponents (paper: B ∝ C^0.3271, η ∝ C^−0.1250).
- Part B (§3.2, IsoFLOP): several model scales with D = C / M each; per budget, the vertex of a parabola in
  ln M through the best scale and its two neighbours gives M_opt(C), and D_opt = C / M_opt; `fit_isoflop`
  fits their power laws (paper: M_opt ∝ C^0.5243, D_opt ∝ C^0.4757).

Everything is fitted per seed; the derived rows carry the per-seed values (mean ± std over seeds). A fit
that is ill-posed for a seed (an IsoFLOP profile whose best scale is its smallest or largest: the minimum is
not bracketed) gives NaN for that seed, so its checks read inconclusive rather than pretending.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanoseek.experiments import micro
from nanoseek.experiments.core import (
    Check,
    Context,
    Experiment,
    Metric,
    Variant,
    summarize_values,
)
from nanoseek.scaling import deepseek_llm_flops_per_token, fit_isoflop, fit_power_law
from nanoseek.scaling.laws import (
    BATCH_EXP,
    D_EXP,
    ETA_EXP,
    M_EXP,
    optimal_batch_size,
    optimal_data_scale,
    optimal_learning_rate,
    optimal_model_scale,
)

PRESET = "tiny-dense"
SEQ_LEN = 64
HEAD_DIM = 6  # widths are multiples of 6, so 8/3·d is an integer and M is the paper's formula exactly
NEAR_OPTIMAL = 0.0025  # DeepSeek LLM §3.1: within 0.25% of the minimum generalization error
# The paper's multi-step schedule (×0.316 at 80%, ×0.1 at 90% of the steps); 10% of the documents held out,
# because micro's 2% is 2 documents (8K tokens), on which the seeds' losses scatter by ~1.5%.
SETS = ("schedule.lr_schedule=deepseek-multistep", "data.val_fraction=0.1")


def model_scale(n_layer: int, d_model: int) -> int:
    """M, non-embedding training FLOPs per token at SEQ_LEN (DeepSeek LLM Eq. 2)."""
    return deepseek_llm_flops_per_token(n_layer, d_model, SEQ_LEN)


def model_overrides(n_layer: int, d_model: int) -> dict:
    """ModelConfig fields of a dense MHA model whose non-embedding FLOPs/token are exactly `model_scale`."""
    if d_model % HEAD_DIM:
        raise ValueError(f"d_model={d_model} must be a multiple of {HEAD_DIM}")
    heads = d_model // HEAD_DIM
    return {"attention_type": "mha", "hidden_size": d_model, "num_hidden_layers": n_layer,
            "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": 8 * d_model // 3,
            "max_position_embeddings": SEQ_LEN}


@dataclass(frozen=True)
class Budget:
    """One compute budget: Part A's model width, tokens (C = M·D exactly, D a multiple of every batch) and
    batch sizes (sequences of SEQ_LEN tokens); Part B's widths and the batch and LR they train at."""

    width: int
    tokens: int
    batch_sizes: tuple[int, ...]
    iso_widths: tuple[int, ...]
    iso_batch: int = 8
    iso_lr: float = 1e-2

    @property
    def compute(self) -> int:
        return model_scale(1, self.width) * self.tokens


@dataclass(frozen=True)
class Plan:
    budgets: tuple[Budget, ...]
    lrs: tuple[float, ...]


def _budget(compute: float, width: int, batch_sizes: tuple[int, ...], iso_widths: tuple[int, ...]) -> Budget:
    """D ≈ compute / M rounded to a multiple of 4096 tokens (SEQ_LEN × 64 ≥ the largest batch), so every grid
    point of a budget trains exactly the same tokens."""
    quantum = SEQ_LEN * 64
    return Budget(width, max(1, round(compute / (model_scale(1, width) * quantum))) * quantum, batch_sizes, iso_widths)


# One-layer models: in a pilot, two-layer ones lay 0.1–0.2 nats above the one-layer profile at the same
# budget (and made it non-monotonic in M). Widths d → M at
# l_seq 64: 12 19.6K, 18 37.2K, 24 59.9K, 30 87.8K, 36 121K, 48 203K, 60 305K. From a pilot run (1 seed):
# Part A's width at each budget is the one nearest its IsoFLOP optimum; the grids hold every budget's best point
# inside them (the smallest budget's best batch was the grid's smallest, 4, so it also gets 2); the profiles
# bracket the optimum (narrower models at the largest budget would need more tokens than the corpus's 887K); and
# they train at batch 8 × 64 tokens and LR 1e-2, the pilot grid's best point or within 0.4% of it at every budget
# (the paper, likewise, ran its IsoFLOP profiles at its fitted hyperparameters).
FULL = Plan(budgets=(_budget(5e9, 18, (2, 4, 8, 16, 32), (12, 18, 24, 30, 36)),
                     _budget(1.5e10, 24, (4, 8, 16, 32), (12, 18, 24, 30, 36)),
                     _budget(4.5e10, 30, (4, 8, 16, 32), (24, 30, 36, 48, 60))),
            lrs=(2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2))
QUICK = Plan(budgets=(_budget(5e9, 18, (4, 8, 16), (12, 18, 24)),
                      _budget(1.5e10, 24, (4, 8, 16), (18, 24, 30)),
                      _budget(4.5e10, 30, (4, 8, 16), (24, 30, 36))),
             lrs=(5e-3, 1e-2, 2e-2))


def plan_variants(plan: Plan) -> list[Variant]:
    """Part A's grid ("hp{k}-b{batch}-lr{lr}") and Part B's profile ("iso{k}-d{d_model}") per budget k;
    an IsoFLOP point that is also a grid point is run once, for both. Each variant's `matched` holds its exact
    compute C{k} = M·D (checked within 2% per budget), M and D."""
    variants: dict[tuple, Variant] = {}

    def add(name, part, k, shape, batch, lr, steps):
        m, tokens = model_scale(*shape), steps * batch * SEQ_LEN
        spec = {"parts": [part], "budget": k, "compute": plan.budgets[k - 1].compute, "n_layer": shape[0],
                "d_model": shape[1], "batch_size": batch, "lr": lr, "steps": steps,
                "warmup": max(1, steps // 20), "seq_len": SEQ_LEN, "sets": list(SETS)}
        key = (k, shape, batch, lr, steps)
        if key in variants:
            variants[key].spec["parts"].append(part)
        else:
            variants[key] = Variant(name, spec, {f"C{k}": m * tokens, "M": m, "D": tokens})

    for k, b in enumerate(plan.budgets, 1):
        for batch in b.batch_sizes:
            if b.tokens % (batch * SEQ_LEN):
                raise ValueError(f"budget {k}: {b.tokens} tokens is not a multiple of batch {batch} × {SEQ_LEN}")
            for lr in plan.lrs:
                add(f"hp{k}-b{batch}-lr{lr:g}", "hp", k, (1, b.width), batch, lr, b.tokens // (batch * SEQ_LEN))
        for width in b.iso_widths:
            steps = round(b.compute / (model_scale(1, width) * b.iso_batch * SEQ_LEN))
            add(f"iso{k}-d{width}", "iso", k, (1, width), b.iso_batch, b.iso_lr, steps)
    return list(variants.values())


def _budget_groups(*plans: Plan) -> dict[str, tuple[str, ...]]:
    """matched_on: C{k} → every variant of budget k in any plan (the runner checks those it runs)."""
    groups: dict[str, dict[str, None]] = {}
    for plan in plans:
        for v in plan_variants(plan):
            groups.setdefault(f"C{v.spec['budget']}", {})[v.name] = None
    return {k: tuple(names) for k, names in groups.items()}


# ---------------------------------------------------------------------------- fits (pure, tested on synthetic points)
@dataclass(frozen=True)
class HyperOptimum:
    """One budget's near-optimal region in its (batch, LR) grid."""

    compute: float
    batch: float  # geometric mean of the near-optimal points' batch sizes (tokens)
    lr: float  # geometric mean of their learning rates
    loss: float  # the best loss
    near: int  # points within the tolerance
    at_edge: bool  # the best point lies on the grid's boundary: the optimum may lie outside it


@dataclass(frozen=True)
class HyperFit:
    optima: tuple[HyperOptimum, ...]  # ascending compute
    batch_coef: float
    batch_exp: float
    lr_coef: float
    lr_exp: float


def hyper_optimum(compute: float, batch, lr, loss, tol: float = NEAR_OPTIMAL) -> HyperOptimum:
    """The near-optimal region of one budget: points with loss ≤ (1 + tol)·min (non-finite losses never are)."""
    b, e, lo = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (batch, lr, loss))
    if not b.size == e.size == lo.size:
        raise ValueError(f"batch, lr and loss must have the same length, got {b.size}, {e.size}, {lo.size}")
    ok = np.isfinite(lo)
    if not ok.any():
        raise ValueError(f"compute {compute:g}: no finite loss")
    best = int(np.argmin(np.where(ok, lo, np.inf)))
    near = ok & (lo <= lo[best] * (1 + tol))
    at_edge = any(np.unique(x).size > 1 and x[best] in (x.min(), x.max()) for x in (b, e))
    return HyperOptimum(float(compute), float(np.exp(np.log(b[near]).mean())), float(np.exp(np.log(e[near]).mean())),
                        float(lo[best]), int(near.sum()), bool(at_edge))


def fit_hyperparameters(compute, batch, lr, loss, tol: float = NEAR_OPTIMAL) -> HyperFit:
    """Points (C, B, η, loss) grouped by exact C → each budget's near-optimal (B, η) → B_opt = coef·C^exp and
    η_opt = coef·C^exp by least squares in log-log space (`fit_power_law`)."""
    c = np.asarray(compute, dtype=np.float64).reshape(-1)
    b, e, lo = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (batch, lr, loss))
    optima = tuple(hyper_optimum(budget, b[c == budget], e[c == budget], lo[c == budget], tol)
                   for budget in np.unique(c))
    bc, be = fit_power_law([o.compute for o in optima], [o.batch for o in optima])
    ec, ee = fit_power_law([o.compute for o in optima], [o.lr for o in optima])
    return HyperFit(optima, bc, be, ec, ee)


def bracket(model, loss) -> np.ndarray:
    """Indices of one budget's best model scale and its two neighbours in M: the points its parabola goes
    through. The profiles' tails are not parabolic at micro scale (the largest models get ~100 steps and lose
    0.5–1 nats), so a parabola through all of them puts the vertex where the tails balance, not at the
    minimum. ValueError if the best scale is the smallest or largest one (the minimum is not bracketed).
    Non-finite losses (diverged runs) are left out."""
    m, lo = np.asarray(model, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    order = [i for i in np.argsort(m) if np.isfinite(lo[i])]
    if len({m[i] for i in order}) < 3 or len(order) != len({m[i] for i in order}):
        raise ValueError(f"{len(order)} model scales with a finite loss (distinct: {len({m[i] for i in order})}); "
                         "need >= 3 distinct")
    best = min(range(len(order)), key=lambda j: lo[order[j]])
    if best in (0, len(order) - 1):
        side = "smallest" if best == 0 else "largest"
        raise ValueError(f"the best loss is at the {side} model scale M = {m[order[best]]:.3g}: not bracketed")
    return np.array(order[best - 1:best + 2])


def isoflop_minimum(model, loss) -> tuple[float, float]:
    """(M_opt, loss at it) of one budget: the vertex of loss = a·(ln M)² + b·ln M + c through `bracket`'s points."""
    m, lo = np.asarray(model, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    sel = bracket(m, lo)
    a, b, c = np.polyfit(np.log(m[sel]), lo[sel], 2)
    if a <= 0:  # a flat triple: no curvature to place a minimum
        raise ValueError(f"loss vs ln M is not convex (curvature {a:.3g}): no minimum")
    x = -b / (2 * a)
    return float(math.exp(x)), float(a * x * x + b * x + c)


@dataclass(frozen=True)
class IsoFit:
    compute: tuple[float, ...]  # ascending
    model_opt: tuple[float, ...]  # NaN where that budget's minimum is not bracketed
    loss_opt: tuple[float, ...]
    errors: tuple[str | None, ...]
    model_coef: float = math.nan  # NaN unless every budget is bracketed
    model_exp: float = math.nan
    data_coef: float = math.nan
    data_exp: float = math.nan

    @property
    def data_opt(self) -> tuple[float, ...]:
        return tuple(c / m for c, m in zip(self.compute, self.model_opt))


def fit_isoflops(compute, model, loss) -> IsoFit:
    """Per-budget IsoFLOP minima (`isoflop_minimum`); when every budget is bracketed, `fit_isoflop` on the
    bracketing points (the same parabolas) gives M_opt = coef·C^exp and D_opt = C / M_opt."""
    c, m, lo = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (compute, model, loss))
    budgets = np.unique(c)
    m_opt, l_opt, errors, keep = [], [], [], []
    for budget in budgets:
        idx = np.flatnonzero(c == budget)
        try:
            mo, loo = isoflop_minimum(m[idx], lo[idx])
            keep.extend(idx[bracket(m[idx], lo[idx])])
            errors.append(None)
        except ValueError as e:
            mo, loo = math.nan, math.nan
            errors.append(f"C = {budget:.3g}: {e}")
        m_opt.append(mo)
        l_opt.append(loo)
    fit = IsoFit(tuple(map(float, budgets)), tuple(m_opt), tuple(l_opt), tuple(errors))
    if any(errors) or budgets.size < 2:
        return fit
    law = fit_isoflop(c[keep], m[keep], lo[keep])
    return IsoFit(fit.compute, tuple(law.model_opt), tuple(law.loss_opt), fit.errors,
                  law.model_coef, law.model_exp, law.data_coef, law.data_exp)


# ---------------------------------------------------------------------------- from runs to fits
@dataclass(frozen=True)
class SeedFits:
    seed: int
    hyper: HyperFit
    iso: IsoFit


def _points(runs: dict[str, list[dict]]) -> dict[int, dict[str, list[tuple]]]:
    """seed → {"hp": [(C, batch tokens, lr, loss)], "iso": [(C, M, loss)]} from the runs' specs (fingerprints)."""
    out: dict[int, dict[str, list[tuple]]] = {}
    for results in runs.values():
        for r in results:
            s = r["fingerprint"]["spec"]
            loss = r["metrics"].get("val_loss", math.nan)
            loss = math.nan if loss is None else float(loss)
            seed = out.setdefault(r["seed"], {"hp": [], "iso": []})
            if "hp" in s["parts"]:
                seed["hp"].append((s["compute"], s["batch_size"] * s["seq_len"], s["lr"], loss))
            if "iso" in s["parts"]:
                seed["iso"].append((s["compute"], model_scale(s["n_layer"], s["d_model"]), loss))
    return out


def seed_fits(runs: dict[str, list[dict]]) -> list[SeedFits]:
    fits = []
    for seed, pts in sorted(_points(runs).items()):
        hyper = fit_hyperparameters(*zip(*pts["hp"]))
        fits.append(SeedFits(seed, hyper, fit_isoflops(*zip(*pts["iso"]))))
    return fits


class ScalingExperiment(Experiment):
    name = "scaling"
    title = "Scaling laws of hyperparameters and model/data allocation (DeepSeek LLM §3)"
    claim = ("B_opt and η_opt follow power laws in compute C = M·D (B grows, η falls), and IsoFLOP minima give "
             "M_opt ∝ C^a, D_opt ∝ C^b with a ≈ b ≈ 0.5")
    paper = ("B ∝ C^0.3271, η ∝ C^−0.1250 (§3.1, Fig. 3; 1e17–2e19 FLOPs); M_opt ∝ C^0.5243, D_opt ∝ C^0.4757 "
             "(§3.2, Fig. 4; 1e17–3e20 FLOPs)")
    metrics = (
        Metric("val_loss", "held-out loss (nats/token)"),
        Metric("B_opt", "B_opt (tokens)", lower_is_better=False, fmt=".0f"),
        Metric("lr_opt", "η_opt", lower_is_better=False, fmt=".3g"),
        Metric("M_opt", "M_opt (FLOPs/token)", lower_is_better=False, fmt=".3g"),
        Metric("D_opt", "D_opt (tokens)", lower_is_better=False, fmt=".3g"),
        Metric("batch_exp", "B_opt exponent (paper 0.3271)", lower_is_better=False, fmt=".3f"),
        Metric("lr_exp", "η_opt exponent (paper −0.1250)", lower_is_better=False, fmt=".3f"),
        Metric("model_exp", "M_opt exponent (paper 0.5243)", lower_is_better=False, fmt=".3f"),
        Metric("data_exp", "D_opt exponent (paper 0.4757)", lower_is_better=False, fmt=".3f"),
    )
    matched_on = _budget_groups(QUICK, FULL)
    checks = (
        # signs with a margin: the same grid point at every budget (a flat optimum) fits an exponent ≈ 0, and the
        # smallest real shift, one more near-optimal point at one end budget, moves it by ~0.16
        Check("batch_exp", "fit", "above", bound=0.05),
        Check("lr_exp", "fit", "below", bound=-0.05),
        Check("model_exp", "fit", "above", bound=0.3),
        Check("model_exp", "fit", "below", bound=0.8),
    )
    notes = (
        "Setting: one-layer dense DeepSeek-LLM models (MHA with 6-wide heads, SwiGLU 8/3·d, RMSNorm, RoPE, init "
        "std 0.006; 512-token BPE; l_seq 64), d 12–60, so M = 19.6K–305K non-embedding FLOPs/token; AdamW "
        "0.9/0.95/0.1 with the paper's multi-step LR (warmup 5% of the steps, ×0.316 at 80%, ×0.1 at 90%), fp32; "
        "the stdlib corpus (887K training tokens: no run sees a token twice) with 10% of its documents (80K "
        "tokens) held out. Budgets C ≈ 5e9, 1.5e10, 4.5e10 FLOPs (the paper: 1e17–3e20). Part A: per budget one "
        "width (18, 24, 30: M 37K, 60K, 88K) trained on D = C/M tokens (135K, 250K, 512K) at batch 2/4–32 "
        "sequences × LR 2.5e-3–4e-2, factors of 2 (quick: 4–16 × 5e-3–2e-2), 66–2000 steps; per seed, B_opt and "
        "η_opt are the geometric means of the points within 0.25% of the best held-out loss. Part B: 5 widths "
        "per budget (quick: 3) at D = C/M, batch 8 sequences and LR 1e-2; M_opt is the vertex of the parabola in "
        "ln M through the best width and its two neighbours (the profiles' tails, e.g. the widest models with "
        "~100 steps, lose 0.5–1 nats and are not parabolic). Widths, grids and the IsoFLOP hyperparameters were "
        "placed from one pilot seed. Checks: B_opt grows and η_opt falls with C (the paper's signs, by more than "
        "±0.05: a flat optimum, the same grid point at every budget, fits ≈ 0, while one more near-optimal point "
        "at one end budget already moves an exponent by ~0.16); the M_opt "
        "exponent lies in 0.3–0.8, the band of published fits (early DeepSeek data 0.450, Chinchilla 0.49, "
        "OpenWebText2 0.578, OpenAI 0.73). Why it may differ at scale: 9× compute instead of 3000×, so each "
        "exponent rests on three budgets a factor 3 apart and a grid spaced by factors of 2 (the paper's η_opt "
        "changes by 9^−0.125 = 0.76× over the range, less than one grid step); the seeds' losses scatter by "
        "~0.5–1%, more than the 0.25% tolerance, so the near-optimal region is often one point; one-layer models "
        "at 66–2000 steps, where the LR mostly buys progress per step; the embedding and lm_head, left out of M, "
        "cost as much as the block at d ≤ 30, and l_seq 64 makes attention's 12·d·l_seq up to half of M."
    )

    def setting(self) -> dict:
        return {**micro.setting(), "sets": list(SETS)}

    def variants(self, quick: bool) -> list[Variant]:
        return plan_variants(QUICK if quick else FULL)

    def run(self, variant: Variant, seed: int, run_dir: Path, ctx: Context) -> dict:
        s = variant.spec
        budget = micro.Budget(steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                              warmup=s["warmup"], evals=1)
        summary, records = micro.pretrain_variant(run_dir, ctx, seed, budget, model_overrides(s["n_layer"], s["d_model"]),
                                                  sets=list(s["sets"]), preset=PRESET)
        return {"metrics": micro.lm_metrics(summary, records)}

    def derive(self, runs: dict[str, list[dict]], ctx: Context) -> list[dict]:
        fits = seed_fits(runs)
        compute = [o.compute for o in fits[0].hyper.optima]
        rows = []
        for k, c in enumerate(compute):
            per_seed = {"B_opt": [f.hyper.optima[k].batch for f in fits], "lr_opt": [f.hyper.optima[k].lr for f in fits],
                        "near_optimal": [f.hyper.optima[k].near for f in fits],
                        "at_edge": [float(f.hyper.optima[k].at_edge) for f in fits],
                        "M_opt": [f.iso.model_opt[k] for f in fits], "D_opt": [f.iso.data_opt[k] for f in fits]}
            rows.append({"name": f"opt{k + 1}", "matched": {f"C{k + 1}": c},
                         "metrics": {key: summarize_values(v) for key, v in per_seed.items()}})
        per_seed = {"batch_exp": [f.hyper.batch_exp for f in fits], "lr_exp": [f.hyper.lr_exp for f in fits],
                    "model_exp": [f.iso.model_exp for f in fits], "data_exp": [f.iso.data_exp for f in fits],
                    "batch_coef_log10": [math.log10(f.hyper.batch_coef) for f in fits],
                    "lr_coef_log10": [math.log10(f.hyper.lr_coef) for f in fits],
                    "model_coef_log10": [_log10(f.iso.model_coef) for f in fits],
                    "data_coef_log10": [_log10(f.iso.data_coef) for f in fits]}
        rows.append({"name": "fit", "matched": {}, "metrics": {key: summarize_values(v) for key, v in per_seed.items()}})
        return rows

    def headline(self, table: list[dict]) -> str:
        fit = next((r["metrics"] for r in table if r["name"] == "fit"), {})

        def exp(key, paper):
            s = fit.get(key)
            if not s or not math.isfinite(s["mean"]):
                return f"n/a (paper {paper:.3f})"
            spread = f" ± {s['std']:.2f}" if len(s["values"]) > 1 else ""
            return f"{s['mean']:.2f}{spread} (paper {paper:.3f})"

        edges = [r["metrics"]["at_edge"]["mean"] for r in table if r["name"].startswith("opt") and "at_edge" in r["metrics"]]
        edge = f"; best grid point on the grid's edge in {sum(edges) / len(edges):.0%} of budgets×seeds" if any(edges) else ""
        return (f"B_opt ∝ C^{exp('batch_exp', BATCH_EXP)}, η_opt ∝ C^{exp('lr_exp', ETA_EXP)}, "
                f"M_opt ∝ C^{exp('model_exp', M_EXP)}, D_opt ∝ C^{exp('data_exp', D_EXP)}{edge}")

    def figures(self, plt, runs: dict[str, list[dict]], out: Path) -> list[str]:
        fits = seed_fits(runs)
        points = _points(runs)
        return [_plot_grid(plt, points, out), _plot_hyper_laws(plt, fits, out), _plot_isoflop(plt, points, fits, out)]


def _log10(x: float) -> float:
    return math.log10(x) if math.isfinite(x) and x > 0 else math.nan


def _mean_loss(points: dict[int, dict[str, list[tuple]]], part: str) -> dict[tuple, float]:
    """Each point's loss averaged over the seeds (keys: the point without its loss)."""
    acc: dict[tuple, list[float]] = {}
    for pts in points.values():
        for p in pts[part]:
            acc.setdefault(p[:-1], []).append(p[-1])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _mean_law(values: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(coef, exp) of the seeds' mean law: the mean exponent and mean log-coefficient (a log-space OLS fit is
    linear in the data, so this is the fit through the seeds' mean log optima); None if a seed has none."""
    if not values or not all(math.isfinite(c) and math.isfinite(e) for c, e in values):
        return None
    return math.exp(np.mean([math.log(c) for c, _ in values])), float(np.mean([e for _, e in values]))


def _plot_grid(plt, points, out: Path) -> str:
    """Seed-mean loss over each budget's (B, η) grid: the near-optimal region (of the seed-mean losses) ringed,
    each seed's (B_opt, η_opt) as a cross, the paper's law at that C as a star."""
    mean = _mean_loss(points, "hp")
    budgets = sorted({k[0] for k in mean})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.0), squeeze=False)
    for i, (ax, c) in enumerate(zip(axes[0], budgets)):
        pts = [(b, e, lo) for (cc, b, e), lo in mean.items() if cc == c]
        b, e, lo = (np.array(x) for x in zip(*pts))
        sc = ax.scatter(b, e, c=lo, cmap="viridis_r", s=330, marker="s")
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        for bi, ei, li in pts:
            ax.annotate(f"{li:.3f}", (bi, ei), ha="center", va="center", fontsize=6, color="white")
        near = lo <= np.nanmin(lo) * (1 + NEAR_OPTIMAL)
        ax.scatter(b[near], e[near], s=520, facecolors="none", edgecolors="red", lw=1.5,
                   label="within 0.25% of the best (seed mean)" if i == 0 else None)
        for j, pts_s in enumerate(points.values()):
            sel = [p for p in pts_s["hp"] if p[0] == c]
            o = hyper_optimum(c, *(np.array(x) for x in list(zip(*sel))[1:]))
            ax.scatter([o.batch], [o.lr], marker="x", color="black", s=40,
                       label="B_opt, η_opt per seed" if i == j == 0 else None)
        ax.scatter([optimal_batch_size(c)], [optimal_learning_rate(c)], marker="*", color="orange", s=120,
                   label="the paper's law at this C" if i == 0 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(set(b)), [f"{x:g}" for x in sorted(set(b))])
        ax.set_yticks(sorted(set(e)), [f"{x:g}" for x in sorted(set(e))])
        ax.minorticks_off()
        ax.margins(0.15)
        ax.set_xlabel("batch size (tokens)")
        ax.set_ylabel("learning rate")
        ax.set_title(f"C = {c:.3g} FLOPs", fontsize=9)
    fig.legend(loc="lower center", ncol=3, fontsize=7, markerscale=0.5, frameon=False)
    fig.suptitle("Held-out loss (seed mean) over the (batch size, LR) grid per budget", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out / "scaling_grid.png", dpi=110)
    plt.close(fig)
    return "scaling_grid.png"


def _law_lines(plt, ax, compute, law, paper, label):
    cs = np.geomspace(min(compute) / 1.5, max(compute) * 1.5, 50)
    if law:
        ax.plot(cs, law[0] * cs ** law[1], color="tab:blue", label=f"fit: ∝ C^{law[1]:.3f}")
    ax.plot(cs, paper(cs), color="orange", ls="--", label=f"paper: ∝ C^{label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(compute), [f"{c:.2g}" for c in compute])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel("compute C (FLOPs)")
    ax.legend(fontsize=7)


def _plot_hyper_laws(plt, fits: list[SeedFits], out: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    compute = [o.compute for o in fits[0].hyper.optima]
    for ax, attr, coef, paper, label, ylabel in (
            (axes[0], "batch", "batch", optimal_batch_size, f"{BATCH_EXP}", "B_opt (tokens)"),
            (axes[1], "lr", "lr", optimal_learning_rate, f"{ETA_EXP}", "η_opt")):
        for f in fits:
            ax.scatter(compute, [getattr(o, attr) for o in f.hyper.optima], color="tab:blue", s=18, alpha=0.7)
        law = _mean_law([(getattr(f.hyper, f"{coef}_coef"), getattr(f.hyper, f"{coef}_exp")) for f in fits])
        _law_lines(plt, ax, compute, law, paper, label)
        ax.set_ylabel(ylabel)
    fig.suptitle("Near-optimal batch size and learning rate vs compute (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling_hparams.png", dpi=110)
    plt.close(fig)
    return "scaling_hparams.png"


def _plot_isoflop(plt, points, fits: list[SeedFits], out: Path) -> str:
    """IsoFLOP profiles (seed-mean loss and its parabola per budget), then M_opt and D_opt vs C."""
    mean = _mean_loss(points, "iso")
    budgets = sorted({k[0] for k in mean})
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    for c, color in zip(budgets, colors):
        m, lo = (np.array(x) for x in zip(*sorted((mm, v) for (cc, mm), v in mean.items() if cc == c)))
        axes[0].scatter(m, lo, color=color, s=20, label=f"C = {c:.2g}")
        keep = np.isfinite(lo)
        if keep.sum() >= 3:
            a, b, k = np.polyfit(np.log(m[keep]), lo[keep], 2)
            xs = np.linspace(np.log(m.min()) - 0.2, np.log(m.max()) + 0.2, 60)
            axes[0].plot(np.exp(xs), a * xs**2 + b * xs + k, color=color, lw=1)
            try:
                mo, loo = isoflop_minimum(m, lo)
                axes[0].scatter([mo], [loo], color=color, marker="v", s=50, edgecolors="black")
            except ValueError:
                pass
    axes[0].set_xscale("log")
    scales = sorted({mm for _, mm in mean})
    axes[0].set_xticks(scales, [f"{mm / 1e3:.3g}K" for mm in scales], fontsize=7)
    axes[0].xaxis.set_minor_locator(plt.NullLocator())
    axes[0].set_xlabel("model scale M (non-embedding FLOPs/token)")
    axes[0].set_ylabel("held-out loss (seed mean)")
    axes[0].set_title("IsoFLOP profiles (▼: parabola minimum)", fontsize=9)
    axes[0].legend(fontsize=7)
    for ax, attr, coef, paper, label, ylabel in (
            (axes[1], "model_opt", "model", optimal_model_scale, f"{M_EXP}", "M_opt (FLOPs/token)"),
            (axes[2], "data_opt", "data", optimal_data_scale, f"{D_EXP}", "D_opt (tokens)")):
        for f in fits:
            ax.scatter(f.iso.compute, getattr(f.iso, attr), color="tab:blue", s=18, alpha=0.7)
        law = _mean_law([(getattr(f.iso, f"{coef}_coef"), getattr(f.iso, f"{coef}_exp")) for f in fits])
        _law_lines(plt, ax, budgets, law, paper, label)
        ax.set_ylabel(ylabel)
    fig.suptitle("IsoFLOP analysis: compute-optimal model and data scale (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling_isoflop.png", dpi=110)
    plt.close(fig)
    return "scaling_isoflop.png"
