"""LAReQA grid scorer, exact-rank metrics, published benchmarks at scale and reports (tables, heatmap, JSON).

Public API: `evaluate_grid(encoder, benchmark, ...) -> dict` (or its two halves `encode_benchmark` +
`score_encoded`); published layouts (MIRACL, Mr. TyDi, MLDR, MKQA, BEIR): `published.load_task` +
`at_scale.score_task`; what a training run is scored on: `evaluator.open_evaluator`; `print_report(results)`,
`write_reports(results, output_dir)`; for runs: `print_metrics_by_step`, `plot_metrics_by_step`. The metric names and
directions are in `hbt_accel.evaluation.schema`; a run's checkpoints are found with `hbt_accel.training.checkpoints`.
"""

from __future__ import annotations

from hbt_accel.evaluation.grid import (
    EncodedBenchmark,
    encode_benchmark,
    evaluate_grid,
    load_encoded,
    save_encoded,
    score_encoded,
)
from hbt_accel.evaluation.report import plot_metrics_by_step, print_metrics_by_step, print_report, write_reports

__all__ = [
    "EncodedBenchmark",
    "encode_benchmark",
    "evaluate_grid",
    "load_encoded",
    "plot_metrics_by_step",
    "print_metrics_by_step",
    "print_report",
    "save_encoded",
    "score_encoded",
    "write_reports",
]
