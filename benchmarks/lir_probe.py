"""Does removing language directions from the embeddings help the multilingual pool? (issue 14, item 4)

    python benchmarks/lir_probe.py --model runs/sweeps/beyond_paper/sampling-hybrid__seed-1

A probe, not a feature: the model's embeddings of MLQA-R validation (`mlqa-r:validation`) are encoded once, then
scored as they are and after each projection below, with a paired bootstrap interval against "as they are". The
directions are estimated on sentences of the training split (`mlqa-r:train`) outside the paragraphs of the scored
questions, so never on a scored candidate.

- per language, rank r (LIR, Yang et al., EMNLP 2021): the top-r right singular vectors of one language's passage
  embeddings (uncentred, so the language's mean direction is the first) are projected out of that language's
  embeddings. This needs each text's language at inference: fine for LAReQA, not a sentence-transformers head.
- shared, rank r: the top-r principal directions of the seven language means (centred on their mean) are projected
  out of every embedding, whatever its language: one linear map, what a `Dense` head could ship.

Embeddings are re-normalised after a projection. The result is written to the `lir_probe` section of docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from report import invocation, publish, run_benchmark

from hbt_accel.models.precision import EVAL_PRECISION_HELP, EVAL_PRECISIONS

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="model folder or 'embedded'")
    parser.add_argument("--benchmark", default="mlqa-r:validation", help="what is scored (never XQuAD-R here)")
    parser.add_argument("--directions_from", default="mlqa-r:train", help="whose passages the directions come from")
    parser.add_argument("--passages_per_language", type=int, default=1000, help="passages per language, spread evenly")
    parser.add_argument("--ranks", default="1,2,4,8", help="directions removed, per language or shared")
    parser.add_argument("--precision", default="auto", choices=EVAL_PRECISIONS, help=EVAL_PRECISION_HELP)
    parser.add_argument("--docs_dir", default=str(REPO / "docs"), help="write the table here ('' = print only)")
    return parser.parse_args(argv)


def normalized(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def top_directions(vectors: np.ndarray, rank: int) -> np.ndarray:
    """(rank, d) orthonormal: the top right singular vectors of `vectors` (n, d)."""
    return np.linalg.svd(vectors, full_matrices=False)[2][:rank]


def project_out(vectors: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """`vectors` (n, d) without their components along the orthonormal rows of `directions`, re-normalised."""
    return normalized(vectors - (vectors @ directions.T) @ directions)


def text_languages(encoded) -> tuple[np.ndarray, np.ndarray]:
    """(language index of every query, of every candidate) of an EncodedBenchmark."""
    counts = np.diff(encoded.candidate_offsets)
    return encoded.query_language, np.repeat(np.arange(len(encoded.languages)), counts)


def per_language(encoded, directions: dict[str, np.ndarray]):
    """The EncodedBenchmark with each text's own language's directions projected out."""
    query_language, candidate_language = text_languages(encoded)
    queries, candidates = encoded.query_embeddings.copy(), encoded.candidate_embeddings.copy()
    for j, language in enumerate(encoded.languages):
        queries[query_language == j] = project_out(queries[query_language == j], directions[language])
        candidates[candidate_language == j] = project_out(candidates[candidate_language == j], directions[language])
    return dataclasses.replace(encoded, query_embeddings=queries, candidate_embeddings=candidates)


def shared(encoded, directions: np.ndarray):
    """The EncodedBenchmark with the same directions projected out of every text."""
    return dataclasses.replace(
        encoded,
        query_embeddings=project_out(encoded.query_embeddings, directions),
        candidate_embeddings=project_out(encoded.candidate_embeddings, directions),
    )


def estimation_passages(name: str, count: int) -> dict[str, list[str]]:
    """language -> `count` sentences spread evenly over that language's pool, leaving out every paragraph that holds
    a held-out question: those sentences are the candidates being scored (a `:train` split keeps the whole pool)."""
    from hbt_accel.data import is_validation_id, load_lareqa_benchmark

    samples = {}
    for lang, pool in load_lareqa_benchmark(name).pools.items():
        scored = {pool.context_of[g] for q, g in zip(pool.question_ids, pool.gold) if is_validation_id(q)}
        kept = [text for text, paragraph in zip(pool.candidates, pool.context_of) if paragraph not in scored]
        if not kept:
            raise SystemExit(f"--directions_from {name}: no {lang} sentences outside the held-out paragraphs")
        samples[lang] = [kept[i] for i in np.linspace(0, len(kept) - 1, min(count, len(kept))).astype(int)]
    return samples


def main(argv=None) -> None:
    from hbt_accel.data import article_of_question, load_lareqa_benchmark
    from hbt_accel.evaluation import encode_benchmark, score_encoded
    from hbt_accel.evaluation.schema import HEADLINE_KEYS
    from hbt_accel.evaluation.statistics import paired_difference, resampling_units
    from hbt_accel.models.dual_encoder import DualEncoder
    from hbt_accel.models.precision import evaluation_precision

    args = parse_args(argv)
    choice = evaluation_precision(args.precision)
    print(f"precision: {choice.reason}", flush=True)
    started = time.perf_counter()
    encoder = DualEncoder.from_pretrained(args.model)
    benchmark = load_lareqa_benchmark(args.benchmark)
    samples = estimation_passages(args.directions_from, args.passages_per_language)
    missing = [lang for lang in benchmark.languages if lang not in samples]
    if missing:  # checked before any encoding
        raise SystemExit(f"--directions_from {args.directions_from}: no passages in {', '.join(missing)}")
    encoded = encode_benchmark(encoder, benchmark, bf16=choice.bf16)
    passages = {lang: encoder.encode(samples[lang], kind="passage", bf16=choice.bf16) for lang in encoded.languages}

    ranks = [int(r) for r in args.ranks.split(",")]
    # one SVD per language (and one of the means) at the largest rank; a smaller rank is its leading rows
    per_language_directions = {lang: top_directions(vectors, max(ranks)) for lang, vectors in passages.items()}
    means = np.stack([passages[lang].mean(axis=0) for lang in encoded.languages])  # (L, d)
    shared_directions = top_directions(means - means.mean(axis=0), len(means) - 1)  # L centred means: L - 1 at most
    variants = {"as encoded": encoded}
    for rank in ranks:
        directions = {lang: found[:rank] for lang, found in per_language_directions.items()}
        variants[f"per language (LIR), rank {rank}"] = per_language(encoded, directions)
        if rank < len(means):
            variants[f"shared, rank {rank}"] = shared(encoded, shared_directions[:rank])

    scored = {}
    for name, variant in variants.items():
        per_query = []
        scored[name] = (score_encoded(variant, per_query=per_query), per_query[0])
    baseline = scored["as encoded"][1]
    article_of, resampled = resampling_units(baseline, article_of_question(benchmark))
    rows = []
    for name, (results, scores) in scored.items():
        gap = paired_difference(scores, baseline, article_of=article_of) if name != "as encoded" else None
        cells = [f"{results[key]:.3f}" if key != "rank_distance" else f"{results[key]:.0f}" for key in HEADLINE_KEYS]
        multi = gap["multi_map"] if gap else None
        cells.append(f"{multi['difference']:+.3f} [{multi['low']:+.3f}, {multi['high']:+.3f}]" if multi else "")
        rows.append("| " + " | ".join([name, *cells]) + " |")
        print(rows[-1], flush=True)
    write(args, encoded, rows, resampled, time.perf_counter() - started)


def write(args, encoded, rows: list[str], resampled: str, seconds: float) -> None:
    command = invocation()
    body = [
        "## Language-information removal probe (issue 14)",
        "",
        f"`{command.strip()}` on {time.strftime('%Y-%m-%d')}, {seconds:.0f} s: {len(encoded.query_ids):,} "
        f"{args.benchmark} queries ({len(set(encoded.query_ids)):,} question ids) in {len(encoded.languages)} "
        "languages; directions from "
        f"{args.passages_per_language} {args.directions_from} passages per language, {encoded.precision} encoding. "
        f"One model, so the interval covers the questions only (paired bootstrap over {resampled}, 1000 "
        "resamples), not training seeds.",
        "",
        "| embeddings | mono | cross | multi | rank distance | multi minus as encoded [95% CI] |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish(args.docs_dir, "lir_probe", body)


if __name__ == "__main__":
    run_benchmark(main)
