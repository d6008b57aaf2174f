"""How often are the answer sentences of one MLQA-R id in two languages translations of each other?

    python benchmarks/translation_check.py                                  # every id, the untrained embedded model
    python benchmarks/translation_check.py --languages en,de,zh --max_ids 200

The passage-alignment term (docs/beyond_paper.md) treats an id's answers in two languages as translations. MLQA-R's
contexts are not parallel (method.md), so this checks the assumption: for every language pair, over the ids present
in both, the answer in L1 retrieves the answer in L2 among all L2 answers of those ids (bitext retrieval, P@1, both
directions), the mean cosine of same-id pairs against other-id pairs, and the median character-length ratio. A P@1
far below 1 with a model that matches translations well would mean the answers are often not translations.
Encodes each distinct answer once with the evaluator's encoder path (`evaluation.encoding.encode_texts`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from hbt_accel.models.precision import EVAL_PRECISION_HELP, EVAL_PRECISIONS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="model folder or 'embedded'")
    parser.add_argument("--data_dir", default="", help="folder with mlqa-r/; empty = $HBT_DATA_DIR or ../shared")
    parser.add_argument("--languages", default="", help="comma-separated languages; empty = all of MLQA-R")
    parser.add_argument("--max_ids", type=int, default=0, help="first N ids (file order); 0 = all")
    parser.add_argument("--precision", default="auto", choices=EVAL_PRECISIONS, help=EVAL_PRECISION_HELP)
    parser.add_argument("--output", default="", help="also write the table as JSON here")
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the table here ('' = print only)")
    return parser.parse_args(argv)


def answers_by_language(data_dir: str, languages: list[str], max_ids: int) -> dict[str, dict[str, str]]:
    """language -> id -> answer sentence (the gold sentence, exactly as the evaluation reads it)."""
    from hbt_accel.data import lareqa_training_rows, load_lareqa_benchmark

    benchmark = load_lareqa_benchmark("mlqa-r", languages=languages or None, data_dir=data_dir or None)
    rows = list(lareqa_training_rows(benchmark, hard_negatives=False))
    kept = set(list(dict.fromkeys(row["id"] for row in rows))[: max_ids or None])  # the first ids, in file order
    answers: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["id"] in kept:
            answers.setdefault(row["lang"], {})[row["id"]] = row["positive"]
    return answers


def pair_row(first: dict[str, str], second: dict[str, str], vectors: dict[str, np.ndarray]) -> dict | None:
    """Bitext retrieval between two languages' answers of their shared ids."""
    shared = sorted(set(first) & set(second))
    if len(shared) < 2:
        return None
    a = np.stack([vectors[first[i]] for i in shared])  # (n, d)
    b = np.stack([vectors[second[i]] for i in shared])  # (n, d)
    scores = a @ b.T  # (n, n) cosines
    diagonal = np.diag(scores)
    off_diagonal = (scores.sum() - diagonal.sum()) / (len(shared) ** 2 - len(shared))
    lengths = np.array([len(second[i]) / max(len(first[i]), 1) for i in shared])
    return {
        "ids": len(shared),
        "p_at_1_forward": float(np.mean(scores.argmax(axis=1) == np.arange(len(shared)))),
        "p_at_1_backward": float(np.mean(scores.argmax(axis=0) == np.arange(len(shared)))),
        "cosine_same_id": float(diagonal.mean()),
        "cosine_other_ids": float(off_diagonal),
        "median_length_ratio": float(np.median(lengths)),
    }


def section(args: argparse.Namespace, precision: str, rows: dict[str, dict]) -> list[str]:
    """The pairs as a markdown table, then the share of same-id answers found as each other's nearest neighbour."""
    from report import invocation

    lines = [
        "## Are an MLQA-R id's answers in two languages translations? (issue 14, passage alignment)",
        "",
        f"`{invocation()}`, model `{args.model}`, {precision} encoding: for each language pair, over "
        "the ids with an answer in both, the answer in one language retrieves the other among all of that "
        "language's answers of those ids.",
        "",
        "| pair | ids | P@1 -> | P@1 <- | cosine same id | cosine other ids | median length ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, row in rows.items():
        lines.append(
            f"| {pair} | {row['ids']:,} | {row['p_at_1_forward']:.3f} | {row['p_at_1_backward']:.3f} | "
            f"{row['cosine_same_id']:.3f} | {row['cosine_other_ids']:.3f} | {row['median_length_ratio']:.2f} |"
        )
    total = sum(row["ids"] for row in rows.values())
    found = sum(row["ids"] * (row["p_at_1_forward"] + row["p_at_1_backward"]) / 2 for row in rows.values())
    lines += [
        "",
        f"Over all {len(rows)} pairs ({total:,} id pairs), P@1 averaged over both directions: "
        f"{found / max(total, 1):.3f}.",
    ]
    return lines


def main(argv=None) -> None:
    from report import publish

    from hbt_accel.evaluation.encoding import encode_texts
    from hbt_accel.models.dual_encoder import DualEncoder
    from hbt_accel.models.precision import evaluation_precision

    args = parse_args(argv)
    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    answers = answers_by_language(args.data_dir, languages, args.max_ids)
    pairs = [
        (first, second)
        for first, second in itertools.combinations(sorted(answers), 2)
        if len(answers[first].keys() & answers[second].keys()) >= 2
    ]
    if not pairs:
        from hbt_accel.errors import DataError

        raise DataError("--languages / --max_ids: no language pair shares two or more ids; nothing to compare")
    texts = sorted({text for by_id in answers.values() for text in by_id.values()})
    choice = evaluation_precision(args.precision)
    print(f"precision: {choice.reason}", flush=True)
    encoder = DualEncoder.from_pretrained(args.model)
    vectors = dict(zip(texts, encode_texts(encoder, texts, "passage", bf16=choice.bf16)))  # text -> (d,)

    rows = {f"{first}-{second}": pair_row(answers[first], answers[second], vectors) for first, second in pairs}
    publish(args.docs_dir, "translation_check", section(args, choice.label, rows))
    if args.output:
        from hbt_accel.atomic import write_json

        write_json(args.output, {"model": args.model, "precision": choice.label, "pairs": rows})


if __name__ == "__main__":
    from report import run_benchmark

    run_benchmark(main)
