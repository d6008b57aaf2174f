"""Reports of a grid evaluation: a rich table in the terminal, and eval_results.json / grid.csv / grid_heatmap.png.

Files are written atomically (`hbt_accel.atomic`); metric names and directions come from `schema`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from hbt_accel.atomic import write_atomic, write_json
from hbt_accel.evaluation.grid import RESULTS_FILE
from hbt_accel.evaluation.schema import ANY_BY_KEY, MAP_KEYS, METRICS, RANK_DISTANCE, RECALL_AT_1


def grid_matrix(results: dict) -> tuple[list[str], list[list[float]]]:
    """(languages, rows): rows[i][j] = mAP of queries in languages[i] against the pool of languages[j] (NaN = none)."""
    languages = results["languages"]
    rows = [[results["grid"].get(f"{q}-{p}", math.nan) for p in languages] for q in languages]
    return languages, rows


def _cell_style(value: float) -> str:
    if math.isnan(value):
        return "dim"
    for threshold, style in ((0.8, "bold green"), (0.6, "green"), (0.4, "yellow"), (0.2, "dark_orange")):
        if value >= threshold:
            return style
    return "red"


def print_report(results: dict, console=None) -> None:
    """The grid (rows: query language, columns: pool language, plus the multilingual column) and the summary; a
    published benchmark's results (no grid): one row per task and the macro average."""
    from rich.console import Console
    from rich.table import Table

    if "grid" not in results:
        (console or Console()).print(retrieval_table(results))
        return
    languages, rows = grid_matrix(results)
    # a pipe or log file gets rich's 80 columns by default, which would cut an 11-language grid to "0.…"
    console = console or Console(width=max(Console().width, 30 + 8 * len(languages)))
    title = f"{results.get('benchmark', '')} mAP ({results.get('precision', 'fp32')}), rows = query language"
    table = Table(title=title)
    table.add_column("query \\ pool")
    for lang in languages:
        table.add_column(lang, justify="right")
    table.add_column("multi", justify="right")
    table.add_column("rank dist.", justify="right")
    for lang, row in zip(languages, rows):
        multi = results["multi_map_per_language"].get(lang, math.nan)
        distance = results["rank_distance_per_language"].get(lang, math.nan)
        cells = [f"[{_cell_style(v)}]{v:.3f}[/]" if not math.isnan(v) else "[dim]-[/]" for v in row]
        table.add_row(lang, *cells, f"[{_cell_style(multi)}]{multi:.3f}[/]", f"{distance:.1f}")
    console.print(table)

    summary = summary_table(results)
    console.print(summary)


def summary_table(results: dict):
    """The headline metrics, with their 95% CI and the paired difference to a baseline when the results hold them."""
    from rich.table import Table

    from hbt_accel.evaluation.statistics import format_p_value

    summary = Table(title="summary")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    intervals = results.get("confidence_intervals") or {}
    if intervals:
        summary.add_column("95% CI", justify="right")
    paired = results.get("paired_difference") or {}
    resamples = results.get("bootstrap_resamples")
    if paired:
        summary.add_column("minus baseline [95% CI], p", justify="right")
    for metric in METRICS:
        cells = [metric.key, metric.format(results.get(metric.key, math.nan), extra_digits=1)]
        if intervals:
            ci = intervals.get(metric.key)
            cells.append(f"[{metric.format(ci['low'])}, {metric.format(ci['high'])}]" if ci else "")
        if paired:
            d = paired.get(metric.key)
            cells.append(f"{metric.format_difference(d)}, {format_p_value(d['p_value'], resamples)}" if d else "")
        summary.add_row(*cells)
    summary.add_row("queries / candidates", f"{results.get('n_queries', 0):,} / {results.get('n_candidates', 0):,}")
    summary.add_row("seconds (encode + score)", f"{results.get('seconds', math.nan):.1f}")
    return summary


