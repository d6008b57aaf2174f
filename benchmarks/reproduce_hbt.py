"""The paper's X-X / X-Y / hybrid table beside this repo's, rendered from committed files only.

    python recipes/sweep.py --config recipes/sweeps/final_default.yaml        # the 15 runs (5 seeds each), once
    python recipes/evaluate.py --model embedded --benchmark xquad-r \\
        --output_dir docs/sweeps/final_default/untrained                       # the untrained row, once
    python benchmarks/reproduce_hbt.py                                         # this report

The runs are the final_default sweep's: `recipes/default.yaml` (embedded multilingual-e5-small, MLQA-R) with only
`sampling` changed, 5 seeds each, every one scored on the FULL XQuAD-R grid (11 languages x 1,190 questions; el, ru,
th, tr never seen in training). This script reads their committed point summaries and the untrained model's
eval_results.json and writes the `reproduction` section of docs/results.md, docs/results.json and one heatmap per
setting (seed 1) into docs/figures/; a second run writes the same bytes. Paired tests with intervals are in the
sweep's own report (docs/sweeps/final_default/report.md); the alpha sweep and scores by step are the data_ratio
sweep's; tuning on MLQA-R validation is the beyond_paper sweep's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from report import write_section

from hbt_accel.atomic import write_atomic, write_json
from hbt_accel.evaluation.grid import RESULTS_FILE, language_view
from hbt_accel.evaluation.report import heatmap_png
from hbt_accel.evaluation.schema import HEADLINE, HEADLINE_KEYS

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "docs" / "sweeps" / "final_default"
UNSEEN = ("el", "ru", "th", "tr")  # XQuAD-R languages absent from MLQA-R
STRATEGIES = ("xx", "xy", "hybrid")
PAPER = {  # arXiv 2408.10536, XQuAD-R: mono / cross / multi mAP, rank distance
    "XLM-R hybrid (paper)": (0.798, 0.705, 0.593, 286.6),
    "LaBSE hybrid (paper)": (0.817, 0.767, 0.682, 221.1),
}


def grid_results(point: dict) -> dict:
    """A point summary as the grid results `language_view` and the heatmap read."""
    keys = ("grid", "multi_map_per_language", "rank_distance_per_language")
    return {**point["final"], **{key: point[key] for key in keys}}


def load_runs(sweep: Path) -> dict[str, list[dict]]:
    """sampling -> its points' grid results, seed order; 'untrained' -> the untrained model's."""
    runs: dict[str, list[dict]] = {"untrained": [json.loads((sweep / "untrained" / RESULTS_FILE).read_text())]}
    for strategy in STRATEGIES:
        paths = sorted(sweep.glob(f"sampling-{strategy}__seed-*.json"))
        if not paths:
            raise SystemExit(f"error: {sweep}: no sampling-{strategy} points (run the final_default sweep first)")
        runs[strategy] = [grid_results(json.loads(path.read_text())) for path in paths]
    return runs


def mean_row(name: str, results: list[dict]) -> str:
    """Mean over seeds, and the spread (std) where there are several."""
    cells = []
    for metric in HEADLINE:
        values = [r[metric.key] for r in results]
        cell = metric.format(statistics.fmean(values))
        cells.append(cell + (f" ± {metric.format(statistics.stdev(values))}" if len(values) > 1 else ""))
    return f"| {name} | {len(results)} | " + " | ".join(cells) + " |"


def _seed_counts(runs: dict[str, list[dict]]) -> str:
    """'5 seeds each', or the count per setting while a sweep is still landing."""
    counts = {name: len(results) for name, results in runs.items() if name != "untrained"}
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} seeds each"
    return ", ".join(f"{name} {count} seeds" for name, count in counts.items())


def render(runs: dict[str, list[dict]]) -> str:
    header = "| model / sampling | seeds | mono mAP | cross mAP | multi mAP | rank distance (lower is better) |\n"
    header += "|---" * 6 + "|"
    unseen = {name: [language_view(r, UNSEEN) for r in results] for name, results in runs.items()}
    paper = [f"| {name} | - | " + " | ".join(m.format(v) for m, v in zip(HEADLINE, scores)) + " |"
             for name, scores in PAPER.items()]  # fmt: skip
    lines = [
        "Rendered by `python benchmarks/reproduce_hbt.py` from the final_default sweep's committed points "
        f"(`recipes/default.yaml`, only `sampling` changed, {_seed_counts(runs)}; docs/sweeps/final_default/, whose "
        "report has the paired tests) and the untrained model's `recipes/evaluate.py` results. Every number is from a "
        "full-grid evaluation: 11 languages x 1,190 questions, 121 language pairs, exact ranks over the whole pool "
        "(LAReQA protocol). Cells: mean ± std over seeds.",
        "",
        "## XQuAD-R, all 11 languages",
        "",
        header,
        *[mean_row(name, results) for name, results in runs.items()],
        *paper,
        "",
        "## XQuAD-R, queries in the languages never trained on (el, ru, th, tr)",
        "",
        header,
        *[mean_row(name, results) for name, results in unseen.items()],
        "",
        "## Heatmaps (mAP, rows = query language, columns = pool language; seed 1)",
        "",
        *[f"![{name}](figures/heatmap_{name}.png)" for name in runs],
    ]
    return "\n".join(lines)


def summary(results: list[dict]) -> dict:
    """docs/results.json's entry of one setting: means over seeds, all languages and the never-trained ones."""
    keys = (*HEADLINE_KEYS, "recall_at_1", "recall_at_10")
    unseen = [language_view(r, UNSEEN) for r in results]
    return {
        **{key: statistics.fmean(r[key] for r in results) for key in keys},
        "seeds": len(results),
        "unseen_languages": {key: statistics.fmean(view[key] for view in unseen) for key in HEADLINE_KEYS},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep_dir", default=str(SWEEP))
    parser.add_argument("--docs_dir", default=str(REPO / "docs"))
    args = parser.parse_args(argv)
    docs = Path(args.docs_dir)
    runs = load_runs(Path(args.sweep_dir))
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    for name, results in runs.items():
        write_atomic(docs / "figures" / f"heatmap_{name}.png", heatmap_png(results[0]))
    write_json(docs / "results.json", {name: summary(results) for name, results in runs.items()})
    write_section(docs / "results.md", "reproduction", render(runs))
    print(render(runs))


if __name__ == "__main__":
    main()
