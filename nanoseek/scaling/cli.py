"""`nanoseek scaling plan`: compute-optimal batch size, learning rate, model and data scale for a budget.

    nanoseek scaling plan --compute 1e20                    # DeepSeek LLM's laws (§3.1 Eq. 1, §3.2 Eq. 4)
    nanoseek scaling plan --compute 3e10 --seq-len 64 --fit runs/experiments/full/scaling   # our fitted laws

Each law is X = coef·C^exp with C = M·D in FLOPs (M: non-embedding FLOPs/token, D: tokens). --fit reads the
"fit" row of a finished `nanoseek experiment scaling` (its mean exponent and mean log-coefficient over seeds).
The suggested shape solves M = 72·n_layer·d² + 12·n_layer·d·l_seq at an aspect ratio d/n_layer ≈ 128
(DeepSeek LLM 7B: 4096/30 ≈ 137).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from nanoseek.scaling.flops import (
    deepseek_llm_flops_per_token,
    deepseek_llm_param_counts,
)
from nanoseek.scaling.laws import (
    BATCH_COEF,
    BATCH_EXP,
    D_COEF,
    D_EXP,
    ETA_COEF,
    ETA_EXP,
    M_COEF,
    M_EXP,
)

ASPECT = 128  # d_model / n_layer of the suggested shape

Law = tuple[float, float]  # (coef, exp)


@dataclass(frozen=True)
class Laws:
    source: str
    batch: Law | None  # tokens per step
    lr: Law | None
    model: Law | None  # non-embedding FLOPs/token
    data: Law | None  # tokens
    hyper_range: tuple[float, float]  # the compute the hyperparameter laws were fitted over
    iso_range: tuple[float, float]  # ... and the IsoFLOP laws


PAPER = Laws("DeepSeek LLM (arXiv 2401.02954) Eq. 1 and Eq. 4", (BATCH_COEF, BATCH_EXP), (ETA_COEF, ETA_EXP),
             (M_COEF, M_EXP), (D_COEF, D_EXP), (1e17, 2e19), (1e17, 3e20))


def load_fit(directory: str | Path) -> Laws:
    """The laws a finished `nanoseek experiment scaling --out DIR` fitted (DIR/results.json)."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `nanoseek experiment scaling --out {directory}` first")
    results = json.loads(path.read_text())
    rows = {row["name"]: row for row in results.get("variants", [])}
    if results.get("experiment") != "scaling" or "fit" not in rows:
        raise ValueError(f"{path} is not the results of `nanoseek experiment scaling` (no 'fit' row)")
    fit = rows["fit"]["metrics"]

    def law(name: str) -> Law | None:
        coef, exp = fit.get(f"{name}_coef_log10"), fit.get(f"{name}_exp")
        if not coef or not exp or not (math.isfinite(coef["mean"]) and math.isfinite(exp["mean"])):
            return None  # not fitted (e.g. an IsoFLOP minimum that was not bracketed)
        return 10 ** coef["mean"], exp["mean"]

    compute = [c for name, row in rows.items() if name.startswith("opt") for c in row["matched"].values()]
    span = (min(compute), max(compute)) if compute else (math.nan, math.nan)
    seeds = results.get("config", {}).get("seeds", "?")
    return Laws(f"fitted by `nanoseek experiment scaling` in {directory} ({seeds} seed(s))",
                law("batch"), law("lr"), law("model"), law("data"), span, span)


def suggest_shape(model_scale: float, seq_len: int) -> tuple[int, int]:
    """(n_layer, d_model) whose M is near `model_scale` at d_model ≈ ASPECT·n_layer: the depth whose exact-M
    width is nearest that ratio, the width then rounded (to 64 from 256 up, else to 12 or 6, so 8/3·d is whole)."""
    best = None
    for n_layer in range(1, 1000):
        # the positive root of 72·L·d² + 12·L·l_seq·d − M = 0
        a, b = 72 * n_layer, 12 * n_layer * seq_len
        d = (-b + math.sqrt(b * b + 4 * a * model_scale)) / (2 * a)
        score = abs(math.log(d / (ASPECT * n_layer)))
        if best is None or score < best[0]:
            best = (score, n_layer, d)
        elif d < ASPECT * n_layer:  # deeper only narrows further
            break
    _, n_layer, d = best
    quantum = 64 if d >= 256 else 12 if d >= 48 else 6
    return n_layer, max(quantum, quantum * round(d / quantum))


