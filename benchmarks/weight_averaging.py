"""Does the weight average of finished runs (a "model soup") beat the runs it is made of? Issue 14, on validation.

    python benchmarks/weight_averaging.py --runs RUN_A,RUN_B[,...] --output_dir runs/soup

The runs are seeds of one recipe (e.g. the final_default sweep's hybrid points, trained on `mlqa-r:train`). The script
averages their weights (`hbt_accel.training.averaging`, the code path of `recipes/average.py`), then scores every run
and the average here, on the same questions of `--benchmark` (`mlqa-r:validation` by default, never XQuAD-R: this is a
choice to make) with the same code, and tests the average paired over whole articles against the runs' mean (what one
would get from a single run, on average) and against each run. The section `weight_averaging` of docs/results.md is
written from what it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
from report import invocation, publish, run_benchmark  # noqa: E402

from hbt_accel.errors import DataError  # noqa: E402
from hbt_accel.evaluation.schema import HEADLINE  # noqa: E402
from hbt_accel.models.precision import EVAL_PRECISION_HELP, EVAL_PRECISIONS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated finished run folders of one recipe")
    parser.add_argument("--output_dir", required=True, help="a new folder for the averaged model")
    parser.add_argument("--benchmark", default="mlqa-r:validation", help="score the runs and their average on this")
    parser.add_argument("--max_queries", type=int, default=0, help="the first N question ids; 0 = all")
    parser.add_argument("--data_dir", default="", help="folder with mlqa-r/ and xquad-r/; empty = default lookup")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of articles for the paired tests")
    parser.add_argument("--precision", default="auto", choices=EVAL_PRECISIONS, help=EVAL_PRECISION_HELP)
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the section here ('' = print only)")
    return parser.parse_args(argv)


def check_held_out(folders: list[Path], benchmark: str) -> None:
    """One line naming the first run whose training saw questions of `benchmark`, before any averaging: the default
    recipe trains on all of MLQA-R, so its runs score high on `mlqa-r:validation` and would decide nothing."""
    import yaml

    from hbt_accel.data import shares_questions
    from hbt_accel.run_record import CONFIG_FILE

    for folder in folders:
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise DataError(f"{path}: missing (needed to tell what the run trained on)")
        train_data = (yaml.safe_load(path.read_text()) or {}).get("train_data") or []
        if shares_questions(train_data, benchmark):
            raise DataError(
                f"{path}: train_data {', '.join(train_data)} holds questions of --benchmark {benchmark} "
                "(train on mlqa-r:train to compare on mlqa-r:validation)"
            )


def score_models(folders: list[Path], questions, max_queries: int, bf16: bool) -> list:
    """Each model's per-query ranks on `questions`, encoded in bf16 or fp32 (`--precision`). The folders are the runs
    (one model, checked by `check_runs`) and their average: the first one's tokenizer serves all."""
    from hbt_accel.evaluation import evaluate_grid
    from hbt_accel.models.dual_encoder import DualEncoder

    tokenizer, scores = None, []
    for folder in folders:
        encoder = DualEncoder.from_pretrained(folder, tokenizer=tokenizer)
        tokenizer = encoder.tokenizer
        per_query: list = []
        evaluate_grid(encoder, questions, max_queries=max_queries, bf16=bf16, per_query=per_query)
        scores.append(per_query[0])
    return scores


def run_labels(folders: list[Path]) -> list[str]:
    """Each run's path below the runs' common folder (two runs may share a last name, e.g. .../final)."""
    resolved = [folder.resolve() for folder in folders]
    common = Path(os.path.commonpath(resolved))
    return [str(folder.relative_to(common)) if folder != common else folder.name for folder in resolved]


def section(
    args: argparse.Namespace, precision: str, folders: list[Path], runs: list, average, article_of: dict
) -> list[str]:
    from hbt_accel.evaluation.statistics import paired_difference, resampling_units, weighted_headline

    article_of, resampled = resampling_units(average, article_of)  # an article's questions are not independent

    def headline(scores) -> list[str]:
        values = weighted_headline(scores, np.ones(len(scores.query_ids)))[:, 0]
        return [f"{values[k]:.{m.digits}f}" for k, m in enumerate(HEADLINE)]

    def paired(a, b) -> list[str]:
        test = paired_difference(a, b, n_resamples=args.bootstrap, article_of=article_of)
        return [m.format_difference(test[m.key]) for m in HEADLINE]

    labels = run_labels(folders)
    header = "| model | " + " | ".join(m.label for m in HEADLINE) + " |"
    rule = "|---" * (len(HEADLINE) + 1) + "|"
    lines = [
        "## Weight averaging of runs (issue 14)",
        "",
        f"`{invocation()}`: the uniform mean of the weights of {len(folders)} runs, scored on `{args.benchmark}` "
        f"({len(set(average.query_ids)):,} question ids, {len(average.query_ids):,} queries in "
        f"{len(average.languages)} languages, {precision} encoding).",
        "",
        header,
        rule,
        *(f"| {label} | " + " | ".join(headline(run)) + " |" for label, run in zip(labels, runs)),
        "| **weight average** | " + " | ".join(headline(average)) + " |",
        "",
        f"Paired bootstrap over {resampled} ({args.bootstrap:,} resamples), the average minus:",
        "",
        header.replace("| model |", "| minus |"),
        rule,
        "| the runs' mean | " + " | ".join(paired(average, runs)) + " |",
        *(f"| {label} | " + " | ".join(paired(average, run)) + " |" for label, run in zip(labels, runs)),
    ]
    return lines


def main(argv=None) -> None:
    from hbt_accel.data import article_of_question, load_lareqa_benchmark
    from hbt_accel.models.precision import evaluation_precision
    from hbt_accel.training.averaging import average_models, check_runs

    args = parse_args(argv)
    runs = [run for run in args.runs.split(",") if run]
    check_held_out([Path(run) for run in runs], args.benchmark)  # the sharper diagnosis comes first
    folders = check_runs(runs)
    questions = load_lareqa_benchmark(args.benchmark, data_dir=args.data_dir or None)  # bad name: one line, first
    choice = evaluation_precision(args.precision)
    print(f"precision: {choice.reason}", flush=True)
    average_models(folders, args.output_dir)
    *runs, average = score_models([*folders, Path(args.output_dir)], questions, args.max_queries, choice.bf16)
    publish(
        args.docs_dir,
        "weight_averaging",
        section(args, choice.label, folders, runs, average, article_of_question(questions)),
    )


if __name__ == "__main__":
    run_benchmark(main)
