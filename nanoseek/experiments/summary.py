"""The suite's summary: RESULTS.md (a paper-vs-nanoseek table, then each experiment's claim, setting
and checks) and the same table in the README between markers."""
from __future__ import annotations

from pathlib import Path

from nanoseek.utils import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def results_table(results: dict[str, dict], link_root: str | None = None) -> str:
    lines = ["| experiment | claim | paper | nanoseek (mean ± std over seeds) | verdict |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cell = f"[{name}]({link_root}/{name}/report.md)" if link_root else name
        lines.append(f"| {cell} | {r['claim']} | {r['paper']} | {r['headline']} | **{r['verdict']}** |")
    return "\n".join(lines)


def results_markdown(results: dict[str, dict], root: Path) -> str:
    lines = ["# Paper vs nanoseek: the ablations at micro scale", "",
             f"Written by `nanoseek experiment all` / `summary` from `{root}/*/results.json`. Each experiment's "
             "report (table, plots, per-seed values) is in its directory. Verdicts compare mean ± std over "
             "seeds: *inconclusive* where the spreads overlap.", "", results_table(results), ""]
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
    text = results_markdown(results, root)
    paths = [root / "RESULTS.md"]
    atomic_write_text(paths[0], text)
    if results_path:
        paths.append(Path(results_path))
        atomic_write_text(paths[-1], text)
    if readme:
        path = Path(readme)
        old = path.read_text()
        if BEGIN not in old or END not in old or old.index(BEGIN) > old.index(END):
            raise ValueError(f"{path} has no {BEGIN} … {END} markers to put the results table between")
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        atomic_write_text(path, f"{head}{BEGIN}\n{results_table(results)}\n{END}{tail}")
        paths.append(path)
    return paths