def budget_plan(compute: float, laws: Laws = PAPER, seq_len: int = 4096) -> dict:
    """B_opt (tokens and sequences), η_opt, M_opt, D_opt, steps and a suggested shape for `compute` FLOPs
    (None where a law is missing)."""
    if not (isinstance(compute, (int, float)) and math.isfinite(compute) and compute > 0):
        raise ValueError(f"--compute must be a positive, finite number of FLOPs, got {compute!r}")
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")

    def at(law: Law | None) -> float | None:
        return None if law is None else law[0] * compute ** law[1]

    out = {"compute": compute, "seq_len": seq_len, "batch_tokens": at(laws.batch), "lr": at(laws.lr),
           "model_scale": at(laws.model), "data_tokens": at(laws.data)}
    out["batch_sequences"] = None if out["batch_tokens"] is None else out["batch_tokens"] / seq_len
    out["steps"] = (None if out["batch_tokens"] is None or out["data_tokens"] is None
                    else out["data_tokens"] / out["batch_tokens"])
    if out["model_scale"] is not None:
        n_layer, d_model = suggest_shape(out["model_scale"], seq_len)
        out["shape"] = {"n_layer": n_layer, "d_model": d_model,
                        "model_scale": deepseek_llm_flops_per_token(n_layer, d_model, seq_len),
                        "non_embedding_params": deepseek_llm_param_counts(n_layer, d_model, 0)[0]}
    return out


def format_plan(plan: dict, laws: Laws) -> str:
    def num(x: float | None, fmt: str = ".4g") -> str:
        return "n/a (not fitted)" if x is None else f"{x:{fmt}}"

    c = plan["compute"]
    lines = [f"laws: {laws.source}",
             f"compute budget C        {c:.4g} FLOPs",
             f"batch size B_opt        {num(plan['batch_tokens'])} tokens"
             + ("" if plan["batch_sequences"] is None
                else f" = {plan['batch_sequences']:.4g} sequences of {plan['seq_len']} tokens"),
             f"learning rate η_opt     {num(plan['lr'])}",
             f"model scale M_opt       {num(plan['model_scale'])} non-embedding FLOPs/token",
             f"data scale D_opt        {num(plan['data_tokens'])} tokens",
             f"steps D_opt / B_opt     {num(plan['steps'], '.4g')}"]
    if "shape" in plan:
        s = plan["shape"]
        lines.append(f"suggested shape         n_layer {s['n_layer']}, d_model {s['d_model']} "
                     f"(M = {s['model_scale']:.4g}, {s['model_scale'] / plan['model_scale']:.0%} of M_opt; "
                     f"N1 = {s['non_embedding_params']:.4g} non-embedding parameters)")
    for name, (lo, hi) in (("B/η", laws.hyper_range), ("M/D", laws.iso_range)):
        if math.isfinite(lo) and not lo <= c <= hi:
            lines.append(f"note: C is outside the compute the {name} laws were fitted over "
                         f"({lo:.3g}–{hi:.3g} FLOPs): extrapolated")
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> None:
    laws = load_fit(args.fit) if args.fit else PAPER
    print(format_plan(budget_plan(args.compute, laws, args.seq_len), laws))


def register(sub) -> None:
    p = sub.add_parser("scaling", help="DeepSeek LLM scaling laws: compute-optimal hyperparameters and model/data scale",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = p.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND", required=True)
    q = ssub.add_parser("plan", help="B, η, M, D (and a model shape) for a compute budget",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--compute", type=float, required=True, metavar="C", help="compute budget in FLOPs (C = M·D)")
    q.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence, for B in sequences and for M")
    q.add_argument("--fit", metavar="DIR", help="use the laws fitted by `nanoseek experiment scaling --out DIR` "
                                                "instead of the paper's")
    q.set_defaults(func=_plan)