def retrieval_table(results: dict):
    """A published benchmark's results (`evaluator.published_results`): its official metrics per task, then the
    macro average; the title names the corpus searched (full or capped)."""
    from rich.table import Table

    metrics = [ANY_BY_KEY[key] for key in results["metrics"]]
    table = Table(title=f"{results['benchmark']} {results.get('split') or ''} ({results['corpus']})")
    for column in ("task", *(metric.label for metric in metrics), "queries", "passages"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in results["tasks"]:
        values = [metric.format(task[metric.key]) for metric in metrics]
        table.add_row(task["task"], *values, f"{task['n_queries']:,}", f"{task['protocol']['corpus_size']:,}")
    macro = [metric.format(results[metric.key]) for metric in metrics]
    table.add_row("macro average", *macro, f"{results['n_queries']:,}", "")
    return table


def write_reports(results: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write eval_results.json, grid.csv (query_lang,pool_lang,map,recall_at_1,recall_at_10,n_queries) and
    grid_heatmap.png into `output_dir`; returns name -> path. Results without a grid (BEIR) get the JSON only."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["json"] = write_json(output_dir / RESULTS_FILE, results, sort_keys=True)
    if "grid" not in results:
        return paths

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["query_lang", "pool_lang", "map", "recall_at_1", "recall_at_10", "n_queries"])
    for key, value in results["grid"].items():
        query_lang, pool_lang = key.split("-")
        writer.writerow(
            [
                query_lang,
                pool_lang,
                f"{value:.6f}",
                f"{results.get('grid_recall_at_1', {}).get(key, math.nan):.6f}",
                f"{results.get('grid_recall_at_10', {}).get(key, math.nan):.6f}",
                results.get("grid_n_queries", {}).get(key, ""),
            ]
        )
    paths["csv"] = write_atomic(output_dir / "grid.csv", buffer.getvalue())
    paths["heatmap"] = write_atomic(output_dir / "grid_heatmap.png", heatmap_png(results))
    return paths


def heatmap_png(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    languages, rows = grid_matrix(results)
    multi = [results["multi_map_per_language"].get(lang, math.nan) for lang in languages]
    matrix = np.array([row + [m] for row, m in zip(rows, multi)])  # (L, L + 1): the grid, then "multi"
    size = 1.0 + 0.55 * len(languages)
    figure, axes = plt.subplots(figsize=(max(5.5, size + 1.5), max(4.0, size)))
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(languages) + 1), [*languages, "multi"])
    axes.set_yticks(range(len(languages)), languages)
    axes.set_xlabel("candidate pool language")
    axes.set_ylabel("query language")
    axes.axvline(len(languages) - 0.5, color="white", linewidth=2)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if not math.isnan(matrix[i, j]):
                color = "black" if matrix[i, j] > 0.6 else "white"
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    axes.set_title(
        f"{results.get('benchmark', '')} mAP ({results.get('precision', 'fp32')})\nmono {results['mono_map']:.3f}, "
        f"cross {results['cross_map']:.3f}, multi {results['multi_map']:.3f}",
        fontsize=9,
    )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# A run: one row per checkpoint
# ---------------------------------------------------------------------------------------------------------------
def print_metrics_by_step(rows: list[tuple[int, dict]], console=None) -> None:
    """rows: (step, results) sorted by step -> a table of the summary metrics, best value per column in bold."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 110))
    table = Table(title="metrics by step")
    table.add_column("step", justify="right")
    for metric in METRICS:
        table.add_column(metric.key, justify="right")
    best = {metric.key: metric.best(r.get(metric.key, math.nan) for _, r in rows) for metric in METRICS}
    for step, results in rows:
        cells = []
        for metric in METRICS:
            value = results.get(metric.key, math.nan)
            text = metric.format(value, extra_digits=1)
            cells.append(f"[bold]{text}[/]" if value == best[metric.key] else text)
        table.add_row(str(step), *cells)
    console.print(table)


def plot_metrics_by_step(rows: list[tuple[int, dict]], path: str | os.PathLike) -> Path:
    """mono/cross/multi mAP and R@1 against the step (left), rank distance (right); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in (*MAP_KEYS, RECALL_AT_1.key):
        left.plot(steps, [r.get(key, math.nan) for _, r in rows], marker="o", label=key)
    left.set_xlabel("step")
    left.set_ylabel("score")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [r.get(RANK_DISTANCE.key, math.nan) for _, r in rows], marker="o", color="tab:red")
    right.set_xlabel("step")
    right.set_ylabel(RANK_DISTANCE.label)
    right.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return write_atomic(Path(path), buffer.getvalue())
