"""Issue 14's section of docs/results.md, rendered from the committed per-point summaries of two sweeps.

    python benchmarks/beyond_paper_report.py

1. `recipes/sweeps/beyond_paper.yaml`: each feature of docs/beyond_paper.md against the default, trained on
   `mlqa-r:train` and scored on `mlqa-r:validation` (the only place a setting is chosen).
2. `recipes/sweeps/final_default.yaml`: the chosen default against X-X and X-Y batches on the full XQuAD-R grid,
   next to the untrained model (docs/results.json) and the paper's rows, then the goal of issue 14 checked figure by
   figure.

It trains nothing: run the two sweeps first (their reports are re-rendered here from the summaries).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from report import invocation, publish, run_benchmark
from reproduce_hbt import PAPER

from hbt_accel.evaluation.schema import HEADLINE
from hbt_accel.sweeps.report import load_summaries, render_markdown, write_report
from hbt_accel.sweeps.run import load_sweep

REPO = Path(__file__).resolve().parents[1]
GOAL = {"mono_map": 0.817, "cross_map": 0.767, "multi_map": 0.68, "rank_distance": 221.0}  # the LaBSE hybrid row


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation_sweep", default=str(REPO / "recipes/sweeps/beyond_paper.yaml"))
    parser.add_argument("--final_sweep", default=str(REPO / "recipes/sweeps/final_default.yaml"))
    parser.add_argument("--frontier_sweep", default=str(REPO / "recipes/sweeps/data_ratio.yaml"), help="alpha sweep")
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the section here ('' = print only)")
    return parser.parse_args(argv)


def sweep_tables(config: str) -> tuple[dict, str]:
    """Re-render a sweep's report from its summaries; returns report.json's content and its tables (no title)."""
    spec = load_sweep(config)
    if not load_summaries(spec):  # no empty report or figures in the repository
        return {"settings": []}, f"Not run yet: `python recipes/sweep.py --config {Path(config).relative_to(REPO)}`."
    write_report(spec)
    report = json.loads((spec.results_root / "report.json").read_text())
    tables = render_markdown(spec, report).split("\n", 2)[2]  # drop the "# Sweep" title and its blank line
    return report, tables.replace("in this folder", f"in `{spec.results_root.relative_to(REPO)}/`")


def validation_size(config: str) -> str:
    """What the validation sweep was scored on, read from one of its per-query files."""
    from hbt_accel.evaluation.grid import PerQueryScores

    found = sorted(load_sweep(config).results_root.glob("*.per_query.npz"))
    if not found:
        return "the held-out 15% of the ids"
    scores = PerQueryScores.load(found[0])
    ids, queries, languages = len(set(scores.query_ids)), len(scores.query_ids), len(scores.languages)
    return f"{ids:,} held-out question ids, {queries:,} queries in {languages} languages"


def reference_rows(untrained: dict) -> list[str]:
    """The untrained model (full grid, docs/results.json) and the paper's rows, one seed each by construction."""
    rows = ["| untrained multilingual-e5-small | " + " | ".join(_figure(untrained[m.key], m.digits) for m in HEADLINE)]
    for name, figures in PAPER.items():
        rows.append(f"| {name} | " + " | ".join(_figure(value, m.digits) for value, m in zip(figures, HEADLINE)))
    return [row + " |" for row in rows]


def unseen_lines(report: dict, untrained: dict) -> list[str]:
    """Queries in the XQuAD-R languages no run was trained on (el, ru, th, tr), against every pool: each final
    setting's mean ± std over seeds next to the untrained encoder (the issue asks that these gain too)."""
    if not report["settings"]:
        return []
    header = "| model | seeds | " + " | ".join(m.label for m in HEADLINE) + " |"
    lines = ["Queries in the languages never trained on (el, ru, th, tr), against all pools:", "", header]
    lines.append("|---" * (len(HEADLINE) + 2) + "|")
    for row in report["settings"]:
        cells = [_mean_std(row["unseen"][m.key], m.digits) for m in HEADLINE]
        lines.append(f"| {row['settings'].get('sampling')} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    figures = untrained["unseen_languages"]
    lines.append("| untrained | - | " + " | ".join(_figure(figures[m.key], m.digits) for m in HEADLINE) + " |")
    return lines + [""]


def _mean_std(stats: dict, digits: int) -> str:
    if stats["mean"] is None or math.isnan(stats["mean"]):
        return "-"
    spread = "" if stats.get("std") is None or math.isnan(stats["std"]) else f" ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}{spread}"


def goal_lines(report: dict) -> list[str]:
    """Each goal figure against the default's mean over seeds (the hybrid row of the final sweep)."""
    default = next((row for row in report["settings"] if row["settings"].get("sampling") == "hybrid"), None)
    if default is None:
        return ["The final sweep has no finished hybrid point yet."]
    lines = [f"Goal of issue 14 against the default's mean over {len(default['seeds'])} seed(s), full grid:", ""]
    for metric in HEADLINE:
        mean, goal = default[metric.key]["mean"], GOAL[metric.key]
        met = mean <= goal if metric.key == "rank_distance" else mean >= goal
        lines.append(f"- {metric.label}: {mean:.{metric.digits}f} against {goal:g}: {'met' if met else 'not met'}")
    return lines


def frontier_lines(configs: list[str], docs_dir: Path) -> list[str]:
    """The mono-vs-multi figures of the sweeps that trace the frontier, as each sweep's report drew them; nothing
    until every one of them has been drawn."""
    figures = [load_sweep(config).results_root / "mono_vs_multi.png" for config in configs]
    if not all(path.is_file() for path in figures):
        return []
    intro = (
        "The frontier found (monolingual against multilingual mAP, mean ± std over seeds), by alpha on the first 300 "
        "XQuAD-R question ids, then the three batch types on the full grid:"
    )
    links = [f"![{path.parent.name}: mono vs multi mAP]({path.relative_to(docs_dir)})" for path in figures]
    return ["", intro, *(line for link in links for line in ("", link))]


def _figure(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    _, validation = sweep_tables(args.validation_sweep)
    final, full_grid = sweep_tables(args.final_sweep)
    untrained = json.loads((REPO / "docs/results.json").read_text())["untrained"]
    held_out = validation_size(args.validation_sweep)
    body = [
        "## Beyond the paper (issue 14): what helped on MLQA-R validation, and the default on the full grid",
        "",
        f"Rendered by `{invocation()}` from the committed sweep summaries (docs/beyond_paper.md: the features).",
        "",
        f"### Each feature on MLQA-R validation ({held_out}; trained on the other 85% of the ids)",
        "",
        validation.strip(),
        "",
        "### The default on the full XQuAD-R grid (11 x 1,190 questions, 13,014 candidates)",
        "",
        full_grid.strip(),
        "",
        "References (one model each, no interval): the untrained encoder on the same grid and the paper's rows.",
        "",
        "| model | " + " | ".join(m.label for m in HEADLINE) + " |",
        "|---" * (len(HEADLINE) + 1) + "|",
        *reference_rows(untrained),
        "",
        *unseen_lines(final, untrained),
        *goal_lines(final),
        *frontier_lines([args.frontier_sweep, args.final_sweep], REPO / "docs"),
    ]
    publish(args.docs_dir, "beyond_paper", body)


if __name__ == "__main__":
    run_benchmark(main)
