"""The suite's summary: RESULTS.md (a paper-vs-nanoseek table, then each experiment's claim, setting
and checks) and the same table in the README between markers. A RESULTS.md written outside the
experiments' directory (docs/RESULTS.md) gets a copy of each report and its plots beside it
(docs/results/NAME/), so the evidence travels with the summary."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from nanoseek.utils import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def results_table(results: dict[str, dict], link_root: str | None = None) -> str:
    lines = ["| experiment | claim | paper | nanoseek (mean ± std over seeds) | verdict |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cell = f"[{name}]({link_root}/{name}/report.md)" if link_root else name
        lines.append(f"| {cell} | {r['claim']} | {r['paper']} | {r['headline']} | **{r['verdict']}** |")
    return "\n".join(lines)


def results_markdown(results: dict[str, dict], root: Path, link_root: str | None = None) -> str:
    lines = ["# Paper vs nanoseek: the ablations at micro scale", "",
             f"Written by `nanoseek experiment all` / `summary` from `{root}/*/results.json`. Each experiment's "
             "report (table, plots, per-seed values) is in its directory. Verdicts compare mean ± std over "
             "seeds: *inconclusive* where the spreads overlap.", "", results_table(results, link_root), ""]
    for name, r in results.items():
        cfg = r["config"]
        lines += [f"## {name}: {r['title']}", "", f"- claim: {r['claim']}", f"- paper: {r['paper']}",
                  f"- nanoseek: {r['headline']}",
                  f"- verdict: **{r['verdict']}** ({'quick plan, ' if cfg['quick'] else ''}{cfg['seeds']} seed(s), "
                  f"{r['wall_s'] / 60:.1f} min of runs)"]
        lines += [f"  - {c['check']}: {c['verdict']}" for c in r["checks"]]
        if r.get("notes"):
            lines += [f"- setting: {r['notes']}"]
        lines.append("")
    return "\n".join(lines)


def write_summary(results: dict[str, dict], root: Path, results_path: str | None = None,
                  readme: str | None = None) -> list[Path]:
    """Write ROOT/RESULTS.md (and a copy at `results_path`); replace the README's table between the markers."""
    if not results:
        raise ValueError(f"no finished experiment under {root} (each needs DIR/NAME/results.json)")
    paths = [root / "RESULTS.md"]
    atomic_write_text(paths[0], results_markdown(results, root, "."))
    if results_path:
        path = Path(results_path)
        for name in results:  # the reports and plots the summary links to
            dest = path.parent / "results" / name
            dest.mkdir(parents=True, exist_ok=True)
            for f in [root / name / "report.md", *sorted((root / name).glob("*.png"))]:
                if f.is_file():
                    shutil.copyfile(f, dest / f.name)
        atomic_write_text(path, results_markdown(results, root, "results"))
        paths.append(path)
    if readme:
        path = Path(readme)
        old = path.read_text()
        if BEGIN not in old or END not in old or old.index(BEGIN) > old.index(END):
            raise ValueError(f"{path} has no {BEGIN} … {END} markers to put the results table between")
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        link = os.path.relpath(Path(results_path).parent / "results", path.parent) if results_path else None
        atomic_write_text(path, f"{head}{BEGIN}\n{results_table(results, link)}\n{END}{tail}")
        paths.append(path)
    return paths
