"""Scaling-law fits — DeepSeek LLM §3.1 (hyperparameters) and §3.2 (model/data allocation).

With C = M·D (M = non-embedding FLOPs/token, D = tokens) the paper fits
    η_opt = 0.3118·C^−0.1250      B_opt = 0.2920·C^0.3271  (batch in tokens; grid search 1e17–2e19)
    M_opt = 0.1715·C^0.5243       D_opt = 5.8316·C^0.4757  (IsoFLOP profiles, 1e17–3e20)
The last pair comes from IsoFLOP profiles: for each budget, train models of several scales, fit
the loss against log M, and take the minimum; then fit power laws of the minima against C.
``fit_isoflop`` does exactly that with a parabola per budget; ``fit_power_law`` is a least-squares
line in log-log space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ETA_COEF, ETA_EXP = 0.3118, -0.1250
BATCH_COEF, BATCH_EXP = 0.2920, 0.3271
M_COEF, M_EXP = 0.1715, 0.5243
D_COEF, D_EXP = 5.8316, 0.4757


def optimal_learning_rate(compute: float) -> float:
    """η_opt = 0.3118·C^−0.1250 (DeepSeek LLM Eq. 1)."""
    return ETA_COEF * compute**ETA_EXP


def optimal_batch_size(compute: float) -> float:
    """B_opt = 0.2920·C^0.3271 tokens per step (DeepSeek LLM Eq. 1)."""
    return BATCH_COEF * compute**BATCH_EXP


def optimal_model_scale(compute: float) -> float:
    """M_opt = 0.1715·C^0.5243 non-embedding FLOPs/token (DeepSeek LLM Eq. 4)."""
    return M_COEF * compute**M_EXP


def optimal_data_scale(compute: float) -> float:
    """D_opt = 5.8316·C^0.4757 tokens (DeepSeek LLM Eq. 4)."""
    return D_COEF * compute**D_EXP


def _positive_1d(name: str, values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{name} must be finite and > 0 for a log-space fit, got {a.tolist()}")
    return a


def fit_power_law(x, y) -> tuple[float, float]:
    """Least-squares fit of y = coef·x^exponent as a line in (log x, log y); returns (coef, exponent)."""
    lx, ly = np.log(_positive_1d("x", x)), np.log(_positive_1d("y", y))
    if lx.shape != ly.shape:
        raise ValueError(f"x and y must have the same length, got {lx.size} and {ly.size}")
    if np.unique(lx).size < 2:
        raise ValueError(f"x needs at least 2 distinct values to fit a power law, got {np.unique(lx).tolist()}")
    exponent, log_coef = np.polyfit(lx, ly, 1)
    return float(np.exp(log_coef)), float(exponent)


@dataclass(frozen=True)
class IsoFLOPFit:
    """Per-budget optima and the power laws through them (C = M·D, so D_opt = C / M_opt)."""

    compute: tuple[float, ...]  # the distinct budgets, ascending
    model_opt: tuple[float, ...]  # argmin of each budget's parabola in log M
    data_opt: tuple[float, ...]
    loss_opt: tuple[float, ...]  # the parabola's minimum
    model_coef: float
    model_exp: float
    data_coef: float
    data_exp: float


def fit_isoflop(compute, model_scale, loss) -> IsoFLOPFit:
    """IsoFLOP analysis: points (C, M, loss) grouped by exact C; per group loss ≈ a·(ln M)² + b·ln M + c.

    Each budget needs ≥ 3 distinct model scales and an upward parabola (a > 0), else the optimum is
    not bracketed and a ValueError names the budget. Needs ≥ 2 budgets for the power laws.
    """
    c = _positive_1d("compute", compute)
    m = _positive_1d("model_scale", model_scale)
    lo = np.asarray(loss, dtype=np.float64).reshape(-1)
    if not (c.size == m.size == lo.size):
        raise ValueError(f"compute, model_scale and loss must have the same length, got {c.size}, {m.size}, {lo.size}")
    budgets = np.unique(c)
    if budgets.size < 2:
        raise ValueError(f"need at least 2 distinct compute budgets, got {budgets.tolist()}")
    m_opt, l_opt = [], []
    for budget in budgets:
        sel = c == budget
        lm = np.log(m[sel])
        if np.unique(lm).size < 3:
            raise ValueError(f"compute budget {budget:g} has {np.unique(lm).size} distinct model scales; need >= 3")
        a, b, k = np.polyfit(lm, lo[sel], 2)
        if a <= 0:
            raise ValueError(f"compute budget {budget:g}: loss vs log M is not convex (curvature {a:g}); the optimum is not bracketed")
        x = -b / (2 * a)
        m_opt.append(float(np.exp(x)))
        l_opt.append(float(a * x * x + b * x + k))
    d_opt = budgets / np.asarray(m_opt)
    mc, me = fit_power_law(budgets, m_opt)
    dc, de = fit_power_law(budgets, d_opt)
    return IsoFLOPFit(
        compute=tuple(float(b) for b in budgets),
        model_opt=tuple(m_opt),
        data_opt=tuple(float(d) for d in d_opt),
        loss_opt=tuple(l_opt),
        model_coef=mc,
        model_exp=me,
        data_coef=dc,
        data_exp=de,
    )
