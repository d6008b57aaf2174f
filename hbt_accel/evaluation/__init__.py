"""LAReQA grid scorer, exact-rank metrics, BEIR-style scorer and reports (tables, heatmap, JSON).

Public API: `evaluate_grid(encoder, benchmark, ...) -> dict`, `evaluate_beir(encoder, folder, ...) -> dict`,
`print_report(results)`, `write_reports(results, output_dir)`.
"""

from __future__ import annotations

from hbt_accel.evaluation.grid import EncodedBenchmark, encode_benchmark, evaluate_grid, score_encoded

__all__ = ["EncodedBenchmark", "encode_benchmark", "evaluate_grid", "score_encoded"]
