"""Does the weight average of finished runs (a "model soup") beat the runs it is made of? Issue 14, on validation.

    python benchmarks/weight_averaging.py --runs RUN_A,RUN_B[,...] --output_dir runs/soup

The runs are seeds of one recipe whose final evaluation scored `--benchmark` (the beyond_paper sweep's points:
`mlqa-r:validation`, never XQuAD-R), so each has a per_query.npz of the same questions. The script averages their
weights (`hbt_accel.averaging`, the code path of `recipes/average.py`), scores the average on the same questions,
and tests it paired over question ids against the runs' mean (what one would get from a single run, on average)
and against each run. The section `weight_averaging` of docs/results.md is written from what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
from report import invocation, publish  # noqa: E402

from hbt_accel.errors import DataError  # noqa: E402
from hbt_accel.evaluation.schema import HEADLINE  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated finished run folders of one recipe")
    parser.add_argument("--output_dir", required=True, help="a new folder for the averaged model")
    parser.add_argument("--benchmark", default="mlqa-r:validation", help="what the runs' final evaluation scored")
    parser.add_argument("--data_dir", default="", help="folder with mlqa-r/ and xquad-r/; empty = default lookup")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of question ids for the paired tests")
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the section here ('' = print only)")
    return parser.parse_args(argv)


def load_run_scores(folders: list[Path], benchmark: str) -> list:
    """Each run's per-query ranks from its final evaluation; one line naming the run when it is missing or was
    scored on another benchmark (checked before any weights are averaged)."""
    from hbt_accel.evaluation.grid import PER_QUERY_FILE, PerQueryScores

    scores = []
    for folder in folders:
        path = folder / PER_QUERY_FILE
        if not path.is_file():
            raise DataError(f"{path}: missing (the run's final evaluation writes it; was final_eval off?)")
        run = PerQueryScores.load(path)
        if run.benchmark != benchmark:
            raise DataError(f"{path}: scored on {run.benchmark!r}, expected --benchmark {benchmark!r}")
        if scores and (run.query_ids, run.languages) != (scores[0].query_ids, scores[0].languages):
            raise DataError(f"{path}: other questions or languages than {folders[0] / PER_QUERY_FILE} (not pairable)")
        scores.append(run)
    return scores


def load_questions(like, data_dir: str):
    """The benchmark the runs were scored on, restricted to their languages; one line, before any weights are
    averaged, when these files do not hold the runs' questions (`like`: one run's scores; a final evaluation takes
    the first N question ids)."""
    from hbt_accel.data import load_lareqa_benchmark
    from hbt_accel.evaluation.grid import select_question_ids

    questions = load_lareqa_benchmark(like.benchmark, languages=like.languages, data_dir=data_dir or None)
    if select_question_ids(questions, like.languages, len(set(like.query_ids))) != set(like.query_ids):
        where = f"--data_dir {data_dir}" if data_dir else "the default data lookup"
        raise DataError(f"{where}: its {like.benchmark} has other question ids than the runs were scored on")
    return questions


def score_average(output_dir: str, questions, max_queries: int):
    """The averaged model's per-query ranks on the runs' questions, bf16 encoding as in training."""
    from hbt_accel.evaluation import evaluate_grid
    from hbt_accel.modeling import DualEncoder

    per_query: list = []
    encoder = DualEncoder.from_pretrained(output_dir)
    evaluate_grid(encoder, questions, max_queries=max_queries, bf16=True, per_query=per_query)
    return per_query[0]


def run_labels(folders: list[Path]) -> list[str]:
    """Each run's path below the runs' common folder (two runs may share a last name, e.g. .../final)."""
    resolved = [folder.resolve() for folder in folders]
    common = Path(os.path.commonpath(resolved))
    return [str(folder.relative_to(common)) if folder != common else folder.name for folder in resolved]


def section(args: argparse.Namespace, folders: list[Path], runs: list, average) -> list[str]:
    from hbt_accel.evaluation.statistics import paired_difference, weighted_headline

    def headline(scores) -> list[str]:
        values = weighted_headline(scores, np.ones(len(scores.query_ids)))[:, 0]
        return [f"{values[k]:.{m.digits}f}" for k, m in enumerate(HEADLINE)]

    def paired(a, b) -> list[str]:
        test = paired_difference(a, b, n_resamples=args.bootstrap)
        return [m.format_difference(test[m.key]) for m in HEADLINE]

    labels = run_labels(folders)
    header = "| model | " + " | ".join(m.label for m in HEADLINE) + " |"
    rule = "|---" * (len(HEADLINE) + 1) + "|"
    lines = [
        "## Weight averaging of runs (issue 14)",
        "",
        f"`{invocation()}`: the uniform mean of the weights of {len(folders)} runs, scored on `{args.benchmark}` "
        f"({len(set(average.query_ids)):,} question ids, {len(average.query_ids):,} queries in "
        f"{len(average.languages)} languages, bf16 encoding).",
        "",
        header,
        rule,
        *(f"| {label} | " + " | ".join(headline(run)) + " |" for label, run in zip(labels, runs)),
        "| **weight average** | " + " | ".join(headline(average)) + " |",
        "",
        f"Paired bootstrap over question ids ({args.bootstrap:,} resamples), the average minus:",
        "",
        header.replace("| model |", "| minus |"),
        rule,
        "| the runs' mean | " + " | ".join(paired(average, runs)) + " |",
        *(f"| {label} | " + " | ".join(paired(average, run)) + " |" for label, run in zip(labels, runs)),
    ]
    return lines


def main(argv=None) -> None:
    from hbt_accel.averaging import average_models, check_runs

    args = parse_args(argv)
    folders = check_runs([run for run in args.runs.split(",") if run])
    runs = load_run_scores(folders, args.benchmark)
    questions = load_questions(runs[0], args.data_dir)
    average_models(folders, args.output_dir)
    average = score_average(args.output_dir, questions, max_queries=len(set(runs[0].query_ids)))
    publish(args.docs_dir, "weight_averaging", section(args, folders, runs, average))


if __name__ == "__main__":
    main()
