"""The experiment runner: variants × seeds, resumable, aggregated into results.json and report.md.

An `Experiment` names a paper's claim, the variants that test it, the metrics it measures, the
quantities its variants are matched on, and the checks that decide the verdict. The runner trains
each (variant, seed) into DIR/runs/VARIANT/seed-N (a finished run leaves result.json and is reused;
an interrupted one resumes from its checkpoints), then writes

    DIR/results.json   {experiment, claim, paper, verdict, checks, variants: [{name, matched, metrics:
                        {metric: {mean, std, values}}}], config, wall_s}
    DIR/report.md      the claim, the paper's figure, a mean ± std table with the matched quantities,
                        each check's verdict, and the plots (DIR/*.png; they need matplotlib, the
                        `report` extra, and are left out without it).

Verdicts are paired: seed N fixes the data order and the initialization stream for every variant, so
a check looks at the per-seed differences d = a − b (a − (1 + tol)·b for "not_worse", a − bound for
"below"/"above") and their mean ± std (sample std over seeds), which removes what the seeds share
(at micro scale, one seed's data order moves every variant's loss by several percent together):
reproduced when the whole interval mean(d) ± std(d) lies on the claimed side of 0 (d < 0 for "less",
"not_worse" and "below"; d > 0 for "greater" and "above"), not reproduced when it lies on the other,
inconclusive when the spread overlaps 0. "not_worse" (a within (1 + tol) of b on a lower-is-better
metric) states "about as good as" / "at least as good as" claims: the tolerance is part of the claim,
the spread still has to clear it.
The experiment's verdict: not reproduced if any check is, reproduced if all are, else inconclusive.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from nanoseek.utils import atomic_write_text, pyplot

MATCH_TOLERANCE = 0.02  # matched quantities may differ by at most 2% between the variants that match them
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool = True
    fmt: str = ".4f"


@dataclass
class Variant:
    """One arm of an experiment: `spec` is whatever the experiment needs to run it (a JSON-able dict, also
    the fingerprint that decides whether a finished run may be reused); `matched` holds the quantities the
    variants are matched on, computed from the spec without training."""

    name: str
    spec: dict
    matched: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """One comparison the claim makes; see the module docstring for the rules."""

    metric: str
    a: str
    kind: str  # less | greater | not_worse | below | above
    b: str | None = None
    tol: float = 0.0
    bound: float | None = None

    def describe(self) -> str:
        if self.kind in ("below", "above"):
            return f"{self.metric}({self.a}) {'<' if self.kind == 'below' else '>'} {self.bound:g}"
        if self.kind == "not_worse":
            return f"{self.metric}({self.a}) ≤ (1 + {self.tol:g})·{self.metric}({self.b})"
        return f"{self.metric}({self.a}) {'<' if self.kind == 'less' else '>'} {self.metric}({self.b})"

    def difference(self, stats: dict[str, dict[str, dict]]) -> dict:
        """mean ± std over seeds of the paired difference d (the claim: d < 0, or d > 0 for greater/above)."""
        if self.kind not in ("less", "greater", "not_worse", "below", "above"):
            raise ValueError(f"unknown check kind {self.kind!r}")
        a = stats[self.a][self.metric]["values"]
        if self.kind in ("below", "above"):
            d = [x - self.bound for x in a]
        else:
            b = stats[self.b][self.metric]["values"]
            if len(a) != len(b):
                raise ValueError(f"{self.describe()}: {len(a)} and {len(b)} seeds cannot be paired")
            scale = 1 + self.tol if self.kind == "not_worse" else 1
            d = [x - scale * y for x, y in zip(a, b)]
        return summarize_values(d)

    def verdict(self, stats: dict[str, dict[str, dict]]) -> str:
        d = self.difference(stats)
        sign = -1 if self.kind in ("greater", "above") else 1  # the claim: sign·d < 0
        lo, hi = sorted((sign * (d["mean"] - d["std"]), sign * (d["mean"] + d["std"])))
        return "reproduced" if hi < 0 else "not reproduced" if lo > 0 else "inconclusive"


def overall_verdict(verdicts: list[str]) -> str:
    if "not reproduced" in verdicts:
        return "not reproduced"
    return "reproduced" if verdicts and all(v == "reproduced" for v in verdicts) else "inconclusive"


@dataclass
class Context:
    """What every run of an invocation shares."""

    out: Path
    quick: bool = False
    seeds: int = 3
    threads: int = 1
    cache: Path = Path("runs/experiments/cache")
    """Datasets and tokenizers, built once and shared by every experiment."""


class Experiment:
    """Subclasses set the class attributes and implement `variants` and `run`."""

    name: str = ""
    title: str = ""
    claim: str = ""
    paper: str = ""
    """The paper's figure and where it is (section / table)."""
    metrics: tuple[Metric, ...] = ()
    matched_on: ClassVar[dict[str, tuple[str, ...] | None]] = {}
    """Matched quantity → the variants that must agree on it (None: all of them)."""
    checks: tuple[Check, ...] = ()
    notes: str = ""
    """What the micro setting is and why it may differ at scale (printed in the report)."""

    def variants(self, quick: bool) -> list[Variant]:
        raise NotImplementedError

    def run(self, variant: Variant, seed: int, run_dir: Path, ctx: Context) -> dict:
        """Train/measure one (variant, seed); returns {"metrics": {key: float}, "curves": {name: [[x, y], ...]}}."""
        raise NotImplementedError

    def setting(self) -> dict:
        """What every variant shares and its runs depend on (data, base model): part of each run's fingerprint,
        so a changed setting reruns instead of reusing runs made under the old one."""
        return {}

    def headline(self, table: list[dict]) -> str:
        """Our figure, one line, for the summary tables: each check's metric for its variants."""
        stats = {row["name"]: row["metrics"] for row in table}
        fmts = {m.key: m.fmt for m in self.metrics}
        parts = []
        for c in self.checks:
            names = [c.a] if c.b is None else [c.a, c.b]
            if all(c.metric in stats.get(n, {}) for n in names):
                values = " vs ".join(f"{n} {fmt_stat(stats[n][c.metric], fmts.get(c.metric, '.4f'))}" for n in names)
                parts.append(f"{c.metric}: {values}")
        return "; ".join(dict.fromkeys(parts))

    def derive(self, runs: dict[str, list[dict]], ctx: Context) -> list[dict]:
        """Extra variants computed from the runs (e.g. fits across variants), as results.json variant dicts
        with per-seed values; none by default."""
        return []

    def figures(self, plt, runs: dict[str, list[dict]], out: Path) -> list[str]:
        """Extra plots (matplotlib.pyplot `plt`) written under `out`; their file names. Default: the curves
        the runs returned."""
        return plot_curves(plt, runs, out)


# ---------------------------------------------------------------------------- matched budgets
def matched_errors(variants: list[Variant], matched_on: dict[str, tuple[str, ...] | None],
                   tolerance: float = MATCH_TOLERANCE) -> list[str]:
    """Each matched quantity that differs by more than `tolerance` (relative to its largest value) between
    the variants that must agree on it."""
    errors = []
    by_name = {v.name: v for v in variants}
    for quantity, names in matched_on.items():
        group = [by_name[n] for n in names if n in by_name] if names is not None else variants
        values = {v.name: v.matched.get(quantity) for v in group}
        if any(x is None for x in values.values()):
            errors.append(f"{quantity}: not computed for {[n for n, x in values.items() if x is None]}")
            continue
        if len(values) > 1 and (max(values.values()) - min(values.values())) > tolerance * max(values.values()):
            errors.append(f"{quantity} differs by more than {tolerance:.0%}: {values}")
    return errors


# ---------------------------------------------------------------------------- aggregation
def summarize_values(values: list[float]) -> dict:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def aggregate(runs: list[dict], keys: list[str]) -> dict:
    return {k: summarize_values([r["metrics"][k] for r in runs]) for k in keys
            if all(k in r["metrics"] and r["metrics"][k] is not None for r in runs)}


# ---------------------------------------------------------------------------- running
def _run_one(exp: Experiment, v: Variant, seed: int, ctx: Context) -> dict:
    run_dir = ctx.out / "runs" / v.name / f"seed-{seed}"
    done, stamp = run_dir / "result.json", run_dir / "spec.json"
    spec = {"spec": v.spec, "quick": ctx.quick, "setting": exp.setting()}
    if done.is_file() and json.loads(done.read_text()).get("fingerprint") == spec:
        return json.loads(done.read_text())
    if run_dir.exists() and not (stamp.is_file() and json.loads(stamp.read_text()) == spec):
        shutil.rmtree(run_dir)  # the variant changed since: its old (finished or partial) run says nothing now
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(spec) + "\n")  # what an interrupted run was started with
    t0 = time.perf_counter()
    result = exp.run(v, seed, run_dir, ctx)
    result = {"variant": v.name, "seed": seed, "fingerprint": spec, "wall_s": time.perf_counter() - t0,
              "metrics": result["metrics"], "curves": result.get("curves", {})}
    atomic_write_text(done, json.dumps(result) + "\n")
    return result


def run_experiment(exp: Experiment, ctx: Context, log: Callable[[str], None] = print) -> dict:
    """Run (or reuse) every (variant, seed) of `exp`, then write results.json, report.md and the plots."""
    variants = exp.variants(ctx.quick)
    errors = matched_errors(variants, exp.matched_on)
    if errors:
        raise ValueError(f"experiment {exp.name}: variants are not matched: " + "; ".join(errors))
    ctx.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    total = len(variants) * ctx.seeds
    for i, (v, seed) in enumerate((v, s) for v in variants for s in range(ctx.seeds)):
        log(f"[{exp.name}] run {i + 1}/{total}: {v.name}, seed {seed}")
        runs.setdefault(v.name, []).append(_run_one(exp, v, seed, ctx))

    keys = [m.key for m in exp.metrics]
    table = [{"name": v.name, "matched": v.matched, "metrics": aggregate(runs[v.name], keys)} for v in variants]
    table += [{**row, "derived": True} for row in exp.derive(runs, ctx)]
    stats = {row["name"]: row["metrics"] for row in table}
    checks = []
    for c in exp.checks:
        try:
            diff, verdict = c.difference(stats), c.verdict(stats)
        except KeyError:  # a variant or metric the (quick) plan does not have
            continue
        checks.append({"check": c.describe(), "verdict": verdict, "difference": diff})
    results = {
        "experiment": exp.name, "title": exp.title, "claim": exp.claim, "paper": exp.paper,
        "verdict": overall_verdict([c["verdict"] for c in checks]), "checks": checks, "headline": exp.headline(table),
        "notes": exp.notes, "variants": table,
        "config": {"quick": ctx.quick, "seeds": ctx.seeds, "threads": ctx.threads,
                   "variants": {v.name: v.spec for v in variants}},
        "wall_s": sum(r["wall_s"] for rs in runs.values() for r in rs),
    }
    plt = pyplot()
    figures = [plot_metrics(plt, exp, table, ctx.out), *exp.figures(plt, runs, ctx.out)] if plt else []
    atomic_write_text(ctx.out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(ctx.out / "report.md", report_markdown(exp, results, figures))
    log(f"[{exp.name}] {results['verdict']}: {ctx.out / 'report.md'}")
    return results


# ---------------------------------------------------------------------------- reporting
def fmt_stat(s: dict | None, fmt: str = ".4f") -> str:
    if not s:
        return "—"
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}" if len(s["values"]) > 1 else f"{s['mean']:{fmt}}"


def fmt_difference(d: dict) -> str:
    return f"{d['mean']:+.3g} ± {d['std']:.2g}" if len(d["values"]) > 1 else f"{d['mean']:+.3g}"


def _fmt_number(x) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.4g}"
    return f"{int(x):,}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def _table(exp: Experiment, rows: list[dict]) -> list[str]:
    """Markdown rows: the variant, its matched quantities, then every metric some row has (the experiment's first)."""
    known = [m for m in exp.metrics if any(m.key in row["metrics"] for row in rows)]
    extra = sorted({k for row in rows for k in row["metrics"]} - {m.key for m in exp.metrics})
    matched = sorted({k for row in rows for k in row["matched"]})
    head = ["variant", *[f"{q} (matched)" for q in matched], *[m.label for m in known], *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], *[_fmt_number(row["matched"][q]) if q in row["matched"] else "" for q in matched],
                 *[fmt_stat(row["metrics"].get(m.key), m.fmt) for m in known],
                 *[fmt_stat(row["metrics"].get(k)) for k in extra]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(exp: Experiment, results: dict, figures: list[str]) -> str:
    cfg = results["config"]
    lines = [f"# {exp.title or exp.name}", "",
             f"**Claim.** {exp.claim}", "", f"**Paper.** {exp.paper}", "",
             f"**Verdict: {results['verdict']}** ({'quick plan, ' if cfg['quick'] else ''}{cfg['seeds']} seed(s), "
             f"mean ± std over seeds; {results['wall_s'] / 60:.1f} min of runs)", ""]
    derived = [row for row in results["variants"] if row.get("derived")]
    if derived:  # what the claim is about first (fits, paired errors), then the runs they come from
        lines += [*_table(exp, derived), ""]
    lines += _table(exp, [row for row in results["variants"] if not row.get("derived")])
    lines += ["", "| check | paired difference over seeds (left − right side) | verdict |", "|---|---|---|"]
    lines += [f"| {c['check']} | {fmt_difference(c['difference'])} | {c['verdict']} |" for c in results["checks"]]
    if exp.notes:
        lines += ["", exp.notes]
    lines += ["", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(lines)


def plot_metrics(plt, exp: Experiment, table: list[dict], out: Path) -> str:
    """One bar chart per metric, mean with ±std error bars per variant."""
    metrics = [m for m in exp.metrics if any(m.key in row["metrics"] for row in table)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 * max(1, len(metrics)), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        rows = [r for r in table if m.key in r["metrics"]]
        ax.bar(range(len(rows)), [r["metrics"][m.key]["mean"] for r in rows],
               yerr=[r["metrics"][m.key]["std"] for r in rows], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(m.label, fontsize=9)
        values = [r["metrics"][m.key]["mean"] for r in rows]
        if len(values) > 1 and 0 < min(values) < max(values) and m.lower_is_better:  # losses: zoom in on differences
            spread = max(values) - min(values)
            ax.set_ylim(max(0.0, min(values) - 2 * spread), max(values) + 2 * spread)
    fig.suptitle(exp.title or exp.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    return "metrics.png"


def plot_curves(plt, runs: dict[str, list[dict]], out: Path) -> list[str]:
    """Each curve name the runs returned (e.g. held-out loss over steps): the seeds' mean per variant."""
    names = sorted({c for rs in runs.values() for r in rs for c in r.get("curves", {})})
    if not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant, rs in runs.items():
            curves = [r["curves"][name] for r in rs if r.get("curves", {}).get(name)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [curves[0][i][0] for i in range(n)]
            ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(xs, ys, label=variant, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return ["curves.png"]
